"""OFA's label-smoothed cross entropy (spec §6.1) with per-sample weights, constraints and per-task sums.

Three layers, so a vocabulary-parallel variant can swap only the first:
1. `token_losses(logits, target, …)` → per-position `TokenLosses` (loss, nll, valid, correct), computed from
   three per-token quantities: the target's log-prob, the sum of log-probs over the allowed set and the size
   of that set. (`ofa_scale.parallel.vocab_parallel_loss` computes the same three with all-reduces and returns
   the same fields.)
2. `smoothed_loss(...)` — the formula that combines them (shared by both).
3. `reduce_token_losses(...)` → sums over the micro-batch, optional drop-worst, per-task sums.
Normalisation (dividing by token counts over the global batch) is `loss_denominators` + `combine_group_losses`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence

import torch

from ofa_scale.objectives.config import TASKS

PAD = 1


@dataclass
class TokenLosses:
    """Per target position, shape (B, T); positions with `valid` False (pad targets) carry zeros."""

    loss: torch.Tensor
    nll: torch.Tensor
    valid: torch.Tensor
    correct: torch.Tensor


@dataclass
class LossOutput:
    """Sums over one micro-batch (group). `loss`/`nll_loss` carry gradients; the per-task tensors do not."""

    loss: torch.Tensor  # scalar: Σ token losses (label-smoothed, conf-weighted)
    nll_loss: torch.Tensor  # scalar: Σ conf-weighted NLL
    ntokens: torch.Tensor  # scalar long: target tokens counted (after drop-worst)
    task_loss: torch.Tensor  # (len(TASKS),) Σ loss per task
    task_nll: torch.Tensor  # (len(TASKS),)
    task_tokens: torch.Tensor  # (len(TASKS),) long
    task_correct: torch.Tensor  # (len(TASKS),) long: argmax == target (token accuracy)


def smoothed_loss(target_lp: torch.Tensor, allowed_lp_sum: torch.Tensor, n_allowed: torch.Tensor,
                  epsilon: float, weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, nll) per token: nll = −w·lp[y], smooth = −w·Σ_allowed lp, ε_i = ε/(|allowed|−1),
    loss = (1 − ε − ε_i)·nll + ε_i·smooth. `w` (conf) multiplies the log-probs, as OFA does."""
    if weight is not None:
        target_lp = target_lp * weight
        allowed_lp_sum = allowed_lp_sum * weight
    nll = -target_lp
    if epsilon == 0.0:
        return nll, nll
    eps_i = epsilon / (n_allowed.to(nll.dtype) - 1).clamp_min(1)
    loss = (1.0 - epsilon - eps_i) * nll - eps_i * allowed_lp_sum
    return loss, nll


def allowed_ids_mask(vocab_size: int, constraint_range: tuple[int, int], device=None) -> torch.Tensor:
    """OFA's `constraint_range=start,end`: ids 0–3 and [start, end) allowed."""
    ids = torch.arange(vocab_size, device=device)
    start, end = constraint_range
    return (ids < 4) | ((ids >= start) & (ids < end))


def token_losses(logits: torch.Tensor, target: torch.Tensor, *, epsilon: float = 0.0, pad: int = PAD,
                 conf: Optional[torch.Tensor] = None, constraint_masks: Optional[torch.Tensor] = None,
                 constraint_range: Optional[tuple[int, int]] = None) -> TokenLosses:
    """Per-position losses for logits (B, T, V) and target (B, T); only non-pad positions are computed.

    Constraint masks (B, T, V) and/or a constraint range restrict both the softmax and the smoothing mass.
    """
    b, t, v = logits.shape
    valid = target != pad
    zeros = logits.new_zeros((b, t), dtype=torch.float32)
    x = logits[valid].float()  # (N, V): pad positions never reach the softmax
    y = target[valid]
    allowed = None
    if constraint_range is not None:
        allowed = allowed_ids_mask(v, constraint_range, logits.device).expand(x.shape[0], v)
    if constraint_masks is not None:
        cm = constraint_masks[valid]
        allowed = cm if allowed is None else allowed & cm
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    lp = torch.log_softmax(x, dim=-1)
    target_lp = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if allowed is None:
        allowed_sum = lp.sum(-1)
        n_allowed = torch.full_like(target_lp, v)
    else:
        allowed_sum = lp.masked_fill(~allowed, 0.0).sum(-1)
        n_allowed = allowed.sum(-1)
    weight = None
    if conf is not None:
        weight = conf.float().view(b, 1).expand(b, t)[valid]
    loss, nll = smoothed_loss(target_lp, allowed_sum, n_allowed, epsilon, weight)
    correct = torch.zeros((b, t), dtype=torch.bool, device=logits.device)
    with torch.no_grad():
        correct[valid] = lp.argmax(-1) == y
    return TokenLosses(loss=zeros.masked_scatter(valid, loss), nll=zeros.masked_scatter(valid, nll),
                       valid=valid, correct=correct)


def reduce_token_losses(tl: TokenLosses, task_ids: Optional[torch.Tensor] = None, drop_worst_ratio: float = 0.0,
                        num_tasks: int = len(TASKS)) -> LossOutput:
    """Sum the valid positions; with `drop_worst_ratio` r keep only the floor((1−r)·N) smallest token losses
    (OFA's drop-worst, token level, over the whole micro-batch). Rows with task id < 0 (padding) count in the
    totals (they have no valid tokens anyway) but in no task."""
    b, t = tl.valid.shape
    loss, nll, correct = tl.loss[tl.valid], tl.nll[tl.valid], tl.correct[tl.valid]
    if task_ids is None:
        task_ids = torch.full((b,), -1, dtype=torch.long, device=tl.valid.device)
    tok_task = task_ids.view(b, 1).expand(b, t)[tl.valid]
    if drop_worst_ratio > 0.0 and loss.numel() > 0:
        keep = int(loss.numel() * (1.0 - drop_worst_ratio))
        _, idx = torch.topk(loss.detach(), k=keep, largest=False)
        loss, nll, correct, tok_task = loss[idx], nll[idx], correct[idx], tok_task[idx]
    known = tok_task >= 0
    tt = tok_task.clamp_min(0)
    dev = loss.device

    def per_task(values: torch.Tensor, dtype) -> torch.Tensor:
        out = torch.zeros(num_tasks, dtype=dtype, device=dev)
        return out.index_add_(0, tt[known], values[known].to(dtype))

    with torch.no_grad():
        task_loss = per_task(loss.detach(), torch.float32)
        task_nll = per_task(nll.detach(), torch.float32)
        task_tokens = per_task(torch.ones_like(tt), torch.long)
        task_correct = per_task(correct.long(), torch.long)
    return LossOutput(loss=loss.sum(), nll_loss=nll.sum(), ntokens=torch.tensor(loss.numel(), device=dev),
                      task_loss=task_loss, task_nll=task_nll, task_tokens=task_tokens, task_correct=task_correct)


def label_smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, epsilon: float = 0.0,
                                 pad: int = PAD, conf: Optional[torch.Tensor] = None,
                                 constraint_masks: Optional[torch.Tensor] = None,
                                 constraint_range: Optional[tuple[int, int]] = None,
                                 task_ids: Optional[torch.Tensor] = None,
                                 drop_worst_ratio: float = 0.0) -> LossOutput:
    """Spec §6.1 on one group's logits: token losses, then sums (the caller normalises)."""
    tl = token_losses(logits, target, epsilon=epsilon, pad=pad, conf=conf, constraint_masks=constraint_masks,
                      constraint_range=constraint_range)
    return reduce_token_losses(tl, task_ids, drop_worst_ratio)


# ------------------------------------------------------------------------------------------- normalisation
Normalization = Literal["global_tokens", "per_group"]


def kept_tokens(n_valid: int, drop_worst_ratio: float = 0.0) -> int:
    """Tokens a micro-batch group contributes after drop-worst (known before the forward pass)."""
    return int(n_valid * (1.0 - drop_worst_ratio)) if drop_worst_ratio > 0.0 else n_valid


def count_loss_tokens(batch: Mapping, drop_worst_ratio: float = 0.0) -> dict[str, int]:
    """Target tokens per group of a collated micro-batch — sum these over micro-batches and DP ranks
    (all-reduce) to get the global counts that `loss_denominators` needs."""
    return {g: kept_tokens(int((grp["target"] != PAD).sum()), drop_worst_ratio)
            for g, grp in batch.items() if g != "stats"}


def loss_denominators(global_tokens: Mapping[str, int], mode: Normalization = "per_group") -> dict[str, float]:
    """Divisor of each group's loss sum, from token counts summed over the whole global batch.

    global_tokens: every group divides by the total count — the loss is the mean over all target tokens of
      the step, independent of how the step is split into ranks and micro-batches.
    per_group: each group divides by its own count — OFA's loss_v1/ntok_v1 + loss_v2/ntok_v2, generalised
      to global counts so it too is independent of the split.
    """
    if mode == "global_tokens":
        total = max(1, sum(int(n) for n in global_tokens.values()))
        return {g: float(total) for g in global_tokens}
    if mode == "per_group":
        return {g: float(max(1, int(n))) for g, n in global_tokens.items()}
    raise ValueError(f"unknown loss normalisation {mode!r}")


def combine_group_losses(outputs: Mapping[str, LossOutput], denominators: Mapping[str, float]) -> torch.Tensor:
    """Σ_group loss_sum / denominator: the quantity whose sum over all micro-batches and ranks is the step loss."""
    total = None
    for g, out in outputs.items():
        term = out.loss / denominators[g]
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no group losses to combine")
    return total


def merge_task_sums(outputs: Sequence[LossOutput]) -> dict[str, torch.Tensor]:
    """Add the per-task sums of several groups/micro-batches (for logging loss/<task> and acc/<task>)."""
    keys = ("task_loss", "task_nll", "task_tokens", "task_correct")
    return {k: sum(getattr(o, k) for o in outputs) for k in keys}


def task_metrics(sums: Mapping[str, torch.Tensor], tasks: Sequence[str] = TASKS) -> dict[str, float]:
    """{'loss/<task>': mean token loss, 'acc/<task>': token accuracy} for tasks with tokens this step.

    The loss is the optimised one: nats per token (fairseq logs base 2), conf-weighted — so text/image
    infilling and detection read 2× their unweighted cross entropy, and VQA is scaled by answer confidence."""
    out: dict[str, float] = {}
    tokens = sums["task_tokens"].tolist()
    for i, task in enumerate(tasks):
        if tokens[i] > 0:
            out[f"loss/{task}"] = float(sums["task_loss"][i]) / tokens[i]
            out[f"acc/{task}"] = float(sums["task_correct"][i]) / tokens[i]
    return out
