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
applied before the softmax (the masks come dense, (B, T, V) bool, or compact as the Collator builds them, a
`ConstraintSets` resolved here for the valid positions and this slice's columns only), so they restrict both the
softmax and the smoothing mass exactly (OFA masks the logits with −inf, then smooths over the allowed set). Pad
targets never reach the softmax: only the valid positions' rows are computed (their number is the same on every
tensor-parallel rank, which share the targets).

Encouraging Loss (`log_end` set; spec §10.4.2, OFA's label_smoothed_encouraging_loss.py): each kept token adds
the bonus (1 − ε)·b(p_y) + (ε / V)·Σ_v b(p_v), b(p) = log(max(1 − p, 1e−5)), replaced above `log_end` by its
tangent at `log_end`, p = exp(conf · log-prob) (OFA multiplies the log-probs by conf before both terms), V the real
vocabulary size (masked ids have p = 0, b = 0). Drop-worst ranks tokens by the label-smoothed loss without the
bonus (`TokenLosses.rank`), as OFA adds the bonus after its drop-worst. Σ_v b(p_v) is a sum over the vocabulary
like the others, so the bonus splits over tensor-parallel slices the same way.

The loss is replicated on every tensor-parallel rank. The sums that carry gradients use megatron's "reduce" region
(sum forward, identity backward), so each rank gets exactly the gradient of its own logits; the others (the max,
the set size, the argmax) carry none and go through ofa_scale/parallel/collectives.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch

from ofa_scale.objectives.constraints import ConstraintSets
from ofa_scale.parallel import collectives


@dataclass
class TokenLosses:
    """Per target position, shape (B, T); positions with `valid` False (pad targets, dropped tokens) carry zeros."""

    loss: torch.Tensor  # label-smoothed, conf-weighted; carries gradients
    nll: torch.Tensor  # conf-weighted negative log-likelihood of the target
    valid: torch.Tensor  # bool: the position counts (non-pad target, not dropped)
    correct: torch.Tensor  # bool: the argmax over the allowed set is the target (token accuracy)
    # what drop-worst ranks by when it is not `loss`: with the Encouraging Loss, the label-smoothed loss alone
    rank: Optional[torch.Tensor] = None

    def drop_worst(self, ratio: float) -> "TokenLosses":
        """OFA's drop-worst (spec §6.1 step 5): keep the `kept_tokens(N, ratio)` valid positions with the smallest
        loss over the whole (B, T) batch; the dropped ones leave `valid` and carry zeros. Identical on every
        tensor-parallel rank, whose losses are identical."""
        if ratio <= 0.0:
            return self
        keep = kept_tokens(int(self.valid.sum()), ratio)
        key = self.loss if self.rank is None else self.rank
        flat = key.detach().masked_fill(~self.valid, float("inf")).flatten()
        kept = torch.zeros_like(self.valid).flatten()
        kept[torch.topk(flat, k=keep, largest=False).indices] = True
        kept = kept.view_as(self.valid)
        zero = torch.zeros((), dtype=self.loss.dtype, device=self.loss.device)
        return TokenLosses(loss=torch.where(kept, self.loss, zero), nll=torch.where(kept, self.nll, zero),
                           valid=kept, correct=self.correct & kept,
                           rank=None if self.rank is None else torch.where(kept, self.rank, zero))


def kept_tokens(n_valid: int, drop_worst_ratio: float = 0.0) -> int:
    """Tokens a group of n_valid target tokens keeps after drop-worst: floor((1 − r)·N), as OFA."""
    return int(n_valid * (1.0 - drop_worst_ratio)) if drop_worst_ratio > 0.0 else n_valid


@runtime_checkable
class TokenLoss(Protocol):
    """Label smoothing `epsilon` and the ignored target id `ignore_index` are fixed at construction."""

    epsilon: float
    ignore_index: int

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *, conf: Optional[torch.Tensor] = None,
                 constraint_masks: Optional[torch.Tensor | ConstraintSets] = None,
                 constraint_range: Optional[tuple[int, int]] = None) -> TokenLosses:
        """logits (B, T, V or V_local), target (B, T); conf (B,) per-sample weights; constraint_masks (B, T, V)
        bool over the real vocabulary, or the same as a compact `ConstraintSets`; constraint_range (start, end):
        ids 0–3 and [start, end) allowed."""
        ...


class VocabParallelTokenLoss:
    """The formula on this rank's vocabulary slice [vocab_start, vocab_start + V_local), summed over `group`
    (`tp_size` ranks). Ids >= `real_vocab` are padding rows and take no probability mass; `real_vocab=None`
    (one slice only) means every column is real. `log_end` (0, 1]: add the Encouraging Loss bonus (module
    docstring); None: label-smoothed cross entropy only."""

    def __init__(self, epsilon: float, ignore_index: int, *, vocab_start: int = 0, real_vocab: Optional[int] = None,
                 group: Any = None, tp_size: int = 1, log_end: Optional[float] = None):
        if tp_size > 1 and real_vocab is None:
            raise ValueError("real_vocab is required when the vocabulary is split")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label smoothing epsilon is {epsilon}; use a value in [0, 1)")
        if log_end is not None and not 0.0 < log_end <= 1.0:
            raise ValueError(f"encouraging loss log_end is {log_end}; use a value in (0, 1]")
        self.log_end = None if log_end is None else float(log_end)
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

    def _allowed(self, valid: torch.Tensor, n: int, v_local: int, device,
                 constraint_masks: Optional[torch.Tensor | ConstraintSets],
                 constraint_range: Optional[tuple[int, int]]) -> Optional[torch.Tensor]:
        """(N, V_local) or (V_local,) bool: the ids of this slice that may receive probability mass at the N
        `valid` positions; None when all may (the common unconstrained case needs no mask at all)."""
        start, end = self.vocab_start, self.vocab_start + v_local
        real = end if self.real_vocab is None else self.real_vocab
        ids = torch.arange(start, end, device=device)
        allowed = ids < real if real < end else None
        if constraint_range is not None:
            lo, hi = constraint_range
            in_range = (ids < 4) | ((ids >= lo) & (ids < hi))
            allowed = in_range if allowed is None else allowed & in_range
        if isinstance(constraint_masks, ConstraintSets):
            local = constraint_masks.allowed(valid.to(device), start, min(end, real))
        elif constraint_masks is not None:
            local = constraint_masks[valid][:, start:min(end, real)].bool()
        if constraint_masks is not None:
            if local.shape[-1] < v_local:  # the slice reaches into the padded rows (or past the mask's columns)
                local = torch.cat([local, local.new_zeros(n, v_local - local.shape[-1])], dim=-1)
            allowed = local if allowed is None else local & allowed
        return allowed

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *, conf: Optional[torch.Tensor] = None,
                 constraint_masks: Optional[torch.Tensor | ConstraintSets] = None,
                 constraint_range: Optional[tuple[int, int]] = None) -> TokenLosses:
        b, t, v_local = logits.shape
        start = self.vocab_start
        valid = target != self.ignore_index
        # at least fp32: bf16/fp16 logits would lose the log-sum-exp's precision
        x = logits[valid].to(torch.promote_types(logits.dtype, torch.float32))  # (N, V_local)
        y = target[valid]
        n = y.shape[0]
        allowed = self._allowed(valid, n, v_local, x.device, constraint_masks, constraint_range)
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
        rank = None
        if self.log_end is not None:
            rank = loss
            loss = loss + self._encouraging_bonus(z, log_norm, target_lp, weight, allowed, v_local)

        with torch.no_grad():  # accuracy: the argmax over the whole allowed vocabulary is the target
            local_best, local_arg = masked.max(-1)
            best = self._reduce_no_grad(local_best.clone(), "max")
            mine = ((local_best == best) & in_slice & (local_arg == local_y)).to(x.dtype)
            hit = self._reduce_no_grad(mine, "max") > 0
        correct = torch.zeros_like(valid)
        correct[valid] = hit
        zeros = x.new_zeros((b, t))
        return TokenLosses(loss=zeros.masked_scatter(valid, loss), nll=zeros.masked_scatter(valid, nll),
                           valid=valid, correct=correct,
                           rank=None if rank is None else zeros.masked_scatter(valid, rank))

    def _bonus(self, p: torch.Tensor) -> torch.Tensor:
        """b(p) = log(max(1 − p, 1e−5)); above log_end the tangent line at log_end (OFA's conservative version)."""
        b = torch.log(torch.clamp(1.0 - p, min=1e-5))
        end = self.log_end
        if end != 1.0:
            b = torch.where(p > end, (p - end) / (end - 1.0) + math.log(1.0 - end), b)
        return b

    def _encouraging_bonus(self, z: torch.Tensor, log_norm: torch.Tensor, target_lp: torch.Tensor,
                           weight: Optional[torch.Tensor], allowed: Optional[torch.Tensor], v_local: int
                           ) -> torch.Tensor:
        """(N,) per kept token: (1 − ε)·b(p_y) + (ε / V)·Σ_v b(p_v). This slice's log-probs are z − log_norm
        (N, V_local); where not allowed they become −inf as in OFA (p = 0, b = 0) before any exp, so a large masked
        logit cannot overflow into the gradient."""
        lp = z - log_norm.unsqueeze(-1)
        bonus = (1.0 - self.epsilon) * self._bonus(torch.exp(target_lp if weight is None else target_lp * weight))
        if self.epsilon > 0.0:
            split = self.tp_size > 1
            if split:  # see below: the log-normaliser's share of the gradient is added by hand
                lp = z - log_norm.detach().unsqueeze(-1)
            if allowed is not None:
                lp = lp.masked_fill(~allowed, float("-inf"))
            w = None if weight is None else weight.unsqueeze(-1)
            p = torch.exp(lp if w is None else lp * w)
            b_sum = self._sum(self._bonus(p).sum(-1))
            if split:
                # Σ_v b(p_v) depends on the log-normaliser through every slice's entries, but the reduce region's
                # identity backward would give each rank only its own slice's share. Add the whole (all-reduced,
                # replicated) derivative d/d(log_norm) = −w·Σ_v b'(p_v)·p_v times (log_norm − log_norm.detach()):
                # zero in the forward pass, the exact gradient backward.
                with torch.no_grad():
                    slope = self._reduce_no_grad((self._bonus_slope(p) * p).sum(-1), "sum")
                    slope = -slope if weight is None else -slope * weight
                b_sum = b_sum + slope * (log_norm - log_norm.detach())
            vocab = self.real_vocab if self.real_vocab is not None else v_local
            bonus = bonus + (self.epsilon / vocab) * b_sum
        return bonus

    def _bonus_slope(self, p: torch.Tensor) -> torch.Tensor:
        """db/dp of `_bonus`: −1/(1 − p), 0 where the 1e−5 clamp holds, 1/(log_end − 1) on the tangent."""
        slope = torch.where(1.0 - p > 1e-5, -1.0 / (1.0 - p).clamp_min(1e-5), torch.zeros_like(p))
        end = self.log_end
        if end != 1.0:
            slope = torch.where(p > end, torch.full_like(p, 1.0 / (end - 1.0)), slope)
        return slope


class SingleProcessTokenLoss(VocabParallelTokenLoss):
    """The vocabulary-parallel loss with one slice holding the whole vocabulary (no collective). `real_vocab`
    excludes padded output columns, if the logits have any."""

    def __init__(self, epsilon: float = 0.0, ignore_index: int = 1, real_vocab: Optional[int] = None,
                 log_end: Optional[float] = None):
        super().__init__(epsilon, ignore_index, vocab_start=0, real_vocab=real_vocab, group=None, tp_size=1,
                         log_end=log_end)


def make_token_loss(ctx: Any, epsilon: float, ignore_index: int, log_end: Optional[float] = None) -> TokenLoss:
    """The token loss for a ParallelContext's logits (vocabulary-split when tp > 1); `ctx=None`: one process.
    `log_end`: the Encouraging Loss (objectives.loss: encouraging); None: label-smoothed cross entropy."""
    if ctx is None:
        return SingleProcessTokenLoss(epsilon, ignore_index, log_end=log_end)
    real_vocab = ctx.layout.vocab_size
    if ctx.tp_size == 1:
        return SingleProcessTokenLoss(epsilon, ignore_index, real_vocab=real_vocab, log_end=log_end)
    start, _ = ctx.vocab_range()
    return VocabParallelTokenLoss(epsilon, ignore_index, vocab_start=start, real_vocab=real_vocab, group=ctx.tp_group,
                                  tp_size=ctx.tp_size, log_end=log_end)
