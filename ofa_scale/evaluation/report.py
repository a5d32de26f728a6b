"""`ofa-eval report RUN_DIR`: pictures of a training run from its metrics.jsonl, and a markdown page embedding them.

Draws per-objective loss, token accuracy, learning rate, grad norm, throughput, memory and (finetuning runs) the
validation metrics into PNGs, then writes report.md with a header of run facts (arch, steps, layout, final loss,
best validation metric). Uses matplotlib's object API on the Agg canvas, never pyplot: no global figure state and no
display backend, so it is safe inside the trainer. Needs neither torch nor the model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_file, atomic_write_text

DEFAULT_OUT = "report"  # inside RUN_DIR unless --out says otherwise


@dataclass(frozen=True)
class Panel:
    """One PNG: a title and the metric keys drawn on it (each key one line); `prefix` adds every key under it."""

    name: str
    title: str
    ylabel: str
    keys: tuple[str, ...] = ()
    prefix: Optional[str] = None
    logy: bool = False


PANELS = (
    Panel("loss", "Training loss per objective", "loss (nats / target token)", ("loss",), "loss/", logy=True),
    Panel("accuracy", "Token accuracy per objective", "accuracy", prefix="acc/"),
    Panel("lr", "Learning rate", "lr", ("lr",)),
    Panel("grad_norm", "Gradient norm (before clipping)", "grad norm", ("grad_norm",), logy=True),
    Panel("throughput", "Throughput", "per second", ("samples_per_s", "tokens_per_s"), logy=True),
    Panel("memory", "Peak memory", "GiB", ("host_peak_gib", "host_peak_gib_min", "host_rss_gib",
                                          "accel_peak_gib", "accel_peak_gib_min")),
)
VALID_PREFIX = "valid/"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The step records of metrics.jsonl. A malformed line (e.g. cut by a kill mid-write) is skipped and counted in
    one warning; a missing or empty file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass the run directory of an ofa-train or ofa-finetune run.")
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
        else:
            bad += 1
    if bad:
        print(f"warning: {path}: skipped {bad} malformed line{'s' if bad != 1 else ''}", file=sys.stderr,
              flush=True)
    if not records:
        raise UserError(f"{path} holds no step records; the run has not finished a step yet.")
    return records


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` at the steps that have a finite value (nulls are the writer's non-finite values)."""
    points = [(r["step"], float(r[key])) for r in records if _finite(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def _panel_keys(panel: Panel, all_keys: Sequence[str]) -> list[str]:
    keys = list(panel.keys)
    if panel.prefix:
        keys += sorted(k for k in all_keys if k.startswith(panel.prefix) and k.count("/") == 1)
    return keys


def _save_png(fig, path: Path) -> None:
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _draw(path: Path, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]],
          logy: bool, markers: bool = False) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, steps, values in lines:
        ax.plot(steps, values, label=label, marker="o" if markers or len(steps) == 1 else None, markersize=4)
    if logy and all(v > 0 for _, _, values in lines for v in values):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize="small", ncols=2 if len(lines) > 6 else 1)
    _save_png(fig, path)


def draw_plots(records: Sequence[dict[str, Any]], out: Path) -> list[tuple[str, Path]]:
    """Every panel that has data, plus one validation PNG per valid/<metric>; [(title, png path)] in page order."""
    all_keys = sorted({k for r in records for k in r})
    drawn = []
    for panel in PANELS:
        lines = [(k, *series(records, k)) for k in _panel_keys(panel, all_keys)]
        lines = [line for line in lines if line[1]]
        if lines:
            path = out / f"{panel.name}.png"
            _draw(path, panel.title, panel.ylabel, lines, panel.logy)
            drawn.append((panel.title, path))
    for key in (k for k in all_keys if k.startswith(VALID_PREFIX)):
        steps, values = series(records, key)
        if steps:  # only the validation steps carry the key; markers show where they are
            metric = key[len(VALID_PREFIX):]
            path = out / f"valid_{metric.replace('/', '_')}.png"
            _draw(path, f"Validation {metric}", metric, [(key, steps, values)], logy=False, markers=True)
            drawn.append((f"Validation {metric}", path))
    return drawn


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _config_facts(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):  # the header then lacks these facts; the plots still stand
        return {}
    if not isinstance(cfg, dict):
        return {}
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    return {"arch": model.get("arch"), "steps": train.get("steps"), "pretrained": model.get("pretrained")}


def run_facts(run_dir: Path, records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) rows for the report header; facts whose file is absent are left out."""
    facts: list[tuple[str, str]] = [("run", str(run_dir.resolve()))]
    cfg = _config_facts(run_dir)
    if cfg.get("arch"):
        facts.append(("arch", str(cfg["arch"])))
    if cfg.get("pretrained"):
        facts.append(("initialised from", str(cfg["pretrained"])))
    last_step = records[-1]["step"]
    facts.append(("steps", f"{last_step}" + (f" of {cfg['steps']}" if cfg.get("steps") else "")))
    status = _read_json(run_dir / "status.json")
    if status and status.get("state"):
        facts.append(("status", str(status["state"])))
    layout = _read_json(run_dir / "layout.json")
    if layout:
        parts = [f"{k} {layout[k]}" for k in ("world_size", "dp", "tp", "pp") if k in layout]
        if "zero_stage" in layout:
            parts.append(f"ZeRO-{layout['zero_stage']}")
        facts.append(("layout", ", ".join(parts)))
    steps, losses = series(records, "loss")
    if losses:
        facts.append(("final loss", f"{losses[-1]:.4f} (step {steps[-1]})"))
    best = _read_json(run_dir / "best.json")
    if best and "metric" in best and _finite(best.get("value")):
        facts.append(("best validation", f"{best['metric']} {best['value']:.4f} (step {best.get('step')})"))
    skipped = max((r.get("nonfinite_steps") or 0 for r in records), default=0)
    if skipped:
        facts.append(("non-finite steps skipped", str(skipped)))
    return facts


def write_report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw the PNGs and report.md into `out` (default RUN_DIR/report); returns [report.md, *pngs]."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass the run directory of an ofa-train or ofa-finetune run.")
    records = read_records(run_dir / "metrics.jsonl")
    out = Path(out) if out is not None else run_dir / DEFAULT_OUT
    plots = draw_plots(records, out)
    lines = [f"# Run report: {run_dir.resolve().name}", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in run_facts(run_dir, records)]
    lines.append("")
    for title, path in plots:
        lines += [f"## {title}", "", f"![{title}]({path.name})", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return [report] + [path for _, path in plots]


def log_to_tracker(tracker, run_dir: Path) -> None:
    """The trainer's end-of-run hook: write RUN_DIR/report and log it to mlflow under `report/`. Pictures are a
    convenience, so any failure is one warning line and never fails the run that produced them."""
    try:
        for path in write_report(run_dir):
            tracker.log_artifact(path, DEFAULT_OUT)
    except Exception as e:  # noqa: BLE001 — a finished run must not fail because a plot could not be drawn
        print(f"ofa-train: warning: run report not logged ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="an ofa-train / ofa-finetune run directory")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"where the PNGs and report.md go (default: RUN_DIR/{DEFAULT_OUT})")


def run(args: argparse.Namespace) -> int:
    paths = write_report(args.run_dir, args.out)
    print(f"report: {paths[0]} ({len(paths) - 1} plots)")
    return 0
