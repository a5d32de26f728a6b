"""OFA's label-smoothed cross entropy (spec §6.1) on vocabulary-split logits.

Each TP rank holds logits for one contiguous slice of the (padded) vocabulary. Every quantity the loss needs is
a max or a sum over the vocabulary, so each is computed on the slice and all-reduced: the log-sum-exp, the
target's logit, the smoothing sum over the allowed set and the size of that set. Constraint masks, constraint
ranges and the padded rows beyond the real vocabulary are all applied as one "allowed" mask before any of these,
so label smoothing, per-sample weights (`conf`) and constraints are exact, not approximated.

The loss is replicated on every TP rank; the all-reduced sums therefore use megatron's "reduce" region (sum
forward, identity backward), so each rank gets exactly the gradient of its own logits.
"""

from __future__ import annotations

from typing import Optional

import torch

# the same per-token record as the single-process loss, so the reductions downstream are shared
from ofa_scale.objectives.loss import TokenLosses  # noqa: F401  (re-exported)


def _reduce(x: torch.Tensor, group, tp: int) -> torch.Tensor:
    if tp == 1:
        return x
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


def _all_reduce_no_grad(x: torch.Tensor, group, tp: int, op) -> torch.Tensor:
    if tp > 1:
        import torch.distributed as dist

        dist.all_reduce(x, op=op, group=group)
    return x


def allowed_mask(shape_bt: tuple[int, int], vocab_start: int, vocab_end: int, real_vocab: int, device,
                 constraint_masks: Optional[torch.Tensor] = None,
                 constraint_range: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """(B, T, V_local) bool: which ids of this slice may receive probability mass."""
    ids = torch.arange(vocab_start, vocab_end, device=device)
    allowed = (ids < real_vocab).expand(*shape_bt, -1)
    if constraint_range is not None:
        lo, hi = constraint_range
        allowed = allowed & ((ids < 4) | ((ids >= lo) & (ids < hi)))
    if constraint_masks is not None:
        local = constraint_masks[..., vocab_start:min(vocab_end, real_vocab)]
        if local.shape[-1] < vocab_end - vocab_start:  # this slice reaches into the padded rows
            pad = local.new_zeros(*local.shape[:-1], vocab_end - vocab_start - local.shape[-1])
            local = torch.cat([local, pad], dim=-1)
        allowed = allowed & local.bool()
    return allowed


def vocab_parallel_label_smoothed_nll(
        logits: torch.Tensor, target: torch.Tensor, *, epsilon: float, ignore_index: int,
        vocab_start: int = 0, real_vocab: Optional[int] = None, group=None, tp_size: int = 1,
        conf: Optional[torch.Tensor] = None, constraint_masks: Optional[torch.Tensor] = None,
        constraint_range: Optional[tuple[int, int]] = None) -> TokenLosses:
    """Label-smoothed NLL per target position, for logits (B, T, V_local) covering ids [vocab_start, +V_local).

    With tp_size == 1 and vocab_start == 0 this is the single-process loss; `real_vocab` (default: all columns)
    excludes padded vocabulary rows."""
    b, t, v_local = logits.shape
    vocab_end = vocab_start + v_local
    real_vocab = vocab_end if real_vocab is None and tp_size == 1 else real_vocab
    if real_vocab is None:
        raise ValueError("real_vocab is required when the vocabulary is split")
    allowed = allowed_mask((b, t), vocab_start, vocab_end, real_vocab, logits.device, constraint_masks,
                           constraint_range)
    x = logits.float().masked_fill(~allowed, float("-inf"))

    # log-sum-exp over the whole vocabulary; the max is a constant shift, so it needs no gradient
    local_max = x.detach().amax(-1)
    global_max = _all_reduce_no_grad(local_max.clone(), group, tp_size, _max_op())
    global_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    sum_exp = _reduce(torch.exp(x - global_max.unsqueeze(-1)).sum(-1), group, tp_size)
    lse = global_max + torch.log(sum_exp)

    # the target's logit lives on exactly one rank
    in_slice = (target >= vocab_start) & (target < vocab_end)
    local_idx = (target - vocab_start).clamp(0, v_local - 1)
    target_logit = torch.where(in_slice, logits.float().gather(-1, local_idx.unsqueeze(-1)).squeeze(-1),
                               torch.zeros_like(lse))
    target_logit = _reduce(target_logit, group, tp_size)

    # sum of log-probabilities over the allowed set, and the set's size
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    allowed_logit_sum = _reduce(torch.where(allowed, logits.float(), zero).sum(-1), group, tp_size)
    n_allowed = _all_reduce_no_grad(allowed.sum(-1).to(x.dtype), group, tp_size, _sum_op())

    weight = conf.float().view(b, 1) if conf is not None else torch.ones((b, 1), device=x.device)
    lp_target = (target_logit - lse) * weight
    lp_allowed_sum = (allowed_logit_sum - n_allowed * lse) * weight
    nll = -lp_target
    smooth = -lp_allowed_sum
    eps_i = epsilon / (n_allowed - 1).clamp_min(1)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth

    valid = target != ignore_index
    loss = torch.where(valid, loss, zero)
    nll = torch.where(valid, nll, zero)

    # accuracy: the argmax over the whole vocabulary equals the target
    with torch.no_grad():
        local_best, local_arg = x.max(-1)
        best = _all_reduce_no_grad(local_best.clone(), group, tp_size, _max_op())
        mine = (local_best == best) & in_slice & (local_arg == local_idx)
        correct = _all_reduce_no_grad(mine.to(x.dtype), group, tp_size, _max_op()) > 0
    return TokenLosses(loss=loss, nll=nll, valid=valid, correct=correct & valid)


def _max_op():
    import torch.distributed as dist

    return dist.ReduceOp.MAX


def _sum_op():
    import torch.distributed as dist

    return dist.ReduceOp.SUM
