"""OFA as a flat list of pipeline layers (for DeepSpeed's PipelineModule).

The user-visible units ("blocks", what `parallel.stage_layers` counts) are:

    embedding (token lookup + ResNet stem + encoder embedding) | encoder layer × E |
    decoder embedding (encoder final LN + decoder embedding + biases) | decoder layer × D | head (final LN + logits)

Internally the embedding and the head are two pipeline layers each, because the shared token embedding is a
DeepSpeed TiedLayerSpec on the first and last stage (its gradients are summed between the two copies), so the
PipelineModule sees E + D + 5 layers; a block is never split across stages. The tied layer is one module whose
forward is the lookup on the first stage and the output projection on the last (no DeepSpeed `forward_fn`), so
DeepSpeed's own checkpoint saves and restores it like any other layer.

First-stage inputs (`pipeline_inputs` builds them): src_tokens, patch_images, patch_masks (int64),
prev_output_tokens, code_masks (int64), patch_sampling (int64 [sample_patch_num, generator seed]; [0, 0] = every
patch). The embed stage rebuilds the patch generator from the seed, so it draws the patches pp = 1 draws.

Between layers everything travels as one tuple of tensors. Masks and indices travel as int64 so DeepSpeed sends no
gradient for them; every float tensor that crosses a stage boundary is used downstream, so it receives a gradient
(DeepSpeed asserts this). Encoder stages carry: states, padding mask, the shared absolute-position bias, the
position embeddings (for the decoder's cross bias), the text and image relative-position bucket indices, the
decoder's token embeddings, prev_output_tokens and code masks. Decoder stages carry: states, self padding mask,
self absolute bias, the self-attention text and image bucket indices, encoder states, encoder padding mask, cross
bias, code masks. The relative biases themselves are computed by the model's own functions
(`encoder.relative_layer_bias`, `decoder.relative_self_bias`) from indices its `embed` steps built.
"""

from __future__ import annotations

import torch
from torch import nn

from ofa_scale.model.decoder import relative_self_bias
from ofa_scale.model.encoder import relative_layer_bias


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


def pipeline_inputs(src_tokens: torch.Tensor, patch_images: torch.Tensor, patch_masks: torch.Tensor,
                    prev_output_tokens: torch.Tensor, code_masks: torch.Tensor, sample_patch_num: int | None = None,
                    patch_generator: torch.Generator | None = None) -> tuple:
    """The first stage's input tuple for one micro-batch (the model's keyword arguments, as tensors).

    A generator cannot travel through DeepSpeed's data path, so patch sampling sends its seed (the generator's
    `initial_seed`, which the trainer set with manual_seed and has not drawn from)."""
    k = int(sample_patch_num or 0)
    if k and patch_generator is None:
        raise ValueError("sample_patch_num > 0 needs the patch_generator it draws from")
    sampling = torch.tensor([k, patch_generator.initial_seed() if k else 0], dtype=torch.int64)
    return (src_tokens, patch_images, patch_masks.long(), prev_output_tokens, code_masks.long(), sampling)


class SharedEmbedding(nn.Module):
    """The tied token embedding (one TiedLayerSpec module on the first and the last stage).

    On the first stage it receives the input tuple and looks up the source and target tokens; on the last it
    receives the final hidden states (a tensor) and projects them onto the vocabulary with the same weight."""

    def __init__(self, embedding: nn.Module, factory):
        super().__init__()
        self.embedding = embedding
        self.factory = factory

    prefix_map = {"embedding": "encoder.embed_tokens"}

    def forward(self, inputs):
        if isinstance(inputs, torch.Tensor):
            return self.factory.output_logits(inputs, self.embedding)
        src_tokens, patch_images, patch_masks, prev_output_tokens, code_masks, sampling = inputs
        return (self.embedding(src_tokens), self.embedding(prev_output_tokens), src_tokens, patch_images,
                patch_masks, prev_output_tokens, code_masks, sampling)


def _contiguous(values: tuple) -> tuple:
    """p2p sends need contiguous buffers (expanded position tensors and bucket slices are views)."""
    return tuple(v.contiguous() for v in values)


def _patch_generator(sampling: torch.Tensor, device: torch.device) -> tuple[int, torch.Generator | None]:
    """(sample_patch_num, generator) from the int64 [k, seed] input: the generator pp = 1 builds for this batch."""
    k, seed = (int(v) for v in sampling.tolist())
    if not k:
        return 0, None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return k, generator


class EncoderEmbedPipe(nn.Module):
    """ResNet stem, image_proj, embedding LNs and the shared absolute-position bias (the encoder minus its layers)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    prefix_map = {"encoder": "encoder"}

    def forward(self, inputs):
        src_emb, tgt_emb, src_tokens, patch_images, patch_masks, prev_output_tokens, code_masks, sampling = inputs
        self.encoder.embed_tokens.value = src_emb
        k, generator = _patch_generator(sampling, patch_images.device)
        x, padding_mask, pos = self.encoder.embed(src_tokens, patch_images, patch_masks.bool(), k, generator)
        image_buckets = pos.image_buckets
        if image_buckets is None:  # the tuple's layout is fixed: no image is an empty image block
            image_buckets = pos.text_buckets.new_zeros((x.shape[0], 0, 0))
        return _contiguous((x, padding_mask.long(), pos.abs_bias, pos.position_embeddings, pos.text_buckets,
                            image_buckets, tgt_emb, prev_output_tokens, code_masks))


class _LayerWithRelTables(nn.Module):
    """One transformer layer plus its own relative-position tables (OFA keeps those at encoder/decoder level,
    named `<side>.{token,image}_rel_pos_table_list.<i>`; a pipeline stage needs them next to the layer)."""

    side = ""

    def __init__(self, layer: nn.Module, token_table: nn.Module, image_table: nn.Module, index: int):
        super().__init__()
        self.layer = layer
        self.token_table = token_table
        self.image_table = image_table
        self.prefix_map = {"layer": f"{self.side}.layers.{index}",
                           "token_table": f"{self.side}.token_rel_pos_table_list.{index}",
                           "image_table": f"{self.side}.image_rel_pos_table_list.{index}"}


class EncoderLayerPipe(_LayerWithRelTables):
    side = "encoder"

    def forward(self, inputs):
        x, pad, abs_bias, pos_embed, text_buckets, image_buckets, tgt_emb, prev, code = inputs
        bias = relative_layer_bias(abs_bias, self.token_table, self.image_table, text_buckets, image_buckets)
        x = self.layer(x, pad.bool(), bias)
        return (x, pad, abs_bias, pos_embed, text_buckets, image_buckets, tgt_emb, prev, code)


class DecoderEmbedPipe(nn.Module):
    """The encoder's final LayerNorm, then the decoder's input embedding, self and cross absolute biases."""

    def __init__(self, encoder_norm: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder_norm = encoder_norm
        self.decoder = decoder

    prefix_map = {"encoder_norm": "encoder.layer_norm", "decoder": "decoder"}

    def forward(self, inputs):
        x, pad, abs_bias, pos_embed, text_buckets, image_buckets, tgt_emb, prev, code = inputs
        del abs_bias, text_buckets, image_buckets  # consumed by the encoder layers
        enc_states = self.encoder_norm(x)
        self.decoder.embed_tokens.value = tgt_emb
        code_masks = code.bool()
        dx, self_pad, pos = self.decoder.embed(prev, code_masks if bool(code_masks.any()) else None)
        cross = self.decoder.cross_bias(pos, pos_embed)
        self_pad = prev.eq(self.decoder.padding_idx).long()
        return _contiguous((dx, self_pad, pos.abs_bias, pos.text_buckets, pos.image_buckets, enc_states, pad, cross,
                            code))


class DecoderLayerPipe(_LayerWithRelTables):
    side = "decoder"

    def forward(self, inputs):
        x, self_pad, self_abs, text_buckets, image_buckets, enc_states, enc_pad, cross, code = inputs
        code_masks = code.bool()
        bias = relative_self_bias(self_abs, self.token_table, self.image_table, text_buckets, image_buckets,
                                  code_masks if bool(code_masks.any()) else None)
        pad = self_pad.bool()
        x = self.layer(x, pad if bool(pad.any()) else None, bias, enc_states, enc_pad.bool(), cross,
                       causal_offset=0)
        return (x, self_pad, self_abs, text_buckets, image_buckets, enc_states, enc_pad, cross, code)


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
    del enc._modules["layer_norm"], dec._modules["layer_norm"], dec._modules["output_projection"]
    return dict(embedding=embedding, encoder=enc, decoder=dec, enc_layers=enc_layers, enc_tables=enc_tables,
                dec_layers=dec_layers, dec_tables=dec_tables, enc_norm=enc_norm, dec_norm=dec_norm)
