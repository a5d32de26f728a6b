"""One builder per pretraining task: raw record fields → example dicts (spec §2.3, §2.4; docs/interfaces.md §4).

Every random choice comes from `record_rng(seed, purpose)`: one independent stream per purpose, so enabling a
task or changing augmentation never shifts the draws of another (and a record always builds identically).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from PIL import Image

from ofa_scale.data.image_ops import to_uint8_tensor
from ofa_scale.errors import UserError
from ofa_scale.objectives.augment import random_augment
from ofa_scale.objectives.config import ObjectivesConfig, ScaledConstants
from ofa_scale.objectives.negatives import Negatives
from ofa_scale.objectives.text import pre_caption, pre_question, whole_word_mask
from ofa_scale.objectives.transforms import (box_bins, detection_image, grounding_image, infill_image,
                                             vl_image)

Example = dict[str, Any]

# Prompts, verbatim from OFA (spec §2.3 / §2.4).
CAPTION_PROMPT = " what does the image describe?"
ITM_CAPTION_PROMPT = ' does the image describe " {} "?'
ITM_QA_PROMPT = ' what is the answer to question " {} ". is " {} "?'
GROUNDING_PROMPT = ' which region does the text " {} " describe?'
GROUNDED_CAPTION_PROMPT = "  what does the region describe? region:"  # two leading spaces (token 1437 first)
TEXT_INFILL_PROMPT = ' what is the complete text of " "?'
IMAGE_INFILL_PROMPT = " what is the image in the middle part?"
DETECTION_PROMPT = " what are the objects in the image?"
YES, NO = " yes", " no"


def record_rng(seed: int, purpose: str) -> random.Random:
    """A stream for one purpose of one record (str seeds hash with SHA-512: stable across processes)."""
    return random.Random(f"{int(seed)}/{purpose}")


@dataclass
class BuildContext:
    """What the builders share: config, tokenizer, scaled constants, negatives and pre-encoded prompts."""

    cfg: ObjectivesConfig
    tok: Any
    negatives: Optional[Negatives] = None
    k: ScaledConstants = field(init=False)
    _ids: dict[str, list[int]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.k = self.cfg.scaled

    def ids(self, text: str) -> list[int]:
        """Encoded constant strings, cached (prompts and yes/no are encoded once per process)."""
        out = self._ids.get(text)
        if out is None:
            out = self._ids[text] = self.tok.encode(text)
        return out

    def bins(self, box: list[float]) -> list[int]:
        return [self.tok.bin_token(b) for b in box_bins(box, self.k.box_normaliser, self.cfg.num_bins)]


def make_example(ctx: BuildContext, task: str, src: list[int], tgt: list[int], image: Optional[torch.Tensor],
                 patch_mask: bool, conf: float, code_mask: bool = False) -> Example:
    tok = ctx.tok
    return {"task": task, "source": [tok.bos] + src + [tok.eos], "prev_output": [tok.bos] + tgt,
            "target": tgt + [tok.eos], "image": image, "patch_mask": patch_mask, "code_mask": code_mask,
            "conf": float(conf)}


# ------------------------------------------------------------------------------------------ image-text rows
def vl_image_tensor(ctx: BuildContext, img: Image.Image, seed: int) -> torch.Tensor:
    """Caption/VQA image: random resize + centre crop, then RandomAugment (when enabled)."""
    k, cfg = ctx.k, ctx.cfg
    out = vl_image(img, cfg.vl.image_size, k.resize_min, k.resize_max, k.max_side, record_rng(seed, "resize"))
    if cfg.random_augment and cfg.augment_ops:
        out = random_augment(out, record_rng(seed, "augment"), cfg.augment_ops, cfg.augment_magnitude,
                             k.translate_px)
    return to_uint8_tensor(out)


def caption_example(ctx: BuildContext, caption: str, dataset_name: str, image: torch.Tensor) -> Example:
    cfg, tok = ctx.cfg, ctx.tok
    tgt = tok.encode(" " + pre_caption(caption, cfg.max_tgt_words))
    ex = make_example(ctx, "caption", ctx.ids(CAPTION_PROMPT), tgt, image, True, 1.0)
    if dataset_name == "cc12m":
        # OFA ignores the first two target positions of CC12M captions (pad = ignored), then re-sets eos last.
        target = ex["target"]
        target[:2] = [tok.pad] * min(2, len(target))
        target[-1] = tok.eos
    return ex


def best_answer(answers: list[dict]) -> tuple[str, float]:
    """The highest-confidence answer (first one on ties; a repeated answer keeps its last confidence)."""
    ref: dict[str, float] = {}
    for a in answers:
        ref[str(a["answer"])] = float(a["conf"])
    if not ref:
        raise UserError("a qa record has no answers; reconvert the shards (the converter rejects such rows)")
    answer = max(ref, key=ref.__getitem__)
    return answer, ref[answer]


def vqa_example(ctx: BuildContext, question: str, answer: str, conf: float, image: torch.Tensor) -> Example:
    tok = ctx.tok
    return make_example(ctx, "vqa", tok.encode(" " + question), tok.encode(" " + answer), image, True, conf)


def itm_example(ctx: BuildContext, prompt: str, positive: bool, image: torch.Tensor, conf: float) -> Example:
    return make_example(ctx, "itm", ctx.tok.encode(prompt), ctx.ids(YES if positive else NO), image, True, conf)


def grounding_examples(ctx: BuildContext, caption: str, box: list[float], img: Image.Image,
                       seed: int) -> list[Example]:
    """Visual grounding (text → 4 bins) and grounded captioning (bins → text), sharing one image/box draw."""
    cfg, k, tok = ctx.cfg, ctx.k, ctx.tok
    out_img, out_box = grounding_image(img, box, cfg.vl.image_size, k.resize_min, k.resize_max, k.max_side,
                                       record_rng(seed, "resize"))
    image = to_uint8_tensor(out_img)
    region = ctx.bins(out_box)
    examples = []
    if cfg.enabled("grounding"):
        src = tok.encode(GROUNDING_PROMPT.format(pre_caption(caption, cfg.max_src_words)))
        examples.append(make_example(ctx, "grounding", src, list(region), image, True, 1.0))
    if cfg.enabled("grounded_caption"):
        tgt = tok.encode(" " + pre_caption(caption, cfg.max_tgt_words))
        examples.append(make_example(ctx, "grounded_caption", ctx.ids(GROUNDED_CAPTION_PROMPT) + region, tgt,
                                     image, True, 1.0))
    return examples


def vl_row_examples(ctx: BuildContext, meta: dict, img: Image.Image, seed: int) -> list[Example]:
    """A vision-language row → its main example plus, for caption/qa rows, the ITM example (spec §2.3)."""
    cfg = ctx.cfg
    kind = meta.get("type")
    if kind == "visual_grounding":
        if not (cfg.enabled("grounding") or cfg.enabled("grounded_caption")):
            return []
        if not meta.get("box") or len(meta["box"]) != 4:
            raise UserError(f"visual_grounding record {meta.get('uniq_id')!r} has no 4-number box; reconvert the "
                            f"shards with this ofa-scale")
        return grounding_examples(ctx, meta.get("caption", ""), [float(c) for c in meta["box"]], img, seed)
    if kind not in ("caption", "qa"):
        raise UserError(f"vl record {meta.get('uniq_id')!r} has type {kind!r}; expected caption, qa or "
                        f"visual_grounding (reconvert the shards)")
    main_task = "caption" if kind == "caption" else "vqa"
    if not (cfg.enabled(main_task) or cfg.enabled("itm")):
        return []
    image = vl_image_tensor(ctx, img, seed)
    examples = []
    if kind == "caption":
        caption = meta.get("caption", "")
        conf = 1.0
        if cfg.enabled("caption"):
            examples.append(caption_example(ctx, caption, meta.get("dataset_name", ""), image))
    else:
        question = pre_question(meta.get("question", ""), cfg.max_src_words)
        answer, conf = best_answer(meta.get("answers") or [])
        if cfg.enabled("vqa"):
            examples.append(vqa_example(ctx, question, answer, conf, image))
    if cfg.enabled("itm"):
        if ctx.negatives is None:
            raise UserError("the itm task needs negative samples; set the negatives directory (the shards' "
                            "negatives/ folder) or remove itm from objectives.tasks")
        positive = record_rng(seed, "itm").random() >= 1.0 - cfg.itm_positive_prob
        neg_rng = record_rng(seed, "negative")
        if kind == "caption":
            text = caption if positive else ctx.negatives.caption(caption, list(meta.get("gt_objects") or []),
                                                                  neg_rng)
            prompt = ITM_CAPTION_PROMPT.format(pre_caption(text, cfg.max_src_words))
        else:
            shown = answer if positive else ctx.negatives.answer(answer, conf, neg_rng)
            prompt = ITM_QA_PROMPT.format(question, shown)
        examples.append(itm_example(ctx, prompt, positive, image, conf))
    return examples


# -------------------------------------------------------------------------------------- auxiliary records
def text_infill_example(ctx: BuildContext, text: str, seed: int) -> Example:
    """Text infilling (spec §2.4): lowercase, first 512 → last 256 tokens, whole-word span masking."""
    cfg, tok = ctx.cfg, ctx.tok
    ids = encode_prefix(tok, " " + text.strip().lower(), cfg.text_read_tokens)[-cfg.text_keep_tokens:]
    full = [tok.bos] + ids + [tok.eos]
    masked = whole_word_mask(full, tok.word_start_mask(full).tolist(), cfg.mask_ratio, cfg.poisson_lambda,
                             tok.mask, record_rng(seed, "mask"))
    # OFA splices the masked text between prompt[:-2] and prompt[-2:]; encoding the two halves separately gives
    # the same ids with GPT-2 BPE (tested) and a sensible split with any other tokenizer.
    head, tail = TEXT_INFILL_PROMPT.rsplit(' "', 1)
    src = ctx.ids(head) + masked[1:-1] + ctx.ids(' "' + tail)
    return make_example(ctx, "text_infill", src, ids, None, False, cfg.uni_modal_conf)


def encode_prefix(tok: Any, text: str, max_tokens: int) -> list[int]:
    """The first `max_tokens` ids of `tok.encode(text)` without encoding a whole long document.

    Encodes growing prefixes cut just before a whitespace that follows a non-space character: neither BPE
    nor SentencePiece merges across that boundary, so the ids of the prefix are a prefix of the full ids.
    """
    limit = max(4096, 8 * max_tokens)
    while limit < len(text):
        cut = limit
        while cut > 0 and not (text[cut].isspace() and not text[cut - 1].isspace()):
            cut -= 1
        if cut > 0:
            ids = tok.encode(text[:cut])
            if len(ids) > max_tokens:
                return ids[:max_tokens]
        limit *= 4
    return tok.encode(text)[:max_tokens]


def image_infill_example(ctx: BuildContext, img: Image.Image, codes: list[int]) -> Example:
    """Image infilling (spec §2.4): centre square greyed, the 256 VQ codes of the centre as targets."""
    k, tok = ctx.k, ctx.tok
    image = infill_image(img, ctx.cfg.aux.image_size, k.infill_lo, k.infill_hi)
    tgt = [tok.code_token(int(c)) for c in codes]
    return make_example(ctx, "image_infill", ctx.ids(IMAGE_INFILL_PROMPT), tgt, image, True,
                        ctx.cfg.uni_modal_conf, code_mask=True)


def detection_example(ctx: BuildContext, img: Image.Image, objects: list[dict], seed: int) -> Example:
    """Detection (spec §2.4): flip + large-scale jitter; per surviving box in file order 4 bins + its name."""
    tok = ctx.tok
    boxes = [[float(c) for c in o["box"]] for o in objects]
    out_img, kept_idx, kept = detection_image(img, boxes, ctx.cfg.aux.image_size, record_rng(seed, "jitter"))
    tgt: list[int] = []
    for i, box in zip(kept_idx, kept):
        tgt += ctx.bins(box) + tok.encode(" " + str(objects[i]["cat_name"]))
    return make_example(ctx, "detection", ctx.ids(DETECTION_PROMPT), tgt, to_uint8_tensor(out_img), True,
                        ctx.cfg.uni_modal_conf)
