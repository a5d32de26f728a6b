"""The run directory: what a run writes where, and the start/resume decision.

RUN_DIR/
    config.yaml        the resolved training config (after --set overrides), format_version inside
    ds_config.json     the DeepSpeed config the engine ran with
    layout.json        the validated parallel layout
    metrics.jsonl      one JSON line per optimizer step
    mlflow.db          the default mlflow store (plus mlartifacts/)
    checkpoints/       see ofa_scale/training/checkpoint.py
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ofa_scale.errors import UserError
from ofa_scale.training.checkpoint import ResumePoint, find_latest
from ofa_scale.utils.io import atomic_write_json, atomic_write_text


@dataclass
class RunDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def layout(self) -> Path:
        return self.root / "layout.json"

    def write_config(self, config: dict) -> None:
        # parallel.micro_batches is derived at launch (layout.json records it); leaving it out keeps the saved
        # config a valid input to `ofa-train --config RUN/config.yaml`.
        config = {**config, "parallel": {k: v for k, v in config.get("parallel", {}).items() if k != "micro_batches"}}
        atomic_write_text(self.config, yaml.safe_dump(config, sort_keys=False))

    def write_json(self, path: Path, obj) -> None:
        atomic_write_json(path, obj)


def open_run_dir(path: str | Path, resume: bool) -> tuple[RunDir, Optional[ResumePoint]]:
    """Decide fresh start vs resume. Pure file reads, so every rank can call it before process groups exist.

    `--resume` with no checkpoint yet starts fresh: a job requeued before its first checkpoint must not fail.
    Without `--resume`, a directory that already holds a checkpoint is refused rather than overwritten.
    """
    run = RunDir(Path(path))
    point = find_latest(run.checkpoints)
    if point is not None and not resume:
        raise UserError(f"{run.root} already holds a run (checkpoint {point.tag}); pass --resume to continue it or "
                        f"choose a new --run-dir")
    return run, point if resume else None
