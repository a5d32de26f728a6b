import math

import pytest
import torch

from ofa_scale.objectives import TASK_ID, TASKS
from ofa_scale.objectives.loss import (combine_group_losses, count_loss_tokens, label_smoothed_cross_entropy,
                                       loss_denominators, task_metrics, merge_task_sums)

PAD = 1
V = 12


def naive(logits, target, eps, conf, allowed_of):
    """Per-token loop straight from spec §6.1 (float64)."""
    loss = nll = 0.0
    per_tok = []
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
            tok = (1 - eps - eps_i) * n_ll + eps_i * smooth
            loss += tok
            nll += n_ll
            per_tok.append((b, tok))
    return loss, nll, per_tok


def make(seed=0, b=3, t=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=g, dtype=torch.float64)
    target = torch.randint(4, V, (b, t), generator=g)
    target[0, 3:] = PAD
    target[2, 1] = PAD
    conf = torch.tensor([1.0, 0.6, 2.0], dtype=torch.float64)
    return logits, target, conf


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_naive_reference_with_weights(eps):
    logits, target, conf = make()
    out = label_smoothed_cross_entropy(logits, target, epsilon=eps, conf=conf)
    ref_loss, ref_nll, _ = naive(logits, target, eps, conf, lambda b, t: list(range(V)))
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert out.nll_loss.item() == pytest.approx(ref_nll, rel=1e-6)
    assert out.ntokens.item() == int((target != PAD).sum()) == 12


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_constraint_masks_and_range_restrict_softmax_and_smoothing(eps):
    logits, target, conf = make(1)
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 5, V, generator=g) < 0.5
    masks[..., 0] = True
    masks.scatter_(-1, target.unsqueeze(-1), True)  # the target is always allowed
    start, end = 6, 10
    target = torch.where(target == PAD, target, target.clamp(start, end - 1))
    masks.scatter_(-1, target.unsqueeze(-1), True)
    rng_allowed = [v for v in range(V) if v < 4 or start <= v < end]

    def both(b, t):
        return [v for v in rng_allowed if masks[b, t, v]]

    out = label_smoothed_cross_entropy(logits, target, epsilon=eps, conf=conf, constraint_masks=masks,
                                       constraint_range=(start, end))
    ref_loss, ref_nll, _ = naive(logits, target, eps, conf, both)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert out.nll_loss.item() == pytest.approx(ref_nll, rel=1e-6)
    only_range = label_smoothed_cross_entropy(logits, target, epsilon=eps, conf=conf, constraint_range=(start, end))
    assert only_range.loss.item() == pytest.approx(naive(logits, target, eps, conf, lambda b, t: rng_allowed)[0],
                                                   rel=1e-6)
    if eps:  # smoothing over the restricted set differs from smoothing over the full vocabulary
        full = label_smoothed_cross_entropy(logits, target, epsilon=eps, conf=conf)
        assert abs(full.loss.item() - only_range.loss.item()) > 1e-3


def test_gradient_matches_reference():
    logits, target, conf = make(2)
    logits.requires_grad_(True)
    out = label_smoothed_cross_entropy(logits, target, epsilon=0.1, conf=conf)
    out.loss.backward()
    ref = logits.detach().clone().requires_grad_(True)
    lp = torch.log_softmax(ref, -1) * conf.view(3, 1, 1)
    valid = target != PAD
    nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lp.sum(-1)
    eps_i = 0.1 / (V - 1)
    ((1 - 0.1 - eps_i) * nll + eps_i * smooth)[valid].sum().backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-12)


def test_per_task_sums_and_accuracy():
    logits, target, conf = make(4)
    task_ids = torch.tensor([TASK_ID["caption"], TASK_ID["itm"], -1])  # row 2: a padding row id
    out = label_smoothed_cross_entropy(logits, target, conf=conf, task_ids=task_ids)
    _, _, per_tok = naive(logits, target, 0.0, conf, lambda b, t: list(range(V)))
    cap = sum(v for b, v in per_tok if b == 0)
    itm = sum(v for b, v in per_tok if b == 1)
    assert out.task_loss[TASK_ID["caption"]].item() == pytest.approx(cap, rel=1e-5)
    assert out.task_loss[TASK_ID["itm"]].item() == pytest.approx(itm, rel=1e-5)
    assert out.task_tokens.tolist() == [3 if i == 0 else 5 if i == TASK_ID["itm"] else 0 for i in range(len(TASKS))]
    pred = logits.argmax(-1)
    correct_cap = int(((pred[0] == target[0]) & (target[0] != PAD)).sum())
    assert out.task_correct[TASK_ID["caption"]].item() == correct_cap
    m = task_metrics(merge_task_sums([out, out]))
    assert set(m) == {"loss/caption", "acc/caption", "loss/itm", "acc/itm"}
    assert m["loss/caption"] == pytest.approx(cap / 3, rel=1e-5)


def test_drop_worst_keeps_smallest_tokens():
    logits, target, conf = make(5)
    full = label_smoothed_cross_entropy(logits, target, conf=conf)
    kept = label_smoothed_cross_entropy(logits, target, conf=conf, drop_worst_ratio=0.3)
    _, _, per_tok = naive(logits, target, 0.0, conf, lambda b, t: list(range(V)))
    losses = sorted(v for _, v in per_tok)
    k = int(len(losses) * 0.7)
    assert kept.ntokens.item() == k == count_loss_tokens({"vl": {"target": target}}, 0.3)["vl"]
    assert kept.loss.item() == pytest.approx(sum(losses[:k]), rel=1e-6) and kept.loss < full.loss


def split_losses(logits, target, conf, rows):
    return label_smoothed_cross_entropy(logits[rows], target[rows], conf=conf[rows])


def test_global_tokens_normalisation_is_invariant_to_micro_batching():
    lv, tv, cv = make(6)  # group "vl"
    la, ta, ca = make(7)  # group "aux"
    whole = {"vl": split_losses(lv, tv, cv, slice(0, 3)), "aux": split_losses(la, ta, ca, slice(0, 3))}
    counts = {"vl": int((tv != PAD).sum()), "aux": int((ta != PAD).sum())}
    for mode in ("global_tokens", "per_group"):
        den = loss_denominators(counts, mode)
        one_shot = combine_group_losses(whole, den)
        # two micro-batches (rows 0-1 and row 2) with the step's global counts give the same step loss
        parts = [{"vl": split_losses(lv, tv, cv, s), "aux": split_losses(la, ta, ca, s)} for s in (slice(0, 2), slice(2, 3))]
        assert sum(combine_group_losses(p, den) for p in parts).item() == pytest.approx(one_shot.item(), rel=1e-9)
    glob = combine_group_losses(whole, loss_denominators(counts, "global_tokens"))
    assert glob.item() == pytest.approx((whole["vl"].loss + whole["aux"].loss).item() / sum(counts.values()))
    per = combine_group_losses(whole, loss_denominators(counts, "per_group"))
    # OFA: loss_v1 / ntok_v1 + loss_v2 / ntok_v2
    assert per.item() == pytest.approx(whole["vl"].loss.item() / counts["vl"] + whole["aux"].loss.item() / counts["aux"])


def test_agrees_with_vocab_parallel_loss_at_tp1():
    from ofa_scale.parallel.vocab_parallel_loss import vocab_parallel_label_smoothed_nll

    from ofa_scale.objectives.loss import reduce_token_losses

    logits, target, conf = make(8)
    masks = torch.ones(3, 5, V, dtype=torch.bool)
    masks[:, :, 4:6] = False
    target = torch.where(target == PAD, target, target.clamp_min(6))
    mine = label_smoothed_cross_entropy(logits, target, epsilon=0.1, conf=conf, constraint_masks=masks)
    theirs = reduce_token_losses(vocab_parallel_label_smoothed_nll(
        logits, target, epsilon=0.1, ignore_index=PAD, conf=conf, constraint_masks=masks))
    assert theirs.loss.item() == pytest.approx(mine.loss.item(), rel=1e-6)
    assert theirs.task_tokens.sum() == 0 and theirs.ntokens == mine.ntokens
