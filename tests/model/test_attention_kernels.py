"""The fused SDPA path equals the math reference (fp32) for encoder, decoder self- and cross-attention."""

import torch

from ofa_scale.model import OFAConfig, OFAModel, kernels
from ofa_scale.model.attention import MultiheadAttention
from ofa_scale.model.blocks import DecoderLayer, EncoderLayer
from ofa_scale.model.layers import LayerFactory

CFG = OFAConfig.preset("ofa_tiny", d_model=64, ffn_dim=128, heads=4, encoder_layers=2, decoder_layers=2)


def _both(module, *args, **kwargs):
    outs = []
    for impl in ("math", "sdpa"):
        for m in module.modules():
            if isinstance(m, MultiheadAttention):
                m.impl = impl
        outs.append(module(*args, **kwargs))
    return outs


def _close(a, b, rtol=1e-5):
    scale = a.abs().max().clamp_min(1e-6)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert ((a - b).abs().max() / scale).item() <= rtol, ((a - b).abs().max() / scale).item()


def test_encoder_layer_parity_with_padding():
    torch.manual_seed(0)
    layer = EncoderLayer(CFG, LayerFactory()).eval()
    b, length = 3, 23
    x = torch.randn(b, length, 64)
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[0, 15:] = True
    pad[1, :9] = True  # an image block masked out (patch_mask=False)
    bias = torch.randn(b, 4, length, length)
    _close(*_both(layer, x, pad, bias))


def test_decoder_layer_parity_self_and_cross():
    torch.manual_seed(1)
    layer = DecoderLayer(CFG, LayerFactory()).eval()
    b, t, length = 3, 9, 17
    x = torch.randn(b, t, 64)
    self_pad = torch.zeros(b, t, dtype=torch.bool)
    self_pad[2, 6:] = True
    enc = torch.randn(b, length, 64)
    enc_pad = torch.zeros(b, length, dtype=torch.bool)
    enc_pad[0, :8] = True
    enc_pad[1, 12:] = True
    outs = _both(layer, x, self_pad, torch.randn(b, 4, t, t), enc, enc_pad, torch.randn(b, 4, t, length))
    _close(*outs)


def test_cross_attention_alone_parity():
    torch.manual_seed(2)
    attn = MultiheadAttention(CFG, LayerFactory())
    q, kv = torch.randn(2, 5, 64), torch.randn(2, 11, 64)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 3:] = True
    _close(*_both(attn, q, kv, bias=torch.randn(2, 4, 5, 11), key_padding_mask=pad))


def _batch(b=3, s=8, t=6, size=48):
    src = torch.randint(4, 500, (b, s))
    src[1, 5:] = 1
    prev = torch.randint(4, 500, (b, t))
    prev[2, 4:] = 1
    return dict(
        src_tokens=src,
        patch_images=torch.randn(b, 3, size, size),
        patch_masks=torch.tensor([True, False, True][:b]),
        prev_output_tokens=prev,
        code_masks=torch.tensor([False, False, True][:b]),
    )


def test_full_model_parity():
    torch.manual_seed(3)
    model = OFAModel(CFG).eval()
    batch = _batch()
    with torch.no_grad():
        _close(*_both(model, **batch))


def test_fully_masked_rows_stay_finite():
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True
    for impl in ("math", "sdpa"):
        out = kernels.attention(q, k, v, torch.randn(2, 2, 3, 5), pad, None, impl)
        assert torch.isfinite(out).all()
        # the unmasked sample is unaffected by the other sample's masking
        ref = kernels.attention(q[:1], k[:1], v[:1], None, None, None, "math")
        unbiased = kernels.attention(q[:1], k[:1], v[:1], None, pad[:1], None, impl)
        torch.testing.assert_close(unbiased, ref, rtol=1e-5, atol=1e-6)


def test_causal_offset_matches_sliced_full_mask():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    full = kernels.attention(q, k, v, None, None, 0, "math")
    for impl in ("math", "sdpa"):
        last3 = kernels.attention(q[:, :, 4:], k, v, None, None, 4, impl)
        torch.testing.assert_close(last3, full[:, :, 4:], rtol=1e-5, atol=1e-6)


def test_bf16_sdpa_is_finite_and_close():
    torch.manual_seed(5)
    model = OFAModel(CFG).eval()
    batch = _batch()
    with torch.no_grad():
        model.set_attention_impl("math")
        ref = model(**batch)
        model.set_attention_impl("sdpa")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**batch)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_describe_names_active_kernels():
    info = kernels.describe("sdpa")
    assert "LayerNorm" in info["layer_norm"] and "scaled_dot_product_attention" in info["attention"]
