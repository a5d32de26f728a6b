"""RandomAugment(N=2, M=7) for caption/VQA images (spec §2.1 step 3), on PIL images.

OFA (via ALBEF) draws N ops with replacement from the list below and applies each with probability 0.5 at
magnitude M/10: enhance factor 0.1 + 1.8·M/10, shear ±0.3·M/10, translate ±translate_px·M/10, rotate ±30·M/10
degrees, fill colour (128, 128, 128). OFA implements the ops with OpenCV on numpy arrays; here they are PIL ops
with the same geometry and magnitudes (pixel values can differ by interpolation rounding).

Randomness comes from the caller's `random.Random` (seeded per record). OFA re-seeds numpy identically for
every sample of an epoch, so all its images of one epoch get the same ops; that is an accident of
`numpy_seed(seed, epoch)`, not a design, and it is deliberately not reproduced: each record draws its own ops
(still deterministic for the record's seed, hence resumable).
"""

from __future__ import annotations

import random

from PIL import Image, ImageEnhance, ImageOps

OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
       "TranslateY", "Rotate")
FILL = (128, 128, 128)
MAX_LEVEL = 10.0


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() > 0.5 else value


def apply_op(img: Image.Image, name: str, magnitude: float, translate_px: float, rng: random.Random) -> Image.Image:
    level = magnitude / MAX_LEVEL
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(0.1 + 1.8 * level)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(0.1 + 1.8 * level)
    if name in ("ShearX", "ShearY"):
        s = _signed(0.3 * level, rng)
        data = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=FILL)
    if name in ("TranslateX", "TranslateY"):
        t = _signed(translate_px * level, rng)
        data = (1, 0, t, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, t)
        return img.transform(img.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=FILL)
    if name == "Rotate":
        deg = _signed(30.0 * level, rng)
        return img.rotate(deg, Image.Resampling.BILINEAR, fillcolor=FILL)
    raise ValueError(f"unknown RandomAugment op {name!r}")


def random_augment(img: Image.Image, rng: random.Random, num_ops: int = 2, magnitude: float = 7,
                   translate_px: float = 10.0, ops: tuple[str, ...] = OPS) -> Image.Image:
    """Draw `num_ops` ops with replacement; apply each with probability 0.5."""
    chosen = [ops[rng.randrange(len(ops))] for _ in range(num_ops)]
    for name in chosen:
        if rng.random() > 0.5:
            continue
        img = apply_op(img, name, magnitude, translate_px, rng)
    return img
