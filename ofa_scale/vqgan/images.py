"""Pixels in and out of the VQGAN, as OFA prepares and renders them (spec §10.5.4–§10.5.5).

In: RGB → (resize, centre crop) → [0, 1] → 2x − 1. Out: clamp to [−1, 1] → (x + 1)/2 · 255 → *truncating*
uint8 (OFA's `astype(uint8)`, not rounding).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ofa_scale.errors import UserError


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision's `Resize(int)` on a PIL image with LANCZOS: shorter side → `size`, the longer side truncated
    to keep the aspect ratio (what OFA's generate_code.py applies); a no-op when already that size."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, Image.Resampling.LANCZOS)


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's `CenterCrop(size)` offsets (rounded half-differences)."""
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def square_image(img: Image.Image, size: int = 256) -> Image.Image:
    """RGB, shorter side `size`, centre-cropped to size×size. OFA resizes without cropping, which gives
    non-square code grids for non-square photos that image generation cannot use (spec §10.10 pitfall 7);
    cropping keeps every row at exactly (size/8)² codes."""
    return centre_crop(resize_shorter_side(img.convert("RGB"), size), size)


INFILL_IMAGE_SIZE = 256
CENTRE = slice(64, 192)  # the central 128×128 of a 256×256 image, whose 16×16 codes image_examples rows carry


def centre_pixels(img: Image.Image) -> np.ndarray:
    """uint8 (128, 128, 3): the central 128×128 of a 256×256 image (spec §1.3; crop rows/cols [64, 192))."""
    arr = np.asarray(img.convert("RGB"))
    if arr.shape[:2] != (INFILL_IMAGE_SIZE, INFILL_IMAGE_SIZE):
        raise UserError(f"image_examples images must be 256x256, got {arr.shape[1]}x{arr.shape[0]}")
    return arr[CENTRE, CENTRE]


def to_pixels(images, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float (N, 3, H, W) in [−1, 1] on `device` from: a sequence of same-size PIL images, a uint8 array/tensor
    (N, H, W, 3) (what `decode` returns), or a float tensor (N, 3, H, W) already in [−1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise UserError("no images to encode")
        if not all(isinstance(im, Image.Image) for im in images):
            raise UserError("encode takes PIL images, a uint8 (N, H, W, 3) array, or a float (N, 3, H, W) tensor")
        sizes = {im.size for im in images}
        if len(sizes) != 1:
            raise UserError(f"images of one batch must share a size (got {sorted(sizes)}); use square_image() first")
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise UserError(f"cannot encode a {type(images).__name__}; pass PIL images or a tensor")
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"uint8 images must be (N, H, W, 3), got {tuple(images.shape)}")
        return images.to(device).permute(0, 3, 1, 2).float().div(255.0).mul(2.0).sub(1.0)
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise UserError(f"float images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)} {images.dtype}")
    return images.to(device=device, dtype=torch.float32)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output (N, 3, H, W) → uint8 (N, H, W, 3) on the CPU, truncating like OFA."""
    x = (pixels.detach().float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def to_pil(images: torch.Tensor | np.ndarray) -> list[Image.Image]:
    """uint8 (N, H, W, 3) → PIL RGB images."""
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return [Image.fromarray(a, "RGB") for a in arr]


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two uint8-range images (any shape), over all their pixels."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def flat_seeds(seed: int, indices: Sequence[int]) -> list[int]:
    """Per-image Gumbel seeds for images at global positions `indices` (independent of batching)."""
    return [(int(seed) * 1_000_003 + int(i)) % (2 ** 63) for i in indices]


__all__ = ["centre_pixels", "INFILL_IMAGE_SIZE", "resize_shorter_side", "centre_crop", "square_image", "to_pixels",
           "to_uint8", "to_pil", "psnr",
           "flat_seeds"]
