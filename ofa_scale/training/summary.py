"""`python -m ofa_scale.training.summary RUN_DIR`: first vs last per-task loss of a run, and where its outputs are.

Each loss is averaged over a window of steps at the start and at the end (single steps are noisy: a micro-batch
holds only a few rows of each task). Exit status 1 when a task's loss did not fall by at least --min-drop, so the
demo fails loudly instead of printing a table nobody reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ofa_scale.cli import run_cli
from ofa_scale.errors import UserError
from ofa_scale.training.checkpoint import find_latest
from ofa_scale.training.metrics import read_metrics


def window_means(records: list[dict], key: str, window: int) -> Optional[tuple[float, float, int, int]]:
    """(mean of the first `window` values, mean of the last `window` values, first step, last step) of `key`."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if len(points) < 2:
        return None
    w = max(1, min(window, len(points) // 2))
    first = sum(v for _, v in points[:w]) / w
    last = sum(v for _, v in points[-w:]) / w
    return first, last, points[0][0], points[-1][0]


def summarise(run_dir: Path, window: int, min_drop: float) -> tuple[str, bool]:
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} does not exist; pass the --run-dir of an ofa-train run")
    records = read_metrics(metrics_path)
    if not records:
        raise UserError(f"{metrics_path} is empty; the run has not finished a step yet")
    keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss/")})
    lines = [f"{'objective':<22}{'first':>10}{'last':>10}{'change':>10}  verdict",
             "-" * 62]
    all_fell = True
    for key in keys:
        stats = window_means(records, key, window)
        if stats is None:
            lines.append(f"{key:<22}{'-':>10}{'-':>10}{'-':>10}  too few steps")
            all_fell = False
            continue
        first, last, _, _ = stats
        change = (last - first) / first if first else 0.0
        fell = change <= -min_drop
        all_fell &= fell
        lines.append(f"{key:<22}{first:>10.3f}{last:>10.3f}{100 * change:>9.1f}%  {'falls' if fell else 'DOES NOT FALL'}")
    steps = records[-1]["step"]
    lines.append("-" * 62)
    lines.append(f"steps {records[0]['step']}..{steps}; first/last = mean over {window} steps; "
                 f"'falls' = at least {100 * min_drop:.0f}% lower")
    speed = [r["samples_per_s"] for r in records[1:] if r.get("samples_per_s")]
    if speed:
        speed.sort()
        lines.append(f"throughput (median): {speed[len(speed) // 2]:.1f} examples/s")
    point = find_latest(run_dir / "checkpoints")
    lines.append(f"checkpoint: {point.tag_dir if point else '(none yet)'}")
    mlflow_db = run_dir / "mlflow.db"
    run_id = point.mlflow_run_id if point else None
    if mlflow_db.is_file():
        lines.append(f"mlflow: sqlite:///{mlflow_db.resolve()} (run {run_id}); browse with "
                     f"`mlflow ui --backend-store-uri sqlite:///{mlflow_db.resolve()}`")
    elif run_id:
        lines.append(f"mlflow: run {run_id} on the tracking server (MLFLOW_TRACKING_URI)")
    return "\n".join(lines), all_fell


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ofa-train-summary", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--window", type=int, default=10, help="steps averaged at the start and at the end")
    p.add_argument("--min-drop", type=float, default=0.1, help="relative drop that counts as falling clearly")
    p.add_argument("--json", action="store_true", help="print the table as JSON instead")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def go() -> int:
        if args.json:
            records = read_metrics(args.run_dir / "metrics.jsonl")
            keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss/")})
            out = {k: window_means(records, k, args.window) for k in keys}
            print(json.dumps({k: None if v is None else {"first": v[0], "last": v[1]} for k, v in out.items()}))
            return 0
        text, ok = summarise(args.run_dir, args.window, args.min_drop)
        print(text)
        return 0 if ok else 1

    return run_cli(go, "ofa-train-summary")


if __name__ == "__main__":
    sys.exit(main())
