"""Pipeline stage balancing: the cost of each pipeline block and the contiguous split that evens them out.

Blocks are the user-visible units of parallel/pipeline_layers.py: embedding (token lookup, ResNet stem, encoder
embedding) | encoder layer × E | decoder embedding | decoder layer × D | head. The pipeline module balances its
stages with these costs at run time, and the planner (parallel/planner.py) uses the same costs and split to
predict memory and step time, so the two always agree. Architecture facts come from OFAConfig
(model/config.py) and FLOPs from model/flops.py; nothing here is a copy of either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ofa_scale.errors import ConfigError
from ofa_scale.model.config import OFAConfig
from ofa_scale.model.flops import stem_forward_flops, step_flops
from ofa_scale.model.vit_stem import vit_param_count
from ofa_scale.parallel.pipeline_layers import num_pipeline_layers


# -- parameters ---------------------------------------------------------------------------------------------------

def resnet_params(cfg: OFAConfig) -> int:
    """Parameters of the truncated Bottleneck ResNet (conv1/bn1 and stages 1–3; convs have no bias, BN has 2)."""
    n = 3 * 64 * 49 + 2 * 64  # conv1 + bn1
    channels = 64
    for planes, blocks in zip((64, 128, 256), cfg.resnet_blocks):
        out = planes * 4
        for j in range(blocks):
            n += channels * planes + 9 * planes * planes + planes * out + 2 * (planes + planes + out)
            if j == 0:
                n += channels * out + 2 * out  # downsample conv + BN
            channels = out
    return n


def stem_params(cfg: OFAConfig) -> int:
    """Parameters of the configured image stem (the ResNet, or OFA-OCR's ViT-B/16)."""
    return vit_param_count() if cfg.image_stem == "vit_b16" else resnet_params(cfg)


@dataclass
class ParamGroups:
    """Parameter counts by where they live (full, unsplit sizes). `*_split` parts are divided over TP ranks
    (per-head or per-FFN-unit rows/columns); `*_replicated` parts are not."""

    embedding: int  # the shared vocabulary embedding (split under TP)
    stem_replicated: int  # ResNet, image_proj, position tables, embedding LNs, type embedding
    stem_split: int  # encoder pos_q/pos_k linears
    encoder_layer_split: int
    encoder_layer_replicated: int
    decoder_embed_replicated: int
    decoder_embed_split: int  # decoder self/cross pos_q/pos_k linears
    decoder_layer_split: int
    decoder_layer_replicated: int
    head_replicated: int  # final decoder LayerNorm
    enc_layers: int
    dec_layers: int

    def total(self) -> int:
        return (self.embedding + self.stem_replicated + self.stem_split + self.decoder_embed_replicated
                + self.decoder_embed_split + self.head_replicated
                + self.enc_layers * (self.encoder_layer_split + self.encoder_layer_replicated)
                + self.dec_layers * (self.decoder_layer_split + self.decoder_layer_replicated))


def param_groups(cfg: OFAConfig) -> ParamGroups:
    """Exact parameter counts of `OFAModel(cfg)` (tested against the built model and the spec's presets)."""
    d, f, h = cfg.d_model, cfg.ffn_dim, cfg.heads
    rel = (cfg.num_token_rel_buckets + cfg.num_image_rel_buckets) * h  # per-layer relative tables (split by head)
    attn_split = 4 * d * d + 3 * d + h  # q/k/v/out weights, q/k/v biases, c_attn
    ffn_split = 2 * d * f + f + 2 * f  # fc1/fc2 weights, fc1 bias, ffn_layernorm
    image_positions = cfg.num_image_positions
    return ParamGroups(
        embedding=cfg.vocab_size * d,
        # ResNet, image_proj, text/patch embedding LNs, type embedding, text/image position tables, pos LNs
        stem_replicated=stem_params(cfg) + cfg.image_channels * d + d + 2 * d + 2 * d + 2 * d
        + (cfg.max_source_positions + 2 + image_positions) * d + 4 * d,
        stem_split=2 * (d * d + d),
        encoder_layer_split=attn_split + ffn_split + rel,
        encoder_layer_replicated=d + d + 3 * 2 * d,  # out_proj and fc2 biases, 3 LayerNorms
        # the encoder's final LayerNorm runs at the start of the decoder-embedding pipeline block
        decoder_embed_replicated=2 * d + 2 * d + 2 * d + (cfg.max_target_positions + 2 + image_positions) * d
        + 4 * d,
        decoder_embed_split=4 * (d * d + d),
        decoder_layer_split=2 * attn_split + ffn_split + rel,
        decoder_layer_replicated=2 * d + d + 5 * 2 * d,
        head_replicated=2 * d,
        enc_layers=cfg.encoder_layers, dec_layers=cfg.decoder_layers)


# -- FLOPs (forward, per sample) ------------------------------------------------------------------------------------

@dataclass
class FlopBreakdown:
    """model/flops.py's forward FLOPs of one sample, split the way pipeline blocks hold them."""

    resnet: float  # the stem's convolutions
    encoder_layer: float
    decoder_layer: float
    embed: float  # image_proj + the absolute-position bias projections of encoder and decoder
    head: float  # output projection

    def total(self, cfg: OFAConfig) -> float:
        return (self.resnet + self.embed + cfg.encoder_layers * self.encoder_layer
                + cfg.decoder_layers * self.decoder_layer + self.head)


def forward_flops(cfg: OFAConfig, image_size: int, src_len: int, tgt_len: int) -> FlopBreakdown:
    """Per-block forward FLOPs of one sample, read off model/flops.py: its counts are linear in the layer counts,
    so one extra encoder (decoder) layer isolates the per-layer term and the remainder is the once-per-model part."""
    def at(enc: int, dec: int):
        return step_flops(dataclasses.replace(cfg, encoder_layers=enc, decoder_layers=dec), 1, src_len, tgt_len,
                          image_size)

    one, enc2, dec2 = at(1, 1), at(2, 1), at(1, 2)
    enc_layer, dec_layer = enc2.encoder - one.encoder, dec2.decoder - one.decoder
    conv = stem_forward_flops(cfg, image_size, image_size)[0]
    embed = (one.resnet - conv) + (one.encoder - enc_layer) + (one.decoder - dec_layer)
    return FlopBreakdown(float(conv), float(enc_layer), float(dec_layer), float(embed), float(one.output))


def pipeline_block_flops(cfg: OFAConfig, image_size: int, src_len: int, tgt_len: int, tp: int = 1) -> list[float]:
    """Forward FLOPs per GPU of each block; transformer parts divide by tp, the (replicated) ResNet does not. The
    embedding parts are shared half-and-half between the embedding and the decoder-embedding blocks."""
    fb = forward_flops(cfg, image_size, src_len, tgt_len)
    return ([fb.resnet + fb.embed / tp * 0.5] + [fb.encoder_layer / tp] * cfg.encoder_layers
            + [fb.embed / tp * 0.5] + [fb.decoder_layer / tp] * cfg.decoder_layers + [fb.head / tp])


def block_costs(cfg: OFAConfig, method: str, image_size: int = 480, src_len: int = 128, tgt_len: int = 64,
                tp: int = 1) -> list[float]:
    """Relative cost of each block for balancing: forward FLOPs, parameter counts (the tied embedding counts on
    both the first and the last block, which both hold it), or 1 each."""
    n = num_pipeline_layers(cfg.encoder_layers, cfg.decoder_layers)
    if method == "uniform":
        return [1.0] * n
    if method == "flops":
        return pipeline_block_flops(cfg, image_size, src_len, tgt_len, tp)
    if method == "parameters":
        g = param_groups(cfg)
        return ([g.embedding + g.stem_replicated + g.stem_split]
                + [g.encoder_layer_split + g.encoder_layer_replicated] * cfg.encoder_layers
                + [g.decoder_embed_split + g.decoder_embed_replicated]
                + [g.decoder_layer_split + g.decoder_layer_replicated] * cfg.decoder_layers
                + [g.embedding + g.head_replicated])
    raise ConfigError(f"unknown pipeline partition method {method!r}; use flops, parameters, uniform or explicit")


# -- the split ------------------------------------------------------------------------------------------------------

def balanced_split(costs: list[float], parts: int) -> list[int]:
    """Contiguous split of `costs` into `parts` non-empty runs minimising the largest run (binary search on the
    bottleneck, greedy fill). Returns run lengths."""
    if parts > len(costs):
        raise ValueError("more stages than layers")
    lo, hi = max(costs), sum(costs)
    for _ in range(100):
        mid = (lo + hi) / 2
        if _runs_needed(costs, mid) <= parts:
            hi = mid
        else:
            lo = mid
    return _fill(costs, hi, parts)


def _runs_needed(costs, cap):
    runs, acc = 1, 0.0
    for c in costs:
        if acc + c > cap and acc > 0:
            runs, acc = runs + 1, c
        else:
            acc += c
    return runs


def _fill(costs, cap, parts):
    """Greedy runs under `cap`, then split the longest runs until there are exactly `parts`."""
    runs, acc, n = [], 0.0, 0
    for c in costs:
        if acc + c > cap * (1 + 1e-9) and n > 0:
            runs.append(n)
            acc, n = 0.0, 0
        acc += c
        n += 1
    runs.append(n)
    while len(runs) < parts:
        i = max(range(len(runs)), key=lambda k: runs[k])
        half = runs[i] // 2
        runs[i:i + 1] = [runs[i] - half, half]
    return runs
