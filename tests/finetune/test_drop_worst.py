"""Drop-worst in the trainer's step (spec §6.1 step 5): per group of each micro-batch, exactly floor((1 − r)·N) target
tokens are kept, the dropped ones are the largest losses, the denominators count the kept tokens (so the loss does
not depend on how the global batch is split over data-parallel ranks), and the ratio is 0 until drop_worst_after."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ofa_scale.objectives import loss as loss_module
from ofa_scale.objectives.config import ObjectivesConfig
from ofa_scale.objectives.token_loss import SingleProcessTokenLoss
from ofa_scale.training.metrics import TaskAccumulator
from ofa_scale.training.step import LossSettings, run_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_step_loss import PAD, V, FakeEngine, TinyModel, to_inputs  # noqa: E402  (the trainer-step test's tiny model)

EPS = 0.1
TASKS = ["caption"]


def group_batch(seed: int, rows: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(4, V, (rows, length), generator=g)
    target[0, 4:] = PAD  # rows of different lengths: N = 3·7 − 3 = 18 valid tokens
    return {"src_tokens": torch.randint(4, V, (rows, 4), generator=g), "prev_output_tokens": target.roll(1, -1),
            "target": target, "conf": torch.rand(rows, generator=g) + 0.5,
            "task_ids": torch.zeros(rows, dtype=torch.long)}


MICRO_BATCHES = [{"vl": group_batch(m)} for m in range(2)]
SETTINGS = LossSettings(epsilon=EPS, pad=PAD, per_group=True)


def ctx(dp_size: int = 1):
    return SimpleNamespace(dp_size=dp_size, dp_group=None, tp_size=1, tp_rank=0, layout=SimpleNamespace(vocab_size=V))


def token_losses(model, gb):
    """(per-token label-smoothed losses of the valid positions, flattened) for one group batch."""
    with torch.no_grad():
        tl = SingleProcessTokenLoss(EPS, PAD)(model(gb["src_tokens"], gb["prev_output_tokens"]), gb["target"],
                                              conf=gb["conf"])
    return tl.loss[tl.valid]


def reference(model, ratio: float) -> torch.Tensor:
    """Σ over micro-batches of the sum of the kept (smallest) losses / total kept: computed from sorted losses."""
    kept_sum, kept = 0.0, 0
    for mb in MICRO_BATCHES:
        losses = token_losses(model, mb["vl"]).sort().values
        k = int(losses.numel() * (1 - ratio))
        kept_sum += losses[:k].sum()
        kept += k
    return kept_sum / kept


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_drop_worst_keeps_exactly_the_smallest_losses_and_normalises_by_kept_tokens(ratio):
    model = TinyModel()
    n_valid = [int((mb["vl"]["target"] != PAD).sum()) for mb in MICRO_BATCHES]
    assert n_valid == [18, 18]
    acc = TaskAccumulator(TASKS)
    run_step(FakeEngine(model, gas=2), ctx(), MICRO_BATCHES, ["vl"], to_inputs, SETTINGS, acc,
             drop_worst_ratio=ratio)
    # exact kept count: floor((1 − r)·18) per micro-batch (r = 0.2: 14, not round(14.4); r = 0.5: 9)
    assert acc.per_task[0, acc.TOKENS].item() == 2 * int(18 * (1 - ratio))
    # the loss is the mean of the smallest losses: any other choice of kept tokens gives a larger value
    assert acc.objective == pytest.approx(float(reference(model, ratio)), rel=1e-6)
    full = TaskAccumulator(TASKS)
    run_step(FakeEngine(model, gas=2), ctx(), MICRO_BATCHES, ["vl"], to_inputs, SETTINGS, full)
    assert acc.objective < full.objective
    assert full.per_task[0, full.TOKENS].item() == 36


def test_dropped_tokens_are_the_largest_and_carry_no_gradient():
    from ofa_scale.objectives.step import micro_batch_loss

    model = TinyModel()
    gb = MICRO_BATCHES[0]["vl"]
    logits = model(gb["src_tokens"], gb["prev_output_tokens"])
    total, out = micro_batch_loss(SingleProcessTokenLoss(EPS, PAD), {"vl": logits}, {"vl": gb}, {"vl": 1.0},
                                  drop_worst_ratio=0.3)
    tl = out["vl"]
    all_losses = SingleProcessTokenLoss(EPS, PAD)(logits.detach(), gb["target"], conf=gb["conf"])
    kept = tl.valid
    dropped = all_losses.valid & ~kept
    assert int(kept.sum()) == int(18 * 0.7) == 12 and int(dropped.sum()) == 6
    assert all_losses.loss[kept].max() <= all_losses.loss[dropped].min()
    # the dropped positions' logits get no gradient at all
    logits.retain_grad()
    total.backward()
    assert float(logits.grad[dropped].abs().sum()) == 0.0
    assert float(logits.grad[kept].abs().sum()) > 0.0


def test_loss_and_gradient_do_not_depend_on_the_data_parallel_split(monkeypatch):
    """2 data-parallel ranks with one micro-batch each give the 1-rank, 2-micro-batch loss and gradient: the
    denominator is the global kept count. The all-reduce of the counts is emulated (each rank adds the other's)."""
    ratio = 0.2
    model = TinyModel()
    acc = TaskAccumulator(TASKS)
    run_step(FakeEngine(model, gas=2), ctx(), MICRO_BATCHES, ["vl"], to_inputs, SETTINGS, acc,
             drop_worst_ratio=ratio)
    want_grad = model.out.weight.grad.clone()

    counts = [loss_module.count_loss_tokens([mb], ["vl"], PAD, ratio) for mb in MICRO_BATCHES]
    monkeypatch.setattr(loss_module.collectives, "all_reduce", lambda t, op, group: counts[0] + counts[1])
    objective, grads = 0.0, []
    for rank in range(2):
        model.zero_grad()
        rank_acc = TaskAccumulator(TASKS)
        run_step(FakeEngine(model, gas=1), ctx(dp_size=2), [MICRO_BATCHES[rank]], ["vl"], to_inputs, SETTINGS,
                 rank_acc, drop_worst_ratio=ratio)
        objective += rank_acc.objective
        grads.append(model.out.weight.grad.clone())
    assert objective == pytest.approx(acc.objective, rel=1e-6)
    torch.testing.assert_close((grads[0] + grads[1]) / 2, want_grad, rtol=1e-5, atol=1e-7)  # DeepSpeed averages


def test_ratio_is_zero_until_drop_worst_after():
    """OFA: drop-worst applies when update_num > drop_worst_after (fairseq's update_num counts finished updates,
    so the trainer's 1-based step s is update_num s − 1)."""
    cfg = ObjectivesConfig(drop_worst_ratio=0.2, drop_worst_after=6000)
    assert [cfg.drop_worst_ratio_at(u) for u in (0, 5999, 6000, 6001, 10**6)] == [0.0, 0.0, 0.0, 0.2, 0.2]
    model = TinyModel()
    before, plain = TaskAccumulator(TASKS), TaskAccumulator(TASKS)
    run_step(FakeEngine(model, gas=2), ctx(), MICRO_BATCHES, ["vl"], to_inputs, SETTINGS, before,
             drop_worst_ratio=cfg.drop_worst_ratio_at(6000))
    run_step(FakeEngine(model, gas=2), ctx(), MICRO_BATCHES, ["vl"], to_inputs, SETTINGS, plain)
    assert before.objective == plain.objective
