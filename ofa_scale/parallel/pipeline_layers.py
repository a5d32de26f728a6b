"""OFA as a flat list of pipeline layers (for DeepSpeed's PipelineModule).

The user-visible units ("blocks", what `parallel.stage_layers` counts) are:

    embedding (token lookup + ResNet stem + encoder embedding) | encoder layer × E |
    decoder embedding (encoder final LN + decoder embedding + biases) | decoder layer × D | head (final LN + logits)

Internally the embedding and the head are two pipeline layers each, because the shared token embedding is a
DeepSpeed TiedLayerSpec on the first and last stage (its gradients are summed between the two copies), so the
PipelineModule sees E + D + 5 layers; a block is never split across stages.

Between layers everything travels as one tuple of tensors. Masks and ids travel as int64 so DeepSpeed sends no
gradient for them; every float tensor that crosses a stage boundary is used downstream, so it receives a gradient
(DeepSpeed asserts this). Encoder stages carry: states, padding mask, the shared absolute-position bias, the
position embeddings (for the decoder's cross bias), patch position ids, the decoder's token embeddings,
prev_output_tokens and code masks. Decoder stages carry: states, self padding mask, self absolute bias, encoder
states, encoder padding mask, cross bias, code masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ofa_scale.model import positions


def num_pipeline_layers(encoder_layers: int, decoder_layers: int) -> int:
    """Blocks a user splits over stages: embedding, encoder layers, decoder embedding, decoder layers, head."""
    return encoder_layers + decoder_layers + 3


def blocks_to_layers(stage_blocks: list[int], encoder_layers: int, decoder_layers: int) -> list[int]:
    """Per-stage block counts -> per-stage counts of PipelineModule layers (the embedding and head are 2 each)."""
    last = num_pipeline_layers(encoder_layers, decoder_layers) - 1
    out, start = [], 0
    for n in stage_blocks:
        blocks = range(start, start + n)
        out.append(n + (0 in blocks) + (last in blocks))
        start += n
    return out


_BUCKETS: dict[tuple, torch.Tensor] = {}


def _bucket(kind: str, size: int, extra: int, device: torch.device) -> torch.Tensor:
    """Relative-position bucket tables, computed once per device and shared by every layer of the stage."""
    key = (kind, size, extra, str(device))
    if key not in _BUCKETS:
        table = (positions.token_relative_buckets(size, extra) if kind == "token"
                 else positions.image_relative_buckets(size))
        _BUCKETS[key] = table.to(device)
    return _BUCKETS[key]


class _GivenEmbedding(nn.Module):
    """Stands in for the shared token embedding inside a carved encoder/decoder: the lookup already happened on the
    first stage (where the tied embedding lives), so `embed` is handed the result."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None or value.shape[:2] != ids.shape[:2]:
            raise RuntimeError("pipeline embedding lookup was not provided for this call")
        return value


class SharedEmbedding(nn.Module):
    """The tied token embedding (TiedLayerSpec module on the first and last stage)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    prefix_map = {"embedding": "encoder.embed_tokens"}


def _contiguous(values: tuple) -> tuple:
    """p2p sends need contiguous buffers (expanded position tensors are views)."""
    return tuple(v.contiguous() for v in values)


def embed_lookup(shared: SharedEmbedding, inputs):
    src_tokens, patch_images, patch_masks, prev_output_tokens, code_masks = inputs
    return (shared.embedding(src_tokens), shared.embedding(prev_output_tokens), src_tokens, patch_images,
            patch_masks, prev_output_tokens, code_masks)


def make_head(factory):
    def head(shared: SharedEmbedding, x):
        return factory.output_logits(x, shared.embedding)
    return head


class EncoderEmbedPipe(nn.Module):
    """ResNet stem, image_proj, embedding LNs and the shared absolute-position bias (the encoder minus its layers)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    prefix_map = {"encoder": "encoder"}

    def forward(self, inputs):
        src_emb, tgt_emb, src_tokens, patch_images, patch_masks, prev_output_tokens, code_masks = inputs
        self.encoder.embed_tokens.value = src_emb
        x, padding_mask, pos = self.encoder.embed(src_tokens, patch_images, patch_masks.bool())
        return _contiguous((x, padding_mask.long(), pos.abs_bias, pos.position_embeddings, pos.image_position_ids,
                            tgt_emb, prev_output_tokens, code_masks))


class _LayerWithRelTables(nn.Module):
    """One transformer layer plus its own relative-position tables (OFA keeps those at encoder/decoder level,
    named `<side>.{token,image}_rel_pos_table_list.<i>`; a pipeline stage needs them next to the layer)."""

    side = ""

    def __init__(self, layer: nn.Module, token_table: nn.Module, image_table: nn.Module, index: int, cfg):
        super().__init__()
        self.layer = layer
        self.token_table = token_table
        self.image_table = image_table
        self.cfg = cfg
        self.prefix_map = {"layer": f"{self.side}.layers.{index}",
                           "token_table": f"{self.side}.token_rel_pos_table_list.{index}",
                           "image_table": f"{self.side}.image_rel_pos_table_list.{index}"}


class EncoderLayerPipe(_LayerWithRelTables):
    side = "encoder"

    def forward(self, inputs):
        x, pad, abs_bias, pos_embed, image_ids, tgt_emb, prev, code = inputs
        n = image_ids.shape[1]
        s = x.shape[1] - n
        cfg = self.cfg
        bias = abs_bias.clone()
        token_bucket = _bucket("token", cfg.token_bucket_size, cfg.max_source_positions, x.device)[:s, :s]
        bias[:, :, n:, n:] += F.embedding(token_bucket, self.token_table.weight).permute(2, 0, 1).to(bias.dtype)
        if n:
            image_bucket = _bucket("image", cfg.image_bucket_size, 0, x.device)
            b = image_bucket[image_ids[:, :, None], image_ids[:, None, :]]
            bias[:, :, :n, :n] += F.embedding(b, self.image_table.weight).permute(0, 3, 1, 2).to(bias.dtype)
        x = self.layer(x, pad.bool(), bias)
        return (x, pad, abs_bias, pos_embed, image_ids, tgt_emb, prev, code)


class DecoderEmbedPipe(nn.Module):
    """The encoder's final LayerNorm, then the decoder's input embedding, self and cross absolute biases."""

    def __init__(self, encoder_norm: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder_norm = encoder_norm
        self.decoder = decoder

    prefix_map = {"encoder_norm": "encoder.layer_norm", "decoder": "decoder"}

    def forward(self, inputs):
        x, pad, abs_bias, pos_embed, image_ids, tgt_emb, prev, code = inputs
        del abs_bias, image_ids  # consumed by the encoder layers
        enc_states = self.encoder_norm(x)
        self.decoder.embed_tokens.value = tgt_emb
        code_masks = code.bool()
        dx, self_pad, pos = self.decoder.embed(prev, code_masks if bool(code_masks.any()) else None)
        cross = self.decoder.cross_bias(pos, pos_embed)
        self_pad = prev.eq(self.decoder.padding_idx).long()
        return _contiguous((dx, self_pad, pos.abs_bias, enc_states, pad, cross, code))


class DecoderLayerPipe(_LayerWithRelTables):
    side = "decoder"

    def forward(self, inputs):
        x, self_pad, self_abs, enc_states, enc_pad, cross, code = inputs
        cfg = self.cfg
        t = x.shape[1]
        token_bucket = _bucket("token", cfg.token_bucket_size, cfg.max_target_positions, x.device)[:t, :t]
        text = F.embedding(token_bucket, self.token_table.weight).permute(2, 0, 1)[None].to(self_abs.dtype)
        code_masks = code.bool()
        if bool(code_masks.any()):
            ids = positions.code_position_ids(cfg.code_grid_size, cfg.image_bucket_size).to(x.device)[:t]
            b = _bucket("image", cfg.image_bucket_size, 0, x.device)[ids[:, None], ids[None, :]]
            image = F.embedding(b, self.image_table.weight).permute(2, 0, 1)[None].to(self_abs.dtype)
            bias = self_abs + torch.where(code_masks[:, None, None, None], image, text)
        else:
            bias = self_abs + text
        pad = self_pad.bool()
        x = self.layer(x, pad if bool(pad.any()) else None, bias, enc_states, enc_pad.bool(), cross,
                       causal_offset=0)
        return (x, self_pad, self_abs, enc_states, enc_pad, cross, code)


class DecoderNormPipe(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    prefix_map = {"norm": "decoder.layer_norm"}

    def forward(self, inputs):
        return self.norm(inputs[0])


def carve(model: nn.Module) -> dict:
    """Split a built OFAModel into the pieces the pipeline layers wrap (the model object is consumed)."""
    enc, dec = model.encoder, model.decoder
    embedding = enc.embed_tokens
    enc_layers = list(enc.layers)
    enc_tables = list(zip(enc.token_rel_pos_table_list, enc.image_rel_pos_table_list))
    dec_layers = list(dec.layers)
    dec_tables = list(zip(dec.token_rel_pos_table_list, dec.image_rel_pos_table_list))
    enc_norm, dec_norm = enc.layer_norm, dec.layer_norm
    for module in (enc, dec):
        module.layers = nn.ModuleList()
        module.token_rel_pos_table_list = nn.ModuleList()
        module.image_rel_pos_table_list = nn.ModuleList()
        module.embed_tokens = _GivenEmbedding()
        for name in ("token_rp_bucket", "image_rp_bucket"):  # the pipe layers share one copy per device
            del module._buffers[name]
    del enc._modules["layer_norm"], dec._modules["layer_norm"], dec._modules["output_projection"]
    return dict(embedding=embedding, encoder=enc, decoder=dec, enc_layers=enc_layers, enc_tables=enc_tables,
                dec_layers=dec_layers, dec_tables=dec_tables, enc_norm=enc_norm, dec_norm=dec_norm)
