#!/usr/bin/env python
"""Sweep OFA's GLUE grid for one recipe and write one table (issue 11 §3).

    python scripts/glue_grid.py --config configs/finetune/glue_rte_large.yaml --out runs/rte_grid \\
        --set model.pretrained=... --set data.train=... --set data.valid=... \\
        [--epochs 5,7,10] [--lr 1e-4,7e-5,6e-5,5e-5,3e-5] [--global-batch 128,64,32] \\
        [--launcher "deepspeed --num_gpus 2 --module"] [--tracking-uri URI]

OFA's run_scripts/glue/train_<task>.sh loop over epochs {5,7,10} × lr {1e-4,7e-5,6e-5,5e-5,3e-5} × update_freq
and keep the best dev score; those are the defaults here (`--global-batch` sweeps the update_freq axis as global
batch sizes; default: the recipe's). Every grid point is an ordinary `ofa-train` run in OUT/e<E>_lr<LR>[_b<B>]
(its own checkpoints, metrics.jsonl and best.json), tracked in mlflow as run `<OUT name>/e<E>_lr<LR>…` of the
recipe's experiment, all points in one tracking store (default: sqlite OUT/mlflow.db). A point whose run
directory already holds best.json and a finished final checkpoint is kept, so an interrupted sweep resumes.

Writes OUT/grid.md (one row per point: epochs, lr, batch, best metric value and its step, run dir; the best row
marked) and OUT/grid.json, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFA_EPOCHS = (5, 7, 10)
OFA_LRS = (1e-4, 7e-5, 6e-5, 5e-5, 3e-5)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def points(epochs: list[int], lrs: list[float], batches: list[int | None]) -> list[dict]:
    """The grid in OFA's loop order (epochs outermost)."""
    return [{"epochs": e, "lr": lr, "global_batch": b,
             "tag": f"e{e}_lr{lr:g}" + (f"_b{b}" if b is not None else "")}
            for e in epochs for lr in lrs for b in batches]


def finished(run_dir: Path) -> dict | None:
    """best.json of a run whose last update was checkpointed (ofa-train always checkpoints the final step)."""
    best = run_dir / "best.json"
    config = run_dir / "config.yaml"
    latest = run_dir / "checkpoints" / "latest"
    if not (best.is_file() and config.is_file() and latest.is_file()):
        return None
    import yaml

    steps = int(yaml.safe_load(config.read_text())["train"]["steps"])
    tag = latest.read_text().strip()
    return json.loads(best.read_text()) if tag == f"step_{steps:06d}" else None


def run_point(args: argparse.Namespace, point: dict, out: Path, tracking_uri: str) -> dict:
    run_dir = out / point["tag"]
    best = finished(run_dir)
    if best is None:
        sets = [f"train.epochs={point['epochs']}", f"optim.lr={point['lr']}",
                f"logging.run_name={out.name}/{point['tag']}", f"logging.tracking_uri={tracking_uri}",
                *([f"train.global_batch_size={point['global_batch']}"] if point["global_batch"] else []),
                *args.overrides]
        cmd = [*shlex.split(args.launcher), "ofa_scale.train", "--config", args.config, "--run-dir", str(run_dir),
               *[a for s in sets for a in ("--set", s)]]
        print(f"glue-grid: {point['tag']}: {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd, cwd=REPO).returncode
        if rc != 0:
            return {**point, "run_dir": str(run_dir), "error": f"ofa-train exited with {rc}"}
        best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").is_file() else {}
    else:
        print(f"glue-grid: {point['tag']}: finished before, kept", flush=True)
    return {**point, "run_dir": str(run_dir), "metric": best.get("metric"), "value": best.get("value"),
            "step": best.get("step")}


def table(rows: list[dict]) -> str:
    scored = [r for r in rows if r.get("value") is not None]
    top = max(scored, key=lambda r: r["value"]) if scored else None
    metric = scored[0]["metric"] if scored else "best"
    lines = [f"| epochs | lr | global batch | {metric} | step | run |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = r.get("error") or (f"{100 * r['value']:.2f}" if r.get("value") is not None else "-")
        mark = " **best**" if r is top else ""
        lines.append(f"| {r['epochs']} | {r['lr']:g} | {r['global_batch'] or 'recipe'} | {value}{mark} | "
                     f"{r.get('step', '-')} | {r['run_dir']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glue_grid.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a GLUE recipe (configs/finetune/glue_*.yaml)")
    parser.add_argument("--out", required=True, help="directory of the grid's runs and table")
    parser.add_argument("--epochs", type=_ints, default=list(OFA_EPOCHS), help="comma-separated (OFA: 5,7,10)")
    parser.add_argument("--lr", type=_floats, default=list(OFA_LRS),
                        help="comma-separated (OFA: 1e-4,7e-5,6e-5,5e-5,3e-5)")
    parser.add_argument("--global-batch", type=_ints, default=[None],
                        help="comma-separated global batch sizes (OFA's update_freq axis; default: the recipe's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override passed to every run (repeatable)")
    parser.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m",
                        help='how to start a module, e.g. "deepspeed --num_gpus 8 --module" (default: this python -m)')
    parser.add_argument("--tracking-uri", default=None, help="mlflow store of every point (default: OUT/mlflow.db)")
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        print(f"glue_grid.py: error: {args.config} is not a recipe file", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    rows = [run_point(args, p, out, tracking_uri) for p in points(args.epochs, args.lr, args.global_batch)]
    text = table(rows)
    (out / "grid.md").write_text(text + "\n")
    (out / "grid.json").write_text(json.dumps({"config": args.config, "tracking_uri": tracking_uri, "points": rows},
                                              indent=2) + "\n")
    print(text)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
