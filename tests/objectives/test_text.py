import math
import random

from ofa_scale.objectives.text import insert_masks, pre_caption, pre_question, truncated_poisson, whole_word_mask

MASK = 99


def test_pre_caption_exact():
    assert pre_caption(",.A Man-riding a/horse  <person>\tnear\n\nthe   sea.\n ") == "a man riding a horse person\tnear the sea."
    assert pre_caption("One two three four five", 3) == "one two three"
    assert pre_caption("  #Hello") == "#hello"  # leading spaces protect the punctuation from lstrip, as in OFA


def test_pre_question_keeps_person_tag_and_question_mark():
    assert pre_question("What is <person> holding?") == "what is <person> holding?"
    assert pre_question("?? how  many -dogs/cats", 3) == "how many dogs"


def test_truncated_poisson_support_and_mass():
    pmf = truncated_poisson(3.0)
    # the support ends with the first k whose Poisson(3) mass is < 1e-7
    raw = [math.exp(-3) * 3 ** k / math.factorial(k) for k in range(len(pmf))]
    assert raw[-1] < 1e-7 and raw[-2] >= 1e-7
    assert abs(sum(pmf) - 1.0) < 1e-12
    assert abs(pmf[3] - raw[3] / sum(raw)) < 1e-12


class Scripted(random.Random):
    """An RNG whose span lengths, span starts and insertion positions are given by the test."""

    def __init__(self, lengths, starts, inserts=()):
        super().__init__(0)
        self.lengths, self.starts, self.inserts = list(lengths), list(starts), list(inserts)

    def choices(self, population, weights=None, *, cum_weights=None, k=1):
        out, self.lengths = self.lengths[:k], self.lengths[k:]
        return out

    def sample(self, population, k):
        if self.starts:
            out, self.starts = self.starts[:k], self.starts[k:]
            assert all(s in population for s in out)
            return out
        out, self.inserts = self.inserts[:k], self.inserts[k:]
        return out


# bos, w1 (1 token), w2 (2 tokens), w3, w4 (3 tokens), w5, eos — 10 word starts would be too many; 5 here.
TOKENS = [0, 10, 20, 21, 30, 40, 41, 42, 50, 2]
STARTS = [True, True, True, False, True, True, False, False, True, True]


def test_whole_word_mask_span_collapses_to_one_mask():
    # budget = ceil(0.3 * 5) = 2 words: one span of 2 words starting at w2 → w2 (2 tokens) and w3 vanish.
    out = whole_word_mask(TOKENS, STARTS, 0.3, 3.0, MASK, Scripted(lengths=[2, 4], starts=[2]))
    assert out == [0, 10, MASK, 40, 41, 42, 50, 2]


def test_whole_word_mask_budget_trim_and_two_spans():
    # lengths [1, 5] are trimmed to [1, 1]; spans at w4 and w1
    out = whole_word_mask(TOKENS, STARTS, 0.3, 3.0, MASK, Scripted(lengths=[1, 5], starts=[5, 1]))
    assert out == [0, MASK, 20, 21, 30, MASK, 50, 2]


def test_whole_word_mask_never_runs_past_eos():
    out = whole_word_mask(TOKENS, STARTS, 0.3, 3.0, MASK, Scripted(lengths=[2], starts=[8]))
    assert out == [0, 10, 20, 21, 30, 40, 41, 42, MASK, 2]


def test_zero_length_spans_become_insertions():
    # lengths [0, 2]: one insertion and one 2-word span at w4 (w4 + w5 collapse)
    out = whole_word_mask(TOKENS, STARTS, 0.3, 3.0, MASK, Scripted(lengths=[0, 2], starts=[5], inserts=[0]))
    # result before insertion: [0, 10, 20, 21, 30, MASK, 2]; insertion position 0 + 1 = after bos
    assert out == [0, MASK, 10, 20, 21, 30, MASK, 2]


def test_insert_masks_interior_only():
    rng = random.Random(5)
    for _ in range(50):
        out = insert_masks([0, 5, 6, 2], 2, MASK, rng)
        assert out[0] == 0 and out[-1] == 2 and out.count(MASK) == 2
        assert [t for t in out if t != MASK] == [0, 5, 6, 2]


def test_whole_word_mask_random_is_deterministic_and_consistent():
    tokens = [0] + list(range(10, 210)) + [2]
    starts = [True] * len(tokens)
    a = whole_word_mask(tokens, starts, 0.3, 3.0, MASK, random.Random("7/mask"))
    b = whole_word_mask(tokens, starts, 0.3, 3.0, MASK, random.Random("7/mask"))
    assert a == b
    kept = [t for t in a if t != MASK]
    # the unmasked tokens are an ordered subsequence; at most 60 words are masked (overlapping spans merge)
    assert kept == [t for t in tokens if t in set(kept)]
    assert 40 <= len(tokens) - len(kept) <= 60 and a[0] == 0 and a[-1] == 2
