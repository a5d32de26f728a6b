"""What the text-only finetuning tasks share (Gigaword spec §7.7, GLUE §7.8): OFA runs them without any image
(`patch_images` is None, the ResNet never runs), so their evaluation batches carry `src_tokens` only and their
evaluation items an empty image.

Training examples carry no image either ("image": None, "patch_mask": False); the fixed-shape Collator then fills
the row with its dummy image and marks it as padding, so the encoder attends to the text alone, as in OFA. Their
recipes use the smallest `task.image_size` (16) to keep that dummy cheap and freeze the ResNet
(`train.freeze_resnet`), which OFA's text tasks never update.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ofa_scale.evaluation.generation import batch_inputs
from ofa_scale.finetune.task import EvalItem

# The image of a text-only EvalItem (evaluate.py drops images the same way before gathering items).
NO_IMAGE = torch.empty(0, dtype=torch.uint8)
NO_IMAGE_SIZE = (0, 0)


def glue_sentence(text: str, max_words: int) -> str:
    """OFA's GLUE sentence normalisation (data/nlu_data/*_dataset.py): lower-case, whitespace runs collapsed,
    the first `max_words` words; punctuation is kept (unlike pre_caption)."""
    return " ".join(text.lower().strip().split()[:max_words])


def text_batch(items: Sequence[EvalItem], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs of text-only items: right-padded `src_tokens` only (none: an empty batch of that layout)."""
    if not items:
        return {"src_tokens": torch.full((0, 2), pad, dtype=torch.long, device=device)}
    return {"src_tokens": batch_inputs(items, pad)["src_tokens"].to(device)}
