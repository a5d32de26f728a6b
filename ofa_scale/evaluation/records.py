"""Prediction / reference JSONL files: one JSON object per line, each with an `id`; paired by id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ofa_scale.errors import UserError
from ofa_scale.evaluation.tasks import TaskSpec


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; pass a JSONL file with one object per line")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no} is not valid JSON ({e.msg}); write one JSON object per line") \
                    from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), (str, int)) \
                    or isinstance(record.get("id"), bool):
                raise UserError(f"{path}:{line_no} must be a JSON object with a string or integer 'id'")
            records.append(record)
    return records


@dataclass
class PairedRecords:
    ids: list[str]
    predictions: list[Any]      # task values (missing ones replaced by the task's empty prediction)
    references: list[Any]
    missing: list[bool]         # True where the reference had no prediction
    num_predictions: int


def _index(records: list[dict], what: str) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for r in records:
        key = str(r["id"])
        if key in table:
            raise UserError(f"{what} id {key!r} appears more than once; keep one record per id")
        table[key] = r
    return table


def pair_records(spec: TaskSpec, predictions: list[dict], references: list[dict], *,
                 allow_missing: bool = False) -> PairedRecords:
    """Pair predictions with references by id (in reference order) and parse the task's fields."""
    preds, refs = _index(predictions, "prediction"), _index(references, "reference")
    if not refs:
        raise UserError("the references file has no records; nothing to score")
    unknown = [k for k in preds if k not in refs]
    if unknown:
        raise UserError(f"{len(unknown)} prediction id(s) have no reference (e.g. {unknown[0]!r}); "
                        "check that the predictions and references belong to the same split")
    absent = [k for k in refs if k not in preds]
    if absent and not allow_missing:
        raise UserError(f"{len(absent)} reference id(s) have no prediction (e.g. {absent[0]!r}); "
                        "pass --allow-missing to score them as wrong")
    out = PairedRecords([], [], [], [], len(preds))
    for key, ref in refs.items():
        out.ids.append(key)
        out.references.append(spec.read_reference(ref))
        pred = preds.get(key)
        out.missing.append(pred is None)
        out.predictions.append(spec.empty_prediction if pred is None else spec.read_prediction(pred, ref))
    return out
