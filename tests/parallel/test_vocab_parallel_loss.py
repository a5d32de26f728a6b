"""The vocabulary-parallel TokenLoss on 2 processes (gloo) equals the single-process TokenLoss on the whole logits:
per-token loss, nll, accuracy and each rank's slice of the gradient, with label smoothing, per-sample weights,
constraint masks and ranges, and a vocabulary padded 37 -> 38 whose padded row sits in the last rank's slice.
The trainer's tp=2 runs (tests/train/test_train_parallel.py) check the same loss inside a whole training step."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ofa_scale.objectives.token_loss import SingleProcessTokenLoss

V = 37  # odd: tp=2 pads it to 38
PADDED = 38
TP = 2
EPSILONS = (0.0, 0.1)
KINDS = ("plain", "masks", "range", "both", "all_pad")


def case(kind: str, seed: int):
    """(padded logits (B, T, 38), target, conf, loss kwargs); the padded column holds a huge logit."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, V, generator=g, dtype=torch.float64) * 3
    logits = torch.cat([logits, torch.full((3, 5, PADDED - V), 50.0, dtype=torch.float64)], -1)
    target = torch.randint(4, V, (3, 5), generator=g)
    target[0, -2:] = 1
    conf = torch.tensor([1.0, 0.5, 2.0])
    masks = torch.rand(3, 5, V, generator=g) < 0.4
    kw = {}
    if kind in ("range", "both"):
        kw["constraint_range"] = (10, 30)  # straddles the two slices [0, 19) and [19, 38)
        target = torch.where(target == 1, target, target.clamp(10, 29))
    if kind in ("masks", "both"):
        masks[torch.arange(3)[:, None], torch.arange(5)[None], target] = True
        kw["constraint_masks"] = masks
    if kind == "all_pad":
        target = torch.ones_like(target)
    logits[1].scatter_add_(-1, target[1].unsqueeze(-1), torch.full((5, 1), 20.0, dtype=logits.dtype))  # row 1: right
    return logits, target, conf, kw


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ofa_scale.objectives.token_loss import VocabParallelTokenLoss
    from ofa_scale.parallel import collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    per = PADDED // TP
    results = {}
    collectives.start_recording()
    for eps in EPSILONS:
        for i, kind in enumerate(KINDS):
            logits, target, conf, kw = case(kind, i)
            local = logits[..., rank * per:(rank + 1) * per].clone().requires_grad_()
            loss = VocabParallelTokenLoss(eps, 1, vocab_start=rank * per, real_vocab=V, group=dist.group.WORLD,
                                          tp_size=TP)
            tl = loss(local, target, conf=conf, **kw)
            tl.loss.sum().backward()
            results[(eps, kind)] = {"loss": tl.loss.detach(), "nll": tl.nll.detach(), "valid": tl.valid,
                                    "correct": tl.correct, "grad": local.grad}
    recorded = collectives.stop_recording()
    torch.save({"results": results, "recorded": recorded}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks inherit the imported modules instead of importing torch and megatron again (seconds each)
    import megatron.core.tensor_parallel  # noqa: F401

    mp.start_processes(_rank, args=(port, str(out)), nprocs=TP, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(TP)]


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("kind", KINDS)
def test_two_vocabulary_slices_match_the_single_process_loss_and_gradient(tp2_results, eps, kind):
    logits, target, conf, kw = case(kind, KINDS.index(kind))
    full = logits[..., :V].clone().requires_grad_()
    want = SingleProcessTokenLoss(eps, 1)(full, target, conf=conf, **kw)
    want.loss.sum().backward()
    got = [r["results"][(eps, kind)] for r in tp2_results]
    for r in got:  # the loss is replicated on every tensor-parallel rank
        torch.testing.assert_close(r["loss"], want.loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["nll"], want.nll.detach(), rtol=1e-12, atol=1e-12)
        assert torch.equal(r["valid"], want.valid) and torch.equal(r["correct"], want.correct)
    grad = torch.cat([r["grad"] for r in got], -1)
    torch.testing.assert_close(grad[..., :V], full.grad, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(grad[..., V:]) == 0  # the padded row takes no probability mass
    if kind != "all_pad":
        assert want.correct.any() and want.loss.sum() > 0  # the case exercises accuracy and a real loss


def test_gradient_free_reductions_go_through_the_collectives_module(tp2_results):
    recorded = tp2_results[0]["recorded"]
    assert recorded and set(recorded) <= {("cpu", "all_reduce(max)"), ("cpu", "all_reduce(sum)")}
    assert ("cpu", "all_reduce(sum)") in recorded  # the allowed-set size, with label smoothing
