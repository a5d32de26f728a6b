"""OFA-OCR's ViT-B/16 image stem (spec-ext §10.2.4, `model.image_stem: vit_b16`): the key list, the forward pass
against a hand-written reference of OFA's vit.py, the strict import of an OCR checkpoint, FLOPs and parameter
groups."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ofa_scale.cli.convert_ckpt import main as convert_main
from ofa_scale.model import OFAConfig, OFAModel
from ofa_scale.model.checkpoint import (EMBEDDING_KEY, TIED_EMBEDDING_KEYS, canonical_keys, load_pretrained,
                                        read_fairseq_checkpoint)
from ofa_scale.model.flops import step_flops, vit_forward_flops
from ofa_scale.model.vit_stem import ViTStem, vit_param_count
from ofa_scale.parallel.stage_balance import param_groups

PREFIX = "encoder.embed_images."


def spec_vit_keys() -> dict[str, tuple[int, ...]]:
    """§10.2.4's key list, written out here from the spec (not from the module), with its shapes."""
    keys = {"positional_embedding": (197, 768), "conv1.weight": (768, 3, 16, 16), "ln_pre.weight": (768,),
            "ln_pre.bias": (768,)}
    for i in range(9):
        b = f"transformer.resblocks.{i}."
        keys.update({b + "attn.in_proj_weight": (2304, 768), b + "attn.in_proj_bias": (2304,),
                     b + "attn.out_proj.weight": (768, 768), b + "attn.out_proj.bias": (768,),
                     b + "ln_1.weight": (768,), b + "ln_1.bias": (768,),
                     b + "mlp.c_fc.weight": (3072, 768), b + "mlp.c_fc.bias": (3072,),
                     b + "mlp.c_proj.weight": (768, 3072), b + "mlp.c_proj.bias": (768,),
                     b + "ln_2.weight": (768,), b + "ln_2.bias": (768,)})
    return {PREFIX + k: v for k, v in keys.items()}


D = 32
SMALL = dict(d_model=D, ffn_dim=64, heads=2, encoder_layers=1, decoder_layers=1)


def vit_config(**changes) -> OFAConfig:
    return OFAConfig.preset("ofa_base", image_stem="vit_b16", **{**SMALL, **changes})


def test_key_list_and_parameter_count_are_the_specs():
    spec = spec_vit_keys()
    assert len(spec) == 112 and sum(math.prod(s) for s in spec.values()) == 64_533_504
    with torch.device("meta"):
        model = OFAModel(vit_config())
    keys = canonical_keys(model)
    stem = {k: shape for k, (shape, _) in keys.items() if k.startswith(PREFIX)}
    assert stem == spec
    assert keys["encoder.image_proj.weight"][0] == (D, 768)
    assert vit_param_count() == 64_533_504
    # the parameter groups the planner uses count the built model exactly, with either stem
    for cfg in (vit_config(), OFAConfig.preset("ofa_base", resnet="resnet50", **SMALL)):
        with torch.device("meta"):
            built = OFAModel(cfg)
        assert param_groups(cfg).total() == sum(p.numel() for p in built.parameters()), cfg.image_stem


def test_resnet_stays_the_default_stem():
    cfg = OFAConfig.preset("ofa_base", **SMALL)
    assert cfg.image_stem == "resnet" and cfg.image_channels == 1024
    with torch.device("meta"):
        keys = canonical_keys(OFAModel(cfg))
    assert PREFIX + "layer3.0.conv1.weight" in keys and PREFIX + "positional_embedding" not in keys


def reference_vit(stem: ViTStem, images: torch.Tensor, heads: int) -> torch.Tensor:
    """OFA's vit.py forward written out with plain tensor ops (sequence-first, packed q/k/v split in that order,
    positions resized from 14×14 when the input is not 224 px)."""
    sd = {k: v.detach() for k, v in stem.state_dict().items()}
    x = F.conv2d(images, sd["conv1.weight"], stride=16)
    b, c, gh, gw = x.shape
    x = x.reshape(b, c, -1).permute(0, 2, 1)
    pe = sd["positional_embedding"][1:]
    if images.shape[-2] != 224:
        pe = F.interpolate(pe.reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(gh, gw), mode="bilinear")
        pe = pe.permute(0, 2, 3, 1).reshape(gh * gw, -1)
    x = F.layer_norm(x + pe, (c,), sd["ln_pre.weight"], sd["ln_pre.bias"])
    x = x.permute(1, 0, 2)  # LND
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        p = lambda name: sd[f"transformer.resblocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (c,), p("ln_1.weight"), p("ln_1.bias"))
        q, k, v = (h @ w.t() + bias for w, bias in zip(p("attn.in_proj_weight").chunk(3),
                                                      p("attn.in_proj_bias").chunk(3)))
        n, hd = x.shape[0], c // heads
        q, k, v = (t.reshape(n, b * heads, hd).transpose(0, 1) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1) @ v
        att = att.transpose(0, 1).reshape(n, b, c)
        x = x + att @ p("attn.out_proj.weight").t() + p("attn.out_proj.bias")
        h = F.layer_norm(x, (c,), p("ln_2.weight"), p("ln_2.bias"))
        h = h @ p("mlp.c_fc.weight").t() + p("mlp.c_fc.bias")
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ p("mlp.c_proj.weight").t() + p("mlp.c_proj.bias")
        i += 1
    return x.permute(1, 0, 2).transpose(1, 2).reshape(b, c, gh, gw)


@pytest.mark.parametrize("size", [224, 96])
def test_forward_matches_ofas_vit(size):
    torch.manual_seed(0)
    stem = ViTStem(width=64, layers=2, heads=4).eval()
    with torch.no_grad():
        for p in stem.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LayerNorm weights away from 1, biases away from 0
        images = torch.randn(2, 3, size, size)
        out = stem(images)
        ref = reference_vit(stem, images, heads=4)
    assert out.shape == (2, 64, size // 16, size // 16)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_encoder_runs_with_the_vit_stem_at_480_px():
    torch.manual_seed(0)
    model = OFAModel(vit_config()).eval()
    model.encoder.embed_images = ViTStem(layers=1).eval()  # one block of nine: the wiring is what is tested
    src = torch.tensor([[0, 100, 200, 2]])
    with torch.no_grad():
        x, pad, pos = model.encoder.embed(src, torch.randn(1, 3, 480, 480))
    assert x.shape == (1, 30 * 30 + 4, D) and pos.num_image_tokens == 900 and torch.isfinite(x).all()


def test_flops_formula_matches_the_flop_counter():
    stem = ViTStem(layers=1)
    for size in (224, 480):
        # the math attention kernel is plain matmuls, which the counter sees (the fused CPU kernel it does not)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            stem(torch.randn(1, 3, size, size))
        assert counter.get_total_flops() == vit_forward_flops(size, size, layers=1)[0], size
    # the step count swaps the stem's term and image_proj's input width, nothing else
    vit, resnet = vit_config(), OFAConfig.preset("ofa_base", **SMALL)
    a, b = step_flops(vit, 2, 16, 8, 480), step_flops(resnet, 2, 16, 8, 480)
    assert (a.encoder, a.decoder, a.output) == (b.encoder, b.decoder, b.output)
    assert a.resnet == 2 * (vit_forward_flops(480, 480)[0] + 2 * 900 * 768 * D)


# -------------------------------------------------------------------------------------- import of an OCR checkpoint
OCR_ARGS = dict(arch="ofa_base", encoder_embed_dim=D, decoder_embed_dim=D, encoder_ffn_embed_dim=64,
                decoder_ffn_embed_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, encoder_layers=1,
                decoder_layers=1, resnet_type="ViT-B/16", token_bucket_size=256, image_bucket_size=42,
                max_source_positions=1024, max_target_positions=1024, scale_attn=True, scale_fc=True,
                scale_heads=True, disable_entangle=True, share_all_embeddings=True, encoder_normalize_before=True,
                decoder_normalize_before=True)


@pytest.fixture(scope="module")
def ocr_state():
    """An OFA-OCR state dict: the stem's keys from the spec's list, the rest from a ResNet model of the same
    transformer (everything outside the stem is unchanged), image_proj widened to 768 inputs; fp16 like OFA's."""
    with torch.device("meta"):
        rest = canonical_keys(OFAModel(OFAConfig.preset("ofa_base", resnet="resnet50", **SMALL)))
    shapes = {k: shape for k, (shape, _) in rest.items() if not k.startswith(PREFIX)}
    shapes["encoder.image_proj.weight"] = (D, 768)
    shapes.update(spec_vit_keys())
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    for key in TIED_EMBEDDING_KEYS[1:]:
        state[key] = state[EMBEDDING_KEY]
    return state


def test_ocr_checkpoint_with_the_vit_stem_imports_strictly(tmp_path, ocr_state, capsys):
    path = tmp_path / "ofa_cn_ocr_base.pt"
    torch.save({"model": ocr_state, "cfg": {"model": argparse.Namespace(**OCR_ARGS)}}, path)
    config, weights, _ = read_fairseq_checkpoint(path)
    assert config.image_stem == "vit_b16" and config.image_channels == 768
    assert set(weights) == set(ocr_state) - set(TIED_EMBEDDING_KEYS[1:])
    for key, t in weights.items():
        assert torch.equal(t, ocr_state[key].float()), key
    out = tmp_path / "model_dir"
    assert convert_main(["import-ofa", str(path), "--out", str(out)]) == 0
    model = load_pretrained(out)
    assert model.config.image_stem == "vit_b16"
    assert torch.equal(model.encoder.embed_images.transformer.resblocks[8].attn.in_proj_weight,
                       ocr_state[PREFIX + "transformer.resblocks.8.attn.in_proj_weight"].float())
    # without a config the stem is recognised from the keys
    bare = tmp_path / "bare.pt"
    torch.save({"model": ocr_state}, bare)
    assert read_fairseq_checkpoint(bare)[0].image_stem == "vit_b16"
