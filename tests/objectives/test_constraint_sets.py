"""Compact constraint masks (objectives/constraints.py): the Collator's `ConstraintSets` is a small fraction of the
dense (B, T, V) mask, stands for exactly the mask `constraint_mask` builds per example, and every loss that reads
it (single process, a vocabulary slice with padded columns, the Encouraging Loss, `group_loss` as the trainer and
the pipeline's last stage call it) gives the dense mask's numbers bit for bit."""

from __future__ import annotations

import pytest
import torch

from ofa_scale.objectives import Collator, Composition, ObjectivesConfig
from ofa_scale.objectives.batching import PAD, constraint_mask, loss_inputs
from ofa_scale.objectives.config import VLShape
from ofa_scale.objectives.constraints import ConstraintSets
from ofa_scale.objectives.step import group_loss
from ofa_scale.objectives.token_loss import SingleProcessTokenLoss, VocabParallelTokenLoss

V = 50_000  # a GPT-2-sized vocabulary: the dense mask is B·T·V bytes
B, S, T = 8, 24, 20


def vqa_like(i: int, g: torch.Generator) -> dict:
    """A prev_output-style row: prompt positions allow nothing (pad targets), the answer's first position a trie
    layer of a few hundred ids, then single ids, then eos; every third row a code range instead, one unconstrained."""
    prompt = 6 + i % 5
    coded = i % 3 == 2  # these rows' targets lie in the code range they are constrained to
    answer = [int(x) for x in torch.randint(40_000 if coded else 4, 48_192 if coded else V, (3,), generator=g)]
    target = [PAD] * (prompt - 1) + answer + [2]
    ex = {"task": "vqa", "source": [0] + [5] * 10 + [2], "prev_output": [0] + [7] * (len(target) - 1),
          "target": target, "conf": 0.5 + 0.1 * i, "patch_mask": False, "image": None}
    if coded:
        ex["constraint"] = {"range": (40_000, 48_192)}
    elif i != 4:
        first = sorted({answer[0], *(int(x) for x in torch.randint(4, V, (300,), generator=g))})
        ex["constraint"] = [[] for _ in range(prompt - 1)] + [first, [answer[1], 9], [answer[2]], [2]]
    if i == 6:  # a constraint list longer than the target length: cut at T as the dense mask is
        ex["constraint"] = [[3, 5]] * (T + 4)
    return ex


@pytest.fixture(scope="module")
def batch():
    cfg = ObjectivesConfig(tasks=["caption"], mix={"vl": 1, "text": 0, "image": 0, "detection": 0},
                           vl=VLShape(image_size=16, source_length=S, target_length=T), sample_patch_num=0,
                           random_augment=False)
    g = torch.Generator().manual_seed(0)
    examples = [vqa_like(i, g) for i in range(B - 1)]  # the last row is padding
    group = Collator(cfg, Composition.from_config(cfg, B), vocab_size=V, task_ids={"vqa": 0})(examples)["vl"]
    dense = torch.ones(B, T, V, dtype=torch.bool)
    for i, ex in enumerate(examples):
        if ex.get("constraint") is not None:
            dense[i] = constraint_mask(ex["constraint"], T, V)
    return group, dense


def test_the_batch_payload_is_small_and_stands_for_the_dense_mask(batch):
    group, dense = batch
    sets = group["constraint_masks"]
    assert isinstance(sets, ConstraintSets) and sets.shape == (B, T, V)
    print(f"\nconstraint payload {sets.nbytes} bytes vs dense {dense.numel()} bytes "
          f"({dense.numel() / sets.nbytes:.0f}x smaller)")
    assert sets.nbytes * 100 < B * T * V
    assert torch.equal(sets.dense(), dense)
    valid = group["target"] != PAD
    assert torch.equal(sets.allowed(valid), dense[valid])
    for start, stop in ((0, 7), (25_000, 50_000), (39_990, 40_010), (49_990, 50_100), (60_000, 60_010)):
        assert torch.equal(sets.allowed(valid, start, stop), dense[valid][:, start:stop]), (start, stop)
    moved = loss_inputs(group, "cpu")["constraint_masks"]  # the trainer's device move keeps it compact
    assert isinstance(moved, ConstraintSets) and torch.equal(moved.dense(), dense)


def test_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="outside the vocabulary of 10 ids"):
        ConstraintSets.build([[[3, 12]]], 1, 4, 10)


def _run(loss_fn, logits, target, conf, masks):
    x = logits.clone().requires_grad_(True)
    tl = loss_fn(x, target, conf=conf, constraint_masks=masks)
    tl.loss.sum().backward()
    return tl, x.grad


@pytest.mark.parametrize("eps,log_end", [(0.0, None), (0.1, None), (0.1, 0.75)])
def test_the_masked_loss_equals_the_dense_reference(batch, eps, log_end):
    group, dense = batch
    target, conf = group["target"], group["conf"]
    padded = V + 48  # a tensor-parallel layout pads the output vocabulary; the padded columns get no mass
    logits = 3 * torch.randn(B, T, padded, generator=torch.Generator().manual_seed(1))
    logits[..., V:] = 40.0
    # the whole vocabulary in one process, then two vocabulary slices as tensor-parallel ranks hold them (each
    # slice's partial sums: the tp=1 reductions are the identity)
    losses = [SingleProcessTokenLoss(eps, PAD, real_vocab=V, log_end=log_end)]
    half = padded // 2
    losses += [VocabParallelTokenLoss(eps, PAD, vocab_start=r * half, real_vocab=V, log_end=log_end)
               for r in range(2)]
    for k, loss_fn in enumerate(losses):
        cols = slice(None) if k == 0 else slice((k - 1) * half, k * half)
        ref, ref_grad = _run(loss_fn, logits[..., cols], target, conf, dense)
        got, got_grad = _run(loss_fn, logits[..., cols], target, conf, group["constraint_masks"])
        if k == 0:  # the whole vocabulary: every loss finite, and the comparison sees real losses
            assert torch.isfinite(ref.loss).all() and float(ref.loss.detach().abs().sum()) > 0
        # (a lone slice's partial sums are -inf/nan where a position's allowed ids all lie in the other slice)
        for name in ("loss", "nll", "valid", "correct"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True,
                                       msg=f"slice {k}: {name}")
        torch.testing.assert_close(got_grad, ref_grad, rtol=0, atol=0, equal_nan=True, msg=f"slice {k}: grad")


def test_group_loss_reads_the_compact_masks_as_the_dense_ones(batch):
    group, dense = batch
    logits = 3 * torch.randn(B, T, V, generator=torch.Generator().manual_seed(2))
    loss_fn = SingleProcessTokenLoss(0.1, PAD)
    got, _ = group_loss(loss_fn, logits, group, 7.0, drop_worst_ratio=0.2)
    ref, _ = group_loss(loss_fn, logits, {**group, "constraint_masks": dense}, 7.0, drop_worst_ratio=0.2)
    assert torch.equal(got, ref)
    unconstrained, _ = group_loss(loss_fn, logits, {k: v for k, v in group.items() if k != "constraint_masks"}, 7.0,
                                  drop_worst_ratio=0.2)
    assert float(unconstrained) != pytest.approx(float(ref))  # the masks do change the loss
