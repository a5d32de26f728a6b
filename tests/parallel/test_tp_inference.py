"""Generation and all-candidate scoring on a tensor-parallel model (2 gloo processes, tp=2) equal the single-process
model's inside `full_vocabulary_logits`: decoder logits over the whole real vocabulary (1001 tokens, padded to 1002,
so the last rank holds a padding row that must be cut), beam-search tokens and scores (unconstrained and under a
trie that reaches the last real token) on both ranks, and constrained candidate scores. Outside the block the
logits are the rank's vocabulary slice again, as the vocab-parallel loss of training expects. Both models start
from the name-keyed initial weights (model/init.py), so they hold the same values."""

from __future__ import annotations

import datetime
import os

import pytest
import torch

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.generate import BOS, EOS, GenerationConfig, encode, generate, score_candidates
from ofa_scale.model.init import init_weights
from ofa_scale.utils.trie import Trie
from forked_ranks import run_forked

TP = 2
VOCAB = 1001  # odd: tp=2 pads it to 1002, the padding row sits in rank 1's slice
PADDED = 1002
SEED = 7
# candidates around the slice boundary (501) and the last real token (1000); some share prefixes
CANDIDATES = [[500], [500, 501], [501, 999, 1000], [1000], [1000, 7], [998, 500], [12, 13, 14]]
TRIE_ANSWERS = CANDIDATES[:5]  # the last two candidates leave the trie: -inf for them


def config() -> OFAConfig:
    return OFAConfig.preset("ofa_tiny", encoder_layers=1, decoder_layers=2, vocab_size=VOCAB)


def batch() -> dict:
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, VOCAB, (2, 6), generator=g)
    src[:, 0] = BOS
    return dict(src_tokens=src, patch_images=torch.randn(2, 3, 32, 32, generator=g),
                patch_masks=torch.tensor([True, False]))


def prev_tokens() -> torch.Tensor:
    prev = torch.randint(4, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    prev[:, 0] = BOS
    prev[1, 2] = VOCAB - 1
    return prev


def trie() -> Trie:
    return Trie.from_answers(TRIE_ANSWERS, bos=BOS, eos=EOS)


def inference(model) -> dict:
    """What generation and scoring see: teacher-forced decoder logits, beam search with and without a trie, and
    constrained candidate scores (called inside `full_vocabulary_logits` on the TP ranks)."""
    b = batch()
    beam = GenerationConfig(beam_size=3, max_len_b=4, min_len=2)
    hyps = {name: [[(h.tokens.tolist(), h.score) for h in sample]
                   for sample in generate(model, b, beam, constraint_trie=t)]
            for name, t in (("free", None), ("trie", trie()))}
    return {"logits": model.decoder(prev_tokens(), encode(model, b)), "hyps": hyps,
            "scores": score_candidates(model, b, CANDIDATES, constraint_trie=trie())}


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ofa_scale.parallel import collectives
    from ofa_scale.parallel.context import setup_parallel
    from ofa_scale.parallel.layout import ParallelConfig, validate_layout
    from ofa_scale.parallel.tensor_parallel import TensorParallelLayerFactory, full_vocabulary_logits
    from ofa_scale.training.prepare import build_module, materialise

    torch.set_num_threads(1)
    # a rank left waiting in a collective fails after a minute instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP,
                            timeout=datetime.timedelta(seconds=60))
    cfg = config()
    layout = validate_layout(ParallelConfig(tp=TP), cfg, TP)
    ctx = setup_parallel(layout)
    assert isinstance(ctx.layer_factory, TensorParallelLayerFactory) and layout.padded_vocab_size == PADDED
    module, is_meta = build_module(ctx, cfg)
    model = materialise(ctx, module, cfg, SEED, is_meta).eval()
    with torch.no_grad():
        before = model.decoder(prev_tokens(), encode(model, batch()))
        collectives.start_recording()
        with full_vocabulary_logits(model):
            full = inference(model)
        recorded = collectives.stop_recording()
        after = model.decoder(prev_tokens(), encode(model, batch()))
    try:  # the gather has no backward: a caller with gradients on is told, before any collective
        with full_vocabulary_logits(model):
            model.decoder(prev_tokens(), encode(model, batch()))
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    torch.save({"before": before, "after": after, "full": full, "recorded": recorded, "refused": refused,
                "flag_after": ctx.layer_factory.full_logits}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.manual_seed(0)
    model = OFAModel(config()).eval()
    init_weights(model, SEED)
    with torch.no_grad():
        return inference(model)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_forked(_rank, TP, tmp_path_factory.mktemp("tp_inference"))


def test_full_vocabulary_logits_equal_the_single_process_logits(ranks, reference):
    want = reference["logits"]
    assert want.shape == (2, 5, VOCAB)
    for r in ranks:
        assert r["full"]["logits"].shape == want.shape  # gathered, padding row cut
        torch.testing.assert_close(r["full"]["logits"], want, rtol=0, atol=1e-5)
    # the gather goes through the collectives module (its device check and policy)
    assert ("cpu", "all_gather") in ranks[0]["recorded"]


def test_outside_the_block_each_rank_keeps_its_vocabulary_slice(ranks, reference):
    per = PADDED // TP
    want = reference["logits"]
    for rank, r in enumerate(ranks):
        assert r["flag_after"] is False
        assert "torch.no_grad()" in r["refused"]
        for key in ("before", "after"):
            local = r[key]
            assert local.shape == (2, 5, per)
            start, stop = rank * per, min((rank + 1) * per, VOCAB)
            torch.testing.assert_close(local[..., :stop - start], want[..., start:stop], rtol=0, atol=1e-5)
    assert torch.count_nonzero(ranks[1]["before"][..., VOCAB - per:]) == 0  # the padding row: zero weights


@pytest.mark.parametrize("name", ["free", "trie"])
def test_beam_search_gives_the_single_process_hypotheses_on_both_ranks(ranks, reference, name):
    want = reference["hyps"][name]
    assert [len(sample) for sample in want] == [3, 3]
    for r in ranks:
        got = r["full"]["hyps"][name]
        assert [[toks for toks, _ in sample] for sample in got] == [[toks for toks, _ in sample] for sample in want]
        for g_sample, w_sample in zip(got, want):
            for (_, g_score), (_, w_score) in zip(g_sample, w_sample):
                assert abs(g_score - w_score) < 1e-5
    assert ranks[0]["full"]["hyps"][name] == ranks[1]["full"]["hyps"][name]  # bit-identical across TP ranks
    if name == "trie":  # the constrained beams follow the trie, through the last real token
        finished = {tuple(toks) for sample in want for toks, _ in sample}
        assert finished <= {tuple(a + [EOS]) for a in TRIE_ANSWERS}
        assert any(VOCAB - 1 in toks for toks in finished)


def test_constrained_candidate_scores_equal_the_single_process_scores(ranks, reference):
    want = reference["scores"]
    assert want.shape == (2, len(CANDIDATES))
    assert torch.isfinite(want[:, :len(TRIE_ANSWERS)]).all() and torch.isinf(want[:, len(TRIE_ANSWERS):]).all()
    for r in ranks:
        torch.testing.assert_close(r["full"]["scores"], want, rtol=0, atol=1e-5)
