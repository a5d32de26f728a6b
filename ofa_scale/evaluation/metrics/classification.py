"""Label metrics (spec §7.4, §7.5, §7.8): accuracy; Matthews correlation and F1 with one positive label."""

from __future__ import annotations

import math
from typing import Sequence


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def confusion(predictions: Sequence[str], references: Sequence[str], positive: str) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) treating `positive` as the positive class and every other label as negative."""
    tp = fp = fn = tn = 0
    for p, r in zip(predictions, references, strict=True):
        if p == positive:
            tp, fp = (tp + 1, fp) if r == positive else (tp, fp + 1)
        else:
            fn, tn = (fn + 1, tn) if r == positive else (fn, tn + 1)
    return tp, fp, fn, tn


def matthews_corrcoef(predictions: Sequence[str], references: Sequence[str], positive: str = "yes") -> float:
    """Binary MCC; 0.0 when a marginal is empty (the denominator vanishes), as scikit-learn reports it."""
    tp, fp, fn, tn = confusion(predictions, references, positive)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def f1_positive(predictions: Sequence[str], references: Sequence[str], positive: str = "yes") -> float:
    """F1 of the positive class; 0.0 when there are no positive predictions nor references."""
    tp, fp, fn, _ = confusion(predictions, references, positive)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
