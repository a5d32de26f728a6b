"""The run directory: what a run writes where, and the start/resume decision.

RUN_DIR/
    config.yaml        the resolved training config (after --set overrides), format_version inside
    ds_config.json     the DeepSpeed config the engine ran with
    layout.json        the validated parallel layout
    metrics.jsonl      one JSON line per optimizer step
    mlflow.db          the default mlflow store (plus mlartifacts/)
    checkpoints/       see ofa_scale/training/checkpoint.py
    train.lock         flock'ed by the trainer's rank 0 for the run's life; names the holder (pid, host)
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ofa_scale.errors import UserError
from ofa_scale.training.checkpoint import (ResumePoint, has_checkpoints, newest_readable_point,
                                           published_tag)
from ofa_scale.utils.io import atomic_write_json, atomic_write_text

LOCK_FILE = "train.lock"


class RunLock:
    """An exclusive flock on RUN_DIR/train.lock. The kernel drops it when the process exits, however it dies
    (kill -9 included), so a crashed trainer never leaves a stale lock behind; the file itself stays."""

    def __init__(self, fd: int, path: Path):
        self._fd: Optional[int] = fd
        self.path = path

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    def lock(self) -> RunLock:
        """Take the run directory for this process (creating it), or refuse in one sentence naming the process
        that holds it. Rank 0 calls it before writing anything and keeps the handle for the run's life."""
        check_run_dir_path(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create run directory {self.root} ({e.strerror or e}); choose a writable "
                            f"--run-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.root} is in use by another ofa-train ({holder}); wait for it to end or stop "
                            f"it, or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        return RunLock(fd, self.lock_file)


def check_run_dir_path(root: Path) -> None:
    """A run directory path that names something other than a directory is refused before anything is read."""
    for path in (root, root / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file, not a directory; pass a run directory as --run-dir (a new path "
                            f"starts a run)")


def open_run_dir(path: str | Path, resume: bool) -> tuple[RunDir, Optional[ResumePoint]]:
    """Decide fresh start vs resume. Pure file reads, so every rank can call it before process groups exist.

    `--resume` with no checkpoint yet starts fresh: a job requeued before its first checkpoint must not fail.
    Without `--resume`, a directory that already holds a checkpoint is refused rather than overwritten.
    The point returned is the newest checkpoint whose record reads (for the early compatibility checks); it is
    not verified yet: `choose_resume_point(run.checkpoints)` does that once process groups exist.
    """
    run = RunDir(Path(path))
    check_run_dir_path(run.root)
    if not resume:
        if has_checkpoints(run.checkpoints):
            raise UserError(f"{run.root} already holds a run (checkpoints in {run.checkpoints}); pass --resume to "
                            f"continue it or choose a new --run-dir")
        return run, None
    return run, newest_readable_point(run.checkpoints)


def is_run_root(path: Path) -> bool:
    """A directory `ofa-train` wrote: its config.yaml next to at least one other file of a run."""
    return (path / "config.yaml").is_file() and any(
        (path / name).exists() for name in ("checkpoints", "ds_config.json", "layout.json", "metrics.jsonl"))


def locate_run_checkpoint(path: str | Path) -> Optional[tuple[Path, str]]:
    """(run root, tag) when `path` is an ofa-train run directory (its published checkpoint), its checkpoints/
    directory (the same) or one of its checkpoints/step_* directories; None when `path` is not part of a run.
    Tools that read checkpoints (ofa-eval, ofa-convert export) share these one-sentence refusals."""
    path = Path(path)
    if is_run_root(path):
        root, tag = path, None
    elif path.name == "checkpoints" and is_run_root(path.parent):
        root, tag = path.parent, None
    elif path.parent.name == "checkpoints" and is_run_root(path.parent.parent):
        root, tag = path.parent.parent, path.name
    else:
        return None
    ckpt_dir = root / "checkpoints"
    steps = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir()) if ckpt_dir.is_dir() else []
    if tag is None:
        tag = published_tag(ckpt_dir)
        if tag is None:
            hint = (f"pass one of its step directories ({', '.join(steps[-3:])})" if steps
                    else "let it train to its first checkpoint (train.ckpt_interval)")
            raise UserError(f"{root} is an ofa-train run directory with no published checkpoint yet "
                            f"(no checkpoints/latest); {hint}")
    elif not (ckpt_dir / tag).is_dir():
        have = f"its checkpoints are {', '.join(steps[-3:])}" if steps else "it has no checkpoint yet"
        raise UserError(f"{path} does not exist in run {root}; {have}")
    return root, tag
