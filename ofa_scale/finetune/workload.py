"""What a finetuning recipe trains: one task module over `data.train`, in exact epochs, on the pretraining engine.

`FinetuneWorkload` has the interface of `training.workload.OFAPretraining` (the trainer talks to nothing else):
the tokenizer and model config come from the same sections; the loader reads the task's shard source of
`data.train` in the loader's exact-epoch mode (`train.epochs` passes, each sample once per pass, reshuffled per
pass) through `task.train_examples`; the Collator builds one fixed-shape "vl" group with the task's lengths and
image size. The number of updates is fixed before any process group starts: epochs × (samples // global batch),
capped by `train.steps` when that is positive; `self.cfg` is the config with `train.steps` set to it (what the
learning-rate schedule, the loop and the saved config.yaml see).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.training.workload import OFAPretraining, load_pretrained_weights, tokenizer_and_model_config


def _check_shards(root: str, key: str, source: str) -> int:
    """The number of samples of `source` in the shard directory `root` (from its manifest.json)."""
    manifest = Path(root) / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"{key} {root} holds no manifest.json; point it at the output of "
                        f"`ofa-preprocess shards --format {source}`")
    try:
        sources = json.loads(manifest.read_text()).get("sources", {})
    except (OSError, ValueError) as e:
        raise UserError(f"{manifest} does not read as JSON ({e}); convert the data again") from None
    if source not in sources:
        have = ", ".join(sorted(sources)) or "none"
        raise UserError(f"{key} {root} holds no '{source}' shards (it has: {have}); convert the task's TSV with "
                        f"`ofa-preprocess shards --format {source}`")
    return int(sources[source].get("samples_written", 0))


class FinetuneWorkload(OFAPretraining):
    """One finetuning task (cfg.task) as the trainer's workload; see the module docstring."""

    def __init__(self, cfg):
        from ofa_scale.finetune.task import make_task

        if not cfg.finetuning:
            raise ConfigError("FinetuneWorkload needs task.name; pretraining runs OFAPretraining")
        self.cfg = cfg
        self.tokenizer, self.model_config = tokenizer_and_model_config(cfg)
        self.task = make_task(cfg.task, self.tokenizer)
        if self.task.main_metric not in self.task.metrics:
            raise ConfigError(f"task.best_metric is {cfg.task.best_metric!r}; task {self.task.name} reports "
                              f"{', '.join(self.task.metrics)} (empty = {self.task.metrics[0]})")
        self.source = self.task.source
        self.train_samples = _check_shards(cfg.data.train, "data.train", self.source)
        _check_shards(cfg.data.valid, "data.valid", self.source)
        self.pad = int(self.tokenizer.pad)
        self.tasks = [self.task.name]  # task id 0 in every batch; metrics are loss/<task>, acc/<task>
        self.groups = ["vl"]  # one fixed-shape group of the task's examples
        self.objectives = self._objectives()
        self._flops: Optional[int] = None
        self.composition()
        self.steps_per_epoch = self._steps_per_epoch()
        total = cfg.train.epochs * self.steps_per_epoch
        steps = min(total, cfg.train.steps) if cfg.train.steps > 0 else total
        warmup = cfg.schedule.warmup_steps
        if warmup is not None and not 0 <= warmup < steps:
            raise ConfigError(f"schedule.warmup_steps={warmup} must be in [0, {steps}) (the updates of "
                              f"train.epochs={cfg.train.epochs} x {self.steps_per_epoch} per epoch"
                              f"{', capped by train.steps' if steps < total else ''})")
        self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))

    def _objectives(self):
        """A one-group objectives config: the task's fixed shapes, the loss settings of cfg.objectives."""
        from ofa_scale.objectives.config import VLShape

        src_len, tgt_len = self.task.lengths()
        obj = self.cfg.objectives
        # "caption" only switches the vl source on in Composition; examples carry the finetuning task's name
        return dataclasses.replace(
            obj, tasks=["caption"], mix={"vl": 1, "text": 0, "image": 0, "detection": 0},
            vl=VLShape(image_size=self.cfg.task.image_size, source_length=src_len, target_length=tgt_len),
            sample_patch_num=0, random_augment=False)

    def _steps_per_epoch(self) -> int:
        """Global steps of one pass over data.train, as the loader's exact-epoch mode counts them."""
        from ofa_scale.data.loader import ShardLoader

        return int(ShardLoader(self.loader_config()).steps_per_epoch)

    # ---- model ---------------------------------------------------------------------------------------------
    def load_pretrained_into(self, model, ctx=None) -> None:
        if self.cfg.model.pretrained:
            load_pretrained_weights(model, self.cfg.model.pretrained, self.model_config, ctx, seed=self.cfg.train.seed)

    def pipeline_shapes(self) -> dict:
        vl = self.objectives.vl
        return dict(seed=self.cfg.train.seed, image_size=vl.image_size, src_len=vl.source_length,
                    tgt_len=vl.target_length, dynamic_shape=False)

    # ---- data ----------------------------------------------------------------------------------------------
    def loader_config(self):
        from ofa_scale.data.loader_config import LoaderConfig

        cfg = self.cfg
        return LoaderConfig(root=cfg.data.train, composition={self.source: cfg.train.micro_batch_size},
                            num_streams=cfg.micro_batches_per_step(), seed=cfg.train.seed, mode="epochs",
                            epochs=cfg.train.epochs, shuffle_buffer=cfg.data.shuffle_buffer,
                            num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                            decode_min_size={self.source: cfg.task.image_size, **cfg.data.decode_min_size},
                            on_corrupt=cfg.data.on_corrupt, verify_shards=cfg.data.verify_shards)

    def input_builder(self, step: int, dp_rank: int, dp_size: int, device, dtype):
        """The pretraining input builder; a task with its own image normalisation (imagenet: ImageNet mean/std
        instead of OFA's 0.5/0.5) normalises the batch's uint8 images itself."""
        build = super().input_builder(step, dp_rank, dp_size, device, dtype)
        normalise = getattr(self.task, "normalise_images", None)
        if normalise is None:
            return build

        def build_with_task_images(group: str, batch: dict, m: int) -> dict:
            inputs = build(group, batch, m)
            inputs["patch_images"] = normalise(batch["patch_images"].to(device, non_blocking=True),
                                               inputs["patch_masks"], dtype)
            return inputs

        return build_with_task_images

    def build_loader(self, dp_rank: int, dp_size: int):
        from ofa_scale.data.loader import ShardLoader
        from ofa_scale.objectives.batching import Collator

        collate_fn = Collator(self.objectives, self.composition(), vocab_size=len(self.tokenizer),
                              task_ids={name: i for i, name in enumerate(self.tasks)})
        return ShardLoader(self.loader_config(), rank=dp_rank, world_size=dp_size,
                           record_fn=self.task.train_examples, collate_fn=collate_fn)
