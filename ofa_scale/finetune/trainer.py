"""The finetuning trainer: the pretraining Trainer with a task's workload, validation and the best checkpoint.

    ofa-train --config configs/finetune/caption_stage1_base.yaml      (task.name set → this trainer)

What it adds to `training.trainer.Trainer` (through its hooks, never a copy of the loop):
* `make_workload`: `FinetuneWorkload` (finetune/workload.py): the task's examples over data.train in exact epochs;
* `evaluation_due`: every `task.valid_interval` updates, at the end of each epoch and at the last update;
* `evaluate`: the task's decoding preset and metric over data.valid (first `task.valid_limit` records), through
  the shared driver (finetune/evaluate.py), data-parallel with lockstep generation; with EMA on, on the EMA
  weights. Metrics are logged as `valid/<metric>` (metrics.jsonl, mlflow). When the main metric improves, the
  checkpoint of that update is written (once: the regular save of the same update reuses it) and the atomic
  `checkpoints/best` pointer and RUN_DIR/best.json move to it (finetune/best.py);
* EMA (finetune/ema.py): updated after every optimizer step from `train.ema_start`, stored in every checkpoint;
* SCST (task.criterion = scst): the update is finetune/scst.py's step instead of the cross-entropy step;
* prompt tuning (model.prompt_tuning): every checkpoint also gets its prompt checkpoint, the tuned parameters alone
  with the base model's path and content hash (finetune/prompt_checkpoint.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

from ofa_scale.errors import UserError
from ofa_scale.finetune.best import BestRecord, improves, publish_best
from ofa_scale.training.checkpoint import tag_for
from ofa_scale.training.trainer import Trainer


# This rank's share of the validation images is kept between validations up to this size (uint8 pixels); a larger
# share is decoded again at each validation instead of holding host memory for the whole run.
VALID_CACHE_BYTES = 1 << 30


class FinetuneTrainer(Trainer):
    def make_workload(self):
        from ofa_scale.finetune.workload import FinetuneWorkload

        return FinetuneWorkload(self.cfg)

    # ---- build ---------------------------------------------------------------------------------------------
    def build(self) -> None:
        super().build()
        from ofa_scale.parallel import collectives

        self.task = self.workload.task
        self.valid_items = None  # this rank's share of data.valid, kept after the first validation
        self.saved_at: Optional[int] = None
        self.saved_dir = None
        self._shapes = None
        self.ema = self._build_ema()
        self.scst = self._build_scst()
        self.scst_stats = None
        best = BestRecord.load(self.run.root, self.task.main_metric) if self.is_main else None
        self.best: Optional[BestRecord] = collectives.broadcast_object(best, 0)

    def _build_ema(self):
        """The EMA of the weights (train.ema_decay > 0), restored from the checkpoint on a resume: the rank's own
        shadows under the same layout, the layout-free EMA copy under another."""
        if self.cfg.train.ema_decay <= 0:
            return None
        from ofa_scale.finetune.ema import EMA
        from ofa_scale.finetune.ema_store import has_ema_copy, load_ema_copy
        from ofa_scale.training.checkpoint import load_rank_state

        ema = EMA(self.engine.module, decay=self.cfg.train.ema_decay, start=self.cfg.train.ema_start)
        point = self.point
        if point is not None:
            if self._same_layout(point):
                state = load_rank_state(point, self.rank).get("ema")
                if state is None:
                    raise UserError(f"{point.tag_dir} holds no EMA state but train.ema_decay is "
                                    f"{self.cfg.train.ema_decay}; resume with the run's original train.ema_decay")
                ema.load_state_dict(state)
            elif has_ema_copy(point.tag_dir):
                load_ema_copy(self.ctx, ema, point.tag_dir)
            else:
                raise UserError(f"{point.tag_dir} holds no EMA weights but train.ema_decay is "
                                f"{self.cfg.train.ema_decay}; resume with the run's original train.ema_decay")
        return ema

    # ---- prompt tuning: trained-only checkpoints on a hash-checked base (finetune/prompt_checkpoint.py) --------
    @property
    def trained_only(self) -> bool:
        """Prompt tuning: checkpoints hold the tuned parameters (and their Adam moments) alone; a resume rebuilds
        the frozen base from the path the run recorded, after checking its hash (`load_pretrained`)."""
        return self.cfg.model.prompt_tuning.enabled

    def load_pretrained(self, model) -> None:
        if not self.cfg.model.prompt_tuning.enabled:
            return super().load_pretrained(model)
        from ofa_scale.finetune.prompt_checkpoint import agreed_base
        from ofa_scale.training.workload import load_pretrained_weights

        self.prompt_base = agreed_base(self.cfg.model.pretrained, self.point.tag_dir if self.point else None,
                                       is_main=self.is_main)
        if self.is_main:
            print(f"ofa-train: prompt tuning ({self.cfg.model.prompt_tuning.kind}) on the frozen base "
                  f"{self.prompt_base['resolved']} (sha256 {self.prompt_base['sha256'][:16]}…)", flush=True)
        # the exact files just hashed (a run given as model.pretrained may have moved its best checkpoint since)
        load_pretrained_weights(model, self.prompt_base["resolved"], self.workload.model_config, self.ctx,
                                seed=self.cfg.train.seed)
    # ---- end prompt tuning

    def step(self, step: int) -> dict[str, Any]:
        record = super().step(step)
        if self.ema is not None:
            self.ema.update(step)
        if self.scst_stats is not None:
            record["scst/reward"] = self.scst_stats.reward
            record["scst/hypotheses"] = self.scst_stats.hypotheses
        return record

    def _build_scst(self):
        """(settings, reward, decode) of the SCST step (task.criterion = scst), else None: caption stage 2's
        CIDEr-D, or the task's own parts (image_gen: CLIP on decoded pictures)."""
        if self.cfg.task.criterion != "scst":
            return None
        # ---- image_gen CLIP-SCST (finetune/image_gen.py): the task supplies settings, reward and decode
        if hasattr(self.task, "scst_parts"):
            return self.task.scst_parts(self.device)
        # ---- end image_gen
        from ofa_scale.finetune.scst import CiderReward, ScstSettings
        from ofa_scale.parallel import collectives

        settings = ScstSettings.from_task(self.cfg.task)
        df = self.cfg.task.cider_df
        if not df:
            # no cache given: the document frequencies of data.train's references (OFA's coco-train-words.p),
            # counted once on rank 0 from the shards' JSON (no image is decoded) and sent to every rank
            from ofa_scale.evaluation.cider_df import build_document_frequencies, shard_captions

            counted = None
            if self.is_main:
                try:
                    counted = build_document_frequencies(shard_captions(self.cfg.data.train))
                except UserError as e:  # every rank must stop, not only the one that read the shards
                    counted = str(e)
            df = collectives.broadcast_object(counted, 0)
            if isinstance(df, str):
                raise UserError(df)
        return settings, CiderReward(df), self.task.decode_text

    def forward_backward(self, step: int, micro_batches: list, to_inputs, acc) -> None:
        if self.scst is None:
            return super().forward_backward(step, micro_batches, to_inputs, acc)
        from ofa_scale.finetune.evaluate import lockstep_all_ranks
        from ofa_scale.finetune.scst import run_scst_step

        settings, reward, decode = self.scst
        self.scst_stats = run_scst_step(
            self.engine, self.ctx, micro_batches, model=self.engine.module.model, to_inputs=to_inputs,
            settings=settings, reward=reward, decode=decode, acc=acc,
            lockstep=lockstep_all_ranks if self.launch.world_size > 1 else None)

    def rank_state(self) -> dict[str, Any]:
        state = super().rank_state()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def write_checkpoint_extra(self, tag_dir, step: int) -> None:
        super().write_checkpoint_extra(tag_dir, step)
        if self.ema is not None:
            from ofa_scale.finetune.ema_store import write_ema_copy
            from ofa_scale.parallel.canonical import full_shapes

            if self._shapes is None:
                self._shapes = full_shapes(self.workload.model_config)
            write_ema_copy(self.ctx, self.ema, tag_dir, self._shapes, step, trained_only=self.trained_only)
        if self.cfg.model.prompt_tuning.enabled:  # the tuned parameters alone, from the layout-free copy
            from ofa_scale.finetune.prompt_checkpoint import write_prompt_checkpoint
            from ofa_scale.parallel import collectives

            collectives.barrier()  # every rank's slices of the copy are on disk
            if self.is_main:
                write_prompt_checkpoint(tag_dir, method=self.cfg.model.prompt_tuning.kind, base=self.prompt_base,
                                        model_config=self.workload.model_config, step=step)

    # ---- hooks ---------------------------------------------------------------------------------------------
    def evaluation_due(self, step: int) -> bool:
        interval = self.cfg.task.valid_interval
        return (step == self.cfg.train.steps or step % self.workload.steps_per_epoch == 0
                or (interval > 0 and step % interval == 0))

    def evaluate(self, step: int) -> dict[str, float]:
        from ofa_scale.finetune.evaluate import evaluate, read_items, summary_line

        cfg = self.cfg
        items = self.valid_items or read_items(self.task, cfg.data.valid, limit=cfg.task.valid_limit,
                                               dp_rank=self.ctx.dp_rank, dp_size=self.layout.dp,
                                               fraction=cfg.task.valid_fraction)
        if sum(it.image.numel() for _, it in items[0]) <= VALID_CACHE_BYTES:
            self.valid_items = items  # decoded once, reused by every later validation
        model = self.engine.module.model  # the OFAModel inside GroupsForward (pp = 1 for finetuning)
        self._share_batchnorm_statistics(model)
        with self._eval_weights():
            result = evaluate(self.task, model, cfg.data.valid, device=self.device, dtype=self.dtype,
                              limit=cfg.task.valid_limit, dp_rank=self.ctx.dp_rank, dp_size=self.layout.dp,
                              dp_group=self.ctx.dp_group, lockstep=self.launch.world_size > 1,
                              items=items)
        # ---- image_gen: the validation pictures and their contact sheet, logged to mlflow (finetune/image_gen.py)
        if self.is_main and hasattr(self.task, "write_artifacts"):
            folder = self.run.root / "valid_images" / tag_for(step)
            for path in self.task.write_artifacts(folder, result.predictions, result.items):
                if self.tracker is not None:
                    self.tracker.log_artifact(path, path.parent.relative_to(self.run.root).as_posix())
        # ---- end image_gen
        metric = self.task.main_metric  # one of task.metrics (checked by the workload)
        value = result.metrics[metric]
        moved = False
        if improves(self.best, value):
            if self.save(step) is not None:
                self.best = BestRecord(tag_for(step), step, metric, value)
                if self.is_main:
                    publish_best(self.run.root, self.best)
                moved = True
        if self.is_main:
            note = f"; best → {tag_for(step)}" if moved else (f"; best {self.best.value:.4f} at step {self.best.step}"
                                                               if self.best else "")
            print(f"ofa-train: validation at step {step}: {summary_line(self.task, result.metrics)} "
                  f"({result.samples} samples, {result.seconds:.1f}s){note}", flush=True)
        return {f"valid/{k}": v for k, v in result.metrics.items()}

    def _share_batchnorm_statistics(self, model) -> None:
        """Every data-parallel rank validates with data-parallel rank 0's BatchNorm statistics (the ones
        checkpoints keep), as DDP's buffer broadcast gives OFA: without it each rank's share of the validation set
        would see different running statistics."""
        from ofa_scale.parallel import collectives
        from ofa_scale.parallel.canonical import named_statistics

        if self.layout.dp == 1:
            return
        src = collectives.group_rank_to_global(self.ctx.dp_group, 0)
        for _, buf in named_statistics(model):
            collectives.broadcast(buf, src=src, group=self.ctx.dp_group)

    def _eval_weights(self):
        """Validation runs on the EMA weights when EMA is on."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def save(self, step: int):
        """One checkpoint per update: validation may already have written this update's."""
        if self.saved_at == step:
            return self.saved_dir
        self.saved_dir = super().save(step)
        self.saved_at = step
        return self.saved_dir
