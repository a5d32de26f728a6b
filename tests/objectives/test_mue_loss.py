"""MuE's all-layer training loss (objectives/mue_loss.py): the label-smoothed cross entropy with constraint masks,
conf and drop-worst, summed over every decoder layer, each layer's logits output_projection(layer_norm(h_l)).

The reference is a naive loop written out here: the decoder layers one by one, each layer's logits, and the token
loss per position in plain torch (masked log-softmax, smoothing over the allowed set, conf, then drop-worst over
the batch). The trainer's step (training/step.py run_step with LossSettings.all_layers) must give its gradients.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.objectives.loss import global_loss_denominators
from ofa_scale.objectives.mue_loss import all_layer_loss
from ofa_scale.objectives.step import micro_batch_loss
from ofa_scale.objectives.token_loss import SingleProcessTokenLoss
from ofa_scale.training.metrics import TaskAccumulator
from ofa_scale.training.step import GroupsForward, LossSettings, run_step

PAD, V, EPS, DROP = 1, 300, 0.1, 0.25


@pytest.fixture()
def model() -> OFAModel:
    torch.manual_seed(0)
    cfg = OFAConfig.preset("ofa_tiny", attention_impl="math", d_model=32, ffn_dim=64, heads=2, encoder_layers=2,
                           decoder_layers=3, vocab_size=V, mue=True)
    return OFAModel(cfg).train()  # no dropout in the config: deterministic


@pytest.fixture()
def micro_batch() -> dict:
    g = torch.Generator().manual_seed(3)
    target = torch.randint(4, V, (3, 5), generator=g)
    target[1, 3:] = PAD
    target[2, 4:] = PAD
    prev = torch.cat([torch.zeros(3, 1, dtype=torch.long), target[:, :-1]], dim=1).masked_fill(
        torch.cat([torch.zeros(3, 1, dtype=torch.bool), target[:, :-1].eq(PAD)], dim=1), PAD)
    masks = torch.rand(3, 5, V, generator=g) < 0.3  # constraint masks (VQA / SNLI-VE style), target allowed
    masks.scatter_(2, target[:, :, None], True)
    src = torch.randint(4, V, (3, 6), generator=g)
    src[2, 4:] = PAD
    return {"vl": dict(src_tokens=src, patch_images=torch.randn(3, 3, 32, 32, generator=g),
                       patch_masks=torch.tensor([True, True, False]), prev_output_tokens=prev, target=target,
                       conf=torch.tensor([1.0, 0.5, 2.0]), constraint_masks=masks,
                       task_ids=torch.zeros(3, dtype=torch.long))}


def _inputs(gb: dict) -> dict:
    return {k: gb[k] for k in ("src_tokens", "patch_images", "patch_masks", "prev_output_tokens")}


def naive_loss(model: OFAModel, gb: dict, denominator: float) -> torch.Tensor:
    """Σ_l of layer l's label-smoothed CE (constraint masks, conf, drop-worst) / denominator, written out."""
    enc = model.encoder(gb["src_tokens"], gb["patch_images"], gb["patch_masks"])
    dec = model.decoder
    x, self_pad, pos = dec.embed(gb["prev_output_tokens"])
    cross = dec.cross_bias(pos, enc.position_embeddings)
    valid = gb["target"].ne(PAD)
    total = torch.zeros(())
    for i, layer in enumerate(dec.layers):
        x = layer(x, self_pad, dec.self_bias(i, pos), enc.states, enc.padding_mask, cross, causal_offset=0)
        logits = dec.output_projection(dec.layer_norm(x))
        losses = []
        for b, t in valid.nonzero().tolist():
            allowed = gb["constraint_masks"][b, t]
            lp = torch.log_softmax(logits[b, t].masked_fill(~allowed, float("-inf")), dim=-1)
            y = gb["target"][b, t]
            count = allowed.sum()
            eps_i = EPS / (count - 1)
            loss = (1 - EPS - eps_i) * -lp[y] + eps_i * -lp[allowed].sum()
            losses.append(loss * gb["conf"][b])
        losses = torch.stack(losses)
        kept = int(len(losses) * (1 - DROP))  # drop-worst over the batch: keep the smallest
        total = total + losses.sort().values[:kept].sum() / denominator
    return total


def _close_grads(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal up to float32 rounding relative to the tensor's largest entry (the ResNet's gradients sum over many
    terms in another order)."""
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale + 1e-9, name


def test_all_layer_loss_equals_a_naive_loop_over_layers(model, micro_batch):
    gb = micro_batch["vl"]
    denom = global_loss_denominators([micro_batch], ["vl"], "per_group", PAD, None, drop_worst_ratio=DROP)
    token_loss = SingleProcessTokenLoss(EPS, PAD)
    per_layer = model(**_inputs(gb), all_layers=True)
    assert len(per_layer) == 3
    total, token_losses = all_layer_loss(token_loss, {"vl": per_layer}, micro_batch, denom, drop_worst_ratio=DROP)
    want = naive_loss(model, gb, denom["vl"])
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    # the reported token losses are the last layer's, the model's output
    last, last_tl = micro_batch_loss(token_loss, {"vl": per_layer[-1]}, micro_batch, denom, drop_worst_ratio=DROP)
    assert torch.equal(token_losses["vl"].loss, last_tl["vl"].loss)
    assert float(total.detach()) > 1.5 * float(last.detach())  # the other layers count too

    grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    naive_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), grads, naive_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            _close_grads(a, b, name)


class _Engine:
    """The part of a DeepSpeed engine run_step uses, on one process: forward, backward, step."""

    def __init__(self, model):
        self.module = GroupsForward(model)

    def __call__(self, groups):
        return self.module(groups)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def test_the_trainer_step_trains_on_every_layer_with_all_layers_set(model, micro_batch):
    gb = micro_batch["vl"]
    ctx = SimpleNamespace(dp_size=1, dp_group=None, tp_size=1, layout=SimpleNamespace(vocab_size=V))
    settings = LossSettings(epsilon=EPS, pad=PAD, per_group=True, all_layers=True)
    acc = TaskAccumulator(["caption"])
    run_step(_Engine(model), ctx, [micro_batch], ["vl"], lambda g, b, m: _inputs(b), settings, acc,
             drop_worst_ratio=DROP)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    denom = global_loss_denominators([micro_batch], ["vl"], "per_group", PAD, None, drop_worst_ratio=DROP)
    naive_loss(model, gb, denom["vl"]).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name in want:
        _close_grads(got[name], want[name], name)


@pytest.mark.slow  # four DeepSpeed launches (~100 s on two shared cores)
def test_mue_training_under_tensor_parallelism_and_zero3_equals_one_process(tmp_path, monkeypatch):
    """tp=2 (each layer's logits vocabulary-split, the token loss reduced over the slices) and ZeRO-3 on two
    data-parallel ranks (every encoder layer called twice per forward, once per stream; the tied projection once
    per decoder layer): the same per-step losses as one process."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
    import parallel_launch

    monkeypatch.setattr(parallel_launch, "WORKER", Path(__file__).with_name("mue_workers.py"))
    init = tmp_path / "init"
    parallel_launch.launch("write_init", 1, tmp_path / "w", dir=str(init))
    common = dict(init=str(init), steps=3)
    ref = parallel_launch.launch("mue_train", 1, tmp_path / "ref", **common)[0]["losses"]
    assert ref[0] != pytest.approx(ref[-1], rel=1e-3)  # it trains
    for name, params in (("tp2", dict(tp=2)), ("dp2z3", dict(zero=3))):
        for rank in parallel_launch.launch("mue_train", 2, tmp_path / name, **common, **params):
            assert rank["losses"] == pytest.approx(ref, rel=1e-4), name
