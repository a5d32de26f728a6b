"""Per-step metrics: reduction over data-parallel ranks, RUN_DIR/metrics.jsonl, and the console line.

metrics.jsonl is an append-only log (one JSON object per optimizer step, flushed per line, rank 0 only). On resume
it is cut back to the checkpoint's step, so the file always describes one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ofa_scale.parallel import collectives

from ofa_scale.utils.io import atomic_write_text

METRICS_FORMAT_VERSION = 1


class TaskAccumulator:
    """Sums over one optimizer step, per task: weighted loss, target tokens, correct tokens; plus global counters.

    Kept as one float64 tensor so the data-parallel reduction is a single all-reduce.
    """

    LOSS, TOKENS, CORRECT = 0, 1, 2

    def __init__(self, tasks: Sequence[str]):
        self.tasks = list(tasks)
        self.per_task = torch.zeros(len(self.tasks), 3, dtype=torch.float64)
        # examples processed (all groups, padding rows excluded), non-pad input tokens, the optimised loss
        self.totals = torch.zeros(3, dtype=torch.float64)

    def add(self, task_ids: torch.Tensor, token_loss: torch.Tensor, valid: torch.Tensor,
            correct: torch.Tensor, rows: int, input_tokens: int) -> None:
        """task_ids (B,), token_loss/valid/correct (B, T); everything detached and moved to CPU here."""
        task_ids = task_ids.detach().cpu().long()
        valid = valid.detach().cpu()
        real = task_ids >= 0  # padding rows of a fixed-shape group carry task id -1 and no targets
        task_ids, valid = task_ids[real], valid[real]
        token_loss, correct = token_loss[real.to(token_loss.device)], correct[real.to(correct.device)]
        loss_per_row = (token_loss.detach().float().cpu() * valid).sum(1).double()
        tokens_per_row = valid.sum(1).double()
        correct_per_row = (correct.detach().cpu() & valid).sum(1).double()
        for col, values in ((self.LOSS, loss_per_row), (self.TOKENS, tokens_per_row),
                            (self.CORRECT, correct_per_row)):
            self.per_task[:, col].index_add_(0, task_ids, values)
        self.totals += torch.tensor([rows, input_tokens, 0.0], dtype=torch.float64)

    def add_objective(self, value: float) -> None:
        """This micro-batch's share of the normalised step loss (the sum over all ranks is the step loss)."""
        self.totals[2] += value

    def all_reduce(self, group=None) -> None:
        """Sum over `group` in one all-reduce of a CPU float64 tensor (the collectives module's policy)."""
        if collectives.is_distributed():
            flat = collectives.all_reduce(torch.cat([self.per_task.flatten(), self.totals]), "sum", group)
            n = self.per_task.numel()
            self.per_task = flat[:n].view_as(self.per_task).clone()
            self.totals = flat[n:].clone()

    @property
    def rows(self) -> float:
        return float(self.totals[0])

    @property
    def input_tokens(self) -> float:
        return float(self.totals[1])

    @property
    def objective(self) -> float:
        return float(self.totals[2])

    def task_metrics(self) -> dict[str, float]:
        out = {}
        for i, task in enumerate(self.tasks):
            tokens = float(self.per_task[i, self.TOKENS])
            if tokens > 0:  # a task absent from this step's batch gets no entry rather than a fake zero
                out[f"loss/{task}"] = float(self.per_task[i, self.LOSS]) / tokens
                out[f"acc/{task}"] = float(self.per_task[i, self.CORRECT]) / tokens
        return out


class MetricsFile:
    """RUN_DIR/metrics.jsonl writer (rank 0)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def truncate_after(self, step: Optional[int]) -> None:
        """Keep only records with record['step'] <= step (None: drop everything) — used when (re)starting."""
        kept = []
        if step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write
                    continue
                if rec.get("step", math.inf) <= step:
                    kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(dumps_record(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def dumps_record(record: dict[str, Any]) -> str:
    """One metrics.jsonl line as strict JSON: a non-finite number becomes null and `nonfinite` lists its keys
    (bare NaN/Infinity are not JSON, and most readers reject the whole file for one of them)."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        record = {k: (None if k in bad else v) for k, v in record.items()}
        record["nonfinite"] = bad
    return json.dumps(record, allow_nan=False)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


class StepTimer:
    """Wall time per step and an ETA from the mean of the recent steps."""

    def __init__(self, total_steps: int, window: int = 20):
        self.total_steps = total_steps
        self.window = window
        self.recent: list[float] = []
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        dt = time.perf_counter() - self._t0
        self.recent = (self.recent + [dt])[-self.window:]
        return dt

    def eta_seconds(self, step: int) -> float:
        if not self.recent:
            return float("nan")
        # the first step carries start-up costs (worker spawn, ZeRO gathers); leave it out once others exist
        sample = self.recent[1:] if len(self.recent) > 2 else self.recent
        return (self.total_steps - step) * sum(sample) / len(sample)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def console_line(record: dict[str, Any], total_steps: int, eta_s: float) -> str:
    loss = record.get("loss")
    parts = [f"step {record['step']}/{total_steps}", f"loss {loss:.4f}" if loss is not None else "loss -",
             f"lr {record['lr']:.2e}",
             f"gnorm {record['grad_norm']:.3f}" if record.get("grad_norm") is not None else "gnorm -",
             f"{record['samples_per_s']:.1f} samples/s", f"{record['tokens_per_s']:.0f} tok/s"]
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record.get("skipped_steps") or record.get("nonfinite_steps"):
        parts.append(f"skipped {max(record.get('skipped_steps') or 0, record.get('nonfinite_steps') or 0)}")
    if record.get("host_peak_gib") is not None:
        mem = f"mem {record['host_peak_gib']:.2f} GiB"
        if record.get("host_peak_gib_min") is not None and record["host_peak_gib_min"] != record["host_peak_gib"]:
            mem = f"mem {record['host_peak_gib_min']:.2f}–{record['host_peak_gib']:.2f} GiB"
        if record.get("accel_peak_gib") is not None:
            mem += f" / accel {record['accel_peak_gib']:.2f} GiB"
        parts.append(mem)
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)
