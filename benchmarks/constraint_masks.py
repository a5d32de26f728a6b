"""Trie-constraint masks in the collate: the dense (B, T, V) boolean mask vs the compact `ConstraintSets`.

Prints one table measured side by side (each repeat runs both, in turn): per micro-batch, the constraint payload's
bytes (what a loader worker hands over and the trainer copies to the device), the collate-side CPU time to build
it, and the loss-side time to turn it into the (N, V) allowed rows of the valid positions (dense: `mask[valid]`;
compact: `ConstraintSets.allowed`, which the token loss runs on the device). Ratios are dense / compact.

Workload: VQA as OFA-Base trains it (prompt type prev_output, micro-batch 4, the decoder prompt is the whole
question so the target has ~110 positions of which the answer's 2–4 reach the loss), a trie over 3,129 candidate
answers of 1–3 tokens, and OFA's vocabulary (GPT-2 BPE + 1,000 location bins + 8,192 image codes = 59,457 ids).
Torch runs on one thread; CPU seconds of this process, medians over repeats.

    python benchmarks/constraint_masks.py            # micro-batches of 4 and 16 rows, 20 repeats
    python benchmarks/constraint_masks.py --quick    # 5 repeats
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from ofa_scale.objectives.batching import constraint_mask
from ofa_scale.objectives.constraints import ConstraintSets
from ofa_scale.utils.trie import Trie

VOCAB = 50_265 + 1_000 + 8_192
CANDIDATES = 3_129
PROMPT = 108  # decoder prompt positions (the question and object tags of a prev_output row)
MAX_ANSWER = 3


def workload(rows: int, seed: int = 0) -> tuple[list[list[list[int]]], int]:
    """(per row the constraint lists the VQA task builds, target length)."""
    rng = random.Random(seed)
    # most answers start with their own piece (VQA's 3,129 answers have ~2,000 distinct first tokens); a third
    # share one of 300 common first pieces ("a", "on", "white", ...)
    common = [rng.randrange(4, 50_265) for _ in range(300)]
    answers = {tuple((rng.choice(common) if rng.random() < 0.35 else rng.randrange(4, 50_265)) if k == 0
                     else rng.randrange(4, 50_265) for k in range(rng.randint(1, MAX_ANSWER)))
               for _ in range(CANDIDATES * 2)}
    answers = sorted(answers)[:CANDIDATES]
    trie = Trie.from_answers(answers, bos=0, eos=2)
    print(f"trie: {len(trie.get_next_layer([0]))} distinct first tokens")
    constraints = []
    for _ in range(rows):
        ans = list(rng.choice(answers))
        constraints.append([[] for _ in range(PROMPT - 1)]
                           + [trie.get_next_layer([0, *ans[:k]]) for k in range(len(ans) + 1)])
    return constraints, PROMPT - 1 + MAX_ANSWER + 1


def dense_collate(constraints, rows: int, t_len: int) -> torch.Tensor:
    """The Collator's former path: a (B, T, V) mask filled row by row."""
    mask = torch.ones((rows, t_len, VOCAB), dtype=torch.bool)
    for i, c in enumerate(constraints):
        mask[i] = constraint_mask(c, t_len, VOCAB)
    return mask


def valid_positions(constraints, rows: int, t_len: int) -> torch.Tensor:
    valid = torch.zeros((rows, t_len), dtype=torch.bool)
    for i, c in enumerate(constraints):
        valid[i, PROMPT - 1:len(c)] = True  # the answer tokens and eos: the loss's positions
    return valid


def cpu_time(fn, *args):
    t0 = time.process_time()
    out = fn(*args)
    return time.process_time() - t0, out


def measure(rows: int, repeats: int) -> dict[str, list[float]]:
    constraints, t_len = workload(rows)
    valid = valid_positions(constraints, rows, t_len)
    out: dict[str, list[float]] = {k: [] for k in ("dense_build", "compact_build", "dense_resolve",
                                                   "compact_resolve")}
    for _ in range(repeats):
        s, dense = cpu_time(dense_collate, constraints, rows, t_len)
        out["dense_build"].append(s)
        s, sets = cpu_time(ConstraintSets.build, constraints, rows, t_len, VOCAB)
        out["compact_build"].append(s)
        s, ref = cpu_time(lambda: dense[valid])
        out["dense_resolve"].append(s)
        s, got = cpu_time(sets.allowed, valid)
        out["compact_resolve"].append(s)
        if not torch.equal(ref, got):
            raise AssertionError("the compact constraints resolve to other rows than the dense mask")
    out["dense_bytes"] = [dense.numel() * dense.element_size()]
    out["compact_bytes"] = [sets.nbytes]
    out["t_len"] = [t_len]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats")
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 16], help="micro-batch sizes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 5 if args.quick else 20
    print(f"vocabulary {VOCAB}, {CANDIDATES} candidate answers, prompt {PROMPT} positions; CPU ms, medians of "
          f"{repeats}")
    print("| rows | T | dense bytes | compact bytes | ratio | dense build ms | compact build ms | ratio "
          "| dense resolve ms | compact resolve ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        m = measure(rows, repeats)
        med = {k: statistics.median(v) for k, v in m.items()}
        ms = {k: 1e3 * med[k] for k in ("dense_build", "compact_build", "dense_resolve", "compact_resolve")}
        print(f"| {rows} | {int(med['t_len'])} | {int(med['dense_bytes']):,} | {int(med['compact_bytes']):,} | "
              f"{med['dense_bytes'] / med['compact_bytes']:.0f}x | {ms['dense_build']:.1f} | "
              f"{ms['compact_build']:.2f} | {ms['dense_build'] / max(ms['compact_build'], 1e-3):.0f}x | "
              f"{ms['dense_resolve']:.2f} | {ms['compact_resolve']:.2f} | "
              f"{ms['dense_resolve'] / max(ms['compact_resolve'], 1e-3):.1f}x |")


if __name__ == "__main__":
    main()
