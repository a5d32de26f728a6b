"""The Encouraging Loss (objectives.loss: encouraging, spec §10.4.2) against a naive per-token reference written
from the spec: label smoothing, conf weights, constraint masks and ranges, drop-worst (ranked by the label-smoothed
loss alone, the bonus added on the kept tokens), several log_end values; its gradient, its config checks, and the
vocabulary-parallel loss on 2 processes against the single-process one."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ofa_scale.errors import ConfigError
from ofa_scale.objectives.config import ObjectivesConfig
from ofa_scale.objectives.step import group_loss
from ofa_scale.objectives.token_loss import SingleProcessTokenLoss, make_token_loss

PAD = 1
V = 12
LOG_ENDS = (1.0, 0.75, 0.5, 0.3)


def bonus(p: float, log_end: float) -> float:
    """Spec §10.4.2 step 3."""
    if log_end != 1.0 and p > log_end:
        return (p - log_end) / (log_end - 1.0) + math.log(1.0 - log_end)
    return math.log(max(1.0 - p, 1e-5))


def naive(logits, target, eps, conf, log_end, allowed_of=lambda b, t: list(range(V)), drop_worst=0.0):
    """Per-token loop (float64 Python numbers): the step's loss sum and the kept (row, position) list.
    L_LS as spec §6.1 on log-probs × conf; drop-worst keeps the floor((1 − r)·N) smallest L_LS; each kept token
    adds (1 − ε)·b(p_y) + (ε / V)·Σ_v b(p_v), masked ids having p = 0 (b = 0)."""
    tokens = []
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            y = int(target[b, t])
            if y == PAD:
                continue
            allowed = allowed_of(b, t)
            lse = math.log(sum(math.exp(float(logits[b, t, v])) for v in allowed))
            lp = {v: (float(logits[b, t, v]) - lse) * float(conf[b]) for v in allowed}
            eps_i = eps / (len(allowed) - 1)
            ls = (1 - eps - eps_i) * -lp[y] + eps_i * -sum(lp.values())
            el = (1 - eps) * bonus(math.exp(lp[y]), log_end)
            el += eps / V * sum(bonus(math.exp(lp.get(v, float("-inf"))), log_end) for v in range(V))
            tokens.append(((b, t), ls, el))
    if drop_worst > 0:
        keep = int(len(tokens) * (1 - drop_worst))
        tokens = sorted(tokens, key=lambda x: x[1])[:keep]
    return sum(ls + el for _, ls, el in tokens), sorted(pos for pos, _, _ in tokens), tokens


def make(seed=0, b=3, t=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=g, dtype=torch.float64) * scale
    target = torch.randint(4, V, (b, t), generator=g)
    # confident right answers on row 1 so some target probabilities pass every log_end (the tangent branch)
    logits[1].scatter_add_(-1, target[1].unsqueeze(-1), torch.full((t, 1), 8.0, dtype=logits.dtype))
    target[0, 3:] = PAD
    target[2, 1] = PAD
    conf = torch.tensor([1.0, 0.6, 2.0], dtype=torch.float64)
    return logits, target, conf


def test_bonus_values_of_the_spec():
    loss = SingleProcessTokenLoss(0.0, PAD, log_end=0.75)
    p = torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64)
    got = loss._bonus(p)
    assert got.tolist() == pytest.approx([0.0, math.log(0.5), math.log(0.25), -1 + math.log(0.25)], rel=1e-12)
    assert got[-1].item() == pytest.approx(-2.386, abs=1e-3)  # spec: value at p = 1 with log_end 0.75
    # the tangent's slope -1/(1 - log_end) = -4
    assert (loss._bonus(torch.tensor([0.9], dtype=torch.float64)) - loss._bonus(torch.tensor([0.8],
            dtype=torch.float64))).item() == pytest.approx(-0.4, rel=1e-9)
    # log_end 1: the plain log(1 - p), clamped at 1e-5
    assert SingleProcessTokenLoss(0.0, PAD, log_end=1.0)._bonus(p)[-1].item() == pytest.approx(math.log(1e-5))


@pytest.mark.parametrize("log_end", LOG_ENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_the_naive_reference_per_token(log_end, eps):
    logits, target, conf = make()
    tl = make_token_loss(None, eps, PAD, log_end=log_end)(logits, target, conf=conf)
    total, kept, tokens = naive(logits, target, eps, conf, log_end)
    valid = target != PAD
    assert tl.loss[valid].tolist() == pytest.approx([ls + el for _, ls, el in tokens], rel=1e-9, abs=1e-12)
    assert tl.rank[valid].tolist() == pytest.approx([ls for _, ls, _ in tokens], rel=1e-9)
    assert tl.loss.sum().item() == pytest.approx(total, rel=1e-9)
    # the case reaches the tangent branch and the bonus changes the loss
    p_y = torch.exp(-tl.nll[valid])
    assert (p_y > log_end).any() if log_end < 1 else (p_y > 0.9).any()
    plain = SingleProcessTokenLoss(eps, PAD)(logits, target, conf=conf)
    torch.testing.assert_close(tl.rank, plain.loss, rtol=1e-12, atol=1e-12)
    assert (tl.loss[valid] < plain.loss[valid]).all()  # b <= 0: a reward on top of the cross entropy


@pytest.mark.parametrize("log_end", (0.75, 0.5))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_constraint_masks_and_range(log_end, eps):
    logits, target, conf = make(1)
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 5, V, generator=g) < 0.5
    start, end = 6, 10
    target = torch.where(target == PAD, target, target.clamp(start, end - 1))
    masks.scatter_(-1, target.unsqueeze(-1), True)  # the target is always allowed
    loss = make_token_loss(None, eps, PAD, log_end=log_end)
    in_range = [v for v in range(V) if v < 4 or start <= v < end]
    for kw, allowed_of in (
            ({"constraint_masks": masks}, lambda b, t: [v for v in range(V) if masks[b, t, v]]),
            ({"constraint_range": (start, end)}, lambda b, t: in_range),
            ({"constraint_masks": masks, "constraint_range": (start, end)},
             lambda b, t: [v for v in in_range if masks[b, t, v]])):
        tl = loss(logits, target, conf=conf, **kw)
        total, _, tokens = naive(logits, target, eps, conf, log_end, allowed_of)
        assert tl.loss[target != PAD].tolist() == pytest.approx([ls + el for _, ls, el in tokens], rel=1e-9)


@pytest.mark.parametrize("log_end", (0.75, 0.3))
def test_drop_worst_ranks_by_the_label_smoothed_loss_and_keeps_the_bonus_of_kept_tokens(log_end):
    eps, ratio = 0.1, 0.4
    differs = False
    for seed in range(5):  # seed 4 is one where the two orders differ
        logits, target, conf = make(seed)
        batch = {"target": target, "conf": conf}
        denom = 7.0
        part, tl = group_loss(make_token_loss(None, eps, PAD, log_end=log_end), logits, batch, denom,
                              drop_worst_ratio=ratio)
        total, kept, tokens = naive(logits, target, eps, conf, log_end, drop_worst=ratio)
        assert part.item() == pytest.approx(total / denom, rel=1e-6)  # group_loss: fp32 conf and sum
        assert sorted(map(tuple, tl.valid.nonzero().tolist())) == kept
        # ranking by L_LS + bonus would keep other tokens for some seed: the test tells the two orders apart
        all_tokens = naive(logits, target, eps, conf, log_end)[2]
        by_total = sorted(pos for pos, _, _ in sorted(all_tokens, key=lambda x: x[1] + x[2])[:len(kept)])
        differs |= by_total != kept
    assert differs


def test_gradient_matches_finite_differences():
    logits, target, conf = make(2, t=3, scale=2.0)
    masks = torch.ones(3, 3, V, dtype=torch.bool)
    masks[0, :, 5] = False
    target = torch.where(target == 5, 6, target)
    loss = SingleProcessTokenLoss(0.1, PAD, log_end=0.5)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: loss(z, target, conf=conf, constraint_masks=masks).loss.sum(),
                                    (x,), eps=1e-6, atol=1e-7)


def test_huge_masked_logits_leave_loss_and_gradient_finite():
    logits, target, conf = make(4)
    logits[..., 11] = 1e4  # masked everywhere: OFA's −inf, p = 0
    target = torch.where(target == 11, 10, target)
    x = logits.clone().requires_grad_()
    tl = SingleProcessTokenLoss(0.1, PAD, log_end=0.75)(x, target, conf=conf, constraint_range=(4, 11))
    tl.loss.sum().backward()
    assert torch.isfinite(tl.loss).all() and torch.isfinite(x.grad).all() and not x.grad[..., 11].any()


def test_config_selects_the_loss_and_rejects_bad_values():
    cfg = ObjectivesConfig()
    assert cfg.loss == "ce" and cfg.encouraging_log_end is None and cfg.log_end == 0.75  # OFA's default
    cfg = ObjectivesConfig(loss="encouraging", log_end=0.5)
    cfg.validate()
    assert cfg.encouraging_log_end == 0.5
    for bad, match in ((dict(loss="focal"), "objectives.loss"), (dict(loss="encouraging", log_end=0.0), "log_end"),
                       (dict(loss="encouraging", log_end=1.5), "log_end")):
        with pytest.raises(ConfigError, match=match):
            ObjectivesConfig(**bad).validate()
    with pytest.raises(ValueError, match="log_end"):
        SingleProcessTokenLoss(0.1, PAD, log_end=0.0)


def test_scst_refuses_the_encouraging_loss_and_the_trainer_passes_log_end(tmp_path):
    from pathlib import Path

    from ofa_scale.training.config import load_training_config

    recipes = Path(__file__).resolve().parents[2] / "configs" / "finetune"
    with pytest.raises(ConfigError, match="encouraging"):
        load_training_config(recipes / "caption_stage2_base.yaml", ["objectives.loss=encouraging"])
    cfg = load_training_config(recipes / "caption_stage1_base.yaml", ["objectives.loss=encouraging",
                                                                      "objectives.log_end=0.5"])
    assert cfg.objectives.encouraging_log_end == 0.5


# ---------------------------------------------------------------------------------- 2 vocabulary slices (gloo)
TP, PADDED, V_TP = 2, 38, 37


def _tp_case(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, V_TP, generator=g, dtype=torch.float64) * 3
    logits = torch.cat([logits, torch.full((3, 5, PADDED - V_TP), 50.0, dtype=torch.float64)], -1)
    target = torch.randint(4, V_TP, (3, 5), generator=g)
    target[0, -2:] = PAD
    logits[1].scatter_add_(-1, target[1].unsqueeze(-1), torch.full((5, 1), 20.0, dtype=logits.dtype))
    masks = torch.rand(3, 5, V_TP, generator=g) < 0.4
    masks[torch.arange(3)[:, None], torch.arange(5)[None], target] = True
    return logits, target, torch.tensor([1.0, 0.5, 2.0]), masks


def _tp_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ofa_scale.objectives.token_loss import VocabParallelTokenLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    per = PADDED // TP
    results = {}
    for use_masks in (False, True):
        logits, target, conf, masks = _tp_case(int(use_masks))
        local = logits[..., rank * per:(rank + 1) * per].clone().requires_grad_()
        loss = VocabParallelTokenLoss(0.1, PAD, vocab_start=rank * per, real_vocab=V_TP, group=dist.group.WORLD,
                                      tp_size=TP, log_end=0.75)
        tl = loss(local, target, conf=conf, constraint_masks=masks if use_masks else None)
        tl.loss.sum().backward()
        results[use_masks] = {"loss": tl.loss.detach(), "grad": local.grad}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_vocabulary_slices_match_the_single_process_loss_and_gradient(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import megatron.core.tensor_parallel  # noqa: F401  (imported once, before the fork)

    mp.start_processes(_tp_rank, args=(port, str(tmp_path)), nprocs=TP, join=True, start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(TP)]
    for use_masks in (False, True):
        logits, target, conf, masks = _tp_case(int(use_masks))
        full = logits[..., :V_TP].clone().requires_grad_()
        want = SingleProcessTokenLoss(0.1, PAD, log_end=0.75)(full, target, conf=conf,
                                                              constraint_masks=masks if use_masks else None)
        want.loss.sum().backward()
        for r in got:
            torch.testing.assert_close(r[use_masks]["loss"], want.loss.detach(), rtol=1e-12, atol=1e-12)
        grad = torch.cat([r[use_masks]["grad"] for r in got], -1)
        torch.testing.assert_close(grad[..., :V_TP], full.grad, rtol=1e-12, atol=1e-12)
        assert torch.count_nonzero(grad[..., V_TP:]) == 0
