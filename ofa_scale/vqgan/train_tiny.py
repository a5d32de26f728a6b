"""Train a tiny nearest-code VQGAN (f = 8) on the sample corpus' shape scenes, and measure it.

`python -m ofa_scale.vqgan.train_tiny --out DIR [--steps 300]` writes DIR/model.yaml + DIR/last.ckpt (taming
layout, so `load_vqgan`, `ofa-preprocess image-codes --vqgan DIR` and `ofa-preprocess sample --vqgan DIR` take it)
and prints the reconstruction PSNR of the central 128×128 of held-out scenes next to the colour quantiser the
sample corpus uses without a VQGAN.

Same code budget for both: a 16×16 grid, one code per 8×8 patch of the central 128×128 (what image_examples rows
carry). The colour quantiser's vocabulary is 8192 colours (13 bits a code), the tiny VQGAN's `n_embed` codes
(1024 by default: 10 bits, fewer than the quantiser's).

It is taming's VQModel architecture (its encoder, decoder and `VectorQuantizer2` blocks, a small config) trained
without the GAN: pixel MSE + the VQ-VAE codebook loss + commitment β·‖z − sg(e)‖², straight-through gradients,
Adam. The adversarial and perceptual terms matter for sharp natural photos at scale, not for flat-colour shapes.

What the initialisation does (`colour_path_init`), and why:
* the network starts as "8×8 mean colour → latent → nearest-upsampled colour" through taming's own layers:
  identity residual blocks, RGB carried on three main-path channels (2×2-averaged by each Downsample, repeated by
  each Upsample), plus one large constant "reference" channel so that `norm_out` (one GroupNorm group) normalises
  every image by nearly the same statistics, which its affine scale/shift undo. Without it (H4's runs) the
  per-image GroupNorm erased each image's brightness and contrast and 300 steps ended at 18.1 dB;
* the codebook is k-means++ of the encoder outputs of every whole training scene (64 scenes: 65,536 latents for
  1,024 codes), i.e. a palette of the colours the scenes use (Lloyd steps after the seeding changed held-out PSNR
  by 0.02 dB, so the default skips them);
* training (default): the encoder and codebook stay as initialised (`encoder_lr_scale` 0), so the codes are that
  palette, and the decoder learns to draw 64×64 crops from them: sharper edges than the mean-colour box it starts
  as. The learning rate rises linearly over the first 20% of steps (full-rate Adam steps on the zero-initialised
  residual branches first undo the colour path) and decays to zero (cosine); gradients clipped at 1. With
  `encoder_lr_scale` > 0 the encoder and codebook learn too (`warmup`: plain-autoencoder steps first;
  `restart_every`: dead-code restarts at random current latents), which did worse in short runs.

Status (this machine's shared CPU, 1 thread, 64 training scenes, 16 held-out, 16×16 codes per central 128×128,
colour quantiser 23.88 dB; `tests/vqgan/test_train_tiny.py` asserts the 200-step ratio > 1):

| setting | tiny VQGAN dB | ratio |
|---|---|---|
| last session's trainer (everything trains, 32×32 crops, lr 2e-4), 300 steps | 22.98 | 0.962 |
| initialisation alone (whole-scene k-means palette) | 23.66 | 0.991 |
| decoder only, 64×64 crops, lr 1e-3 without the ramp, 200 steps | 23.90 | 1.001 |
| decoder only, lr 3e-4, 200 steps | 24.04 | 1.007 |
| **default: decoder only, lr 1e-3 with the 20% ramp, 200 steps** | **24.37** | **1.020** |
| the CLI's default 300 steps (270 s on the loaded machine) | 24.43 | 1.023 |
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ofa_scale.errors import UserError
from ofa_scale.vqgan.blocks import AttnBlock, ResnetBlock
from ofa_scale.vqgan.checkpoint import save_taming_checkpoint
from ofa_scale.vqgan.config import DDConfig, VQGANConfig
from ofa_scale.vqgan.images import centre_pixels, psnr, to_pixels
from ofa_scale.vqgan.model import VQGAN

# f = 8 (four levels), so its codes have OFA's grids (16×16 for the 128×128 infilling centre, 32×32 for a
# 256×256 image). One block per level, no attention but the middle one. One GroupNorm group: with taming's 32
# groups every channel is normalised alone, which erases the colour of a flat crop.
TINY = VQGANConfig(quantizer="vq", n_embed=1024, embed_dim=16,
                   ddconfig=DDConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                                     resolution=64, z_channels=32, norm_groups=1))


def scene_images(n: int, seed: int) -> list[Image.Image]:
    """256×256 sample-corpus scenes as an image_examples row stores them (JPEG/PNG round trip included)."""
    from ofa_scale.data.sample_corpus import encode_image, make_scene, render

    out = []
    for i in range(n):
        rng = random.Random(f"{seed}-vqgan-{i}")
        b64 = encode_image(render(make_scene(rng, 256, 256), rng), rng, png_share=0.1)
        out.append(Image.open(io.BytesIO(base64.urlsafe_b64decode(b64))).convert("RGB"))
    return out


def colour_quantiser_reconstruction(img: Image.Image) -> np.ndarray:
    """What the sample corpus' colour-quantiser codes (`colour_codes`) can reproduce of the central 128×128: each
    8×8 patch filled with the centre of its code's colour bin (5 bits red, 4 green, 4 blue)."""
    from ofa_scale.data.sample_corpus import colour_codes

    codes = np.asarray(colour_codes(img)).reshape(16, 16)
    rgb = np.stack([(codes // 256) * 8 + 4, (codes // 16 % 16) * 16 + 8, (codes % 16) * 16 + 8], axis=-1)
    return np.repeat(np.repeat(rgb, 8, axis=0), 8, axis=1).astype(np.uint8)


def vqgan_reconstruction(model: VQGAN, images: list[Image.Image]) -> np.ndarray:
    """decode(encode(central 128×128)) for each image, uint8 (N, 128, 128, 3)."""
    centres = np.stack([centre_pixels(im) for im in images])
    return model.decode(model.encode(centres)).numpy()


@dataclass
class Comparison:
    vqgan_psnr: float
    colour_psnr: float

    @property
    def ratio(self) -> float:
        return self.vqgan_psnr / self.colour_psnr


def compare(model: VQGAN, images: list[Image.Image]) -> Comparison:
    """Mean PSNR (dB) over `images` of the central 128×128: VQGAN reconstruction vs the colour quantiser's."""
    rec = vqgan_reconstruction(model, images)
    refs = [centre_pixels(im) for im in images]
    return Comparison(float(np.mean([psnr(r, x) for r, x in zip(refs, rec)])),
                      float(np.mean([psnr(r, colour_quantiser_reconstruction(im)) for r, im in zip(refs, images)])))


def _random_crops(images: np.ndarray, n: int, size: int, gen: np.random.Generator) -> np.ndarray:
    idx = gen.integers(0, len(images), n)
    ys, xs = gen.integers(0, images.shape[1] - size + 1, n), gen.integers(0, images.shape[2] - size + 1, n)
    return np.stack([images[i, y:y + size, x:x + size] for i, y, x in zip(idx, ys, xs)])


def _zero_residual_branches(model: VQGAN) -> None:
    """Start every residual block and attention as the identity (last conv zeroed, the usual "zero-γ" init)."""
    for m in model.modules():
        last = m.conv2 if isinstance(m, ResnetBlock) else m.proj_out if isinstance(m, AttnBlock) else None
        if last is not None:
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)


_RGB, _REF = [0, 1, 2], 3  # main-path channels that carry the colour, and the constant "reference" channel
_REF_VALUE = 30.0  # dominates each GroupNorm's statistics, so they hardly depend on the image
_SWISH_OFFSET = 8.0  # swish(x) ≈ x for x ≈ 8 ± 1, so the colour passes the nonlinearity almost linearly


def _carry(conv: torch.nn.Conv2d, *, average: bool = False, ref_bias: float | None = None) -> None:
    """Make `conv` pass channels 0-3 through unchanged (or 2×2-averaged for a Downsample conv), fed by nothing
    else; no other channel reads the reference. Other weights keep their random init, so they still learn."""
    w, b = conv.weight.data, conv.bias.data
    w[:_REF + 1] = 0
    b[:_REF + 1] = 0
    if w.shape[1] > _REF:  # (the encoder's conv_in reads pixels: no reference there yet)
        w[:, _REF] = 0
    k = w.shape[-1] // 2
    for c in _RGB + ([_REF] if ref_bias is None else []):
        if average:
            w[c, c, 0:2, 0:2] = 0.25  # Downsample pads right/bottom, so taps [0:2] never touch the padding
        else:
            w[c, c, k, k] = 1.0
    if ref_bias is not None:
        b[_REF] = ref_bias


@torch.no_grad()
def colour_path_init(model: VQGAN, sample: torch.Tensor) -> None:
    """Initialise the network as "8×8 mean colour → latent → nearest-upsampled colour", through taming's layers.

    Residual branches start at zero (identity blocks); channels 0-2 of the main path carry R, G, B, averaged by
    each Downsample and repeated by each Upsample; channel 3 is a large constant, so `norm_out` (one GroupNorm
    group) normalises every image by nearly the same statistics, which its affine scale/shift then undo (measured
    on `sample`). Without this the per-image GroupNorm erases each image's brightness and contrast, and a few
    hundred steps leave the network near the mean colour. The latent starts as the patch's mean colour (other
    dims zero), so the k-means++ codebook starts as a colour palette; training then adds edges and texture."""
    from ofa_scale.vqgan.blocks import Downsample, Upsample

    _zero_residual_branches(model)
    for m in model.modules():
        if isinstance(m, ResnetBlock) and hasattr(m, "nin_shortcut"):
            _carry(m.nin_shortcut)
        elif isinstance(m, (Downsample, Upsample)):
            _carry(m.conv, average=isinstance(m, Downsample))
    enc, dec = model.encoder, model.decoder
    _carry(enc.conv_in, ref_bias=_REF_VALUE)
    _carry(dec.conv_in, ref_bias=_REF_VALUE)
    for conv in (enc.conv_out, model.quant_conv, model.post_quant_conv, dec.conv_out):
        w, b = conv.weight.data, conv.bias.data
        w[:3] = 0
        b[:3] = 0
        for c in _RGB:
            w[c, c, w.shape[-1] // 2, w.shape[-1] // 2] = 1.0
    model.quant_conv.weight.data[3:] = 0  # the latent is the colour alone at first: k-means seeds a palette
    model.quant_conv.bias.data[3:] = 0
    model.post_quant_conv.weight.data[:, 3:] = 0
    dec.conv_out.weight.data[:, 3:] = 0
    for norm, conv in ((enc.norm_out, enc.conv_out), (dec.norm_out, dec.conv_out)):
        seen: list[tuple[float, float]] = []
        hook = norm.register_forward_hook(lambda _m, inp, _o: seen.append((inp[0].mean().item(),
                                                                           inp[0].std().item())))
        model.decode_latent(model.latent(sample))
        hook.remove()
        mean, std = seen[0]
        norm.weight.data[:_REF + 1] = 0
        norm.bias.data[:_REF + 1] = 0
        norm.weight.data[_RGB] = std
        norm.bias.data[_RGB] = mean + _SWISH_OFFSET
        conv.bias.data[:3] = -_SWISH_OFFSET


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def kmeans_pp(vectors: torch.Tensor, k: int, gen: torch.Generator, lloyd_steps: int = 10) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability ∝ squared distance to the nearest chosen one,
    so the codebook spreads over the latents instead of piling up where they are densest."""
    vectors = vectors.detach().float()
    first = int(torch.randint(len(vectors), (1,), generator=gen))
    centres = [vectors[first]]
    d2 = (vectors - centres[0]).pow(2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / len(d2))
        i = int(torch.multinomial(p, 1, generator=gen))
        centres.append(vectors[i])
        d2 = torch.minimum(d2, (vectors - vectors[i]).pow(2).sum(1))
    centres = torch.stack(centres)
    for _ in range(lloyd_steps):  # Lloyd refinement: each centre moves to the mean of the latents it wins
        near = torch.cdist(vectors, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, near, vectors)
        counts = torch.bincount(near, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def train_tiny(images: list[Image.Image], *, steps: int = 300, batch: int = 4, crop: int = 64, lr: float = 1e-3,
               seed: int = 0, config: VQGANConfig = TINY, warmup: float = 0.0, restart_every: int = 0,
               lloyd_steps: int = 0, log_every: int = 0, encoder_lr_scale: float = 0.0, ramp: float = 0.2) -> VQGAN:
    """Train `config` on random crops of `images`; returns the model in eval mode on the CPU. `ramp`: the share
    of `steps` whose learning rate rises linearly to `lr`; `warmup`: the share trained without quantisation (only
    useful when the encoder learns, `encoder_lr_scale` > 0)."""
    if steps < 1 or not images:
        raise UserError("training needs at least one step and one image")
    if crop % config.downsample_factor:
        raise UserError(f"--crop must be a multiple of {config.downsample_factor}")
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    tgen = torch.Generator().manual_seed(seed)
    data = np.stack([np.asarray(im.convert("RGB")) for im in images])
    model = VQGAN(config)
    colour_path_init(model, to_pixels(_random_crops(data, max(batch, 4), crop, gen)))
    codebook = model.quantize.embedding.weight
    # the encoder and codebook ("coder") may learn slower than the decoder, or not at all (scale 0, the default):
    # then the codes stay the colour path's k-means palette and the decoder learns to draw them
    coder = [p for n, p in model.named_parameters() if n.startswith(("encoder.", "quant_conv.", "quantize."))]
    ids = {id(p) for p in coder}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr}]
    if encoder_lr_scale > 0:
        groups.append({"params": coder, "lr": lr * encoder_lr_scale})
    else:
        for p in coder:  # (no backward through the encoder at all)
            p.requires_grad_(False)
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    # a linear ramp first (full-rate Adam steps on the zero-initialised residual branches first cost more than
    # the colour path's reconstruction gains), then cosine decay to zero
    ramp_steps = int(steps * ramp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (ramp_steps + 1))
                                              * 0.5 * (1.0 + np.cos(np.pi * min(i, steps) / steps)))
    usage = torch.zeros(config.n_embed)
    warm = int(steps * warmup)
    t0 = time.monotonic()
    for step in range(1, steps + 1):
        x = to_pixels(_random_crops(data, batch, crop, gen))
        z = model.latent(x)
        if step <= warm:  # a plain autoencoder first: the latents learn to carry the image before being quantised
            z_q, vq_loss = z, torch.zeros(())
            codes = torch.zeros(0, dtype=torch.long)
        else:
            if step == warm + 1:
                with torch.no_grad():  # codebook = k-means++ seeds of the encoder outputs of every whole image
                    seen = [_flat(model.latent(to_pixels(data[i:i + 16]))) for i in range(0, len(data), 16)]
                    codebook.copy_(kmeans_pp(torch.cat(seen), config.n_embed, tgen, lloyd_steps=lloyd_steps))
            codes = model.quantize.codes(z.detach())
            e = model.quantize.embed_codes(codes)
            # VQ-VAE: the codebook moves to its latents, the encoder commits to its codes (β), straight-through
            vq_loss = F.mse_loss(e, z.detach()) + config.beta * F.mse_loss(z, e.detach())
            z_q = z + (e - z).detach()
        rec = model.decode_latent(z_q)
        rec_loss = F.mse_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one odd crop batch must not undo the run
        opt.step()
        sched.step()
        usage += torch.bincount(codes.reshape(-1), minlength=config.n_embed)
        if log_every and step % log_every == 0:
            print(f"step {step}/{steps} reconstruction {rec_loss.item():.4f} vq {vq_loss.item():.4f} "
                  f"codes used {int((usage > 0).sum())} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
        if restart_every and step > warm and (step - warm) % restart_every == 0:
            if step < steps * 0.9:
                with torch.no_grad():  # codes nobody chose lately restart at random latents of this batch
                    dead = (usage == 0).nonzero().reshape(-1)
                    flat = _flat(z.detach())
                    if len(dead):
                        codebook[dead] = flat[torch.randint(len(flat), (len(dead),), generator=tgen)]
            usage.zero_()
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    from ofa_scale.cli import run_cli

    parser = argparse.ArgumentParser(prog="python -m ofa_scale.vqgan.train_tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for model.yaml + last.ckpt")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=64, help="sample scenes to train on")
    parser.add_argument("--eval-images", type=int, default=16, help="held-out scenes for the PSNR comparison")
    parser.add_argument("--batch", type=int, default=4, help="random crops per step")
    parser.add_argument("--crop", type=int, default=64, help="crop side in pixels (a multiple of 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay to 0)")
    parser.add_argument("--encoder-lr-scale", type=float, default=0.0,
                        help="learning rate of the encoder and codebook relative to --lr (default 0: they keep "
                             "the colour path and the k-means palette, only the decoder trains)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def go() -> int:
        t0 = time.monotonic()
        model = train_tiny(scene_images(args.train_images, args.seed), steps=args.steps, batch=args.batch,
                           crop=args.crop, lr=args.lr, seed=args.seed, log_every=50,
                           encoder_lr_scale=args.encoder_lr_scale)
        train_s = time.monotonic() - t0
        save_taming_checkpoint(model, args.out, global_step=args.steps)
        c = compare(model, scene_images(args.eval_images, args.seed + 1))
        print(f"trained {args.steps} steps in {train_s:.0f} s -> {args.out}")
        print(f"PSNR central 128x128 of {args.eval_images} held-out scenes (16x16 codes each): tiny VQGAN "
              f"{c.vqgan_psnr:.2f} dB ({model.n_embed} codes), colour quantiser {c.colour_psnr:.2f} dB (8192 "
              f"colours), ratio {c.ratio:.3f}")
        return 0

    return run_cli(go, "train_tiny")


if __name__ == "__main__":
    sys.exit(main())
