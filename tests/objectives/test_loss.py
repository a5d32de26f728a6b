"""The single-process TokenLoss against a naive per-token reference of spec §6.1, drop-worst, and the loss
normalisation (token counts, per_group / global_tokens denominators, a micro-batch's share of the step loss)."""

import math
from types import SimpleNamespace

import pytest
import torch

from ofa_scale.objectives.loss import (count_loss_tokens, global_loss_denominators, loss_denominators)
from ofa_scale.objectives.step import group_loss, micro_batch_loss
from ofa_scale.objectives.token_loss import (SingleProcessTokenLoss, TokenLoss, VocabParallelTokenLoss, kept_tokens,
                                             make_token_loss)

PAD = 1
V = 12


def naive(logits, target, eps, conf, allowed_of):
    """Per-token loop straight from spec §6.1 (float64): [(row, loss, nll, argmax == target)] per non-pad token."""
    out = []
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            y = int(target[b, t])
            if y == PAD:
                continue
            allowed = allowed_of(b, t)
            z = [float(logits[b, t, v]) for v in allowed]
            lse = math.log(sum(math.exp(x) for x in z))
            lp = {v: (float(logits[b, t, v]) - lse) * float(conf[b]) for v in allowed}
            n_ll = -lp[y]
            smooth = -sum(lp.values())
            eps_i = eps / (len(allowed) - 1)
            best = max(allowed, key=lambda v: float(logits[b, t, v]))
            out.append((b, (1 - eps - eps_i) * n_ll + eps_i * smooth, n_ll, best == y))
    return out


def make(seed=0, b=3, t=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=g, dtype=torch.float64)
    target = torch.randint(4, V, (b, t), generator=g)
    target[0, 3:] = PAD
    target[2, 1] = PAD
    conf = torch.tensor([1.0, 0.6, 2.0], dtype=torch.float64)
    return logits, target, conf


def check_against(tl, ref, target):
    assert tl.loss.sum().item() == pytest.approx(sum(r[1] for r in ref), rel=1e-9)
    assert tl.nll.sum().item() == pytest.approx(sum(r[2] for r in ref), rel=1e-9)
    assert torch.equal(tl.valid, target != PAD)
    assert tl.correct[tl.valid].tolist() == [r[3] for r in ref]
    assert not tl.correct[~tl.valid].any() and not tl.loss[~tl.valid].any()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_naive_reference_with_weights(eps):
    logits, target, conf = make()
    loss = SingleProcessTokenLoss(eps, PAD)
    assert isinstance(loss, TokenLoss)
    tl = loss(logits, target, conf=conf)
    ref = naive(logits, target, eps, conf, lambda b, t: list(range(V)))
    check_against(tl, ref, target)
    assert int(tl.valid.sum()) == len(ref) == 12
    # per position, not only in sum
    assert tl.loss[target != PAD].tolist() == pytest.approx([r[1] for r in ref], rel=1e-9)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_constraint_masks_and_range_restrict_softmax_and_smoothing(eps):
    logits, target, conf = make(1)
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 5, V, generator=g) < 0.5
    masks[..., 0] = True
    start, end = 6, 10
    target = torch.where(target == PAD, target, target.clamp(start, end - 1))
    masks.scatter_(-1, target.unsqueeze(-1), True)  # the target is always allowed
    rng_allowed = [v for v in range(V) if v < 4 or start <= v < end]
    loss = SingleProcessTokenLoss(eps, PAD)

    tl = loss(logits, target, conf=conf, constraint_masks=masks, constraint_range=(start, end))
    check_against(tl, naive(logits, target, eps, conf, lambda b, t: [v for v in rng_allowed if masks[b, t, v]]),
                  target)
    only_range = loss(logits, target, conf=conf, constraint_range=(start, end))
    check_against(only_range, naive(logits, target, eps, conf, lambda b, t: rng_allowed), target)
    only_masks = loss(logits, target, conf=conf, constraint_masks=masks)
    check_against(only_masks, naive(logits, target, eps, conf, lambda b, t: [v for v in range(V) if masks[b, t, v]]),
                  target)
    if eps:  # smoothing over the restricted set differs from smoothing over the full vocabulary
        full = loss(logits, target, conf=conf)
        assert abs(full.loss.sum().item() - only_range.loss.sum().item()) > 1e-3


def test_gradient_matches_reference():
    logits, target, conf = make(2)
    logits.requires_grad_(True)
    SingleProcessTokenLoss(0.1, PAD)(logits, target, conf=conf).loss.sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(ref, -1) * conf.view(3, 1, 1)
    valid = target != PAD
    nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lp.sum(-1)
    eps_i = 0.1 / (V - 1)
    ((1 - 0.1 - eps_i) * nll + eps_i * smooth)[valid].sum().backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-12)
    assert not logits.grad[~valid].any()  # pad positions never reach the softmax


def test_low_precision_logits_are_reduced_in_fp32():
    logits, target, conf = make(3)
    tl = SingleProcessTokenLoss(0.1, PAD)(logits.bfloat16(), target, conf=conf)
    assert tl.loss.dtype == torch.float32
    ref = SingleProcessTokenLoss(0.1, PAD)(logits.bfloat16().double(), target, conf=conf)
    torch.testing.assert_close(tl.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)


def test_padded_vocabulary_columns_take_no_probability_mass():
    logits, target, conf = make(4)
    padded = torch.cat([logits, torch.full((3, 5, 4), 50.0, dtype=logits.dtype)], -1).requires_grad_()
    got = SingleProcessTokenLoss(0.1, PAD, real_vocab=V)(padded, target, conf=conf)
    check_against(got, naive(logits, target, 0.1, conf, lambda b, t: list(range(V))), target)
    got.loss.sum().backward()
    assert torch.count_nonzero(padded.grad[..., V:]) == 0


def test_a_batch_of_only_padding_has_zero_loss_and_zero_gradient():
    logits = torch.randn(2, 3, V, requires_grad=True)
    tl = SingleProcessTokenLoss(0.1, PAD)(logits, torch.full((2, 3), PAD), conf=torch.ones(2))
    assert tl.loss.sum().item() == 0 and not tl.valid.any() and not tl.correct.any()
    tl.loss.sum().backward()
    assert not logits.grad.any()


def test_drop_worst_keeps_the_smallest_token_losses():
    logits, target, conf = make(5)
    tl = SingleProcessTokenLoss(0.0, PAD)(logits, target, conf=conf)
    kept = tl.drop_worst(0.3)
    losses = sorted(r[1] for r in naive(logits, target, 0.0, conf, lambda b, t: list(range(V))))
    k = int(len(losses) * 0.7)
    assert int(kept.valid.sum()) == k == kept_tokens(12, 0.3) == int(count_loss_tokens([{"vl": {"target": target}}],
                                                                                         ["vl"], PAD, 0.3)[0])
    assert kept.loss.sum().item() == pytest.approx(sum(losses[:k]), rel=1e-9)
    assert not kept.loss[~kept.valid].any() and not kept.nll[~kept.valid].any()
    assert not (kept.correct & ~kept.valid).any()
    assert tl.drop_worst(0.0) is tl


# ------------------------------------------------------------------------------------------------- normalisation
def group(seed, rows=slice(None)):
    logits, target, conf = make(seed)
    return logits[rows], {"target": target[rows], "conf": conf[rows]}


def test_step_loss_is_invariant_to_micro_batching_in_both_modes():
    loss = SingleProcessTokenLoss(0.1, PAD)
    whole = {"vl": group(6), "aux": group(7)}
    groups = ["vl", "aux"]
    for mode in ("global_tokens", "per_group"):
        den = global_loss_denominators([{g: b for g, (_, b) in whole.items()}], groups, mode, PAD)
        one_shot, _ = micro_batch_loss(loss, {g: lg for g, (lg, _) in whole.items()},
                                       {g: b for g, (_, b) in whole.items()}, den)
        # two micro-batches (rows 0-1 and row 2) with the step's denominators give the same step loss
        parts = [{"vl": group(6, s), "aux": group(7, s)} for s in (slice(0, 2), slice(2, 3))]
        mbs = [{g: b for g, (_, b) in p.items()} for p in parts]
        assert global_loss_denominators(mbs, groups, mode, PAD) == den
        split = sum(micro_batch_loss(loss, {g: lg for g, (lg, _) in p.items()}, mb, den)[0]
                    for p, mb in zip(parts, mbs))
        assert split.item() == pytest.approx(one_shot.item(), rel=1e-6)  # shares are summed in fp32

    n = {g: int((b["target"] != PAD).sum()) for g, (_, b) in whole.items()}
    sums = {g: loss(lg, b["target"], conf=b["conf"]).loss.sum().item() for g, (lg, b) in whole.items()}
    counts = torch.tensor([n["vl"], n["aux"]], dtype=torch.float64)
    assert loss_denominators(counts, "global_tokens").tolist() == [n["vl"] + n["aux"]] * 2
    assert loss_denominators(counts, "per_group").tolist() == [n["vl"], n["aux"]]
    mb = {g: b for g, (_, b) in whole.items()}
    lg = {g: x for g, (x, _) in whole.items()}
    glob, _ = micro_batch_loss(loss, lg, mb, global_loss_denominators([mb], groups, "global_tokens", PAD))
    assert glob.item() == pytest.approx((sums["vl"] + sums["aux"]) / (n["vl"] + n["aux"]), rel=1e-6)
    per, _ = micro_batch_loss(loss, lg, mb, global_loss_denominators([mb], groups, "per_group", PAD))
    assert per.item() == pytest.approx(sums["vl"] / n["vl"] + sums["aux"] / n["aux"], rel=1e-6)  # OFA's v1 + v2


def test_counts_skip_absent_groups_and_an_empty_group_divides_by_one():
    _, vl = group(8)
    counts = count_loss_tokens([{"vl": vl}, {"vl": vl}], ["vl", "aux"], PAD)
    assert counts.tolist() == [24.0, 0.0] and counts.dtype == torch.float64
    assert loss_denominators(counts, "per_group").tolist() == [24.0, 1.0]
    with pytest.raises(ValueError, match="per_group, global_tokens"):
        loss_denominators(counts, "per_token")


def test_group_loss_applies_drop_worst_and_takes_separate_labels():
    logits, batch = group(9)
    loss = SingleProcessTokenLoss(0.0, PAD)
    part, tl = group_loss(loss, logits, batch, 4.0, drop_worst_ratio=0.5)
    assert int(tl.valid.sum()) == kept_tokens(12, 0.5) == 6
    assert part.item() == pytest.approx(tl.loss.sum().item() / 4.0)
    other = batch["target"].flip(0)
    _, tl2 = group_loss(loss, logits, {"conf": batch["conf"]}, 1.0, target=other)
    assert torch.equal(tl2.valid, other != PAD)


def test_make_token_loss_follows_the_parallel_context():
    assert type(make_token_loss(None, 0.1, PAD)) is SingleProcessTokenLoss
    layout = SimpleNamespace(vocab_size=203, padded_vocab_size=204)
    one = SimpleNamespace(tp_size=1, layout=layout)
    loss = make_token_loss(one, 0.1, PAD)
    assert type(loss) is SingleProcessTokenLoss and loss.real_vocab == 203 and loss.epsilon == 0.1
    group_handle = object()
    two = SimpleNamespace(tp_size=2, layout=layout, tp_group=group_handle, vocab_range=lambda: (102, 204))
    split = make_token_loss(two, 0.1, PAD)
    assert isinstance(split, VocabParallelTokenLoss) and not isinstance(split, SingleProcessTokenLoss)
    assert (split.vocab_start, split.real_vocab, split.group, split.tp_size, split.ignore_index) == (
        102, 203, group_handle, 2, PAD)


def test_denominators_are_all_reduced_on_the_cpu_through_the_collectives_module(tmp_path):
    import torch.distributed as dist

    from ofa_scale.parallel import collectives

    _, vl = group(10)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        collectives.start_recording()
        den = global_loss_denominators([{"vl": vl}], ["vl"], "per_group", PAD)
        calls = collectives.stop_recording()
    finally:
        dist.destroy_process_group()
    assert den == {"vl": 12.0} and calls == [("cpu", "all_reduce(sum)")]
