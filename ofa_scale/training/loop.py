"""`train(cfg, run_dir, resume)`: what `ofa-train` calls after parsing; the work is done by `Trainer` (trainer.py).

Kept as the stable entry point for scripts and tests; `plan` re-exports the pre-process-group checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ofa_scale.training.config import TrainingConfig
from ofa_scale.training.stop import StopRequest
from ofa_scale.training.trainer import Trainer, plan

__all__ = ["train", "plan", "StopRequest", "Trainer"]


def train(cfg: TrainingConfig, run_dir: str | Path, resume: bool = False, stop_after: Optional[int] = None,
          stop: Optional[StopRequest] = None, trainer_cls: type[Trainer] = Trainer) -> dict[str, Any]:
    """Train to cfg.train.steps (or `stop_after` more steps, or until SIGTERM/SIGUSR1), checkpointing on the way."""
    trainer = trainer_cls(cfg, run_dir, resume=resume, stop_after=stop_after, stop=stop)
    try:
        result = trainer.fit()
        trainer.close()  # only on success (see Trainer.close)
    finally:
        trainer.release()
    return result
