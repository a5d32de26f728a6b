"""Train a tiny nearest-code VQGAN (f = 8) on the sample corpus' shape scenes, and measure it.

`python -m ofa_scale.vqgan.train_tiny --out DIR [--steps 300]` writes DIR/model.yaml + DIR/last.ckpt (taming
layout, so `load_vqgan` and `ofa-preprocess image-codes --vqgan DIR` take it) and prints the reconstruction PSNR
of the central 128×128 of held-out scenes next to the colour quantiser the sample corpus uses without a VQGAN.

It is a VQGAN without the GAN: reconstruction (MSE) + commitment loss, codebook vectors as EMA means of their
latents, the VQ-VAE objective; the adversarial and perceptual terms matter for sharp natural photos at scale, not
here. Tricks for a short run: residual branches start at zero, a plain-autoencoder warm-up precedes quantisation,
the codebook starts from encoder outputs (taming's near-zero uniform init maps every latent to one code), unused
codes restart at random current latents, and the learning rate decays to zero.

Status (measured on CPU): 300-2000 steps reach ~15-17.5 dB on held-out scenes; the per-image mean colour gives
17.3 dB and the colour quantiser's codes 23.3 dB, so this tiny model does NOT yet beat the stand-in. Diagnosis so
far: at init the decoder's output barely depends on its input (std over a batch ~5e-5): through ~10 plain convs
with PyTorch's default init the signal shrinks below the bias-made constant pattern, and the final per-image
GroupNorm then normalises that pattern, so training sits at the mean-colour plateau for hundreds of steps.
Re-initialising the convs (unit-gain weights, zero biases) alone did not fix it.
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
from PIL import Image

from ofa_scale.errors import UserError
from ofa_scale.vqgan.blocks import AttnBlock, ResnetBlock
from ofa_scale.vqgan.checkpoint import save_taming_checkpoint
from ofa_scale.vqgan.config import DDConfig, VQGANConfig
from ofa_scale.vqgan.images import centre_pixels, psnr, to_pixels
from ofa_scale.vqgan.model import VQGAN

# 16·(1,2,2,4) channels, one block per level, no attention but the middle one, and still f = 8, so its codes have
# OFA's grids (16×16 for the 128×128 infilling centre, 32×32 for a 256×256 image). One GroupNorm group: with
# taming's 32 groups over 16 channels every channel is normalised alone, which erases the colour of a flat crop.
TINY = VQGANConfig(quantizer="vq", n_embed=1024, embed_dim=32,
                   ddconfig=DDConfig(ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(),
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
    """Start every residual block and attention as the identity (last conv zeroed, the usual "zero-γ" init): the
    untrained network is then a short conv stack that already passes colours through, and a few hundred steps
    go into detail instead of into undoing a random deep stack."""
    for m in model.modules():
        last = m.conv2 if isinstance(m, ResnetBlock) else m.proj_out if isinstance(m, AttnBlock) else None
        if last is not None:
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)


class _EmaCodebook:
    """Codebook vectors as running means of the latents assigned to them (VQ-VAE-2's EMA update), steadier than
    the codebook loss over a short run."""

    def __init__(self, weight: torch.Tensor, decay: float):
        self.weight, self.decay = weight, decay
        self.count = torch.ones(weight.shape[0])
        self.total = weight.detach().clone()

    @torch.no_grad()
    def update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        onehot = torch.nn.functional.one_hot(codes.reshape(-1), self.weight.shape[0]).to(flat.dtype)
        self.count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.total.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        self.weight.copy_(self.total / self.count.clamp_min(1e-5)[:, None])

    @torch.no_grad()
    def restart(self, dead: torch.Tensor, vectors: torch.Tensor) -> None:
        self.weight[dead] = vectors
        self.total[dead] = vectors
        self.count[dead] = 1.0


def train_tiny(images: list[Image.Image], *, steps: int = 300, batch: int = 4, crop: int = 64, lr: float = 3e-3,
               seed: int = 0, config: VQGANConfig = TINY, restart_every: int = 25, continuous_warmup: float = 0.3,
               ema_decay: float = 0.9,
               log_every: int = 0) -> VQGAN:
    """Train `config` on random crops of `images`; returns the model in eval mode on the CPU."""
    if steps < 1 or not images:
        raise UserError("training needs at least one step and one image")
    if crop % config.downsample_factor:
        raise UserError(f"--crop must be a multiple of {config.downsample_factor}")
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    data = np.stack([np.asarray(im.convert("RGB")) for im in images])
    model = VQGAN(config)
    _zero_residual_branches(model)
    quant = model.quantize
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    # cosine decay to zero: a short run ends on small steps instead of on its noisiest ones
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + np.cos(np.pi * min(i, steps) / steps)))
    usage = torch.zeros(config.n_embed)
    warm = int(steps * continuous_warmup)
    t0 = time.monotonic()
    for step in range(1, steps + 1):
        if step == warm + 1:
            with torch.no_grad():  # data-dependent codebook init: codes start where the latents are
                z = model.latent(to_pixels(_random_crops(data, 4 * batch, crop, gen)))
                flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                quant.embedding.weight.copy_(flat[torch.randint(len(flat), (config.n_embed,))])
                ema = _EmaCodebook(quant.embedding.weight, ema_decay)
        x = to_pixels(_random_crops(data, batch, crop, gen))
        z = model.latent(x)
        if step <= warm:  # a plain autoencoder first: the latents learn to carry the image before being quantised
            z_q, qloss, codes = z, torch.zeros(()), torch.zeros(0, dtype=torch.long)
        else:
            codes = quant.codes(z.detach())
            ema.update(z.detach(), codes)
            z_q = quant.embed_codes(codes)
            qloss = config.beta * torch.nn.functional.mse_loss(z, z_q.detach())  # commitment only: EMA moves codes
            z_q = z + (z_q - z).detach()
        rec = model.decode_latent(z_q)
        rec_loss = torch.nn.functional.mse_loss(rec, x)
        loss = rec_loss + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(codes.reshape(-1), minlength=config.n_embed)
        if log_every and step % log_every == 0:
            print(f"step {step}/{steps} reconstruction {rec_loss.item():.4f} codebook {qloss.item():.4f} "
                  f"codes used {int((usage > 0).sum())} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
        if step > warm and step % restart_every == 0 and step < steps * 0.8:
            with torch.no_grad():  # dead codes restart at random latents of this batch
                dead = (usage == 0).nonzero().reshape(-1)
                flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                if len(dead):
                    ema.restart(dead, flat[torch.randint(len(flat), (len(dead),))])
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
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def go() -> int:
        t0 = time.monotonic()
        model = train_tiny(scene_images(args.train_images, args.seed), steps=args.steps, batch=args.batch,
                           crop=args.crop, lr=args.lr, seed=args.seed, log_every=50)
        train_s = time.monotonic() - t0
        save_taming_checkpoint(model, args.out, global_step=args.steps)
        c = compare(model, scene_images(args.eval_images, args.seed + 1))
        print(f"trained {args.steps} steps in {train_s:.0f} s -> {args.out}")
        print(f"PSNR central 128x128 of {args.eval_images} held-out scenes: tiny VQGAN {c.vqgan_psnr:.2f} dB, "
              f"colour quantiser {c.colour_psnr:.2f} dB, ratio {c.ratio:.3f}")
        return 0

    return run_cli(go, "train_tiny")


if __name__ == "__main__":
    sys.exit(main())
