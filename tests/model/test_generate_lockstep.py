"""Generation under a lockstep on 2 processes (gloo): ranks whose samples end at different lengths, or that hold
different numbers of samples (none at all included), run the same number of encoder, decoder and decoder-layer
forwards (ZeRO-3 gathers parameters and TP all-reduces inside each), and each rank's outputs equal its
single-process outputs. The primitive is the one finetune/evaluate.py uses: `not collectives.any_rank(not done)`."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.generate import BOS, PAD, GenerationConfig, generate, score_candidates

WORLD = 2
CANDIDATES = [[500], [500, 600], [500, 601, 602], [501], [502, 603], [504, 605, 606], [507]]


def rank_batch(rank: int, n: int) -> dict:
    g = torch.Generator().manual_seed(10 + rank)
    src = torch.randint(4, 1000, (n, 6), generator=g)
    src[:, 0] = BOS
    return dict(src_tokens=src, patch_images=torch.randn(n, 3, 32, 32, generator=g),
                patch_masks=torch.ones(n, dtype=torch.bool))


# per case and rank: (samples, how to decode); rank 0 stops after 2 tokens, rank 1 is forced to 7
CASES = {
    "beam": [(2, dict(beam_size=2, max_len_b=2)), (2, dict(beam_size=2, max_len_b=7, min_len=7))],
    "greedy": [(3, dict(greedy=True, max_len_b=2)), (1, dict(greedy=True, max_len_b=7, min_len=7))],
    "sampling": [(1, dict(sampling=True, beam_size=2, sampling_topk=5, max_len_b=7, min_len=7)),
                 (2, dict(sampling=True, beam_size=2, sampling_topk=5, max_len_b=1))],
    "empty": [(0, dict(beam_size=2, max_len_b=3)), (2, dict(beam_size=2, max_len_b=5, min_len=5))],
    # all-candidate: 1 sample vs 3 with 3 rows per pass -> 3 passes vs 8 (1 node per pass); then no sample at all
    "allcand": [(1, None), (3, None)],
    "allcand_empty": [(3, None), (0, None)],
}


def run_case(model, name: str, rank: int, lockstep):
    n, decoding = CASES[name][rank]
    batch = rank_batch(rank, n)
    if decoding is None:
        prompts = [[BOS] + list(range(40, 40 + 2 * i)) for i in range(n)]  # different prompt lengths
        return score_candidates(model, batch, CANDIDATES, decoder_prompts=prompts, rows_per_pass=3,
                                lockstep=lockstep)
    gen = torch.Generator().manual_seed(3)
    hyps = generate(model, batch, GenerationConfig(**decoding), generator=gen, lockstep=lockstep)
    return [[(h.tokens, h.score) for h in sample] for sample in hyps]


def count_forwards(model) -> dict:
    counts = {"encoder": 0, "decoder": 0, "decoder_layer": 0}
    for key, module in (("encoder", model.encoder), ("decoder", model.decoder),
                        ("decoder_layer", model.decoder.layers[-1])):
        module.register_forward_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))
    return counts


def _rank(rank: int, port: int, out: str, model) -> None:
    import torch.distributed as dist

    from ofa_scale.parallel import collectives

    torch.set_num_threads(1)
    # a broken lockstep leaves a rank waiting in a collective: fail after a minute instead of hanging
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    counts = count_forwards(model)
    results = {}
    for name in CASES:
        start = dict(counts)
        alone = run_case(model, name, rank, None)  # the single-process run: no collective
        middle = dict(counts)
        locked = run_case(model, name, rank, lambda done: not collectives.any_rank(not done))
        results[name] = {"alone": alone, "locked": locked, "solo_calls": {k: middle[k] - start[k] for k in counts},
                         "calls": {k: counts[k] - middle[k] for k in counts}}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lockstep")
    torch.manual_seed(0)
    model = OFAModel(OFAConfig.preset("ofa_tiny", encoder_layers=1, decoder_layers=2)).eval()  # same weights
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, str(out), model), nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_run_the_same_forwards_and_keep_their_outputs(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    assert r0["calls"] == r1["calls"]
    assert r0["calls"]["decoder_layer"] > 0
    for r in (r0, r1):
        if isinstance(r["alone"], torch.Tensor):
            assert torch.equal(r["locked"], r["alone"])
        else:
            assert len(r["locked"]) == len(r["alone"])
            for got, want in zip(r["locked"], r["alone"]):
                assert [(t.tolist(), s) for t, s in got] == [(t.tolist(), s) for t, s in want]
    # the lockstep did something: without it, the ranks' forwards differ
    assert r0["solo_calls"]["decoder_layer"] != r1["solo_calls"]["decoder_layer"]


def test_hypothesis_lengths_differ_between_ranks(ranks):
    """The setting the test is about: rank 0's beams end after at most 2 tokens + eos, rank 1's after 7 + eos."""
    assert max(len(t) for sample in ranks[0]["beam"]["alone"] for t, _ in sample) <= 3
    assert all(len(t) == 8 for sample in ranks[1]["beam"]["alone"] for t, _ in sample)
    assert ranks[0]["empty"]["locked"] == []
    assert ranks[1]["allcand_empty"]["locked"].shape == (0, len(CANDIDATES))
    assert not torch.equal(ranks[1]["allcand"]["alone"][0], ranks[1]["allcand"]["alone"][1])  # prompts matter
    assert PAD not in [t for sample in ranks[1]["greedy"]["alone"] for toks, _ in sample for t in toks.tolist()]
