"""Evaluation artifacts: `results.parquet` (one row per sample: id, prediction, reference, per-sample scores)
and `eval.json` (format_version, task, metric values, counts, settings), both written atomically, plus the
short human summary printed at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ofa_scale.evaluation.records import PairedRecords
from ofa_scale.evaluation.tasks import TaskScores
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json

EVAL_FORMAT_VERSION = 1
RESULTS_TABLE = "results.parquet"
EVAL_JSON = "eval.json"


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def results_table(paired: PairedRecords, scores: TaskScores) -> pa.Table:
    columns: dict[str, Any] = {
        "id": pa.array(paired.ids, pa.string()),
        "prediction": pa.array([_cell(v) for v in paired.predictions], pa.string()),
        "reference": pa.array([_cell(v) for v in paired.references], pa.string()),
        "missing_prediction": pa.array(paired.missing, pa.bool_()),
    }
    for name, values in scores.per_sample.items():
        columns[name] = pa.array(np.asarray(values, dtype=np.float64))
    return pa.table(columns)


def write_parquet(path: Path, table: pa.Table) -> None:
    table = table.replace_schema_metadata({"format_version": str(EVAL_FORMAT_VERSION)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def eval_document(task: str, main_metric: str, paired: PairedRecords, scores: TaskScores,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format_version": EVAL_FORMAT_VERSION,
        "kind": "ofa-scale evaluation",
        "task": task,
        "main_metric": main_metric,
        "metrics": {k: float(v) for k, v in scores.metrics.items()},
        "counts": {"samples": len(paired.ids), "predictions": paired.num_predictions,
                   "missing_predictions": int(sum(paired.missing))},
        "settings": scores.settings,
        "results_table": RESULTS_TABLE,
        **(extra or {}),
    }


def write_results(out_dir: str | Path, document: dict[str, Any], table: pa.Table) -> Path:
    """Write DIR/results.parquet then DIR/eval.json (last, so its presence marks a complete evaluation)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / RESULTS_TABLE, table)
    atomic_write_json(out / EVAL_JSON, document)
    return out


def summary_line(document: dict[str, Any]) -> str:
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in document["metrics"].items())
    counts = document["counts"]
    missing = f", {counts['missing_predictions']} missing" if counts["missing_predictions"] else ""
    return f"{document['task']:<10} n={counts['samples']}{missing}  {metrics}"


def summary_text(documents: Sequence[dict[str, Any]], out_dir: str | Path) -> str:
    lines = [summary_line(d) for d in documents]
    lines.append(f"(results: {Path(out_dir)})")
    return "\n".join(lines)
