"""OFA decoder (spec §4.5–§4.6): causal self-attention, cross-attention to the encoder, tied output projection,
and per-sample "code mode" for VQGAN image tokens.

Explicit steps (pipeline stages can cut between layers; `start` > 0 only for incremental decoding):

    x, self_pad, pos = decoder.embed(prev_output_tokens, code_masks, start)
    cross = decoder.cross_bias(pos, encoder_out.position_embeddings)
    for i, layer in enumerate(decoder.layers):
        x = layer(x, self_pad, decoder.self_bias(i, pos), encoder_out.states, encoder_out.padding_mask, cross,
                  causal_offset=start)
    logits = decoder.project(x)

`self_bias` is `relative_self_bias` with layer i's tables, which the pipeline's decoder-layer stages call too; the
bucket indices it looks up are computed once per call in `embed`. Every table is called as a module (never read
through `.weight` by another module), so ZeRO-3 can gather each around its own forward; the output projection is
`output_projection`, a module that owns the shared embedding's weight under OFA's name.

Code mode (rows with code_masks=True): positions come from `embed_image_positions[image_position_idx[t]]` with
`image_pos_ln`, the self-attention relative bias from the image table, and the input LN is
`code_layernorm_embedding`; other rows use text positions, `pos_ln`, the text table and `layernorm_embedding`.

Incremental decoding: pass the *whole* prefix `prev_output_tokens` (B, T) and a dict `incremental_state` that the
caller owns; positions already cached are skipped, so each call processes only the new position(s) with their true
step indices. Self-attention K/V are appended per layer, cross-attention K/V (and the cross-bias keys) are
computed once. `reorder_incremental_state` permutes every cached tensor along the batch (beam search).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ofa_scale.errors import UserError
from ofa_scale.model import early_exit, positions
from ofa_scale.model.blocks import DecoderLayer
from ofa_scale.model.config import OFAConfig
from ofa_scale.model.encoder import EncoderOut
from ofa_scale.model.kernels import make_layer_norm
from ofa_scale.model.layers import LayerFactory
from ofa_scale.model.resnet import linspace_rates

STEPS_KEY = "decoder.cached_steps"
CROSS_POS_K_KEY = "decoder.cross_pos_k"


class TiedOutputProjection(nn.Module):
    """Holds the shared token embedding's weight under the name `output_projection.weight` (as OFA's state dict
    does) and projects onto the vocabulary with it inside its own forward, so ZeRO-3 gathers the weight for this
    call; the projection goes through the layer factory so TP can split the vocabulary."""

    def __init__(self, embedding: nn.Module, factory: LayerFactory):
        super().__init__()
        self.weight = embedding.weight
        self.factory = factory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, D) -> logits (…, V_local)."""
        return self.factory.output_logits(x, self)


def relative_self_bias(abs_bias: torch.Tensor, token_table: nn.Module, image_table: nn.Module,
                       text_buckets: torch.Tensor, image_buckets: torch.Tensor,
                       code_masks: torch.Tensor | None) -> torch.Tensor:
    """(B, H_local, Tq, T) self-attention bias of one decoder layer: the shared absolute bias plus the layer's text
    relative table, or for code-mode rows (code_masks True) its image table. Buckets are (Tq, T) int64."""
    # image_gen: past max_target_positions the text table has no buckets (text_buckets is cut short): only
    # code-mode rows get that far (image_gen feeds bos + 1024 codes to place eos), and OFA then uses the image
    # table alone, as here. Checked only in that case, so the usual path has no host sync.
    if code_masks is not None and text_buckets.shape != image_buckets.shape:
        if not bool(code_masks.all()):
            raise UserError("a text-mode target row is longer than max_target_positions")
        return abs_bias + image_table(image_buckets).permute(2, 0, 1)[None].to(abs_bias.dtype)
    text = token_table(text_buckets).permute(2, 0, 1)[None].to(abs_bias.dtype)
    if code_masks is None:
        return abs_bias + text
    image = image_table(image_buckets).permute(2, 0, 1)[None].to(abs_bias.dtype)
    return abs_bias + torch.where(code_masks[:, None, None, None], image, text)


@dataclass
class DecoderPositions:
    """Normalised target position embeddings for all T positions, and the step range being computed."""

    position_embeddings: torch.Tensor  # (B, T, D) after pos_ln / image_pos_ln (per code mode)
    code_masks: torch.Tensor | None  # (B,) bool or None when no row is in code mode
    start: int  # first position computed in this call (cached positions before it)
    length: int  # T
    abs_bias: torch.Tensor  # (B, H_local, T-start, T) self-attention absolute bias, shared by all layers
    text_buckets: torch.Tensor  # (T-start, T) int64 rows of the text relative tables
    image_buckets: torch.Tensor  # (T-start, T) int64 rows of the image relative tables (code-mode rows)


class OFADecoder(nn.Module):
    early_exit: "early_exit.EarlyExitConfig | None" = None  # MuE inference exits (early_exit.enable); None = off

    def __init__(self, cfg: OFAConfig, layers: LayerFactory, embed_tokens: nn.Module):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.cfg = cfg
        self.local_heads = cfg.heads // layers.tp_size
        self.pos_scaling = (cfg.head_dim * cfg.attn_scale_factor) ** -0.5
        self.padding_idx = cfg.pad_token_id
        self.register_buffer("version", torch.tensor([3.0]))
        self.register_buffer("token_rp_bucket",
                             positions.token_relative_buckets(cfg.token_bucket_size, cfg.max_target_positions))
        self.register_buffer("image_rp_bucket", positions.image_relative_buckets(cfg.image_bucket_size))
        self.register_buffer("image_position_idx",
                             positions.code_position_ids(cfg.code_grid_size, cfg.image_bucket_size))
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = make_layer_norm(d, eps)
        self.embed_positions = nn.Embedding(cfg.max_target_positions + 2, d)
        self.embed_image_positions = nn.Embedding(cfg.num_image_positions, d)
        self.pos_ln = make_layer_norm(d, eps)
        self.image_pos_ln = make_layer_norm(d, eps)
        self.self_pos_q_linear = layers.column_linear(d, d, True)
        self.self_pos_k_linear = layers.column_linear(d, d, True)
        self.cross_pos_q_linear = layers.column_linear(d, d, True)
        self.cross_pos_k_linear = layers.column_linear(d, d, True)
        self.code_layernorm_embedding = make_layer_norm(d, eps)
        rates = linspace_rates(cfg.decoder_drop_path_rate, cfg.decoder_layers)
        self.layers = nn.ModuleList(DecoderLayer(cfg, layers, rates[i]) for i in range(cfg.decoder_layers))
        self.layer_norm = make_layer_norm(d, eps)
        self.output_projection = TiedOutputProjection(embed_tokens, layers)
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(cfg.num_token_rel_buckets, self.local_heads) for _ in range(cfg.decoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(cfg.num_image_rel_buckets, self.local_heads) for _ in range(cfg.decoder_layers))

    def reset_index_buffers(self) -> None:
        """Recompute the index buffers in place (after building on meta / loading a checkpoint)."""
        cfg = self.cfg
        with torch.no_grad():
            self.version.copy_(torch.tensor([3.0]))
            self.token_rp_bucket.copy_(
                positions.token_relative_buckets(cfg.token_bucket_size, cfg.max_target_positions))
            self.image_rp_bucket.copy_(positions.image_relative_buckets(cfg.image_bucket_size))
            self.image_position_idx.copy_(positions.code_position_ids(cfg.code_grid_size, cfg.image_bucket_size))

    # ---------------------------------------------------------------- steps
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.local_heads, -1).transpose(1, 2)

    def target_positions(self, length: int, code_masks: torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, T, D) normalised position embeddings: text rows pos_ln(E_txt[t]); code rows
        image_pos_ln(E_img[image_position_idx[t]])."""
        if length > self.embed_positions.num_embeddings:
            raise UserError(f"target length {length} exceeds max_target_positions; truncate targets to "
                            f"{self.cfg.max_target_positions} tokens")
        steps = torch.arange(length, device=self.image_position_idx.device)
        text = self.pos_ln(self.embed_positions(steps))[None].expand(batch, -1, -1)
        if code_masks is None:
            return text
        if length > self.image_position_idx.numel():
            raise UserError(f"code-mode target length {length} exceeds the {self.image_position_idx.numel()} "
                            f"code positions; raise model.code_image_size or shorten image targets")
        image = self.image_pos_ln(self.embed_image_positions(self.image_position_idx[:length]))[None]
        return torch.where(code_masks[:, None, None], image.expand(batch, -1, -1), text)

    def embed(
        self, prev_output_tokens: torch.Tensor, code_masks: torch.Tensor | None = None, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None, DecoderPositions]:
        """-> x (B, T-start, D), self-attention key padding mask (B, T) or None, DecoderPositions."""
        b, t = prev_output_tokens.shape
        if code_masks is not None:
            code_masks = code_masks.to(torch.bool)
            if not bool(code_masks.any()):
                code_masks = None
        x = self.embed_tokens(prev_output_tokens[:, start:])
        if code_masks is None:
            x = self.layernorm_embedding(x)
        else:
            x = torch.where(code_masks[:, None, None], self.code_layernorm_embedding(x), self.layernorm_embedding(x))
        x = F.dropout(x, self.cfg.dropout, self.training)
        pad = prev_output_tokens.eq(self.padding_idx)
        self_padding_mask = pad if bool(pad.any()) else None
        pos_embed = self.target_positions(t, code_masks, b)
        q = self._heads(self.self_pos_q_linear(pos_embed[:, start:])) * self.pos_scaling
        k = self._heads(self.self_pos_k_linear(pos_embed))
        ids = self.image_position_idx[:t]
        pos = DecoderPositions(pos_embed, code_masks, start, t, torch.matmul(q, k.transpose(2, 3)),
                               text_buckets=self.token_rp_bucket[start:t, :t],
                               image_buckets=self.image_rp_bucket[ids[start:, None], ids[None, :]])
        return x, self_padding_mask, pos

    def self_bias(self, i: int, pos: DecoderPositions) -> torch.Tensor:
        """(B, H_local, T-start, T): shared absolute bias + layer i's text (or, for code rows, image) relative."""
        return relative_self_bias(pos.abs_bias, self.token_rel_pos_table_list[i], self.image_rel_pos_table_list[i],
                                  pos.text_buckets, pos.image_buckets, pos.code_masks)

    def cross_bias(
        self, pos: DecoderPositions, encoder_positions: torch.Tensor, incremental_state: dict | None = None
    ) -> torch.Tensor:
        """(B, H_local, T-start, L) absolute bias to the encoder's position embeddings (no relative term)."""
        q = self._heads(self.cross_pos_q_linear(pos.position_embeddings[:, pos.start:])) * self.pos_scaling
        k = None if incremental_state is None else incremental_state.get(CROSS_POS_K_KEY)
        if k is None:
            k = self._heads(self.cross_pos_k_linear(encoder_positions))
            if incremental_state is not None:
                incremental_state[CROSS_POS_K_KEY] = k
        return torch.matmul(q, k.transpose(2, 3))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and the projection tied to the token embedding -> logits (B, T, V_local)."""
        return self.output_projection(self.layer_norm(x))

    # ---------------------------------------------------------------- whole pass
    def forward(
        self,
        prev_output_tokens: torch.Tensor,
        encoder_out: EncoderOut,
        code_masks: torch.Tensor | None = None,
        incremental_state: dict | None = None,
        full_context_alignment: bool = False,
        all_layers: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits (B, T, V_local); with `all_layers` (MuE training, objectives/mue_loss.py) one logits tensor per
        layer, output_projection(layer_norm(h_l)), the last being the usual output."""
        start = 0
        if incremental_state is not None:
            start = int(incremental_state.get(STEPS_KEY, 0))
            if start >= prev_output_tokens.shape[1]:
                raise ValueError(f"incremental_state already holds {start} steps; pass the prefix extended by at "
                                 f"least one token")
        x, self_pad, pos = self.embed(prev_output_tokens, code_masks, start)
        cross = self.cross_bias(pos, encoder_out.position_embeddings, incremental_state)
        causal_offset = None if full_context_alignment else start
        # --- MuE (spec ext §10.7): early exit per sample keeping the KV cache whole (model/early_exit.py); or
        # every layer's output kept for the all-layer training loss; neither = unchanged
        if all_layers and (self.early_exit is not None or incremental_state is not None):
            raise ValueError("all_layers is MuE's training output: a full teacher-forced pass without exits")
        states = [] if all_layers else None
        if self.early_exit is not None:
            x = early_exit.run_decoder_layers(self, x, self_pad, pos, encoder_out, cross, causal_offset,
                                              incremental_state, self.early_exit)
        else:
            for i, layer in enumerate(self.layers):
                cache = None if incremental_state is None else incremental_state.setdefault(f"decoder.layers.{i}",
                                                                                            {})
                x = layer(x, self_pad, self.self_bias(i, pos), encoder_out.states, encoder_out.padding_mask, cross,
                          causal_offset=causal_offset, cache=cache)
                if states is not None:
                    states.append(x)
        if incremental_state is not None:
            incremental_state[STEPS_KEY] = prev_output_tokens.shape[1]
        if states is not None:
            return tuple(self.project(h) for h in states)
        return self.project(x)

    @staticmethod
    def reorder_incremental_state(incremental_state: dict, new_order: torch.Tensor) -> dict:
        """Permute/repeat every cached tensor along the batch dimension, in place (beam search)."""

        def reorder(value):
            if isinstance(value, torch.Tensor):
                return value.index_select(0, new_order.to(value.device))
            if isinstance(value, dict):
                return {k: reorder(v) for k, v in value.items()}
            return value

        for key in list(incremental_state):
            incremental_state[key] = reorder(incremental_state[key])
        return incremental_state
