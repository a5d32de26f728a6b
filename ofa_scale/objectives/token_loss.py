"""OFA's label-smoothed cross entropy per target token (spec §6.1): the one token-loss interface.

    token_loss = make_token_loss(ctx, epsilon, ignore_index)        # ctx: a ParallelContext, or None
    tl = token_loss(logits, target, conf=…, constraint_masks=…, constraint_range=…)   # -> TokenLosses

The trainer, the pipeline's last stage, `ParallelContext.token_losses` and the tests all call a `TokenLoss`.
There is one implementation of the formula, `VocabParallelTokenLoss`: its logits (B, T, V_local) cover one
contiguous slice [vocab_start, vocab_start + V_local) of the (padded) vocabulary, as each tensor-parallel rank
holds them. Every quantity the loss needs is a max or a sum over the vocabulary (the log-sum-exp, the target's
logit, the smoothing sum over the allowed set, the size of that set, the argmax), so each is computed on the slice
and summed over the tensor-parallel group. `SingleProcessTokenLoss` is the same class with one slice that is the
whole vocabulary: tp = 1, every reduction the identity, no collective.

Constraint masks, a constraint range and the padded vocabulary rows beyond `real_vocab` form one "allowed" mask
applied before the softmax, so they restrict both the softmax and the smoothing mass exactly (OFA masks the logits
with −inf, then smooths over the allowed set). Pad targets never reach the softmax: only the valid positions'
rows are computed (their number is the same on every tensor-parallel rank, which share the targets).

The loss is replicated on every tensor-parallel rank. The sums that carry gradients use megatron's "reduce" region
(sum forward, identity backward), so each rank gets exactly the gradient of its own logits; the others (the max,
the set size, the argmax) carry none and go through ofa_scale/parallel/collectives.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch

from ofa_scale.parallel import collectives


@dataclass
class TokenLosses:
    """Per target position, shape (B, T); positions with `valid` False (pad targets, dropped tokens) carry zeros."""

    loss: torch.Tensor  # label-smoothed, conf-weighted; carries gradients
    nll: torch.Tensor  # conf-weighted negative log-likelihood of the target
    valid: torch.Tensor  # bool: the position counts (non-pad target, not dropped)
    correct: torch.Tensor  # bool: the argmax over the allowed set is the target (token accuracy)

    def drop_worst(self, ratio: float) -> "TokenLosses":
        """OFA's drop-worst (spec §6.1 step 5): keep the `kept_tokens(N, ratio)` valid positions with the smallest
        loss over the whole (B, T) batch; the dropped ones leave `valid` and carry zeros. Identical on every
        tensor-parallel rank, whose losses are identical."""
        if ratio <= 0.0:
            return self
        keep = kept_tokens(int(self.valid.sum()), ratio)
        flat = self.loss.detach().masked_fill(~self.valid, float("inf")).flatten()
        kept = torch.zeros_like(self.valid).flatten()
        kept[torch.topk(flat, k=keep, largest=False).indices] = True
        kept = kept.view_as(self.valid)
        zero = torch.zeros((), dtype=self.loss.dtype, device=self.loss.device)
        return TokenLosses(loss=torch.where(kept, self.loss, zero), nll=torch.where(kept, self.nll, zero),
                           valid=kept, correct=self.correct & kept)


def kept_tokens(n_valid: int, drop_worst_ratio: float = 0.0) -> int:
    """Tokens a group of n_valid target tokens keeps after drop-worst: floor((1 − r)·N), as OFA."""
    return int(n_valid * (1.0 - drop_worst_ratio)) if drop_worst_ratio > 0.0 else n_valid


@runtime_checkable
class TokenLoss(Protocol):
    """Label smoothing `epsilon` and the ignored target id `ignore_index` are fixed at construction."""

    epsilon: float
    ignore_index: int

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *, conf: Optional[torch.Tensor] = None,
                 constraint_masks: Optional[torch.Tensor] = None,
                 constraint_range: Optional[tuple[int, int]] = None) -> TokenLosses:
        """logits (B, T, V or V_local), target (B, T); conf (B,) per-sample weights; constraint_masks (B, T, V)
        bool over the real vocabulary; constraint_range (start, end): ids 0–3 and [start, end) allowed."""
        ...


class VocabParallelTokenLoss:
    """The formula on this rank's vocabulary slice [vocab_start, vocab_start + V_local), summed over `group`
    (`tp_size` ranks). Ids >= `real_vocab` are padding rows and take no probability mass; `real_vocab=None`
    (one slice only) means every column is real."""

    def __init__(self, epsilon: float, ignore_index: int, *, vocab_start: int = 0, real_vocab: Optional[int] = None,
                 group: Any = None, tp_size: int = 1):
        if tp_size > 1 and real_vocab is None:
            raise ValueError("real_vocab is required when the vocabulary is split")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label smoothing epsilon is {epsilon}; use a value in [0, 1)")
        self.epsilon = float(epsilon)
        self.ignore_index = int(ignore_index)
        self.vocab_start = int(vocab_start)
        self.real_vocab = real_vocab
        self.group = group
        self.tp_size = int(tp_size)

    # -- reductions over the tensor-parallel group (the identity with one slice, or with no valid position, which
    #    every rank of the group sees alike) --
    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1 or x.numel() == 0:
            return x
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        return reduce_from_tensor_model_parallel_region(x, group=self.group)

    def _reduce_no_grad(self, x: torch.Tensor, op: str) -> torch.Tensor:
        if self.tp_size == 1 or x.numel() == 0:
            return x
        return collectives.all_reduce(x, op, self.group)

    def _allowed(self, n: int, v_local: int, device, constraint_masks: Optional[torch.Tensor],
                 constraint_range: Optional[tuple[int, int]]) -> Optional[torch.Tensor]:
        """(N, V_local) or (V_local,) bool: the ids of this slice that may receive probability mass; None when
        all may (the common unconstrained case needs no mask at all)."""
        start, end = self.vocab_start, self.vocab_start + v_local
        real = end if self.real_vocab is None else self.real_vocab
        ids = torch.arange(start, end, device=device)
        allowed = ids < real if real < end else None
        if constraint_range is not None:
            lo, hi = constraint_range
            in_range = (ids < 4) | ((ids >= lo) & (ids < hi))
            allowed = in_range if allowed is None else allowed & in_range
        if constraint_masks is not None:
            local = constraint_masks[:, start:min(end, real)].bool()
            if local.shape[-1] < v_local:  # the slice reaches into the padded rows (or past the mask's columns)
                local = torch.cat([local, local.new_zeros(n, v_local - local.shape[-1])], dim=-1)
            allowed = local if allowed is None else local & allowed
        return allowed

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *, conf: Optional[torch.Tensor] = None,
                 constraint_masks: Optional[torch.Tensor] = None,
                 constraint_range: Optional[tuple[int, int]] = None) -> TokenLosses:
        b, t, v_local = logits.shape
        start = self.vocab_start
        valid = target != self.ignore_index
        # at least fp32: bf16/fp16 logits would lose the log-sum-exp's precision
        x = logits[valid].to(torch.promote_types(logits.dtype, torch.float32))  # (N, V_local)
        y = target[valid]
        n = y.shape[0]
        allowed = self._allowed(n, v_local, x.device, None if constraint_masks is None else constraint_masks[valid],
                                constraint_range)
        masked = x if allowed is None else x.masked_fill(~allowed, float("-inf"))

        # log-sum-exp over the whole allowed vocabulary, shifted by its max (a constant: no gradient)
        with torch.no_grad():
            shift = self._reduce_no_grad(masked.amax(-1), "max")
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        z = x - shift.unsqueeze(-1)
        log_norm = torch.log(self._sum(torch.exp(masked - shift.unsqueeze(-1)).sum(-1)))  # lse − shift

        # the target's log-probability: its logit lives on exactly one rank
        in_slice = (y >= start) & (y < start + v_local)
        local_y = (y - start).clamp(0, v_local - 1)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        target_lp = self._sum(torch.where(in_slice, z.gather(-1, local_y.unsqueeze(-1)).squeeze(-1), zero)) - log_norm

        weight = None if conf is None else conf.to(x.device, x.dtype).view(b, 1).expand(b, t)[valid]
        nll = -target_lp if weight is None else -target_lp * weight
        loss = nll
        if self.epsilon > 0.0:
            # Σ_allowed lp = Σ_allowed z − |allowed|·(lse − shift); ε_i = ε / (|allowed| − 1)
            with torch.no_grad():
                count = (torch.full((n,), float(v_local), dtype=x.dtype, device=x.device) if allowed is None
                         else allowed.to(x.dtype).sum(-1).expand(n).contiguous())
                count = self._reduce_no_grad(count, "sum")
            z_sum = z.sum(-1) if allowed is None else torch.where(allowed, z, zero).sum(-1)
            smooth = -(self._sum(z_sum) - count * log_norm)
            if weight is not None:
                smooth = smooth * weight
            eps_i = self.epsilon / (count - 1).clamp_min(1)
            loss = (1.0 - self.epsilon - eps_i) * nll + eps_i * smooth

        with torch.no_grad():  # accuracy: the argmax over the whole allowed vocabulary is the target
            local_best, local_arg = masked.max(-1)
            best = self._reduce_no_grad(local_best.clone(), "max")
            mine = ((local_best == best) & in_slice & (local_arg == local_y)).to(x.dtype)
            hit = self._reduce_no_grad(mine, "max") > 0
        correct = torch.zeros_like(valid)
        correct[valid] = hit
        zeros = x.new_zeros((b, t))
        return TokenLosses(loss=zeros.masked_scatter(valid, loss), nll=zeros.masked_scatter(valid, nll),
                           valid=valid, correct=correct)


class SingleProcessTokenLoss(VocabParallelTokenLoss):
    """The vocabulary-parallel loss with one slice holding the whole vocabulary (no collective). `real_vocab`
    excludes padded output columns, if the logits have any."""

    def __init__(self, epsilon: float = 0.0, ignore_index: int = 1, real_vocab: Optional[int] = None):
        super().__init__(epsilon, ignore_index, vocab_start=0, real_vocab=real_vocab, group=None, tp_size=1)


def make_token_loss(ctx: Any, epsilon: float, ignore_index: int) -> TokenLoss:
    """The token loss for a ParallelContext's logits (vocabulary-split when tp > 1); `ctx=None`: one process."""
    if ctx is None:
        return SingleProcessTokenLoss(epsilon, ignore_index)
    real_vocab = ctx.layout.vocab_size
    if ctx.tp_size == 1:
        return SingleProcessTokenLoss(epsilon, ignore_index, real_vocab=real_vocab)
    start, _ = ctx.vocab_range()
    return VocabParallelTokenLoss(epsilon, ignore_index, vocab_start=start, real_vocab=real_vocab, group=ctx.tp_group,
                                  tp_size=ctx.tp_size)
