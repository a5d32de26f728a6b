"""Analytic FLOP count of an OFA training step (for MFU and the parallelism planner).

Convention: one multiply-add = 2 FLOPs; only matmuls and convolutions are counted (LayerNorm, softmax, GELU,
embedding lookups and elementwise ops are ignored — a few percent at most). Training = forward + backward, with the
backward taken as 2× the forward (weight and input gradients), i.e. step = 3 × forward.

Forward terms, per sample (d = d_model, f = ffn_dim, V = vocab, n = image tokens, S = source tokens,
L = n + S encoder tokens, T = target tokens):
* ResNet stem: every conv of the truncated ResNet, 2·Cin·Cout·k²·Hout·Wout (exact output sizes).
  Or the ViT-B/16 stem (`image_stem: vit_b16`, w = 768, n patches): patch conv 2·n·3·16²·w, per block
  q/k/v/out 8·n·w², MLP 16·n·w², scores and weighted sum 4·n²·w.
* image_proj: 2·n·C·d (C = 1024 for the ResNet, 768 for the ViT).
* Encoder, per layer: q/k/v/out 8·L·d², FFN 4·L·d·f, scores and weighted sum 4·L²·d.
  Plus once: the absolute-position bias pos_q/pos_k 4·L·d² and its product 2·L²·d.
* Decoder, per layer: self q/k/v/out 8·T·d², self attention 4·T²·d, cross q/out 4·T·d², cross k/v 4·L·d²,
  cross attention 4·T·L·d, FFN 4·T·d·f. Plus once: self position bias 4·T·d² + 2·T²·d, cross position bias
  2·T·d² + 2·L·d² + 2·T·L·d, and the tied output projection 2·T·d·V.
This is exactly what `torch.utils.flop_counter.FlopCounterMode` sees for the math attention path (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

from ofa_scale.model.config import OFAConfig


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def resnet_forward_flops(cfg: OFAConfig, height: int, width: int) -> tuple[int, int, int]:
    """-> (FLOPs of the truncated ResNet for one image, output grid height, output grid width)."""
    flops = 0

    def conv(cin, cout, k, stride, pad, h, w):
        nonlocal flops
        ho, wo = _conv_out(h, k, stride, pad), _conv_out(w, k, stride, pad)
        flops += 2 * cin * cout * k * k * ho * wo
        return ho, wo

    h, w = conv(3, 64, 7, 2, 3, height, width)
    h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)  # maxpool
    inplanes = 64
    for planes, n_blocks, stride in zip((64, 128, 256), cfg.resnet_blocks, (1, 2, 2)):
        out = planes * 4
        for j in range(n_blocks):
            s = stride if j == 0 else 1
            conv(inplanes, planes, 1, 1, 0, h, w)
            ho, wo = conv(planes, planes, 3, s, 1, h, w)
            conv(planes, out, 1, 1, 0, ho, wo)
            if j == 0 and (s != 1 or inplanes != out):
                conv(inplanes, out, 1, s, 0, h, w)
            h, w, inplanes = ho, wo, out
    return flops, h, w


def vit_forward_flops(height: int, width: int, channels: int = 768, layers: int = 9,
                      patch: int = 16) -> tuple[int, int, int]:
    """-> (FLOPs of the ViT stem for one image, output grid height, output grid width)."""
    gh, gw = height // patch, width // patch
    n, w = gh * gw, channels
    return 2 * n * 3 * patch * patch * w + layers * (24 * n * w * w + 4 * n * n * w), gh, gw


def stem_forward_flops(cfg: OFAConfig, height: int, width: int) -> tuple[int, int, int]:
    """-> (FLOPs of the configured image stem for one image, output grid height, output grid width)."""
    if cfg.image_stem == "vit_b16":
        return vit_forward_flops(height, width)
    return resnet_forward_flops(cfg, height, width)


@dataclass
class StepFlops:
    resnet: int
    encoder: int
    decoder: int
    output: int

    @property
    def forward(self) -> int:
        return self.resnet + self.encoder + self.decoder + self.output

    @property
    def train_step(self) -> int:
        return 3 * self.forward


def step_flops(
    cfg: OFAConfig,
    batch: int,
    src_len: int,
    tgt_len: int,
    image_size: int | tuple[int, int] | None,
    sample_patch_num: int | None = None,
) -> StepFlops:
    """FLOPs of one micro-batch (forward terms; `.train_step` = 3 × forward)."""
    d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    resnet = n = 0
    if image_size:
        hh, ww = (image_size, image_size) if isinstance(image_size, int) else image_size
        resnet, gh, gw = stem_forward_flops(cfg, hh, ww)
        n = sample_patch_num if sample_patch_num else gh * gw
        resnet += 2 * n * cfg.image_channels * d  # image_proj
    s, t = src_len, tgt_len
    length = n + s
    enc_layer = 8 * length * d * d + 4 * length * d * f + 4 * length * length * d
    encoder = cfg.encoder_layers * enc_layer + 4 * length * d * d + 2 * length * length * d
    dec_layer = (8 * t * d * d + 4 * t * t * d + 4 * t * d * d + 4 * length * d * d + 4 * t * length * d
                 + 4 * t * d * f)
    decoder = (cfg.decoder_layers * dec_layer + 4 * t * d * d + 2 * t * t * d
               + 2 * t * d * d + 2 * length * d * d + 2 * t * length * d)
    output = 2 * t * d * v
    return StepFlops(batch * resnet, batch * encoder, batch * decoder, batch * output)
