"""Compact constraint masks: which target ids each (row, position) of a group batch allows, without (B, T, V).

A dense boolean mask over the vocabulary costs B·T·V bytes per micro-batch (VQA with the GPT-2 vocabulary: tens
of MB), built in the loader workers and copied to the device, although only the few answer positions of a
trie-constrained row restrict anything. `ConstraintSets` holds the same information as lists:

  * `positions` (K,): flat indices b·T + t of the positions with an explicit allowed-id list (a trie step, an
    answer's eos); every other position of the batch allows the whole vocabulary;
  * `entry_positions`, `entry_ids` (M,): the allowed ids, one entry per (position, id) pair;
  * `ranges` (B, 2): rows constrained by OFA's `constraint_range` [start, end) at every position (ids 0–3 and
    the range allowed), start −1 for the other rows.

The loss resolves it on the device, only for the positions it computes (`allowed`): the result is exactly the
rows of the dense mask `batching.constraint_mask` would give (`dense` builds that reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

# ids 0–3 (bos, pad, eos, unk) stay allowed under a constraint range, as OFA's constraint_range does
SPECIAL_IDS = 4


@dataclass(frozen=True)
class ConstraintSets:
    """The allowed target ids of a (B, T) group batch over a vocabulary of V ids (module docstring)."""

    shape: tuple[int, int, int]  # (B, T, V) of the dense mask this stands for
    positions: torch.Tensor  # (K,) int64 flat b·T + t with an explicit list
    entry_positions: torch.Tensor  # (M,) int64 flat position of each allowed id
    entry_ids: torch.Tensor  # (M,) int64
    ranges: torch.Tensor  # (B, 2) int64 [start, end) per row; start −1: no range

    @classmethod
    def build(cls, constraints: Sequence[Any], batch_size: int, t_len: int, vocab_size: int) -> "ConstraintSets":
        """From each row's `constraint` (None, {"range": (start, end)}, or per target position a list of allowed
        ids; positions beyond the list allow everything), rows beyond `constraints` unconstrained."""
        positions: list[int] = []
        entry_pos: list[int] = []
        entry_ids: list[int] = []
        ranges = torch.full((batch_size, 2), -1, dtype=torch.long)
        for row, constraint in enumerate(constraints):
            if constraint is None:
                continue
            if isinstance(constraint, dict) and "range" in constraint:
                ranges[row] = torch.as_tensor(tuple(constraint["range"]), dtype=torch.long)
                continue
            for t, allowed in enumerate(list(constraint)[:t_len]):
                flat = row * t_len + t
                ids = [int(i) for i in allowed]
                positions.append(flat)
                entry_pos.extend([flat] * len(ids))
                entry_ids.extend(ids)
        bad = [i for i in entry_ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"constraint allows id {bad[0]}, outside the vocabulary of {vocab_size} ids")
        return cls(shape=(batch_size, t_len, vocab_size), positions=torch.tensor(positions, dtype=torch.long),
                   entry_positions=torch.tensor(entry_pos, dtype=torch.long),
                   entry_ids=torch.tensor(entry_ids, dtype=torch.long), ranges=ranges)

    # -- tensor-like plumbing: the batch moves to the device (objectives/step.py) and through pinned memory --
    def _map(self, fn) -> "ConstraintSets":
        return ConstraintSets(self.shape, fn(self.positions), fn(self.entry_positions), fn(self.entry_ids),
                              fn(self.ranges))

    def to(self, device: Any, non_blocking: bool = False) -> "ConstraintSets":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "ConstraintSets":
        return self._map(lambda t: t.pin_memory())

    @property
    def device(self) -> torch.device:
        return self.ranges.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.positions, self.entry_positions, self.entry_ids, self.ranges))

    # -- resolution --
    def allowed(self, valid: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """(N, stop − start) bool on `valid`'s device: for each True position of the (B, T) `valid`, in row-major
        order (as `dense_mask[valid]` orders them), the allowed ids among [start, stop) (default: all V)."""
        b, t, v = self.shape
        if tuple(valid.shape) != (b, t):
            raise ValueError(f"valid has shape {tuple(valid.shape)}; these constraints are for ({b}, {t})")
        stop = v if stop is None else min(stop, v)
        width = max(stop - start, 0)
        sets = self.to(valid.device)
        flat = valid.flatten().nonzero().squeeze(1)  # (N,) flat positions the caller computes
        n = flat.shape[0]
        out = torch.ones((n, width), dtype=torch.bool, device=valid.device)
        if n == 0 or width == 0:
            return out
        ids = torch.arange(start, stop, device=valid.device)
        lo, hi = sets.ranges[flat // t].unbind(-1)  # (N,) each position's row range
        ranged = lo >= 0
        if bool(ranged.any()):
            in_range = (ids < SPECIAL_IDS) | ((ids >= lo[:, None]) & (ids < hi[:, None]))
            out = torch.where(ranged[:, None], in_range, out)
        if sets.positions.numel():
            # which output row (−1: none) each flat position of the batch is
            slot = torch.full((b * t,), -1, dtype=torch.long, device=valid.device)
            slot[flat] = torch.arange(n, device=valid.device)
            listed = slot[sets.positions]
            out[listed[listed >= 0]] = False  # an explicit list allows only its ids
            rows = slot[sets.entry_positions]
            keep = (rows >= 0) & (sets.entry_ids >= start) & (sets.entry_ids < stop)
            out[rows[keep], sets.entry_ids[keep] - start] = True
        return out

    def dense(self) -> torch.Tensor:
        """(B, T, V) bool: the dense mask (the reference `allowed` is tested against)."""
        b, t, v = self.shape
        return self.allowed(torch.ones((b, t), dtype=torch.bool, device=self.device)).view(b, t, v)
