"""Checkpoints: DeepSpeed's engine state + per-rank loader/RNG state + a trainer record, behind a `latest` pointer.

Layout of RUN_DIR/checkpoints:
    step_000100/                 DeepSpeed's files (model, ZeRO partitions, optimizer, lr scheduler)
    step_000100/rank_00000.pt    this rank's loader state and RNG states
    step_000100/trainer.json     step, mlflow run id, config, DeepSpeed config, world size (format_version)
    latest                       the tag of the newest *complete* checkpoint ("step_000100")

`latest` is written (atomically) by rank 0 only after every rank has finished its files and trainer.json exists,
so a job killed mid-save resumes from the previous checkpoint. The pointer has the same format as DeepSpeed's own
`latest` file, so `engine.load_checkpoint(dir)` and zero_to_fp32 tools find it too.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

CHECKPOINT_FORMAT_VERSION = 1
LATEST = "latest"
TRAINER_RECORD = "trainer.json"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank_{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class ResumePoint:
    tag: str
    tag_dir: Path
    record: dict[str, Any]  # trainer.json

    @property
    def step(self) -> int:
        return int(self.record["step"])

    @property
    def mlflow_run_id(self) -> Optional[str]:
        return self.record.get("mlflow_run_id")


def find_latest(ckpt_dir: Path) -> Optional[ResumePoint]:
    """The newest complete checkpoint, or None when there is none yet."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    tag_dir = ckpt_dir / tag
    record_path = tag_dir / TRAINER_RECORD
    if not record_path.is_file():
        raise UserError(f"{pointer} points at {tag} but {record_path} is missing; the checkpoint directory was "
                        f"edited by hand — restore it or point `latest` at a complete step_* directory")
    record = json.loads(record_path.read_text())
    version = record.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"checkpoint {tag_dir} has format_version {version}; this ofa-scale reads version "
                        f"{CHECKPOINT_FORMAT_VERSION} — resume it with the release that wrote it")
    return ResumePoint(tag=tag, tag_dir=tag_dir, record=record)


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank: int, rank_state: dict[str, Any],
                    record: dict[str, Any], keep: int,
                    write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective: every rank calls it. Returns the tag directory.

    `write_extra(tag_dir)` (collective too) adds files to the checkpoint before it is published by `latest`."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover from a save that was killed before `latest` moved
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    buf = io.BytesIO()
    torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, **rank_state}, buf)
    atomic_write_bytes(rank_file(tag_dir, rank), buf.getvalue())
    if write_extra is not None:
        write_extra(tag_dir)
    _barrier()  # every rank's files are on disk before the record and the pointer say the checkpoint exists
    if rank == 0:
        atomic_write_json(tag_dir / TRAINER_RECORD, {"format_version": CHECKPOINT_FORMAT_VERSION, "tag": tag,
                                                      "step": step, **record})
        atomic_write_text(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep, current=tag)
    _barrier()
    return tag_dir


def load_rank_state(point: ResumePoint, rank: int) -> dict[str, Any]:
    path = rank_file(point.tag_dir, rank)
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint was written by {point.record.get('world_size')} "
                        f"processes; resume with the same number of processes")
    return torch.load(path, map_location="cpu", weights_only=False)


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
    complete = [t for t in tags if (ckpt_dir / t / TRAINER_RECORD).is_file()]
    for tag in complete[:-keep]:
        if tag != current:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    for tag in tags:  # incomplete leftovers older than the newest checkpoint are dead weight
        if tag not in complete and tag < current:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
