"""Checkpoints: DeepSpeed's engine state + per-rank loader/RNG state + a trainer record, behind a `latest` pointer.

Layout of RUN_DIR/checkpoints:
    step_000100/                 DeepSpeed's files (model, ZeRO partitions, optimizer, lr scheduler)
    step_000100/rank_00000.pt    this rank's loader state and RNG states
    step_000100/trainer.json     step, mlflow run id, config, DeepSpeed config, world size (format_version)
    step_000100/manifest.json    size and sha256 of every file above (checkpoint_integrity.py), written last
    latest                       the tag of the newest *complete* checkpoint ("step_000100")

`latest` is written (atomically) by rank 0 only after every rank has finished its files, trainer.json and the
manifest exist, so a job killed mid-save resumes from the previous checkpoint. The pointer has the same format as
DeepSpeed's own `latest` file, so `engine.load_checkpoint(dir)` and zero_to_fp32 tools find it too. A checkpoint
whose trainer record says `finite: false` is kept for inspection but never published by `latest`.

Resuming (`choose_resume_point`) verifies the manifest before any rank loads anything: a damaged checkpoint (bit
flip, truncated or missing file) is skipped with one warning line for the newest intact older one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ofa_scale.errors import UserError
from ofa_scale.parallel import collectives
from ofa_scale.training.checkpoint_integrity import find_damage, is_complete, write_manifest
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ofa_scale.utils.malloc import release_free_memory

CHECKPOINT_FORMAT_VERSION = 1
LATEST = "latest"
BEST = "best"  # finetuning: the best checkpoint by the validation metric (ofa_scale/finetune/best.py)
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
                    write_extra: Optional[Callable[[Path], None]] = None, trained_only: bool = False) -> Path:
    """Collective: every rank calls it. Returns the tag directory.

    `write_extra(tag_dir)` (collective too) adds files to the checkpoint before it is published by `latest`.
    `trained_only`: DeepSpeed's files hold only the parameters that train (`_trained_parameters_only`)."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover from a save that was killed before `latest` moved
    _barrier()
    with disk_full_is_a_user_error(ckpt_dir, tag_dir):
        if trained_only:
            with _trained_parameters_only(engine):
                engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
        else:
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
    write_manifest(tag_dir)  # rank 0 lists the files after writing trainer.json, so it is hashed too
    if rank == 0:
        if _is_finite(record):  # weights that went NaN/inf must never become what a resume continues from
            atomic_write_text(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep, current=tag)
    _barrier()
    release_free_memory()  # the save's buffers were freed; glibc would keep their pages resident (utils/malloc.py)
    return tag_dir


@contextlib.contextmanager
def _trained_parameters_only(engine):
    """DeepSpeed's `exclude_frozen_parameters` leaves frozen parameters out of its files (ZeRO's frozen fragments
    too) but keeps every buffer of the module state (BatchNorm statistics, index tables): for the duration of the
    save the module state is the trained parameters alone. Loading it needs `load_module_strict=False`, the rest
    coming from where the caller rebuilt it."""
    full = engine.module_state_dict

    def trained(*args, **kwargs):
        state = full(*args, **kwargs)
        keep = {name for name, p in engine.module.named_parameters() if p.requires_grad}
        for name in [k for k in state if k not in keep]:
            del state[name]
        return state

    engine.module_state_dict = trained  # an instance attribute: what DeepSpeed's _save_checkpoint calls
    try:
        yield
    finally:
        del engine.module_state_dict


@contextlib.contextmanager
def disk_full_is_a_user_error(ckpt_dir: Path, tag_dir: Path):
    """A full disk while a checkpoint is written ends in one sentence. Nothing published is touched: `latest` still
    names the previous complete checkpoint, and the unfinished directory is removed to give the space back."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(tag_dir, ignore_errors=True)
        free = shutil.disk_usage(ckpt_dir).free / 2**20
        latest = published_tag(ckpt_dir)
        raise UserError(f"the disk of {ckpt_dir} is full ({os.strerror(e.errno).lower()}) while writing checkpoint "
                        f"{tag_dir.name}; {free:.0f} MiB free after removing it. `latest` still points at "
                        f"{latest or 'no checkpoint'}: free space (or lower train.keep_checkpoints), then continue "
                        f"with --resume") from None


def load_rank_state(point: ResumePoint, rank: int) -> dict[str, Any]:
    path = rank_file(point.tag_dir, rank)
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint was written by {point.record.get('world_size')} "
                        f"processes; resume with the same number of processes")
    return torch.load(path, map_location="cpu", weights_only=False)


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    """Keep the newest `keep` complete checkpoints up to `current`, and always `current` and the ones `latest` and
    `best` publish: when a run writes only non-finite checkpoints for a while, the last finite one survives."""
    if keep <= 0:
        return
    pinned = {published_tag(ckpt_dir), published_tag(ckpt_dir, BEST)}
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir())
    complete = [t for t in tags if t <= current and is_complete(ckpt_dir / t)]
    for tag in complete[:-keep]:
        if tag != current and tag not in pinned:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    for tag in tags:  # incomplete leftovers older than the newest checkpoint are dead weight
        if tag < current and tag not in complete and tag not in pinned:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def _is_finite(record: dict[str, Any]) -> bool:
    return record.get("finite", True) is not False


def published_tag(ckpt_dir: Path, pointer: str = LATEST) -> Optional[str]:
    """The tag `latest` (or another pointer file) names, or None when there is no pointer or it names no step
    directory."""
    try:
        tag = (ckpt_dir / pointer).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if tag.startswith("step_") and (ckpt_dir / tag).is_dir() else None


def resume_candidates(ckpt_dir: Path) -> list[str]:
    """Tags a resume may continue from, newest first: complete checkpoints up to the one `latest` publishes (newer
    ones were never published: a save killed before the pointer moved, or non-finite weights). When the pointer
    itself is unreadable, every complete checkpoint is a candidate."""
    if not ckpt_dir.is_dir():
        return []
    newest = published_tag(ckpt_dir)
    tags = sorted((p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and is_complete(p)), reverse=True)
    return [t for t in tags if newest is None or t <= newest]


def has_checkpoints(ckpt_dir: Path) -> bool:
    """Whether a run has written (or begun publishing) any checkpoint: a fresh start must not overwrite it."""
    return (ckpt_dir / LATEST).exists() or bool(resume_candidates(ckpt_dir))


def _read_point(ckpt_dir: Path, tag: str) -> tuple[Optional[ResumePoint], Optional[str]]:
    """(point, None) or (None, why it cannot be resumed from). A format_version from another release is not
    damage: it raises, since falling back past it would silently discard that release's progress."""
    tag_dir = ckpt_dir / tag
    try:
        record = json.loads((tag_dir / TRAINER_RECORD).read_text())
    except (OSError, ValueError) as e:
        return None, f"{TRAINER_RECORD} is unreadable ({type(e).__name__})"
    if not isinstance(record, dict) or "step" not in record:
        return None, f"{TRAINER_RECORD} holds no step"
    version = record.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"checkpoint {tag_dir} has format_version {version}; this ofa-scale reads version "
                        f"{CHECKPOINT_FORMAT_VERSION} — resume it with the release that wrote it")
    if not _is_finite(record):
        return None, "its weights are not finite"
    return ResumePoint(tag=tag, tag_dir=tag_dir, record=record), None


def newest_readable_point(ckpt_dir: Path) -> Optional[ResumePoint]:
    """The newest candidate whose trainer record reads, without hashing anything (pure file reads, so every rank
    may call it before process groups exist); `choose_resume_point` later verifies it. None for a fresh run."""
    problems = []
    for tag in resume_candidates(ckpt_dir):
        point, problem = _read_point(ckpt_dir, tag)
        if point is not None:
            return point
        problems.append(f"{tag} ({problem})")
    if problems or (ckpt_dir / LATEST).exists():
        raise _none_intact(ckpt_dir, problems)
    return None


def choose_resume_point(ckpt_dir: Path) -> Optional[ResumePoint]:
    """Collective (every rank, after process groups exist, before any rank loads a checkpoint file): the newest
    checkpoint whose files all match their manifest, the same on every rank. Skipping damaged ones prints one
    warning line (rank 0); when none is intact every rank raises the same UserError. None for a fresh run."""
    me = collectives.rank()
    candidates = collectives.broadcast_object(resume_candidates(ckpt_dir) if me == 0 else None, src=0)
    skipped: list[str] = []
    for tag in candidates:
        # rank 0 reads the record so every rank decides on the same bytes, and raises on every rank if it must
        point, problem, fatal = collectives.broadcast_object(_read_point_or_error(ckpt_dir, tag) if me == 0 else None,
                                                             src=0)
        if fatal is not None:
            raise UserError(fatal)
        if point is not None:
            problem = find_damage(point.tag_dir)
        if problem is None:
            if skipped and me == 0:
                print(f"ofa-train: warning: skipping damaged checkpoint{'s' if len(skipped) > 1 else ''} "
                      f"{'; '.join(skipped)}; resuming from {tag}, the newest intact one", file=sys.stderr,
                      flush=True)
            return point
        skipped.append(f"{tag} ({problem})")
    if skipped or (ckpt_dir / LATEST).exists():
        raise _none_intact(ckpt_dir, skipped)
    return None


def _read_point_or_error(ckpt_dir: Path, tag: str) -> tuple[Optional[ResumePoint], Optional[str], Optional[str]]:
    try:
        return (*_read_point(ckpt_dir, tag), None)
    except UserError as e:
        return None, None, str(e)


def _none_intact(ckpt_dir: Path, problems: list[str]) -> UserError:
    found = "; ".join(problems) if problems else ("no step_* directory with a manifest.json: checkpoints written "
                                                  "before ofa-scale verified them have none")
    return UserError(f"{ckpt_dir} holds no intact checkpoint to resume from ({found}); restore the files from a "
                     f"backup, or start a new --run-dir")


def _barrier() -> None:
    collectives.barrier()
