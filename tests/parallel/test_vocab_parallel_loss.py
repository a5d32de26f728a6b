"""The vocabulary-parallel loss equals the single-process OFA loss (objectives/loss.py) on one rank, with padded
vocabulary rows ignored. Its split form is exercised by the tp=2 equivalence runs (test_equivalence.py), whose
batches carry constraint masks, per-sample weights and label smoothing over a vocabulary padded 203 -> 204."""

import pytest
import torch

from ofa_scale.objectives.loss import token_losses
from ofa_scale.parallel.vocab_parallel_loss import vocab_parallel_label_smoothed_nll

V = 37


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, V, generator=g) * 3
    target = torch.randint(4, V, (3, 5), generator=g)
    target[0, -2:] = 1
    conf = torch.tensor([1.0, 0.5, 2.0])
    masks = torch.rand(3, 5, V, generator=g) < 0.4
    masks[torch.arange(3)[:, None], torch.arange(5)[None], target] = True
    return logits, target, conf, masks


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["plain", "masks", "range", "both"])
def test_matches_single_process_loss_and_gradients(eps, kind):
    logits, target, conf, masks = batch(1)
    kw = {}
    if kind in ("masks", "both"):
        kw["constraint_masks"] = masks
    if kind in ("range", "both"):
        kw["constraint_range"] = (10, 30)
        target = target.clamp(10, 29)
        target[0, -2:] = 1
        masks[torch.arange(3)[:, None], torch.arange(5)[None], target] = True
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    want = token_losses(a, target, epsilon=eps, conf=conf, **kw)
    got = vocab_parallel_label_smoothed_nll(b, target, epsilon=eps, ignore_index=1, conf=conf, **kw)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.nll, want.nll)
    assert torch.equal(got.valid, want.valid) and torch.equal(got.correct, want.correct)
    want.loss.sum().backward()
    got.loss.sum().backward()
    torch.testing.assert_close(b.grad, a.grad)


def test_padded_vocabulary_rows_take_no_probability_mass():
    logits, target, conf, masks = batch(2)
    padded = torch.cat([logits, torch.full((3, 5, 3), 50.0)], dim=-1).requires_grad_()  # huge logits in padding
    got = vocab_parallel_label_smoothed_nll(padded, target, epsilon=0.1, ignore_index=1, real_vocab=V, conf=conf,
                                            constraint_masks=masks)
    want = token_losses(logits, target, epsilon=0.1, conf=conf, constraint_masks=masks)
    torch.testing.assert_close(got.loss, want.loss)
    got.loss.sum().backward()
    assert torch.count_nonzero(padded.grad[..., V:]) == 0
