"""The trainer's step (`run_step`) and the pipeline's last stage (`PipelineLoss`) both compute the step loss through
the objectives' TokenLoss and normalisation: on the same micro-batches they give the same loss, gradient and
per-task metrics, and both equal the single-process loss of the whole global batch (conf weights and constraint
masks included)."""

from types import SimpleNamespace

import pytest
import torch

from ofa_scale.objectives.token_loss import SingleProcessTokenLoss
from ofa_scale.training.metrics import TaskAccumulator
from ofa_scale.training.pipeline_step import PipelineLoss
from ofa_scale.training.step import GroupsForward, LossSettings, run_step, step_denominators

V, PAD = 16, 1
TASKS = ["caption", "itm", "text_infill"]


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, 8)
        self.out = torch.nn.Linear(8, V)

    def forward(self, src_tokens, prev_output_tokens):
        return self.out(self.emb(prev_output_tokens) + self.emb(src_tokens).mean(1, keepdim=True))


def group_batch(seed: int, rows: int, with_masks: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(4, V, (rows, 5), generator=g)
    target[0, 3:] = PAD
    gb = {"src_tokens": torch.randint(4, V, (rows, 4), generator=g), "prev_output_tokens": target.roll(1, -1),
          "target": target, "conf": torch.rand(rows, generator=g) + 0.5,
          "task_ids": torch.randint(0, len(TASKS), (rows,), generator=g)}
    gb["task_ids"][-1] = -1  # a padding row: no task, no targets
    gb["target"][-1] = PAD
    if with_masks:
        masks = torch.rand(rows, 5, V, generator=g) < 0.5
        masks.scatter_(-1, target.unsqueeze(-1), True)
        gb["constraint_masks"] = masks
    return gb


MICRO_BATCHES = [{"vl": group_batch(2 * m, 3, True), "aux": group_batch(2 * m + 1, 2, False)} for m in range(2)]
GROUPS = ["vl", "aux"]
CTX = SimpleNamespace(dp_size=1, dp_group=None, tp_size=1, tp_rank=0, layout=SimpleNamespace(vocab_size=V))


def to_inputs(g, gb, m):
    return {"src_tokens": gb["src_tokens"], "prev_output_tokens": gb["prev_output_tokens"]}


class FakeEngine:
    """DeepSpeed's engine as run_step drives it: backward divides by gradient_accumulation_steps."""

    def __init__(self, model, gas):
        self.module, self.gas, self.steps = GroupsForward(model), gas, 0

    def __call__(self, inputs):
        return self.module(inputs)

    def backward(self, value):
        (value / self.gas).backward()

    def step(self):
        self.steps += 1


def reference(model, settings):
    """Σ_g (Σ token losses of group g over the whole global batch) / D_g, computed in one piece."""
    loss = SingleProcessTokenLoss(settings.epsilon, PAD)
    total = 0.0
    sums = {g: 0.0 for g in GROUPS}
    counts = {g: 0 for g in GROUPS}
    for g in GROUPS:
        gbs = [mb[g] for mb in MICRO_BATCHES]
        cat = {k: torch.cat([gb[k] for gb in gbs]) for k in gbs[0]}
        tl = loss(model(cat["src_tokens"], cat["prev_output_tokens"]), cat["target"], conf=cat["conf"],
                  constraint_masks=cat.get("constraint_masks"))
        sums[g], counts[g] = tl.loss.sum(), int(tl.valid.sum())
    for g in GROUPS:
        total = total + sums[g] / (counts[g] if settings.per_group else sum(counts.values()))
    return total


@pytest.mark.parametrize("per_group", [True, False])
def test_run_step_and_pipeline_last_stage_compute_the_global_batch_loss(per_group):
    settings = LossSettings(epsilon=0.1, pad=PAD, per_group=per_group)
    model = TinyModel()
    want = reference(model, settings)
    want.backward()
    want_grad = model.out.weight.grad.clone()
    model.zero_grad()

    acc = TaskAccumulator(TASKS)
    engine = FakeEngine(model, gas=len(MICRO_BATCHES))
    run_step(engine, CTX, MICRO_BATCHES, GROUPS, to_inputs, settings, acc)
    assert engine.steps == len(MICRO_BATCHES)
    assert acc.objective == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(model.out.weight.grad, want_grad, rtol=1e-5, atol=1e-7)

    # the pipeline's last stage: one group per pipeline micro-batch, labels handed over apart from the batch
    pipe_acc = TaskAccumulator(TASKS)
    pipe_loss = PipelineLoss(CTX, settings)
    pipe_loss.start_step(pipe_acc)
    denominators = step_denominators(CTX, MICRO_BATCHES, GROUPS, settings)
    scale = float(len(MICRO_BATCHES) * len(GROUPS))
    items = [(mb[g], g) for mb in MICRO_BATCHES for g in GROUPS]
    for gb, g in items:
        pipe_loss.expect(gb, denominators[g], scale)
    with torch.no_grad():
        parts = [pipe_loss(model(**to_inputs(g, gb, 0)), gb["target"]) for gb, g in items]
    assert sum(p.item() for p in parts) / scale == pytest.approx(want.item(), rel=1e-6)
    assert pipe_acc.objective == pytest.approx(acc.objective, rel=1e-6)
    assert pipe_acc.task_metrics() == pytest.approx(acc.task_metrics(), rel=1e-6)
    input_tokens = sum(int((gb["src_tokens"] != PAD).sum() + (gb["prev_output_tokens"] != PAD).sum())
                       for gb, _ in items)
    assert (pipe_acc.rows, pipe_acc.input_tokens) == (acc.rows, acc.input_tokens) == (6, input_tokens)
    assert set(acc.task_metrics()) >= {"loss/caption", "acc/caption"}
