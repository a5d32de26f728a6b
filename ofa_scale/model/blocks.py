"""Pre-LN transformer layers with OFA's NormFormer extras (spec §4.7).

Encoder: h = x + DropPath(Dropout(attn_ln(SelfAttn(self_attn_layer_norm(x)))))
         y = h + DropPath(Dropout(fc2(ffn_layernorm(ActDropout(gelu(fc1(final_layer_norm(h))))))))
Decoder: the same self-attention block (with self_attn_ln), then a cross-attention block (encoder_attn_layer_norm,
         cross_attn_ln), then the FFN block.

Each layer is a pure function of explicit inputs (x, masks, biases) so pipeline stages can be cut between layers.
Attribute registration order reproduces OFA's state-dict order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ofa_scale.model.attention import MultiheadAttention
from ofa_scale.model.config import OFAConfig
from ofa_scale.model.kernels import make_layer_norm
from ofa_scale.model.layers import LayerFactory
from ofa_scale.model.prompt_tuning import make_adapter
from ofa_scale.model.resnet import drop_path


class _ResidualBranches:
    """Mixin shared by both layer kinds: the FFN block (fc1 column-parallel, fc2 row-parallel) and the
    post-branch LN → dropout → drop-path → residual add of the attention blocks."""

    fc1: nn.Module
    fc2: nn.Module
    adapter: nn.Module | None
    ffn_layernorm: nn.Module | None
    final_layer_norm: nn.Module

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(self.final_layer_norm(x)))
        h = F.dropout(h, self.activation_dropout, self.training)
        if self.ffn_layernorm is not None:
            h = self.ffn_layernorm(h)
        h = F.dropout(self.fc2(h), self.dropout, self.training)
        if self.adapter is not None:  # prompt tuning's adapter (spec-ext §10.3.5): before the residual add
            h = self.adapter(h)
        return x + drop_path(h, self.drop_path_rate, self.training)

    def _residual(self, residual: torch.Tensor, branch: torch.Tensor, post_ln: nn.Module | None) -> torch.Tensor:
        if post_ln is not None:
            branch = post_ln(branch)
        branch = F.dropout(branch, self.dropout, self.training)
        return residual + drop_path(branch, self.drop_path_rate, self.training)


def _optional_ln(enabled: bool, dim: int, eps: float) -> nn.Module | None:
    return make_layer_norm(dim, eps) if enabled else None


class EncoderLayer(nn.Module, _ResidualBranches):
    def __init__(self, cfg: OFAConfig, layers: LayerFactory, drop_path_rate: float = 0.0):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.dropout = cfg.dropout
        self.activation_dropout = cfg.activation_dropout
        self.drop_path_rate = float(drop_path_rate)
        self.self_attn = MultiheadAttention(cfg, layers, prefix_length=cfg.encoder_prompt_length)
        self.self_attn_layer_norm = make_layer_norm(d, eps)
        self.fc1 = layers.column_linear(d, cfg.ffn_dim, True)
        self.fc2 = layers.row_linear(cfg.ffn_dim, d, True)
        self.attn_ln = _optional_ln(cfg.scale_attn, d, eps)
        # normalises over the full FFN width; under TP each rank holds a shard, so the factory supplies it
        self.ffn_layernorm = layers.ffn_layernorm(cfg.ffn_dim, eps) if cfg.scale_fc else None
        self.final_layer_norm = make_layer_norm(d, eps)
        self.adapter = make_adapter(cfg)  # prompt tuning (None unless model.adapter_dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None, attn_bias: torch.Tensor) -> torch.Tensor:
        """x (B,L,D); padding_mask (B,L) bool or None; attn_bias (B,H_local,L,L) -> (B,L,D)."""
        h = self.self_attn(self.self_attn_layer_norm(x), bias=attn_bias, key_padding_mask=padding_mask)
        x = self._residual(x, h, self.attn_ln)
        return self._ffn(x)


class DecoderLayer(nn.Module, _ResidualBranches):
    def __init__(self, cfg: OFAConfig, layers: LayerFactory, drop_path_rate: float = 0.0):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.dropout = cfg.dropout
        self.activation_dropout = cfg.activation_dropout
        self.drop_path_rate = float(drop_path_rate)
        self.self_attn = MultiheadAttention(cfg, layers, prefix_length=cfg.decoder_prompt_length)
        self.self_attn_ln = _optional_ln(cfg.scale_attn, d, eps)
        self.cross_attn_ln = _optional_ln(cfg.scale_attn, d, eps)
        self.self_attn_layer_norm = make_layer_norm(d, eps)
        self.encoder_attn = MultiheadAttention(cfg, layers)
        self.encoder_attn_layer_norm = make_layer_norm(d, eps)
        self.ffn_layernorm = layers.ffn_layernorm(cfg.ffn_dim, eps) if cfg.scale_fc else None
        self.fc1 = layers.column_linear(d, cfg.ffn_dim, True)
        self.fc2 = layers.row_linear(cfg.ffn_dim, d, True)
        self.final_layer_norm = make_layer_norm(d, eps)
        self.adapter = make_adapter(cfg)  # prompt tuning (None unless model.adapter_dim)

    def forward(
        self,
        x: torch.Tensor,
        self_padding_mask: torch.Tensor | None,
        self_bias: torch.Tensor,
        encoder_states: torch.Tensor,
        encoder_padding_mask: torch.Tensor | None,
        cross_bias: torch.Tensor,
        causal_offset: int | None = 0,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """x (B,Tq,D) for target positions causal_offset.. ; self_padding_mask (B,T) over all target keys;
        self_bias (B,H,Tq,T); encoder_states (B,L,D); cross_bias (B,H,Tq,L); cache: this layer's dict or None."""
        self_cache = cross_cache = None
        if cache is not None:
            self_cache = cache.setdefault("self_attn", {})
            cross_cache = cache.setdefault("encoder_attn", {})
        h = self.self_attn(self.self_attn_layer_norm(x), bias=self_bias, key_padding_mask=self_padding_mask,
                           causal_offset=causal_offset, cache=self_cache)
        x = self._residual(x, h, self.self_attn_ln)
        h = self.encoder_attn(self.encoder_attn_layer_norm(x), encoder_states, bias=cross_bias,
                              key_padding_mask=encoder_padding_mask, cache=cross_cache, static_kv=True)
        x = self._residual(x, h, self.cross_attn_ln)
        return self._ffn(x)
