"""Fast image helpers for the loader and the objectives' transforms.

Three levers make the shard path several times faster than OFA's TSV path (see benchmarks/data_throughput.py):
- `decode_rgb(..., min_size=)` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (Pillow's `draft`) when the stored
  photo is much larger than any transform needs;
- `random_resize_center_crop` resamples only the pixels that survive the crop (`Image.resize(box=...)`) instead of
  resizing the whole image and throwing most of it away;
- `to_uint8_tensor` hands uint8 to the trainer; normalisation to [-1, 1] happens on the device.
- `random_resize_center_crop_tensor` does the same resize with torch's antialiased uint8 bicubic kernel (the
  Pillow filter, vectorised: several times faster than Pillow's own on a plain build) and returns the tensor.
"""

from __future__ import annotations

import io
import math
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# OFA pretraining (spec §2.1): shorter side drawn from 384..480, each side clipped to 672, centre crop 384.
OFA_SHORTER_CHOICES = tuple(range(384, 481))
OFA_MAX_SIDE = 672
OFA_CROP = 384


def decode_rgb(data: bytes, min_size: int | None = None) -> tuple[Image.Image, int]:
    """Decode image bytes to an RGB image; returns (image, reduction factor).

    With `min_size`, a JPEG whose shorter side is at least twice `min_size` is decoded at a reduced scale
    (factor 2, 4 or 8) chosen so the decoded shorter side is still >= min_size. The factor is returned so the
    caller can rescale boxes (pixel x in the original maps to x / factor). PNGs are always decoded in full.
    """
    img = Image.open(io.BytesIO(data))
    factor = 1
    if min_size and img.format == "JPEG":
        w, h = img.size
        short = min(w, h)
        if short >= 2 * min_size:
            # Ask for the smallest size whose shorter side is still >= min_size; Pillow picks the largest DCT
            # reduction that keeps both sides at least this big.
            want = (max(1, math.ceil(w * min_size / short)), max(1, math.ceil(h * min_size / short)))
            result = img.draft("RGB", want)
            if result is not None:
                factor = max(1, round(w / img.size[0]))
    if img.mode != "RGB":
        img = img.convert("RGB")
    else:
        img.load()
    return img, factor


def ofa_resize_size(width: int, height: int, shorter: int, max_side: int | None) -> tuple[int, int]:
    """Output (width, height) of OFA's aspect-preserving resize to shorter side `shorter`.

    The longer side is scaled by the aspect ratio and truncated to an int; then each side is clipped to
    `max_side` independently (as OFA's transform does, which can distort the aspect ratio of very long images).
    """
    if width < height:
        ow, oh = shorter, int(shorter * height / width)
    else:
        oh, ow = shorter, int(shorter * width / height)
    if max_side is not None:
        ow, oh = min(ow, max_side), min(oh, max_side)
    return ow, oh


def center_crop_offsets(width: int, height: int, crop: int) -> tuple[int, int]:
    """(left, top) of a centred crop, rounded as torchvision's CenterCrop rounds them."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def resize_region(
    img: Image.Image,
    resized_size: tuple[int, int],
    region: tuple[int, int, int, int],
    resample: int = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Equivalent of `img.resize(resized_size).crop(region)` that only resamples the pixels of `region`.

    `region` (left, top, right, bottom) is in the coordinates of the resized image and must lie inside it.
    """
    sx = img.width / resized_size[0]
    sy = img.height / resized_size[1]
    left, top, right, bottom = region
    box = (left * sx, top * sy, right * sx, bottom * sy)
    return img.resize((right - left, bottom - top), resample, box=box)


def random_resize_center_crop(
    img: Image.Image,
    shorter_choices: Sequence[int] = OFA_SHORTER_CHOICES,
    max_side: int | None = OFA_MAX_SIDE,
    crop: int = OFA_CROP,
    rng: random.Random | None = None,
) -> Image.Image:
    """OFA's image-text transform steps 1-2 (spec §2.1): random shorter side, clip sides, bicubic, centre crop.

    The crop is applied before resampling (see `resize_region`). If a resized side is smaller than `crop`, that
    side is padded with black as torchvision's CenterCrop does.
    """
    return _resize_center_crop(img, *_draw_layout(img, shorter_choices, max_side, crop, rng), crop)


def _resize_center_crop(img: Image.Image, ow: int, oh: int, left: int, top: int, crop: int) -> Image.Image:
    if left >= 0 and top >= 0:
        return resize_region(img, (ow, oh), (left, top, left + crop, top + crop))
    # Rare: an output side below the crop size; like CenterCrop, pad that side with black, centred.
    resized = img.resize((ow, oh), Image.Resampling.BICUBIC)
    x0, y0 = max(left, 0), max(top, 0)
    part = resized.crop((x0, y0, x0 + min(crop, ow), y0 + min(crop, oh)))
    canvas = Image.new("RGB", (crop, crop))
    canvas.paste(part, (max(crop - ow, 0) // 2, max(crop - oh, 0) // 2))
    return canvas


def _draw_layout(img: Image.Image, shorter_choices: Sequence[int], max_side: int | None, crop: int,
                 rng: random.Random | None) -> tuple[int, int, int, int]:
    rng = rng or random.Random()
    shorter = shorter_choices[rng.randrange(len(shorter_choices))]
    ow, oh = ofa_resize_size(img.width, img.height, shorter, max_side)
    left, top = center_crop_offsets(ow, oh, crop)
    return ow, oh, left, top


def resize_crop_tensor(img: Image.Image, resized_size: tuple[int, int],
                       region: tuple[int, int, int, int]) -> torch.Tensor:
    """3xHxW uint8 tensor of `img.resize(resized_size, BICUBIC).crop(region)`, resampled by torch.

    The HxWx3 pixel array viewed as NCHW is already channels-last, which is the layout torch's uint8
    antialiased kernel is fastest on; only the cropped region is copied out.
    """
    x = torch.from_numpy(np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8))
    x = x.permute(2, 0, 1).unsqueeze(0)
    if (img.width, img.height) != tuple(resized_size):
        x = F.interpolate(x, size=(resized_size[1], resized_size[0]), mode="bicubic", antialias=True,
                          align_corners=False)
    left, top, right, bottom = region
    return x[0, :, top:bottom, left:right].contiguous()


def random_resize_center_crop_tensor(
    img: Image.Image,
    shorter_choices: Sequence[int] = OFA_SHORTER_CHOICES,
    max_side: int | None = OFA_MAX_SIDE,
    crop: int = OFA_CROP,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """`random_resize_center_crop` straight to a 3 x crop x crop uint8 tensor (same RNG draw, same pixels
    within rounding); for pipelines whose next step is the tensor (no PIL augmentation after the crop)."""
    ow, oh, left, top = _draw_layout(img, shorter_choices, max_side, crop, rng)
    if left >= 0 and top >= 0:
        return resize_crop_tensor(img, (ow, oh), (left, top, left + crop, top + crop))
    return to_uint8_tensor(_resize_center_crop(img, ow, oh, left, top, crop))


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """3xHxW uint8 tensor (no normalisation: the trainer does `(x/255 - 0.5)/0.5` on the device)."""
    arr = np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # one writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
