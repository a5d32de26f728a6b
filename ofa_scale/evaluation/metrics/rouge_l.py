"""ROUGE-L as pycocoevalcap's `Rouge` computes it for captions: per hypothesis, the best LCS precision and the
best LCS recall over its references (each maximised separately) combined into an F-measure with beta = 1.2;
the corpus score is the mean over hypotheses."""

from __future__ import annotations

from typing import Sequence

import numpy as np

BETA = 1.2


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_sentence(hypothesis: str, references: Sequence[str], beta: float = BETA) -> float:
    hyp = hypothesis.split()
    if not hyp or not references:
        return 0.0
    best_precision = best_recall = 0.0
    for ref in references:
        ref_words = ref.split()
        if not ref_words:
            continue
        lcs = lcs_length(ref_words, hyp)
        best_precision = max(best_precision, lcs / len(hyp))
        best_recall = max(best_recall, lcs / len(ref_words))
    if best_precision == 0 or best_recall == 0:
        return 0.0
    return (1 + beta ** 2) * best_precision * best_recall / (best_recall + beta ** 2 * best_precision)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
    """(corpus mean, per-hypothesis scores)."""
    scores = np.array([rouge_l_sentence(h, r) for h, r in zip(hypotheses, references, strict=True)], dtype=float)
    return (float(scores.mean()) if len(scores) else 0.0), scores
