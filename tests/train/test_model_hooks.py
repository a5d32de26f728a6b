"""What the trainer does to the model before DeepSpeed sees it: activation checkpointing (gradients must not
change) and continued pretraining from a model directory. (ZeRO-3 needs no preparation: the model is ZeRO-3-clean,
tests/model/test_zero3_clean.py.)"""

from __future__ import annotations

import torch

from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.training.prepare import apply_activation_checkpointing


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
