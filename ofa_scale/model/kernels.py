"""Attention and LayerNorm kernels, chosen once: a plain math reference path and a fused SDPA path.

Both attention paths take queries already multiplied by OFA's (head_dim·attn_scale_factor)^-0.5 and one additive
float bias (absolute + relative position terms); padding and causal masks are applied here.

* "math": scores in fp32, masked entries *replaced* by the fp32 minimum, fp32 softmax (OFA's numerics; a row whose
  keys are all masked becomes uniform instead of NaN).
* "sdpa": `torch.nn.functional.scaled_dot_product_attention` with bias + padding + causal folded into one float
  mask in the query dtype. Masked entries get half the dtype's minimum so that adding a (negative) score can never
  overflow to -inf in fp16, which would turn a fully masked row into NaN.

LayerNorm: apex's FusedLayerNorm when apex is importable (same parameter names), otherwise torch's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

try:  # optional: NVIDIA apex is never a hard dependency
    from apex.normalization import FusedLayerNorm as _ApexLayerNorm  # type: ignore

    _APEX_ERROR: str | None = None
except Exception as e:  # ImportError, or a broken CUDA build of apex
    _ApexLayerNorm = None
    _APEX_ERROR = type(e).__name__


def make_layer_norm(dim: int, eps: float = 1e-5) -> nn.Module:
    if _ApexLayerNorm is not None and torch.cuda.is_available():
        return _ApexLayerNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)


def layer_norm_kernel() -> str:
    if _ApexLayerNorm is not None and torch.cuda.is_available():
        return "apex.FusedLayerNorm"
    return "torch.nn.LayerNorm" + (f" (apex unavailable: {_APEX_ERROR})" if _APEX_ERROR else "")


def mask_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 2


def invalid_keys(
    batch: int,
    q_len: int,
    k_len: int,
    key_padding_mask: torch.Tensor | None,
    causal_offset: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Bool (B|1, 1, Tq, Tk), True where a query may not attend a key; None when nothing is masked.

    Causal: query i sits at absolute position causal_offset + i and may see keys 0..causal_offset + i.
    """
    invalid = None
    if causal_offset is not None:
        q_pos = torch.arange(q_len, device=device)[:, None] + causal_offset
        k_pos = torch.arange(k_len, device=device)[None, :]
        invalid = (k_pos > q_pos)[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].to(torch.bool)
        invalid = pad if invalid is None else (invalid | pad)
    return invalid


def math_attention(q, k, v, bias, invalid, dropout_p: float) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)).float()
    if bias is not None:
        scores = scores + bias.float()
    if invalid is not None:
        scores = scores.masked_fill(invalid, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, bias, invalid, dropout_p: float) -> torch.Tensor:
    mask = None
    if bias is not None:
        mask = bias.to(q.dtype)
    if invalid is not None:
        if mask is None:
            mask = torch.zeros((), dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(invalid, mask_value(q.dtype))
    if mask is not None:
        b, h, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        mask = mask.expand(b, h, tq, tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal_offset: int | None,
    impl: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q (B,H,Tq,hd) pre-scaled, k/v (B,H,Tk,hd), bias broadcastable to (B,H,Tq,Tk) -> (B,H,Tq,hd)."""
    invalid = invalid_keys(q.shape[0], q.shape[2], k.shape[2], key_padding_mask, causal_offset, q.device)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, bias, invalid, dropout_p)
    return math_attention(q, k, v, bias, invalid, dropout_p)


def describe(attention_impl: str | None = None, verbose: bool = False) -> dict[str, str]:
    """Which kernels are active; `verbose` also prints them (one line each)."""
    info = {
        "layer_norm": layer_norm_kernel(),
        "attention": {
            None: "math (fp32 softmax) or sdpa, chosen by model.attention_impl",
            "math": "math (matmul + fp32 softmax)",
            "sdpa": "torch.nn.functional.scaled_dot_product_attention (float additive mask)",
        }.get(attention_impl, str(attention_impl)),
    }
    if torch.cuda.is_available():
        backends = torch.backends.cuda
        info["sdpa_backends"] = ", ".join(
            name
            for name, on in (
                ("flash", backends.flash_sdp_enabled()),
                ("mem_efficient", backends.mem_efficient_sdp_enabled()),
                ("cudnn", getattr(backends, "cudnn_sdp_enabled", lambda: False)()),
                ("math", backends.math_sdp_enabled()),
            )
            if on
        )
        info["sdpa_note"] = "a float bias mask rules out flash; mem_efficient/cudnn take it"
    else:
        info["sdpa_backends"] = "cpu"
    if verbose:
        for key, value in info.items():
            print(f"[ofa_scale.model.kernels] {key}: {value}")
    return info
