"""OFA multi-head attention (spec §4.5): separate q/k/v/out projections, 1/sqrt(head_dim·attn_scale_factor)
query scaling, an additive bias from the caller, and NormFormer's per-head scale `c_attn`.

Heads are a first-class dimension: q/k/v are column-parallel (each TP rank owns heads/tp_size whole heads), out_proj
is row-parallel, and `c_attn` holds only the local heads. Batch-first tensors throughout: (B, T, D).

Caching for incremental decoding (`cache`, a dict owned by the caller):
* self-attention appends this call's keys/values to cache["k"], cache["v"] (B, H, T, hd);
* cross-attention (`static_kv=True`) projects the encoder states once and reuses them on later calls.

Prompt tuning (`prefix_length` > 0, self-attention only): learned prefix keys/values are prepended after the cache
update, with the bias, padding mask and causal offset widened to match (model/prompt_tuning.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ofa_scale.model import kernels
from ofa_scale.model.config import OFAConfig
from ofa_scale.model.layers import LayerFactory
from ofa_scale.model.prompt_tuning import PrefixKeyValues


class MultiheadAttention(nn.Module):
    def __init__(self, cfg: OFAConfig, layers: LayerFactory, prefix_length: int = 0):
        super().__init__()
        d = cfg.d_model
        self.head_dim = cfg.head_dim
        self.local_heads = cfg.heads // layers.tp_size
        self.scaling = (self.head_dim * cfg.attn_scale_factor) ** -0.5
        self.dropout_p = cfg.attention_dropout
        self.impl = cfg.attention_impl
        # registration order = OFA's state-dict order: c_attn, k, v, q, out
        if cfg.scale_heads:
            self.c_attn = nn.Parameter(torch.ones(self.local_heads))
        else:
            self.register_parameter("c_attn", None)
        self.k_proj = layers.column_linear(d, d, True)
        self.v_proj = layers.column_linear(d, d, True)
        self.q_proj = layers.column_linear(d, d, True)
        self.out_proj = layers.row_linear(d, d, True)
        # ---- prompt tuning (spec-ext §10.3.3, model/prompt_tuning.py): prefix keys/values of this rank's heads ----
        self.prefix = None
        if prefix_length:
            self.prefix = PrefixKeyValues(prefix_length, self.local_heads, self.head_dim, cfg.prompt_dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.local_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        causal_offset: int | None = None,
        cache: dict | None = None,
        static_kv: bool = False,
    ) -> torch.Tensor:
        """query (B,Tq,D); key_value (B,Tk,D) or None for self-attention; bias broadcastable to (B,H,Tq,Tk).

        key_padding_mask (B,Tk) covers all keys (cached ones included); causal_offset is the absolute position of
        the first query (None: no causal mask).
        """
        q = self._split_heads(self.q_proj(query) * self.scaling)
        if static_kv and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            source = query if key_value is None else key_value
            k = self._split_heads(self.k_proj(source))
            v = self._split_heads(self.v_proj(source))
            if cache is not None:
                if not static_kv and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        # ---- prompt tuning: the prefix joins after the cache update (never cached, re-prepended every step) ----
        if self.prefix is not None:
            k, v, bias, key_padding_mask, causal_offset = self.prefix.extend(k, v, bias, key_padding_mask,
                                                                             causal_offset)
        dropout_p = self.dropout_p if self.training else 0.0
        out = kernels.attention(q, k, v, bias, key_padding_mask, causal_offset, self.impl, dropout_p)
        if self.c_attn is not None:
            out = out * self.c_attn.view(1, -1, 1, 1).to(out.dtype)
        b, _, tq, _ = out.shape
        out = out.transpose(1, 2).reshape(b, tq, self.local_heads * self.head_dim)
        return self.out_proj(out)
