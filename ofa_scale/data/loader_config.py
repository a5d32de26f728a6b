"""Typed configuration of the streaming loader (a section of the training config tree)."""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Literal

from ofa_scale.errors import ConfigError

SOURCE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass
class LoaderConfig:
    # Output folder of `ofa-preprocess shards` (holds manifest.json and one folder per source).
    root: str = ""
    # Records per source in each micro-batch, e.g. {"vl": 4, "text": 1, "image": 1, "detection": 1}. Only the
    # sources named here are read; fine-tuning sources (caption, vqa, refcoco, ...) work the same way. Usually
    # filled in by the trainer from the objectives' ratios.
    composition: dict[str, int] = field(default_factory=dict)
    # Canonical streams = global batch / micro batch. Fixed for a run: it, not the world size, decides the data
    # order, so any world size dividing it sees the same global batches.
    num_streams: int = 1
    seed: int = 1
    # "epochs": finite, each sample exactly once per epoch (finetuning); "resampled": infinite passes with a
    # reshuffled shard order per pass (pretraining).
    mode: Literal["epochs", "resampled"] = "resampled"
    epochs: int = 1
    # Samples held per stream and source before decoding; memory ~ buffer x stored sample size x streams per
    # worker x sources.
    shuffle_buffer: int = 256
    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = False  # page-locked batches for faster host-to-GPU copies (with num_workers > 0)
    # Smallest shorter side an image of that source must keep when decoded; larger JPEGs are decoded at 1/2, 1/4
    # or 1/8 scale (boxes rescaled). OFA pretraining needs 480 for vl (random resize up to 480) and 384 for
    # detection (scale jitter up to 1.5 x 256). Unset: decode at stored size.
    decode_min_size: dict[str, int] = field(default_factory=dict)
    # What a damaged shard (unreadable, truncated, or failing verify_shards) or an undecodable sample does:
    # "skip" (warn and count, see ShardLoader.stats()) or "fail".
    on_corrupt: Literal["skip", "fail"] = "skip"
    # Check each shard against the sha256 manifest.json lists before reading it (once per worker process).
    verify_shards: bool = False

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("data.root is empty; set it to the output folder of `ofa-preprocess shards`")
        if not self.composition:
            raise ConfigError("loader.composition is empty; give records per micro-batch per source, "
                              "e.g. loader.composition={vl: 4, text: 1}")
        for source, count in self.composition.items():
            if not SOURCE_NAME.match(source):
                raise ConfigError(f"loader.composition has source '{source}'; source names are folder names "
                                  f"under loader.root, e.g. vl, text, image, detection, caption")
            if count < 1:
                raise ConfigError(f"loader.composition.{source} is {count}; drop the source or give it >= 1")
        for source, size in self.decode_min_size.items():
            if not SOURCE_NAME.match(source) or size < 1:
                raise ConfigError(f"data.decode_min_size.{source}={size} is invalid; use a known source and a "
                                  f"positive pixel size")
        if self.num_streams < 1:
            raise ConfigError("loader.num_streams must be >= 1 (global batch / micro batch)")
        if self.mode == "epochs" and self.epochs < 1:
            raise ConfigError("loader.epochs must be >= 1 in epochs mode")
        if self.num_workers < 0 or self.prefetch_factor < 1 or self.shuffle_buffer < 0:
            raise ConfigError("data.num_workers and data.shuffle_buffer must be >= 0, "
                              "data.prefetch_factor >= 1")
