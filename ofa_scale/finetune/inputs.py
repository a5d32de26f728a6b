"""Pieces the generation-based task modules share (caption, refcoco): the finetuning image transform, the TSV id
type, source lengths, and batched beam search over evaluation items with the task's decoding preset.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from ofa_scale.data.image_ops import to_uint8_tensor
from ofa_scale.errors import UserError
from ofa_scale.evaluation.generation import batch_inputs
from ofa_scale.finetune.config import DecodingSection
from ofa_scale.finetune.task import EvalItem, Lockstep
from ofa_scale.finetune.text_inputs import text_batch
from ofa_scale.model.generate import GenerationConfig, generate
from ofa_scale.objectives.batching import normalise_images

# Fixed-shape budget for text measured in words (OFA's max_src_length / max_tgt_length count words, the batch
# counts tokens): GPT-2 BPE splits the lower-case words of captions and expressions into 1.1-1.3 tokens on
# average, so 2 per word truncates essentially nothing (the Collator counts what it cuts).
TOKENS_PER_WORD = 2

# A decimal id without leading zeros round-trips through int, as COCO's image ids do.
_INT_ID = re.compile(r"0|[1-9][0-9]*")


def square_image(image: Optional[Image.Image], size: int, record_id: Any) -> torch.Tensor:
    """OFA's finetuning transform (spec §7.1-§7.3): `Resize((S, S))` bicubic, aspect ratio not kept, no
    augmentation; uint8 3×S×S (normalised on the device)."""
    if image is None:
        raise UserError(f"record {record_id!r} has no image; reconvert the shards with `ofa-preprocess shards`")
    return to_uint8_tensor(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def tsv_id(value: Any) -> int | str:
    """A TSV id as results files carry it: an int when it is a plain decimal number (COCO image ids), else the
    string itself (ids with letters or leading zeros stay strings so they round-trip exactly)."""
    text = str(value)
    return int(text) if _INT_ID.fullmatch(text) else text


def generation_config(decoding: DecodingSection, **overrides: Any) -> GenerationConfig:
    """The task's `task.decoding` preset as a GenerationConfig returning the best hypothesis only."""
    fields = dict(beam_size=decoding.beam, max_len_a=decoding.max_len_a, max_len_b=decoding.max_len_b,
                  min_len=decoding.min_len, no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                  unnormalized=decoding.unnormalized, lenpen=decoding.lenpen, nbest=1)
    fields.update(overrides)
    cfg = GenerationConfig(**fields)
    cfg.validate()
    return cfg


def best_tokens(model: torch.nn.Module, items: Sequence[EvalItem], cfg: GenerationConfig, *, pad: int,
                eos: int, batch_size: int, device: torch.device, dtype: torch.dtype,
                lockstep: Optional[Lockstep]) -> list[torch.Tensor]:
    """Beam search over `items` in batches of `batch_size`: the best hypothesis' tokens (no bos, eos last) per
    item, in order. A sample without any finished hypothesis gets [eos] (an empty prediction). `lockstep`
    (distributed evaluation) keeps this rank's decoder stepping until every rank's batch is done; the caller
    gives every rank the same number of items, hence of batches."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = batch_inputs(chunk, pad)
            masks = batch["patch_masks"].to(device)
            inputs = {"src_tokens": batch["src_tokens"].to(device), "patch_masks": masks,
                      # normalised here, in the model's dtype (generate would normalise to fp32)
                      "patch_images": normalise_images(batch["patch_images"].to(device), masks, dtype)
                      } if chunk[0].image.numel() else text_batch(chunk, pad, device)  # text-only (Gigaword)
            hyps = generate(model, inputs, cfg, lockstep=lockstep)
            out.extend(h[0].tokens.cpu() if h else torch.tensor([eos]) for h in hyps)
    return out


def check_pairs(predictions: Sequence[dict], items: Sequence[EvalItem]) -> None:
    """score() pairs predictions and items by position; a mismatch would score against the wrong references."""
    if len(predictions) != len(items) or any(p.get("id") != i.id for p, i in zip(predictions, items)):
        raise UserError(f"{len(predictions)} predictions do not pair with the {len(items)} evaluation items in "
                        f"order; pass predict()'s output for the same items")
