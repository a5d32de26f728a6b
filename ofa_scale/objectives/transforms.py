"""Image (+ box) transforms of OFA pretraining (spec §2.1) and box quantisation (spec §2.2).

Pixel work goes through `ofa_scale.data.image_ops` (crop-before-resample, uint8 tensors); this module adds the
box geometry that must follow the pixels exactly. Boxes are [x0, y0, x1, y1] floats in pixels.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
from PIL import Image

from ofa_scale.data.image_ops import ofa_resize_size, random_resize_center_crop, resize_region, to_uint8_tensor

Box = list[float]

# uint8 value of the image-infilling hole. OFA zeroes the *normalised* tensor (= 127.5 in pixel units); images
# travel as uint8 and are normalised on the device, so the hole is 128, i.e. 0.5/255 ≈ 0.0039 above OFA's 0.0
# after normalisation. The value is constant, so the model cannot read anything from it.
INFILL_FILL = 128


def vl_image(img: Image.Image, size: int, resize_min: int, resize_max: int, max_side: int,
             rng: random.Random) -> Image.Image:
    """Caption/VQA: random shorter side in [resize_min, resize_max], sides clipped to max_side, centre crop."""
    return random_resize_center_crop(img, tuple(range(resize_min, resize_max + 1)), max_side, size, rng)


def grounding_image(img: Image.Image, box: Box, size: int, resize_min: int, resize_max: int, max_side: int,
                    rng: random.Random) -> tuple[Image.Image, Box]:
    """Visual grounding: the same random resize applied to image and box, then OFA's ObjectCenterCrop.

    The crop is centred on the box centre and shifted to stay inside the image; the box is translated and
    clipped to the crop but never dropped. The crop offset is rounded to whole pixels (as PIL crops) and the
    box is translated by that same integer offset, so box and pixels agree exactly (OFA translates the box by
    the unrounded offset, up to 0.5 px off its own pixels).
    """
    w, h = img.size
    shorter = rng.randint(resize_min, resize_max)
    ow, oh = ofa_resize_size(w, h, shorter, max_side)
    rx, ry = ow / w, oh / h
    x0, y0, x1, y1 = box[0] * rx, box[1] * ry, box[2] * rx, box[3] * ry
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = max(cx - size / 2 + min(ow - cx - size / 2, 0), 0)
    top = max(cy - size / 2 + min(oh - cy - size / 2, 0), 0)
    left, top = int(round(left)), int(round(top))
    out = resize_region(img, (ow, oh), (left, top, left + size, top + size))
    return out, _clip([x0 - left, y0 - top, x1 - left, y1 - top], size, size)


def detection_image(img: Image.Image, boxes: Sequence[Box], size: int, rng: random.Random,
                    scale_min: float = 1.0, scale_max: float = 1.5) -> tuple[Image.Image, list[int], list[Box]]:
    """Detection: horizontal flip (p=0.5) then LargeScaleJitter to size×size.

    Returns (image, kept indices in input order, kept boxes). The shorter side is resized to round(u·size),
    u ~ U[scale_min, scale_max); a random size×size crop is taken; boxes are scaled, shifted, clipped and
    dropped when they end with zero width or height.
    """
    w, h = img.size
    boxes = [list(map(float, b)) for b in boxes]
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        boxes = [[w - b[2], b[1], w - b[0], b[3]] for b in boxes]
    u = rng.random() * (scale_max - scale_min) + scale_min
    target = round(u * size)
    scale = max(target / h, target / w)
    sh, sw = round(h * scale), round(w * scale)
    top = math.floor((sh - size) * rng.random())
    left = math.floor((sw - size) * rng.random())
    out = resize_region(img, (sw, sh), (left, top, left + size, top + size))
    rx, ry = sw / w, sh / h
    kept_idx, kept = [], []
    for i, b in enumerate(boxes):
        c = _clip([b[0] * rx - left, b[1] * ry - top, b[2] * rx - left, b[3] * ry - top], size, size)
        if c[2] > c[0] and c[3] > c[1]:
            kept_idx.append(i)
            kept.append(c)
    return out, kept_idx, kept


def infill_image(img: Image.Image, size: int, lo: int, hi: int) -> torch.Tensor:
    """Image infilling input: size×size (resized if the stored image differs) with the centre [lo, hi)² grey."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    t = to_uint8_tensor(img)
    t[:, lo:hi, lo:hi] = INFILL_FILL
    return t


def _clip(b: Box, w: float, h: float) -> Box:
    return [min(max(b[0], 0.0), w), min(max(b[1], 0.0), h), min(max(b[2], 0.0), w), min(max(b[3], 0.0), h)]


def quantise(coord: float, normaliser: float, num_bins: int) -> int:
    """Spec §2.2: bin = round(coord / normaliser · (num_bins − 1)), half to even like torch.round; clamped."""
    return min(max(int(round(coord / normaliser * (num_bins - 1))), 0), num_bins - 1)


def box_bins(box: Box, normaliser: float, num_bins: int) -> list[int]:
    """Bin indices of x0 y0 x1 y1."""
    return [quantise(c, normaliser, num_bins) for c in box]
