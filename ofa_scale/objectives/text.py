"""OFA's caption/question normalisation (spec §2.0) and the text-infilling noise (spec §2.4, BART-style)."""

from __future__ import annotations

import math
import random
import re
from functools import lru_cache
from typing import Sequence

_LEADING_PUNCT = ",.!?*#:;~"
_MULTI_SPACE = re.compile(r"\s{2,}")


def _normalise(text: str, max_words: int | None, person: bool) -> str:
    text = text.lower().lstrip(_LEADING_PUNCT).replace("-", " ").replace("/", " ")
    if person:
        text = text.replace("<person>", "person")
    # Only runs of >= 2 whitespace characters collapse (a lone tab survives), as in OFA.
    text = _MULTI_SPACE.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if max_words is not None and len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def pre_caption(caption: str, max_words: int | None = None) -> str:
    """OFA's `pre_caption`: lowercase, strip leading punctuation, '-'/'/' → ' ', '<person>' → 'person',
    collapse whitespace runs, keep the first `max_words` words."""
    return _normalise(caption, max_words, person=True)


def pre_question(question: str, max_words: int | None = None) -> str:
    """OFA's `pre_question`: as `pre_caption` without the '<person>' replacement (no '?' is appended)."""
    return _normalise(question, max_words, person=False)


@lru_cache(maxsize=16)
def truncated_poisson(lam: float) -> tuple[float, ...]:
    """BART's span-length distribution: Poisson(lam) pmf for k = 0, 1, … up to and including the first k
    whose mass drops below 1e-7 (at most 128 values), renormalised."""
    pmf = []
    e = math.exp(-lam)
    lam_k, k_fact = 1.0, 1.0
    for k in range(128):
        pmf.append(e * lam_k / k_fact)
        lam_k *= lam
        k_fact *= k + 1
        if pmf[-1] < 1e-7:
            break
    total = sum(pmf)
    return tuple(p / total for p in pmf)


def whole_word_mask(tokens: Sequence[int], word_start: Sequence[bool], ratio: float, poisson_lambda: float,
                    mask_id: int, rng: random.Random) -> list[int]:
    """Whole-word span masking of a bos…eos sequence (fairseq's denoising `add_whole_word_mask`, with
    mask_length=span-poisson, replace_length=1, random_ratio=0).

    ceil(ratio · #word-starts) words are masked in spans whose lengths (in words) follow a truncated
    Poisson; each span becomes one `<mask>`; zero-length spans become `<mask>` insertions at random interior
    positions. bos and eos are never masked.
    """
    n_tok = len(tokens)
    starts_flag = [bool(f) for f in word_start]
    starts_flag[0] = starts_flag[-1] = False
    starts = [i for i, f in enumerate(starts_flag) if f]
    budget = math.ceil(len(starts) * ratio)
    if budget == 0:
        return list(tokens)

    pmf = truncated_poisson(poisson_lambda)
    support = range(len(pmf))
    lengths = rng.choices(support, weights=pmf, k=budget)
    while sum(lengths) < budget:
        lengths += rng.choices(support, weights=pmf, k=budget)
    # Trim to the budget: the span that crosses it is shortened so the lengths add up exactly.
    i, cum = 0, 0
    while cum + lengths[i] < budget:
        cum += lengths[i]
        i += 1
    lengths = lengths[:i] + [budget - cum]
    spans = [n for n in lengths if n > 0]
    num_inserts = len(lengths) - len(spans)
    out = list(tokens)
    if spans:
        chosen = rng.sample(starts, len(spans))  # uniform, without replacement, random order
        keep = [True] * n_tok
        for idx in chosen:
            out[idx] = mask_id
        # A span of n words deletes everything after its first token up to the start of word n+1; the eos
        # acts as an infinitely long word so no span runs past the end. Overlapping spans merge.
        step = [1 if f else 0 for f in starts_flag]
        step[-1] = n_tok + 1
        active = [(idx, n - 1) for idx, n in zip(chosen, spans)]
        while active:
            nxt = []
            for idx, remaining in active:
                remaining -= step[idx + 1]
                if remaining >= 0:
                    keep[idx + 1] = False
                    nxt.append((idx + 1, remaining))
            active = nxt
        out = [t for t, k in zip(out, keep) if k]
    if num_inserts:
        out = insert_masks(out, num_inserts, mask_id, rng)
    return out


def insert_masks(tokens: list[int], count: int, mask_id: int, rng: random.Random) -> list[int]:
    """Insert `count` `<mask>` tokens at distinct random positions strictly between the first and last token."""
    total = len(tokens) + count
    positions = set(p + 1 for p in rng.sample(range(total - 2), count))
    it = iter(tokens)
    return [mask_id if i in positions else next(it) for i in range(total)]
