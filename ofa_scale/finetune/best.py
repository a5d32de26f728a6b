"""The best checkpoint of a finetuning run, by the task's validation metric.

RUN_DIR/checkpoints/best   the tag of the best checkpoint ("step_000400"), written atomically like `latest`
RUN_DIR/best.json          {"format_version", "tag", "step", "metric", "value"}

best.json is written before the pointer moves. Should a run die between the two, the pointer still names the
previous best and best.json another tag; `BestRecord.load` then trusts the pointer and takes its value from
metrics.jsonl, so the pointer only ever moves to a checkpoint that validated better. Pruning
(training/checkpoint.py) never deletes the checkpoint the pointer names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ofa_scale.training.checkpoint import BEST, published_tag
from ofa_scale.utils.io import atomic_write_json, atomic_write_text

BEST_FORMAT_VERSION = 1
BEST_JSON = "best.json"


@dataclass
class BestRecord:
    tag: str
    step: int
    metric: str
    value: float

    @classmethod
    def load(cls, run_root: Path, metric: str) -> Optional["BestRecord"]:
        """The published best of a run (None when it has none yet)."""
        ckpt_dir = Path(run_root) / "checkpoints"
        tag = published_tag(ckpt_dir, BEST)
        if tag is None:
            return None
        try:
            saved = json.loads((Path(run_root) / BEST_JSON).read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("tag") == tag and saved.get("metric") == metric:
            return cls(tag, int(saved["step"]), metric, float(saved["value"]))
        step = int(tag.split("_", 1)[1])
        return cls(tag, step, metric, _logged_value(Path(run_root) / "metrics.jsonl", step, metric))

    def improved_by(self, value: float) -> bool:
        return math.isfinite(value) and value > self.value


def improves(best: Optional[BestRecord], value: float) -> bool:
    """Whether `value` (higher is better for every finetuning metric) beats the published best."""
    if best is None:
        return math.isfinite(value)
    return best.improved_by(value)


def publish_best(run_root: Path, record: BestRecord) -> None:
    """best.json, then the pointer (module docstring). Rank 0 only, after the checkpoint is published."""
    run_root = Path(run_root)
    atomic_write_json(run_root / BEST_JSON, {"format_version": BEST_FORMAT_VERSION, **asdict(record)})
    atomic_write_text(run_root / "checkpoints" / BEST, record.tag)


def best_checkpoint(run_root: Path) -> Optional[Path]:
    """The step directory the run's best pointer names, or None."""
    ckpt_dir = Path(run_root) / "checkpoints"
    tag = published_tag(ckpt_dir, BEST)
    return None if tag is None else ckpt_dir / tag


def _logged_value(metrics: Path, step: int, metric: str) -> float:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return -math.inf
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        value = record.get(f"valid/{metric}")
        if record.get("step") == step and isinstance(value, (int, float)):
            return float(value)
    return -math.inf
