"""The fast all-candidate scorer (model/candidates.py) against OFA's way (score_candidates_naive) on the tiny preset
with random weights, fp32, eval mode: prompts of different lengths per sample, 60 candidates of 1-3 tokens sharing
prefixes, constrained and not, both attention kernels, and passes small enough that levels split into chunks."""

from __future__ import annotations

import random

import pytest
import torch

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.candidates import CandidateTree, run_in_lockstep
from ofa_scale.model.generate import BOS, EOS, PAD, score_candidates, score_candidates_naive
from ofa_scale.utils.trie import Trie


@pytest.fixture(scope="module")
def model() -> OFAModel:
    torch.manual_seed(0)
    # a small vocabulary keeps the naive path's full-vocabulary logits cheap; every id used here is below it
    return OFAModel(OFAConfig.preset("ofa_tiny", encoder_layers=2, decoder_layers=3, vocab_size=1024)).eval()


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(5)
    return dict(src_tokens=torch.tensor([[0, 11, 12, 13, 14, 2], [0, 21, 22, 2, PAD, PAD], [0, 31, 2, PAD, PAD, PAD]]),
                patch_images=torch.randn(3, 3, 32, 32, generator=g), patch_masks=torch.tensor([True, False, True]))


def candidate_set(n: int = 60, seed: int = 1) -> list[list[int]]:
    """n distinct candidates of 1-3 tokens drawn from few first tokens, so many share prefixes (one is a prefix of
    another, as " red" and " red car" are)."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < n:
        cand = [rng.choice([500, 501, 502, 503, 700])] + [rng.randrange(600, 612) for _ in range(rng.randrange(3))]
        if cand not in out:
            out.append(cand)
    return out


PROMPTS = [[BOS, 40, 41, 42, 43, 44, 45], [BOS], [BOS, 50, 51, 52]]  # prev_output-style, one length each


@pytest.fixture(scope="module")
def naive(model, batch) -> dict:
    """OFA's way (math attention), constrained and not: the reference every fast run is compared with."""
    model.set_attention_impl("math")
    try:
        return {constrain: score_candidates_naive(model, batch, candidate_set(), decoder_prompts=PROMPTS,
                                                  constrain=constrain) for constrain in (True, False)}
    finally:
        model.set_attention_impl("sdpa")


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("constrain", [True, False])
def test_tree_scores_equal_the_naive_scores(model, batch, naive, impl, constrain):
    cands = candidate_set()
    assert sum(len(c) for c in cands) > 100 and any(len(c) == 3 for c in cands)
    want = naive[constrain]
    model.set_attention_impl(impl)
    try:
        got = score_candidates(model, batch, cands, decoder_prompts=PROMPTS, constrain=constrain)
        # 3 nodes per pass (x 3 samples): levels 2 and 3 are split into chunks with their own ancestor sets
        chunked = score_candidates(model, batch, cands, decoder_prompts=PROMPTS, constrain=constrain,
                                   rows_per_pass=9)
    finally:
        model.set_attention_impl("sdpa")
    assert got.shape == (3, len(cands)) and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, want, rtol=0, atol=1e-5)


def test_a_narrower_constraint_trie_and_default_prompts(model, batch):
    cands = candidate_set(20, seed=3)
    trie = Trie.from_answers(cands[:12], bos=BOS, eos=EOS)  # 8 candidates partly leave it: -inf for them
    want = score_candidates_naive(model, batch, cands, constraint_trie=trie)
    got = score_candidates(model, batch, cands, constraint_trie=trie)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(want).any()
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=1e-5)


def test_the_prediction_is_the_argmax_of_the_naive_scores(model, batch, naive):
    fast = score_candidates(model, batch, candidate_set(), decoder_prompts=PROMPTS)
    assert fast.argmax(1).tolist() == naive[True].argmax(1).tolist()


def test_an_empty_batch_scores_nothing(model, batch):
    empty = {k: v[:0] for k, v in batch.items()}
    assert score_candidates(model, empty, [[500]]).shape == (0, 1)
    # under a lockstep the rank still runs its passes (on a placeholder sample): others may be waiting on them
    calls = []
    out = score_candidates(model, empty, [[500], [501, 600]], lockstep=lambda done: calls.append(done) or done)
    assert out.shape == (0, 2) and calls == [False, False, True]  # levels 1 and 2, then done


def test_the_tree_shares_prefixes():
    tree = CandidateTree([[5, 6], [5, 7], [5], [8]], eos=EOS)
    assert [[tree.prefixes[n] for n in level] for level in tree.levels] == [[()], [(5,), (8,)], [(5, 6), (5, 7)]]
    # only nodes with children keep keys/values for their descendants
    assert {tree.prefixes[n] for n in tree.store_row} == {(), (5,)}
    # edges: root -> 5, 8; (5,) -> 6, 7, eos; leaves -> eos
    assert tree.num_edges == 2 + 3 + 3


def test_run_in_lockstep_pads_with_idle_passes():
    """A rank with fewer passes runs idle ones until the lockstep says every rank is done."""
    ran, others_left = [], [3]  # the other rank has 3 passes; this one 1

    def lockstep(done: bool) -> bool:
        finished = others_left[0] == 0
        others_left[0] = max(0, others_left[0] - 1)
        return done and finished

    run_in_lockstep([lambda: ran.append("real")], lambda: ran.append("idle"), lockstep)
    assert ran == ["real", "idle", "idle"]


@torch.no_grad()
def test_tree_scoring_reads_every_parameter_inside_its_owner():
    """ZeRO-3-clean (tests/model/test_zero3_clean.py): the scorer calls the decoder's modules, never their weights."""
    from test_zero3_clean import CFG, _batch, foreign_parameter_uses

    torch.manual_seed(0)
    small = OFAModel(CFG).eval()
    batch = _batch(2)
    del batch["prev_output_tokens"]
    violations, checked = foreign_parameter_uses(small, lambda: score_candidates(
        small, batch, [[40], [40, 41], [42, 43, 44]], decoder_prompts=[[BOS, 5, 6], [BOS]],
        lockstep=lambda done: done))
    assert violations == set() and checked > 0
