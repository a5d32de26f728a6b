"""BLEU-1..4 exactly as pycocoevalcap's `Bleu(4)` computes it (option "closest").

Corpus BLEU pools clipped n-gram matches and guesses over all hypotheses; the brevity penalty compares the
summed hypothesis length with the summed *closest* reference lengths (ties: the shorter reference). Per-sentence
scores use the same formula on one sentence. BLEU-k is the geometric mean of precisions 1..k; the tiny/small
constants keep zero counts finite exactly as the reference implementation does.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ofa_scale.evaluation.metrics.ngrams import NGram, ngram_counts

_TINY = 1e-15  # added to matches
_SMALL = 1e-9  # added to guesses


@dataclass(frozen=True)
class BleuResult:
    corpus: tuple[float, ...]   # BLEU-1..n over the whole corpus
    per_sentence: np.ndarray    # (num_hypotheses, n)


def _closest_length(ref_lengths: Sequence[int], hyp_length: int) -> int:
    return min(ref_lengths, key=lambda length: (abs(length - hyp_length), length))


def _cumulative_bleu(matches: Sequence[float], guesses: Sequence[float], hyp_len: float, ref_len: float) -> list[float]:
    scores, product = [], 1.0
    for k, (m, g) in enumerate(zip(matches, guesses)):
        product *= (m + _TINY) / (g + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (hyp_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> BleuResult:
    """BLEU of space-tokenised `hypotheses[i]` against `references[i]` (a non-empty list each)."""
    total_matches, total_guesses = [0] * n, [0] * n
    total_hyp_len = total_ref_len = 0
    per_sentence = np.zeros((len(hypotheses), n))
    for i, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
        if not refs:
            raise ValueError(f"hypothesis {i} has no references")
        words = hyp.split()
        max_ref_counts: Counter[NGram] = Counter()
        ref_lengths = []
        for ref in refs:
            ref_words = ref.split()
            ref_lengths.append(len(ref_words))
            for gram, count in ngram_counts(ref_words, n).items():
                if count > max_ref_counts[gram]:
                    max_ref_counts[gram] = count
        matches = [0] * n
        for gram, count in ngram_counts(words, n).items():
            matches[len(gram) - 1] += min(count, max_ref_counts.get(gram, 0))
        guesses = [max(0, len(words) - k) for k in range(n)]
        ref_len = _closest_length(ref_lengths, len(words))
        per_sentence[i] = _cumulative_bleu(matches, guesses, len(words), ref_len)
        for k in range(n):
            total_matches[k] += matches[k]
            total_guesses[k] += guesses[k]
        total_hyp_len += len(words)
        total_ref_len += ref_len
    corpus = tuple(_cumulative_bleu(total_matches, total_guesses, total_hyp_len, total_ref_len))
    return BleuResult(corpus=corpus, per_sentence=per_sentence)
