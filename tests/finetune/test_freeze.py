"""Freezing (train.freeze_encoder_embedding / freeze_decoder_embedding / freeze_resnet): after optimizer steps with
the model in train mode, the frozen weights and the ResNet's BatchNorm statistics are bit-identical and everything
else changed; also under DeepSpeed ZeRO-3, where parameters are partitioned."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ofa_scale.errors import ConfigError
from ofa_scale.finetune.freeze import apply_freezing, token_embedding_parameters
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.objectives.token_loss import SingleProcessTokenLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
import parallel_launch  # noqa: E402

WORKER = Path(__file__).with_name("finetune_workers.py")
V = 64


def tiny_model() -> OFAModel:
    torch.manual_seed(0)
    return OFAModel(OFAConfig.preset("ofa_tiny", d_model=32, ffn_dim=64, heads=2, encoder_layers=1,
                                     decoder_layers=1, vocab_size=V, max_source_positions=32,
                                     max_target_positions=32, attention_impl="math"))


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(src_tokens=torch.randint(4, V, (2, 6), generator=g), patch_images=torch.randn(2, 3, 32, 32, generator=g),
                patch_masks=torch.tensor([True, True]), prev_output_tokens=torch.randint(4, V, (2, 5), generator=g),
                target=torch.randint(4, V, (2, 5), generator=g))


def snapshot(model) -> dict:
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def train(model, steps: int = 3) -> set[str]:
    """AdamW steps; returns the names of the parameters that received a gradient (code-mode tables get none)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = SingleProcessTokenLoss(0.1, 1)
    with_grad = set()
    for s in range(steps):
        model.train()  # what the trainer does: must not bring frozen BatchNorm back to train mode
        b = batch(s)
        logits = model(b["src_tokens"], b["patch_images"], b["patch_masks"], b["prev_output_tokens"])
        tl = loss_fn(logits, b["target"])
        (tl.loss.sum() / tl.valid.sum()).backward()
        with_grad |= {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return with_grad


@pytest.mark.parametrize("flags", [dict(encoder_embedding=True, decoder_embedding=False, resnet=False),
                                   dict(encoder_embedding=False, decoder_embedding=True, resnet=True)])
def test_frozen_parts_stay_bit_identical_and_the_rest_trains(flags):
    model = tiny_model()
    apply_freezing(model, **flags)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    embedding = {n for n, p in model.named_parameters() if any(p is q for q in token_embedding_parameters(model))}
    # either flag freezes the one shared table (encoder input, decoder input and output projection)
    assert embedding == {"encoder.embed_tokens.weight"} and "encoder.embed_tokens.weight" in frozen
    assert model.decoder.output_projection.weight is model.encoder.embed_tokens.weight
    stem = {n for n, _ in model.named_parameters() if n.startswith("encoder.embed_images.")}
    assert (stem <= frozen) == flags["resnet"] and not (stem & frozen and not flags["resnet"])
    stats = {n for n, _ in model.named_buffers() if n.startswith("encoder.embed_images.") and "running" in n}

    before = snapshot(model)
    with_grad = train(model)
    after = snapshot(model)
    for n in frozen:
        assert torch.equal(before[n], after[n]), n
    for n in stats:
        assert torch.equal(before[n], after[n]) == flags["resnet"], n
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], after[n])}
    assert not with_grad & frozen
    assert changed == with_grad and len(changed) > 50
    if flags["resnet"]:
        assert not any(m.training for m in model.encoder.embed_images.modules()
                       if isinstance(m, torch.nn.BatchNorm2d))
        assert model.encoder.layers[0].training  # the rest follows model.train() as usual


def test_pipeline_embedding_freezing_is_refused():
    stage = torch.nn.Module()
    stage.tied_modules = torch.nn.ModuleDict()
    with pytest.raises(ConfigError, match="pp > 1"):
        apply_freezing(stage, encoder_embedding=True)


def test_prepare_model_hook_reads_the_train_section():
    from ofa_scale.training.prepare import freeze_from_config

    model = tiny_model()
    cfg = SimpleNamespace(train=SimpleNamespace(freeze_encoder_embedding=False, freeze_decoder_embedding=True,
                                                freeze_resnet=False))
    freeze_from_config(cfg, model)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["encoder.embed_tokens.weight"]


@pytest.mark.slow
def test_freezing_under_zero3(tmp_path, monkeypatch):
    """One DeepSpeed process under ZeRO-3 (parameters partitioned, frozen ones outside the optimizer): after 3 steps
    in train mode the frozen embedding, the ResNet and its BatchNorm statistics are bit-identical; every trainable
    parameter changed."""
    monkeypatch.setattr(parallel_launch, "WORKER", WORKER)
    (r,) = parallel_launch.launch("freeze", 1, tmp_path, zero=3)
    assert "encoder.embed_tokens.weight" in r["frozen"]
    assert any(n.startswith("encoder.embed_images.layer3.") for n in r["frozen"])
    assert r["frozen_identical"] == r["frozen"]
    assert r["bn_stats"] and r["bn_stats_identical"] == r["bn_stats"]
    assert r["trainable_changed"] == r["trainable"] and len(r["trainable"]) > 100
    assert not any(r["bn_training"])
