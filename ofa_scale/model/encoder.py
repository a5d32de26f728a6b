"""OFA encoder (spec §4.2–§4.5): ResNet stem + text embedding, positions only as attention biases.

The forward pass is a flat sequence of explicit steps so a pipeline can cut it anywhere between layers:

    x, padding_mask, pos = encoder.embed(src_tokens, patch_images, patch_masks, sample_patch_num, generator)
    for i, layer in enumerate(encoder.layers):
        x = layer(x, padding_mask, encoder.layer_bias(i, pos))
    states = encoder.finalize(x)

* `embed` runs the ResNet stem, image_proj, type embedding and the embedding LNs; the sequence is
  [image tokens ; text tokens]. It also builds `pos` (`EncoderPositions`): the normalised absolute position
  embeddings P (returned to the decoder for its cross bias), the patch position ids, the absolute-position bias
  shared by all layers, and the relative-position bucket indices of the text and image blocks (also shared).
* `layer_bias(i, pos)` adds layer i's text relative table to the text×text block and its image relative table to
  the image×image block (B, H_local, L, L); `relative_layer_bias` is that computation, which the pipeline's
  encoder-layer stages call too.
* `finalize` is the final LayerNorm.

Every table is a module that is *called* (an nn.Embedding looked up with index tensors), never read through
`.weight` by another module: ZeRO-3 gathers a module's own parameters only around that module's forward, so this
is what lets it partition them. For the same reason `EncoderOut` is a NamedTuple: ZeRO-3's backward hooks walk
tuples (not dataclasses) to find the tensors the encoder hands to the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ofa_scale.errors import UserError
from ofa_scale.model import early_exit, mue_encoder, positions
from ofa_scale.model.blocks import EncoderLayer
from ofa_scale.model.config import OFAConfig
from ofa_scale.model.image_stem import build_image_stem
from ofa_scale.model.kernels import make_layer_norm
from ofa_scale.model.layers import LayerFactory
from ofa_scale.model.resnet import linspace_rates


@dataclass
class EncoderPositions:
    """Position information carried from `embed` to every layer (and, via EncoderOut, to the decoder)."""

    position_embeddings: torch.Tensor  # (B, L, D): [image_pos_ln(E_img[ids]) ; pos_ln(E_txt[0..S-1])]
    abs_bias: torch.Tensor  # (B, H_local, L, L), shared by all layers
    image_position_ids: torch.Tensor | None  # (B, n_img) ids r·42+c+1 (after patch sampling)
    num_image_tokens: int
    num_text_tokens: int
    text_buckets: torch.Tensor  # (S, S) int64 rows of the text relative tables
    image_buckets: torch.Tensor | None  # (B, n_img, n_img) int64 rows of the image relative tables


class EncoderOut(NamedTuple):
    """What the decoder reads from the encoder (a NamedTuple so ZeRO-3's hooks see its tensors)."""

    states: torch.Tensor  # (B, L, D) after the final LayerNorm
    padding_mask: torch.Tensor  # (B, L) bool, True = padding
    position_embeddings: torch.Tensor  # (B, L, D), for the decoder's cross-attention bias
    image_position_ids: torch.Tensor | None
    num_image_tokens: int

    def index_select(self, order: torch.Tensor) -> "EncoderOut":
        """Reorder/repeat the batch (beam search)."""
        pick = lambda t: None if t is None else t.index_select(0, order)  # noqa: E731
        return self._replace(
            states=pick(self.states),
            padding_mask=pick(self.padding_mask),
            position_embeddings=pick(self.position_embeddings),
            image_position_ids=pick(self.image_position_ids),
        )


def sample_patches(num_patches: int, k: int, batch: int, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """(batch, k) patch indices drawn without replacement, in random order (OFA does not re-sort them)."""
    # randperm draws on the generator's device (a CUDA generator cannot fill a CPU tensor)
    where = generator.device if generator is not None else None
    orders = [torch.randperm(num_patches, generator=generator, device=where)[:k] for _ in range(batch)]
    return torch.stack(orders).to(device)


def relative_layer_bias(abs_bias: torch.Tensor, token_table: nn.Module, image_table: nn.Module,
                        text_buckets: torch.Tensor, image_buckets: torch.Tensor | None) -> torch.Tensor:
    """(B, H_local, L, L) bias of one encoder layer: the shared absolute bias, plus the layer's text table on the
    text×text block and its image table on the image×image block (the sequence is [image ; text]).

    `image_buckets` may be None or have zero patches (no image)."""
    n = 0 if image_buckets is None else image_buckets.shape[1]
    bias = abs_bias.clone()
    bias[:, :, n:, n:] += token_table(text_buckets).permute(2, 0, 1).to(bias.dtype)
    if n:
        bias[:, :, :n, :n] += image_table(image_buckets).permute(0, 3, 1, 2).to(bias.dtype)
    return bias


class OFAEncoder(nn.Module):
    early_exit: "early_exit.EarlyExitConfig | None" = None  # MuE inference exits (early_exit.enable); None = off

    def __init__(self, cfg: OFAConfig, layers: LayerFactory, embed_tokens: nn.Module):
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.cfg = cfg
        self.local_heads = cfg.heads // layers.tp_size
        self.pos_scaling = (cfg.head_dim * cfg.attn_scale_factor) ** -0.5
        self.padding_idx = cfg.pad_token_id
        # registration order = OFA's state-dict order
        self.register_buffer("version", torch.tensor([3.0]))
        self.register_buffer("token_rp_bucket",
                             positions.token_relative_buckets(cfg.token_bucket_size, cfg.max_source_positions))
        self.register_buffer("image_rp_bucket", positions.image_relative_buckets(cfg.image_bucket_size))
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = make_layer_norm(d, eps)
        self.type_embedding = nn.Embedding(2, d)
        # --- image stem (model.image_stem: resnet | vit_b16; model/image_stem.py) ---
        self.embed_images = build_image_stem(cfg)
        self.image_proj = layers.linear(cfg.image_channels, d, True)
        # --- end image stem ---
        self.patch_layernorm_embedding = make_layer_norm(d, eps)
        self.embed_positions = nn.Embedding(cfg.max_source_positions + 2, d)
        self.embed_image_positions = nn.Embedding(cfg.num_image_positions, d)
        self.pos_ln = make_layer_norm(d, eps)
        self.image_pos_ln = make_layer_norm(d, eps)
        self.pos_q_linear = layers.column_linear(d, d, True)
        self.pos_k_linear = layers.column_linear(d, d, True)
        rates = linspace_rates(cfg.encoder_drop_path_rate, cfg.encoder_layers)
        self.layers = nn.ModuleList(EncoderLayer(cfg, layers, rates[i]) for i in range(cfg.encoder_layers))
        self.layer_norm = make_layer_norm(d, eps)
        # relative tables hold only the local heads' columns (TP slices [tp_rank·H/tp, (tp_rank+1)·H/tp))
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(cfg.num_token_rel_buckets, self.local_heads) for _ in range(cfg.encoder_layers))
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(cfg.num_image_rel_buckets, self.local_heads) for _ in range(cfg.encoder_layers))

    def reset_index_buffers(self) -> None:
        """Recompute the index buffers in place (after building on meta / loading a checkpoint)."""
        cfg = self.cfg
        with torch.no_grad():
            self.version.copy_(torch.tensor([3.0]))
            self.token_rp_bucket.copy_(
                positions.token_relative_buckets(cfg.token_bucket_size, cfg.max_source_positions))
            self.image_rp_bucket.copy_(positions.image_relative_buckets(cfg.image_bucket_size))

    # ---------------------------------------------------------------- steps
    def _absolute_bias(self, pos_embed: torch.Tensor) -> torch.Tensor:
        b, length, _ = pos_embed.shape
        q = self.pos_q_linear(pos_embed).view(b, length, self.local_heads, -1).transpose(1, 2) * self.pos_scaling
        k = self.pos_k_linear(pos_embed).view(b, length, self.local_heads, -1).transpose(1, 2)
        return torch.matmul(q, k.transpose(2, 3))

    def _image_features(self, patch_images, sample_patch_num, generator):
        if not patch_images.is_floating_point():
            raise UserError("patch_images must be normalised float images ((x/255 - 0.5)/0.5, as "
                            "ofa_scale.objectives.batching.to_model_inputs does), not raw uint8 pixels")
        feat = self.embed_images(patch_images.to(self.embed_images.conv1.weight.dtype))
        b, _, h, w = feat.shape
        if h > self.cfg.image_bucket_size or w > self.cfg.image_bucket_size:
            limit = 16 * self.cfg.image_bucket_size
            raise UserError(f"images of {patch_images.shape[-2]}×{patch_images.shape[-1]} px exceed OFA's "
                            f"{limit}×{limit} position table; resize images to at most {limit} px per side")
        feat = feat.flatten(2).transpose(1, 2)  # (B, h·w, C) row-major
        ids = positions.patch_position_ids(h, w, self.cfg.image_bucket_size).to(feat.device)
        ids = ids[None, :].expand(b, -1)
        if sample_patch_num:
            n = h * w
            if sample_patch_num > n:
                raise UserError(f"sample_patch_num={sample_patch_num} exceeds the {n} patches of a "
                                f"{patch_images.shape[-1]} px image; lower it or use larger images")
            order = sample_patches(n, sample_patch_num, b, generator, feat.device)
            feat = feat.gather(1, order[:, :, None].expand(-1, -1, feat.shape[2]))
            ids = ids.gather(1, order)
        return feat, ids

    def embed(
        self,
        src_tokens: torch.Tensor,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        sample_patch_num: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, EncoderPositions]:
        """-> x (B,L,D), padding_mask (B,L) bool, EncoderPositions. Images are already normalised floats."""
        b, s = src_tokens.shape
        if s > self.embed_positions.num_embeddings:
            raise UserError(f"source length {s} exceeds max_source_positions; truncate sources to "
                            f"{self.cfg.max_source_positions} tokens")
        text_pad = src_tokens.eq(self.padding_idx)
        text_type, image_type = self.type_embedding(torch.arange(2, device=src_tokens.device)).unbind(0)
        x = self.embed_tokens(src_tokens) + text_type
        x = F.dropout(self.layernorm_embedding(x), self.cfg.dropout, self.training)
        steps = torch.arange(s, device=src_tokens.device)
        text_pos = self.pos_ln(self.embed_positions(steps))[None].expand(b, -1, -1)
        image_ids = None
        n_img = 0
        if patch_images is not None:
            feat, image_ids = self._image_features(patch_images, sample_patch_num, generator)
            n_img = feat.shape[1]
            img = self.image_proj(feat) + image_type
            img = F.dropout(self.patch_layernorm_embedding(img), self.cfg.dropout, self.training)
            if patch_masks is None:
                image_pad = torch.zeros(b, n_img, dtype=torch.bool, device=x.device)
            else:
                image_pad = (~patch_masks.to(torch.bool))[:, None].expand(b, n_img)
            x = torch.cat([img.to(x.dtype), x], dim=1)
            padding_mask = torch.cat([image_pad, text_pad], dim=1)
            image_pos = self.image_pos_ln(self.embed_image_positions(image_ids))
            pos_embed = torch.cat([image_pos, text_pos], dim=1)
        else:
            padding_mask = text_pad
            pos_embed = text_pos
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        pos = EncoderPositions(
            position_embeddings=pos_embed,
            abs_bias=self._absolute_bias(pos_embed),
            image_position_ids=image_ids,
            num_image_tokens=n_img,
            num_text_tokens=s,
            text_buckets=self.token_rp_bucket[:s, :s],
            image_buckets=None if image_ids is None else self.image_rp_bucket[image_ids[:, :, None],
                                                                               image_ids[:, None, :]],
        )
        return x, padding_mask, pos

    def layer_bias(self, i: int, pos: EncoderPositions) -> torch.Tensor:
        return relative_layer_bias(pos.abs_bias, self.token_rel_pos_table_list[i], self.image_rel_pos_table_list[i],
                                   pos.text_buckets, pos.image_buckets)

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x)

    # ---------------------------------------------------------------- whole pass
    def forward(
        self,
        src_tokens: torch.Tensor,
        patch_images: torch.Tensor | None = None,
        patch_masks: torch.Tensor | None = None,
        sample_patch_num: int | None = None,
        generator: torch.Generator | None = None,
    ) -> EncoderOut:
        x, padding_mask, pos = self.embed(src_tokens, patch_images, patch_masks, sample_patch_num, generator)
        # like OFA, skip the key mask when nothing is padded (saves a masked copy of the bias per layer)
        layer_mask = padding_mask if bool(padding_mask.any()) else None
        # --- MuE (spec ext §10.7): model.mue runs the image and text streams apart (model/mue_encoder.py); an
        # early-exit config stops the loop per sample (model/early_exit.py); neither = unchanged
        if self.cfg.mue:
            x = mue_encoder.run_decomposed_layers(self, x, padding_mask, pos, self.early_exit)
        elif self.early_exit is not None:
            x = early_exit.run_encoder_layers(self, x, padding_mask, layer_mask, pos, self.early_exit)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, layer_mask, self.layer_bias(i, pos))
        return EncoderOut(
            states=self.finalize(x),
            padding_mask=padding_mask,
            position_embeddings=pos.position_embeddings,
            image_position_ids=pos.image_position_ids,
            num_image_tokens=pos.num_image_tokens,
        )

    @staticmethod
    def reorder_encoder_out(encoder_out: EncoderOut, new_order: torch.Tensor) -> EncoderOut:
        return encoder_out.index_select(new_order)
