"""n-gram counting shared by BLEU and CIDEr-D."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

NGram = tuple[str, ...]


def ngram_counts(words: Sequence[str], max_n: int) -> Counter[NGram]:
    """Counts of all 1..max_n-grams of `words`, inserted shortest order first then left to right (the order
    pycocoevalcap sums in, so floating-point sums match it bit for bit)."""
    counts: Counter[NGram] = Counter()
    for k in range(1, max_n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts
