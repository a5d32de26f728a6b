"""What the trainer does to the model before DeepSpeed sees it: ZeRO-3 external-parameter discovery and
activation checkpointing (gradients must not change)."""

from __future__ import annotations

import torch
from torch import nn

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.training.workload import apply_activation_checkpointing
from ofa_scale.training.zero3 import find_external_parameters


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(5, 3)  # read through .weight, never called
        self.proj = nn.Linear(3, 3)

    def forward(self, ids):
        return self.proj(torch.nn.functional.embedding(ids, self.table.weight)) + self.proj.bias


def test_finds_exactly_the_parameters_used_outside_their_owner():
    model = Holder()
    pairs = find_external_parameters(model, lambda: model(torch.tensor([1, 2])))
    found = {(type(m).__name__, n) for m, p in pairs for n, q in model.named_parameters() if q is p}
    # the table's weight is used by Holder.forward, the bias of proj too; proj.weight only inside proj
    assert found == {("Holder", "table.weight"), ("Holder", "proj.bias")}
    assert model.proj.weight.grad is None  # the probe ran without autograd


def tiny_ofa() -> OFAModel:
    torch.manual_seed(0)
    cfg = OFAConfig.preset("ofa_tiny", d_model=32, ffn_dim=64, heads=2, encoder_layers=2, decoder_layers=2,
                           vocab_size=300)
    return OFAModel(cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    return dict(src_tokens=torch.randint(4, 300, (2, 9), generator=g),
                patch_images=torch.randn(2, 3, 32, 32, generator=g),
                patch_masks=torch.tensor([True, False]),
                prev_output_tokens=torch.randint(4, 300, (2, 7), generator=g))


def test_ofa_tied_output_projection_is_reported_as_external():
    model = tiny_ofa()
    inputs = batch()
    pairs = find_external_parameters(model, lambda: model(**inputs))
    external = {id(p) for _, p in pairs}
    assert id(model.encoder.embed_tokens.weight) in external  # the decoder projects with the shared embedding
    names = {n for n, p in model.named_parameters() if id(p) in external}
    assert len(names) == len(external)


def test_activation_checkpointing_keeps_outputs_and_gradients():
    plain, ckpt = tiny_ofa(), tiny_ofa()
    assert apply_activation_checkpointing(ckpt) == 4
    inputs = batch()
    out_a, out_b = plain(**inputs), ckpt(**inputs)
    assert torch.equal(out_a, out_b)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8, msg=name)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]


def test_continued_pretraining_loads_every_weight(tmp_path):
    import pytest

    from ofa_scale.errors import ConfigError
    from ofa_scale.model.checkpoint import save_pretrained
    from ofa_scale.training.workload import load_pretrained_weights

    source = tiny_ofa()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)  # make it differ from a fresh init with the same seed
    save_pretrained(source, tmp_path / "released")
    target = tiny_ofa()
    load_pretrained_weights(target, str(tmp_path / "released"), target.config)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name
    wider = OFAConfig.preset("ofa_tiny", d_model=64, ffn_dim=64, heads=2, encoder_layers=2, decoder_layers=2,
                             vocab_size=300)
    with pytest.raises(ConfigError, match="has d_model=32 but model.arch ofa_tiny has 64"):
        load_pretrained_weights(OFAModel(wider), str(tmp_path / "released"), wider)
