"""The trainer: one object, build → step → evaluate → save, that pretraining and every finetuning recipe use.

    trainer = Trainer(cfg, run_dir, resume=True)
    summary = trainer.fit()          # build(); for each step: step(); evaluate() when due; save() when due

A recipe extends it by overriding the hooks it needs (`make_workload`, `evaluation_due`, `evaluate`,
`forward_backward`, `rank_state`, `write_checkpoint_extra`; ofa_scale/finetune/trainer.py), never by copying
the loop. What each part owns:

* process groups: `collectives.init_default_group` (the NCCL/gloo policy), then DeepSpeed and megatron-core;
* the model: `prepare.prepare_model` (layout shard, initial weights, dtype, checkpointing, compilation);
* the step: `step.run_step` / `pipeline_step.run_pipeline_step` (loss normalisation, backward, engine.step);
* checkpoints: `checkpoint.save_checkpoint` plus the layout-free copy (`layout_resume`);
* logging: metrics.jsonl and the console line on rank 0 (`metrics`), mlflow (`mlflow_logger`).

Non-finite steps: DeepSpeed's ZeRO optimizers skip a step whose gradient norm is not finite (counted in
`skipped_steps`); the trainer also counts a step whose loss or gradient norm is not finite, stops the run after
`train.max_nonfinite_steps` of them in a row (one sentence, non-zero exit), and never writes a checkpoint from non-finite
weights, so `latest` and pruning always keep a finite checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.parallel import collectives
from ofa_scale.parallel.layout import validate_layout
from ofa_scale.training.checkpoint import (ResumePoint, choose_resume_point, load_rank_state, rng_state,
                                           save_checkpoint, set_rng_state)
from ofa_scale.training.config import TrainingConfig, check_world
from ofa_scale.training.memory import MemoryMeter
from ofa_scale.training.metrics import MetricsFile, StepTimer, TaskAccumulator, console_line
from ofa_scale.training.run_dir import RunDir, open_run_dir
from ofa_scale.training.stop import StopRequest
from ofa_scale.training.zero3_master import share_fp32_master
from ofa_scale.utils.config import flatten
from ofa_scale.utils.malloc import bound_heap_growth, release_free_memory

class NonFiniteTraining(UserError):
    """The run produced too many non-finite steps in a row."""


@dataclasses.dataclass
class Launch:
    """What the launcher tells this process (read once, before any process group exists)."""

    world_size: int
    rank: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "Launch":
        env = os.environ
        return cls(world_size=int(env.get("WORLD_SIZE", "1")), rank=int(env.get("RANK", "0")),
                   local_rank=int(env.get("LOCAL_RANK", "0")))


def plan(cfg: TrainingConfig, world_size: int, workload=None):
    """Everything that can fail because of the user, before any process group: batch arithmetic, tokenizer,
    shards, model config, objective composition, parallel layout. Returns (workload, layout, grad_accum)."""
    from ofa_scale.training.pipeline_step import pipeline_micro_batches

    grad_accum = check_world(cfg, world_size)
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 kernels); "
                          "use precision=bf16 or fp32 on CPU")
    workload = workload or default_workload(cfg)
    # parallel.micro_batches (the pipeline schedule length) is the gradient accumulation the batch sizes imply;
    # a pipeline runs each group (vl, aux) of a loader micro-batch as its own micro-batch (pipeline_step.py)
    schedule = grad_accum
    if cfg.parallel.pp > 1:
        schedule = pipeline_micro_batches(grad_accum, len(workload.composition().group_sizes()))
    parallel = dataclasses.replace(cfg.parallel, micro_batches=schedule)
    layout = validate_layout(parallel, workload.model_config, world_size)
    return workload, layout, grad_accum


def default_workload(cfg: TrainingConfig):
    """A finetuning recipe's workload when task.name is set, else OFA multitask pretraining."""
    if cfg.finetuning:
        from ofa_scale.finetune.workload import FinetuneWorkload

        return FinetuneWorkload(cfg)
    from ofa_scale.training.workload import OFAPretraining

    return OFAPretraining(cfg)


class Trainer:
    """See the module docstring. Subclasses (finetuning recipes) override the hooks below."""

    def __init__(self, cfg: TrainingConfig, run_dir: str | Path, resume: bool = False,
                 stop_after: Optional[int] = None, stop: Optional[StopRequest] = None):
        self.cfg = cfg
        self.launch = Launch.from_env()
        self.stop = stop or StopRequest(stop_after)
        self.stop.stop_after = stop_after if stop_after is not None else self.stop.stop_after
        self.workload, self.layout, self.grad_accum = plan(cfg, self.launch.world_size, self.make_workload())
        # the workload may resolve derived values (finetuning: train.steps from train.epochs)
        self.cfg = cfg = self.workload.cfg
        # rank 0 holds RUN_DIR/train.lock for the run's life: a second trainer on the same run dir is refused
        self.run_lock = RunDir(Path(run_dir)).lock() if self.launch.rank == 0 else None
        self.run, self.point = open_run_dir(run_dir, resume)
        if self.point is not None:
            self._check_resume_compatible(self.point, final=False)
        self.engine = None
        self.tracker = None
        self.metrics_file: Optional[MetricsFile] = None
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.memory = MemoryMeter()

    # ---- hooks for recipes ---------------------------------------------------------------------------------------
    def make_workload(self):
        """What is trained (data, objectives, model config); None = OFA multitask pretraining."""
        return None

    def evaluate(self, step: int) -> dict[str, float]:
        """Validation metrics at `step` (pretraining has none); called on every rank, logged by rank 0."""
        return {}

    def evaluation_due(self, step: int) -> bool:
        return False

    # Checkpoints hold only the parameters that train (DeepSpeed's files and the layout-free copy); the frozen rest
    # is rebuilt from model.pretrained on a resume, through `load_pretrained`. Prompt tuning sets it.
    trained_only = False

    def load_pretrained(self, model: torch.nn.Module) -> None:
        """model.pretrained's weights into the freshly built model (also under a trained-only checkpoint's)."""
        self.workload.load_pretrained_into(model, self.ctx)

    def forward_backward(self, step: int, micro_batches: list, to_inputs, acc: TaskAccumulator) -> None:
        """Forward, loss, backward and engine.step() over this rank's micro-batches of one update (pp = 1)."""
        from ofa_scale.training.step import run_step

        # fairseq hands the criterion the number of updates done before this one (0 on the first step)
        run_step(self.engine, self.ctx, micro_batches, self.workload.groups, to_inputs, self.loss_settings, acc,
                 drop_worst_ratio=self.cfg.objectives.drop_worst_ratio_at(step - 1))

    # ---- build ---------------------------------------------------------------------------------------------------
    def build(self) -> None:
        """Process groups, model, engine, loader, run directory and tracking."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from ofa_scale.parallel import setup_parallel

        cfg, launch = self.cfg, self.launch
        if bounds_heap(cfg):  # before the model exists (utils/malloc.py)
            bound_heap_growth()
        accel = get_accelerator()
        self.on_cpu = accel.device_name() == "cpu"
        if launch.world_size == 1 and "MASTER_ADDR" not in os.environ:
            # a plain `python -m ofa_scale.train`: a one-process group, so the same code path runs everywhere
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        if not self.on_cpu:
            accel.set_device(launch.local_rank)
        collectives.init_default_group(accel.device_name())  # before DeepSpeed, which then reuses it
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False)
        self.ctx = setup_parallel(self.layout, seed=cfg.train.seed)
        if self.point is not None:
            # every rank verifies the checkpoint files against their manifest before anything is loaded, and
            # falls back to the newest intact step together (one warning line on rank 0)
            self.point = choose_resume_point(self.run.checkpoints)
            if self.point is not None:
                self._check_resume_compatible(self.point)
        self.rank = collectives.rank()
        self.is_main = self.rank == 0
        _quiet_other_ranks(self.is_main)
        self.device = torch.device("cpu" if self.on_cpu else accel.device_name(accel.current_device()))
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

        self._build_engine()
        self._build_loader()
        self._open_outputs()

    def _build_engine(self) -> None:
        import deepspeed

        from ofa_scale.training.ds_config import build_ds_config
        from ofa_scale.training.layout_resume import (load_canonical_optimizer, load_canonical_weights)
        from ofa_scale.training.pipeline_step import PipelineLoss, pipeline_ds_overrides
        from ofa_scale.training.prepare import prepare_model
        from ofa_scale.training.schedule import schedule_from_config, scheduler_factory
        from ofa_scale.training.step import GroupsForward, LossSettings
        from ofa_scale.training.trained_only_load import trained_only_loader

        cfg, ctx, layout, point, workload = self.cfg, self.ctx, self.layout, self.point, self.workload
        self.loss_settings = LossSettings(epsilon=cfg.objectives.label_smoothing, pad=workload.pad,
                                          per_group=cfg.objectives.loss_normalization == "per_group",
                                          log_end=cfg.objectives.encouraging_log_end,
                                          all_layers=workload.model_config.mue)  # MuE's all-layer loss
        self.pipeline_loss = PipelineLoss(ctx, self.loss_settings) if layout.pp > 1 else None
        # DeepSpeed's own files resume the same layout exactly; another layout resumes from the layout-free copy
        self.from_canonical = point is not None and not self._same_layout(point)
        ds_config = build_ds_config(cfg, layout.dp, self.grad_accum, self.on_cpu)
        pretrained = (lambda m: self.load_pretrained(m)) if cfg.model.pretrained else None
        # a trained-only checkpoint (see `trained_only`) holds no frozen weights: they come from model.pretrained
        base = pretrained if self.trained_only else None
        fill = (lambda m: load_canonical_weights(point.tag_dir, ctx, m, base=base)) if self.from_canonical else None
        self.model = prepare_model(cfg, ctx, workload.model_config, seed=cfg.train.seed, device=self.device,
                                   dtype=self.dtype, fill=fill, pretrained=pretrained,
                                   pipeline_loss=self.pipeline_loss, pipeline_shapes=workload.pipeline_shapes(),
                                   ds_config=ds_config)
        self.memory.mark("model built")
        torch.manual_seed(cfg.train.seed + 1 + ctx.dp_rank)  # per-data-rank dropout streams

        if layout.pp > 1:
            ds_config = pipeline_ds_overrides(ds_config, layout.dp, layout.micro_batches)
            wrapped = self.model  # the PipelineModule runs its stages itself (engine.train_batch)
        else:
            wrapped = GroupsForward(self.model)
        self.ds_config = ds_config
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=wrapped, model_parameters=[p for p in wrapped.parameters() if p.requires_grad], config=ds_config,
            lr_scheduler=scheduler_factory(schedule_from_config(cfg)), mpu=ctx.mpu if layout.pp == 1 else None)
        share_fp32_master(self.engine)  # before any load: the masters and parameters then hold the same values
        release_free_memory()  # DeepSpeed copied every parameter into flat buffers and freed the originals
        if self.from_canonical:
            load_canonical_optimizer(point.tag_dir, ctx, self.engine, self.lr_scheduler)
        elif point is not None:
            # a trained-only checkpoint loads non-strictly: its loader checks it holds exactly what trains
            custom = trained_only_loader(point.tag_dir) if self.trained_only else None
            self.engine.load_checkpoint(str(self.run.checkpoints), tag=point.tag,
                                        load_module_strict=not self.trained_only, custom_load_fn=custom,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)
        if point is not None:
            self._apply_current_schedule()
        if point is not None and self._same_layout(point):
            set_rng_state(load_rank_state(point, self.rank)["rng"])
        self.memory.mark("engine built")

    def _apply_current_schedule(self) -> None:
        """The learning-rate schedule always follows the current config. A checkpoint restores the scheduler's
        state, including the schedule it was written with; when train.steps (or the schedule) changed since, the
        decay is recomputed for the new length from the resumed step on, instead of running the extra steps at
        the old schedule's final rate."""
        from ofa_scale.training.schedule import schedule_from_config

        sched = self.lr_scheduler
        current = schedule_from_config(self.cfg)
        sched.lr_lambdas = [current for _ in sched.lr_lambdas]
        sched.base_lrs = [current.peak_lr for _ in sched.base_lrs]
        factor = current(sched.last_epoch)
        for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
            group["lr"] = base * factor
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    def _build_loader(self) -> None:
        self.loader = self.workload.build_loader(dp_rank=self.ctx.dp_rank, dp_size=self.layout.dp)
        self.start_step = 0
        self.mlflow_run_id = None
        if self.point is not None:
            self.loader.load_state_dict(self.point.record["loader_state"])
            self.start_step = self.point.step
            self.mlflow_run_id = self.point.mlflow_run_id
        self.batches = iter(self.loader)

    def _open_outputs(self) -> None:
        cfg, run = self.cfg, self.run
        failure: Optional[str] = None
        if self.is_main:
            try:
                run.root.mkdir(parents=True, exist_ok=True)
                run.write_config(cfg.to_dict())
                run.write_json(run.ds_config, self.ds_config)
                run.write_json(run.layout, self.layout.to_dict())
                self.metrics_file = MetricsFile(run.metrics)
                self.metrics_file.truncate_after(self.start_step if self.point is not None else None)
                self.tracker = self._start_mlflow()
            except UserError as e:
                failure = str(e)
        # Rank 0 alone talks to mlflow and writes the run directory; when that fails every rank must stop here
        # instead of waiting forever in the first collective of the step loop.
        failure = collectives.broadcast_object(failure, src=0)
        if failure is not None:
            if not self.is_main:
                raise SystemExit(2)  # rank 0 prints the one-line reason; hundreds of copies would bury it
            raise UserError(failure)
        if self.is_main:
            self.mlflow_run_id = self.tracker.run_id if self.tracker is not None else None
            print(f"ofa-train: {self.layout.describe()}, grad accumulation {self.grad_accum}, "
                  f"{'resuming at step ' + str(self.start_step) if self.start_step else 'starting'}; "
                  f"run dir {run.root}", flush=True)
            if self.tracker is not None:
                print(f"ofa-train: {self.tracker.describe()}", flush=True)

    # ---- step ----------------------------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns the step's record (same on every rank)."""
        from ofa_scale.training.pipeline_step import reduce_metrics, run_pipeline_step

        micro_batches = [next(self.batches) for _ in range(self.grad_accum)]
        acc = TaskAccumulator(self.workload.tasks)
        lr = float(self.lr_scheduler.get_last_lr()[0])
        to_inputs = self.workload.input_builder(step=step, dp_rank=self.ctx.dp_rank, dp_size=self.layout.dp,
                                                device=self.device, dtype=self.dtype)
        skipped_before = int(self.engine.skipped_steps)
        self.timer.start()
        if self.pipeline_loss is not None:
            run_pipeline_step(self.engine, self.ctx, micro_batches, self.workload.groups, to_inputs,
                              self.loss_settings, acc, self.pipeline_loss)
            reduce_metrics(acc)  # the last stage's numbers, now on every rank (rank 0 logs them)
        else:
            self.forward_backward(step, micro_batches, to_inputs, acc)
            acc.all_reduce(self.ctx.dp_group)
        dt = self.timer.stop()
        record = self._step_record(step, acc, lr, dt)
        finite = _finite(record["loss"]) and _finite(record.get("grad_norm"))
        record["skipped"] = (not finite) or int(self.engine.skipped_steps) > skipped_before
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        self.nonfinite_total += 0 if finite else 1
        record["nonfinite_steps"] = self.nonfinite_total
        record.update(self.loader_stats())
        record.update(self.memory.step_record())
        return record

    def loader_stats(self) -> dict[str, float]:
        stats = getattr(self.loader, "stats", None)
        if stats is None:
            return {}
        values = stats()
        if not isinstance(values, dict):
            return {}
        names = sorted(k for k, v in values.items() if isinstance(v, (int, float)))
        totals = collectives.reduce_sum_list([float(values[k]) for k in names], self.ctx.dp_group) if names else []
        return {k if k.startswith("data/") else f"data/{k}": int(v) for k, v in zip(names, totals)}

    def _step_record(self, step: int, acc: TaskAccumulator, lr: float, dt: float) -> dict[str, Any]:
        grad_norm = self.engine.get_global_grad_norm()
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = float(grad_norm)
        record: dict[str, Any] = {"step": step, "loss": acc.objective}
        record.update(acc.task_metrics())
        record.update({
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples_per_s": acc.rows / dt,
            "tokens_per_s": acc.input_tokens / dt,
            "skipped_steps": int(self.engine.skipped_steps),
            "step_time_s": dt,
        })
        mfu = self.workload.mfu(dt, collectives.world_size())
        if mfu is not None:
            record["mfu"] = mfu
        return record

    # ---- save ----------------------------------------------------------------------------------------------------
    def weights_finite(self) -> bool:
        """Collective: True when every rank's (local, partitioned) parameters are finite."""
        bad = False
        for p in self.engine.module.parameters():
            local = getattr(p, "ds_tensor", p)
            if local.numel() and not bool(torch.isfinite(local.detach()).all()):
                bad = True
                break
        return not collectives.any_rank(bad)

    def save(self, step: int) -> Optional[Path]:
        """Collective: a checkpoint at `step` (skipped, with a warning, when the weights are not finite)."""
        from ofa_scale.data.loader import merge_loader_states

        if not self.weights_finite():
            if self.is_main:
                print(f"ofa-train: warning: not checkpointing step {step}: the weights are not finite "
                      f"(latest stays at the last finite checkpoint)", flush=True)
            return None
        # Every data-parallel rank owns different streams; the merged state lets any world size dividing the
        # stream count resume (tp/pp peers hold identical loader states, so gathering over the world is harmless).
        states = collectives.all_gather_object(self.loader.state_dict())
        record = {
            "world_size": collectives.world_size(),
            "layout": self.layout.to_dict(),
            "mlflow_run_id": self.mlflow_run_id,
            "loader_state": merge_loader_states(states),
            "config": self.cfg.to_dict(),
            "finite": True,
        }
        tag_dir = save_checkpoint(
            self.engine, self.run.checkpoints, step, self.rank, self.rank_state(), record,
            keep=self.cfg.train.keep_checkpoints, write_extra=lambda d: self.write_checkpoint_extra(d, step),
            trained_only=self.trained_only)
        if self.is_main:
            print(f"ofa-train: checkpoint {tag_dir}", flush=True)
        return tag_dir

    def rank_state(self) -> dict[str, Any]:
        """What this rank stores in its checkpoint file (rank_XXXXX.pt); recipes add their per-rank state."""
        return {"rng": rng_state()}

    def write_checkpoint_extra(self, tag_dir: Path, step: int) -> None:
        """Collective: files added to a checkpoint before it is published (the layout-free copy)."""
        from ofa_scale.training.layout_resume import write_canonical

        write_canonical(self.ctx, self.engine, tag_dir, self.workload.model_config, step, self.lr_scheduler,
                        trained_only=self.trained_only)

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """build(), then steps to cfg.train.steps (or until a stop), checkpointing on the way."""
        self.build()
        try:
            return self._loop()
        finally:
            self.stop.restore()

    def _loop(self) -> dict[str, Any]:
        cfg = self.cfg
        self.timer = StepTimer(cfg.train.steps - self.start_step)
        last: dict[str, Any] = {}
        status = "FAILED"
        try:
            for step in range(self.start_step + 1, cfg.train.steps + 1):
                record = self.step(step)
                if self.evaluation_due(step):
                    record.update(self.evaluate(step))
                last = record
                self._log(record)
                if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteTraining(
                        f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm (last at "
                        f"step {step}); the run stops here — lower optim.lr or check the data, then resume from "
                        f"the last finite checkpoint with --resume")
                stopping = self.stop.after_step()
                if step % cfg.train.ckpt_interval == 0 or step == cfg.train.steps or stopping:
                    self.save(step)
                if stopping and step < cfg.train.steps:
                    if self.is_main:
                        print(f"ofa-train: stopping at step {step} ({self.stop.reason}); continue with --resume",
                              flush=True)
                    status = "KILLED"
                    self._write_status("stopped", step)
                    break
            else:
                status = "FINISHED"
                self._write_status("finished", cfg.train.steps)
        finally:
            # End the loader's worker processes now. They ignore SIGTERM (data/loader_workers.py), so at interpreter
            # exit multiprocessing's handler, which terminates and then joins daemonic children, would wait forever.
            batches = getattr(self, "batches", None)
            if batches is not None:
                batches.close()
            if self.metrics_file is not None:
                self.metrics_file.close()
            if self.tracker is not None:
                if status == "FINISHED":  # pictures of the run next to its metrics (a failure only warns)
                    from ofa_scale.evaluation.report import log_to_tracker

                    log_to_tracker(self.tracker, self.run.root)
                self.tracker.finish(status if status != "FAILED" else "KILLED" if _interrupted() else "FAILED")
        if self.is_main:
            peak = self.memory.summary()
            if peak:
                print(f"ofa-train: {peak}", flush=True)
            damage = {k[5:]: v for k, v in last.items() if k.startswith("data/") and k.count("/") == 1
                      and k[5:] in ("corrupt_shards", "truncated_shards", "skipped_samples", "missing_samples")}
            if damage:
                print("ofa-train: damaged data: " + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                             for k, v in sorted(damage.items())), flush=True)
        return {"steps": cfg.train.steps, "last": last, "run_dir": str(self.run.root),
                "checkpoint": str(self.run.checkpoints), "mlflow_run_id": self.mlflow_run_id}

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.metrics_file.append(record)
        if self.tracker is not None:
            self.tracker.log_metrics(record["step"], {k: v for k, v in record.items() if k != "step"})
        step = record["step"]
        if step % self.cfg.train.log_interval == 0 or step == self.cfg.train.steps or record.get("skipped"):
            print(console_line(record, self.cfg.train.steps, self.timer.eta_seconds(step - self.start_step)),
                  flush=True)

    def _write_status(self, state: str, step: int) -> None:
        """RUN_DIR/status.json: how the last invocation ended; the Slurm supervisor requeues only a 'stopped' run."""
        if self.is_main:
            from ofa_scale.utils.io import atomic_write_json

            atomic_write_json(self.run.root / "status.json", {"state": state, "step": step,
                                                              "steps": self.cfg.train.steps})

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _same_layout(self, point: ResumePoint) -> bool:
        from ofa_scale.training.layout_resume import same_layout

        return same_layout(point.record.get("layout"), point.record.get("world_size"), self.layout,
                           self.launch.world_size)

    def _check_resume_compatible(self, point: ResumePoint, final: bool = True) -> None:
        """Refuse a resume the config cannot continue. Before process groups (`final=False`) the point is the
        unverified `latest`; the step check waits for the verified one (a damaged newest step falls back)."""
        from ofa_scale.training.layout_resume import require_canonical

        cfg = self.cfg
        saved = point.record.get("config", {})
        for section, keys in (("train", ("global_batch_size", "micro_batch_size", "seed")),
                              ("data", ("root", "train"))):
            for key in keys:
                old = saved.get(section, {}).get(key)
                new = getattr(getattr(cfg, section), key)
                if old is not None and old != new:
                    raise ConfigError(f"{section}.{key} was {old!r} when {point.tag_dir} was written but is {new!r} "
                                      f"now; resume with the original value or start a new --run-dir")
        if not self._same_layout(point):
            # DeepSpeed's ZeRO partitions, pipeline files and our per-rank RNG files are per process; another
            # layout resumes from the layout-free copy next to them (layout_resume.py)
            require_canonical(point.tag_dir, point.record.get("layout"), point.record.get("world_size"))
        if final and point.step >= cfg.train.steps:
            raise UserError(f"the run already reached step {point.step} (train.steps={cfg.train.steps}); to train "
                            f"further, raise train.steps (the learning-rate schedule is stretched to the new length "
                            f"from step {point.step} on)")

    def _start_mlflow(self):
        cfg, run = self.cfg, self.run
        if not cfg.logging.mlflow:
            return None
        from ofa_scale.training.mlflow_logger import MlflowRun, git_commit, resolve_tracking_uri

        uri = resolve_tracking_uri(run.root, cfg.logging.tracking_uri)
        tracker = MlflowRun(uri, cfg.logging.experiment, cfg.logging.run_name or run.root.resolve().name, run.root,
                            run_id=self.mlflow_run_id, connect_timeout_s=cfg.logging.connect_timeout_s)
        if not tracker.resumed:
            params = {f"config.{k}": v for k, v in flatten(cfg.to_dict()).items()}
            params.update({f"layout.{k}": v for k, v in flatten(self.layout.to_dict()).items()})
            params.update({f"deepspeed.{k}": v for k, v in flatten(self.ds_config).items()})
            params["git_commit"] = git_commit(Path(__file__).resolve().parents[2])
            tracker.log_params(params)
            tracker.log_artifact(run.config)
            tracker.log_artifact(run.ds_config)
            tracker.log_artifact(run.layout)
            tracker.log_artifact(Path(cfg.data.root or cfg.data.train) / "manifest.json", "data")
        tracker.set_tags({"run_dir": str(run.root.resolve())})
        return tracker

    def close(self) -> None:
        """Tear down process groups after a successful run (not after an error: a barrier would wait for ranks
        stuck in a collective, and the launcher could never see this rank exit and stop the others)."""
        import torch.distributed as dist

        from ofa_scale.parallel.context import teardown_parallel

        collectives.barrier()
        teardown_parallel()
        dist.destroy_process_group()
        self.release()

    def release(self) -> None:
        """Give up the run directory's lock (the kernel also drops it if the process dies)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None


def bounds_heap(cfg: TrainingConfig) -> bool:
    """train.host_heap: under ZeRO-3 ("auto") every parameter is gathered and freed each micro-batch, and on the
    host these blocks fragment glibc's heap (+1.1 GiB per 2-rank ofa_base rank); returning them costs page faults
    (+22% CPU seconds there, +32% on an activation-heavy CPU step), worth paying where memory is the point."""
    mode = cfg.train.host_heap
    return mode == "bounded" or (mode == "auto" and cfg.parallel.zero_stage == 3)


def _finite(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def _quiet_other_ranks(is_main: bool) -> None:
    # DeepSpeed logs through the "DeepSpeed" logger on every rank; keep only rank 0's warnings and errors.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if is_main else logging.ERROR)


def _interrupted() -> bool:
    return isinstance(sys.exc_info()[1], KeyboardInterrupt)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
