"""ImageNet-1K images (spec §7.5): OFA's training augmentation built from timm, the evaluation resize, and the
ImageNet mean/std normalisation.

Training, as OFA's data/cv_data/image_classify_dataset.py composes it: timm's
`create_transform(S, is_training=True, color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1',
interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1, mean/std ImageNet)`, i.e. RandomResizedCrop(S)
bicubic + horizontal flip, then timm's RandAugment (timm switches colour jitter off under RandAugment), with OFA's
RandomAugment(2, 7) (objectives/augment.py, spec §2.1's op list) inserted after RandAugment, then timm's
ToTensor, Normalize(ImageNet mean/std) and RandomErasing(0.25, per-pixel normal noise).
Evaluation: Resize((S, S)) bicubic (finetune/inputs.square_image).

Images travel from the loader to the device as uint8 (objectives/batching.Collator) and are normalised there with
ImageNet's mean/std (`normalise_images`). So the training pipeline runs timm's own final stage and maps its output
back to pixels: exact for every pixel RandomErasing leaves alone; an erased pixel (normal noise in normalised
units) is rounded to the nearest pixel value and clipped to [0, 255], so noise beyond about ±2.1 standard
deviations saturates.

Randomness: timm draws from Python's `random`, numpy's and torch's global generators. Each image's draws come from
its record's seed (the loader's per-record seed) inside saved-and-restored global states: an example is the same
for the same seed (resumable runs), and the process's own random streams (dropout on CPU) are left untouched.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from ofa_scale.finetune.inputs import square_image
from ofa_scale.objectives.augment import random_augment
from ofa_scale.objectives.builders import record_rng

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # OFA --imagenet-default-mean-and-std (timm's IMAGENET_DEFAULT_*)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
# OFA's RandomAugment(2, 7): translate ±10 px at magnitude 10 on its 480-px images; scaled with the image size
OFA_IMAGE_SIZE = 480
RANDOM_AUGMENT_OPS, RANDOM_AUGMENT_MAGNITUDE, RANDOM_AUGMENT_TRANSLATE_PX = 2, 7, 10.0


def timm_train_stages(size: int):
    """timm's (primary, secondary, final) training transforms with OFA's arguments."""
    from timm.data import create_transform  # imported here: only training needs timm

    return create_transform(size, is_training=True, color_jitter=0.4, auto_augment=RAND_AUGMENT,
                            interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD, separate=True)


@contextlib.contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's (CPU) global generators seeded from `seed`, restored afterwards."""
    rng = record_rng(seed, "timm")
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(rng.getrandbits(64))
        np.random.seed(rng.getrandbits(32))
        torch.manual_seed(rng.getrandbits(63))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def to_pixels(normalised: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) ImageNet-normalised float image back to uint8 pixels (rounded, clipped)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (normalised.float() * std + mean).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


class TrainTransform:
    """PIL image + record seed -> uint8 3×S×S: timm's pipeline with OFA's RandomAugment (module docstring)."""

    def __init__(self, size: int):
        self.size = size
        self.primary, self.secondary, self.final = timm_train_stages(size)
        self.translate_px = RANDOM_AUGMENT_TRANSLATE_PX * size / OFA_IMAGE_SIZE

    def pil_stages(self, image: Image.Image, seed: int) -> Image.Image:
        """The PIL part: crop + flip, RandAugment, OFA's RandomAugment (the caller holds `seeded_globals`)."""
        out = self.secondary(self.primary(image.convert("RGB")))
        return random_augment(out, record_rng(seed, "augment"), RANDOM_AUGMENT_OPS, RANDOM_AUGMENT_MAGNITUDE,
                              self.translate_px)

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        with seeded_globals(seed):
            normalised = self.final(self.pil_stages(image, seed))  # ToTensor, Normalize, RandomErasing
        return to_pixels(normalised)


def eval_pixels(image: Optional[Image.Image], size: int, record_id=None) -> torch.Tensor:
    """OFA's evaluation transform before normalisation: Resize((S, S)) bicubic, uint8 3×S×S."""
    return square_image(image, size, record_id)


def normalise_images(images: torch.Tensor, patch_masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B,3,H,W) → ToTensor + Normalize(ImageNet mean/std) in fp32, then `dtype`; rows without an image
    (patch_mask False) become exactly 0, as objectives.batching.normalise_images makes them."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    out = images.float().div_(255.0).sub_(mean).div_(std)
    out.masked_fill_(~patch_masks.bool().view(-1, 1, 1, 1), 0.0)
    return out.to(dtype)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RAND_AUGMENT", "TrainTransform", "eval_pixels", "normalise_images",
           "seeded_globals", "timm_train_stages", "to_pixels"]
