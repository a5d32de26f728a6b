"""Constraint trie over token sequences (OFA `utils/trie.py` semantics, spec §6.3).

Closed answer sets (VQA answers, SNLI-VE labels, GLUE label words, class names) are inserted as
`[bos] + BPE(" " + answer) + [eos]`; during decoding, the tokens allowed after a prefix are the children of the
node that prefix reaches. A prefix that leaves the tree allows only `eos`, so a constrained hypothesis that has
somehow left the answer set is ended rather than continued with arbitrary tokens.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


class Trie:
    """Prefix tree of token-id sequences; children keep insertion order so results are deterministic."""

    def __init__(self, sequences: Iterable[Sequence[int]] = (), eos: int = 2):
        self.eos = int(eos)
        self._root: dict[int, dict] = {}
        self._size = 0
        for seq in sequences:
            self.insert(seq)

    @classmethod
    def from_answers(cls, answers: Iterable[Sequence[int]], bos: int = 0, eos: int = 2) -> "Trie":
        """Trie of `[bos] + answer + [eos]` for each answer's token ids (the answer without bos/eos)."""
        return cls(([bos, *map(int, a), eos] for a in answers), eos=eos)

    def insert(self, sequence: Sequence[int]) -> None:
        node = self._root
        new = False
        for tok in sequence:
            tok = int(tok)
            if tok not in node:
                node[tok] = {}
                new = True
            node = node[tok]
        self._size += int(new)

    def __len__(self) -> int:
        """Number of distinct sequences inserted (a sequence that is a prefix of another still counts)."""
        return self._size

    def _node(self, prefix: Sequence[int]) -> dict | None:
        node = self._root
        for tok in prefix:
            node = node.get(int(tok))
            if node is None:
                return None
        return node

    def get_next_layer(self, prefix: Sequence[int]) -> list[int]:
        """Token ids allowed after `prefix`; `[eos]` if the prefix is not in the tree or ends a sequence."""
        node = self._node(prefix)
        if not node:  # unknown prefix, or a leaf (only reachable when a sequence was inserted without eos)
            return [self.eos]
        return list(node)

    def contains(self, sequence: Sequence[int]) -> bool:
        """True if `sequence` is a prefix path of the tree (a whole inserted sequence or a prefix of one)."""
        return self._node(sequence) is not None

    def allowed_mask(self, prefix: Sequence[int], vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool mask of the tokens allowed after `prefix`."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[self.get_next_layer(prefix)] = True
        return mask

    def answer_masks(self, answer: Sequence[int], vocab_size: int, bos: int = 0) -> torch.Tensor:
        """(len(answer)+1, vocab_size) bool masks for teacher forcing an answer (spec §6.3, training and
        all-candidate scoring): row k allows `next([bos] + answer[:k])`; the last row is where eos is predicted."""
        rows = [self.allowed_mask([bos, *answer[:k]], vocab_size) for k in range(len(answer) + 1)]
        return torch.stack(rows)
