"""OFA-OCR, Chinese text recognition (spec §10.2): `ocr_resize` images, the "what are the texts" prompt, beam
search, line accuracy and NED.

Records come from `ofa-preprocess shards --format ocr` (OFA's `uniq_id, image, text` TSV, spec §10.2.1): meta
`text` (the line's transcription). As in OFA, the tokenizer picks the branch: the `bert` tokenizer (OFA-CN, the
recipes) gives the Chinese prompt and character truncation, any other OFA's GPT-2 branch (English prompt, word
truncation); `task.language: zh` additionally insists on the bert tokenizer. Task knob (`task.extra`):
`is_document` (bool, default false), OFA's document resizing.

Reproduced from OFA (ocr_dataset.py, tasks/mm_tasks/ocr.py), and the conscious changes:
* Text: NFKC of zhconv's traditional→simplified conversion, lower-cased; zh keeps the first `max_tgt_length`
  characters, en the first `max_tgt_length` words. Target = BPE(" " + text) + eos; no constraint mask.
* Image: see `ocr_resize`. OFA draws the padding offset from Python's unseeded `random`, even at evaluation; here
  training draws it from the record's seed (reproducible, resumable) and evaluation from the item id, so a
  checkpoint scores the same every run.
* Scoring: hypothesis and reference are tokenizer-decoded with every space removed; the reference is the decoded
  *target* (normalised, truncated, lower-cased), as OFA decodes `sample["target"]`. accuracy = exact line match;
  ned = 1 − mean(Levenshtein / max(len)), 0 distance when both are empty (OFA divides by zero there).
"""

from __future__ import annotations

import random
import unicodedata
import zlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.finetune.inputs import TOKENS_PER_WORD, best_tokens, check_pairs, generation_config, tsv_id
from ofa_scale.finetune.prompts_cn import task_prompt
from ofa_scale.finetune.task import EvalItem, Example, FinetuneTask, Lockstep

MIN_SIDE = 64  # ocr_resize never shrinks a side below 64 px
DOCUMENT_SIZE = 480  # is_document: 64×1920 cut into 4 rows of 480 px → 256×480, padded to the 480-px square
DOCUMENT_ROWS = 4


def ocr_resize(img: Image.Image, size: int, rng: random.Random, is_document: bool = False) -> Image.Image:
    """OFA's `ocr_resize` (spec §10.2.2) → an RGB size×size image.

    Lines: fit the longer side to `size` keeping the aspect ratio (the other side int(size·short/long), at least
    64 px), bicubic, then replicate the border pixels to a square; the line sits at a random offset along the
    padded axis. Documents (size 480 only): bicubic to 64×1920, cut into 4 pieces of 480 px stacked top to
    bottom (256×480), edge-padded above and below at a random offset."""
    img = img.convert("RGB")
    w, h = img.size
    if is_document:
        line = np.asarray(img.resize((DOCUMENT_SIZE * DOCUMENT_ROWS, MIN_SIDE), Image.Resampling.BICUBIC))
        arr = np.concatenate(np.split(line, DOCUMENT_ROWS, axis=1), axis=0)  # (256, 480, 3)
        top = rng.randint(0, size - arr.shape[0])
        pad = ((top, size - arr.shape[0] - top), (0, 0), (0, 0))
    else:
        if w >= h:
            new_w, new_h = max(MIN_SIDE, size), max(MIN_SIDE, int(size * (h / w)))
            top = rng.randint(0, size - new_h)
            pad = ((top, size - new_h - top), (0, 0), (0, 0))
        else:
            new_w, new_h = max(MIN_SIDE, int(size * (w / h))), max(MIN_SIDE, size)
            left = rng.randint(0, size - new_w)
            pad = ((0, 0), (left, size - new_w - left), (0, 0))
        arr = np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
    out = np.pad(arr, pad, mode="edge")
    if out.shape[:2] != (size, size):  # OFA asserts the same
        raise AssertionError(f"ocr_resize produced {out.shape[1]}x{out.shape[0]}, not {size}x{size}")
    return Image.fromarray(out)


def normalise_text(text: str) -> str:
    """OFA's `unicodedata.normalize("NFKC", zhconv.convert(text, "zh-hans"))`: traditional → simplified,
    full-width → half-width (zhconv is a dependency, imported here so other tasks never load its tables)."""
    import zhconv

    return unicodedata.normalize("NFKC", zhconv.convert(text, "zh-hans"))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ocr_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Line accuracy and 1 − mean normalised edit distance (OFA's `acc` and `ned`) over space-free strings."""
    if not hyps:
        return {"accuracy": 0.0, "ned": 0.0}
    acc = sum(h == r for h, r in zip(hyps, refs)) / len(hyps)
    dist = sum(levenshtein(h, r) / max(len(h), len(r)) if (h or r) else 0.0 for h, r in zip(hyps, refs))
    return {"accuracy": acc, "ned": 1.0 - dist / len(hyps)}


class OCRTask(FinetuneTask):
    """Examples: source bos + BPE(prompt) + eos; target BPE(" " + text) + eos; prev_output bos + BPE(" " + text)
    (module docstring for the text and the image). Evaluation ids are the TSV's uniq-id."""

    name = "ocr"
    source = "ocr"
    metrics = ("accuracy", "ned")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        unknown = sorted(set(cfg.extra) - {"is_document"})
        if unknown:
            raise ConfigError(f"task.extra has {unknown} for task ocr; it knows only is_document")
        self.is_document = bool(cfg.extra.get("is_document", False))
        if self.is_document and cfg.image_size != DOCUMENT_SIZE:
            raise ConfigError(f"task.extra.is_document needs task.image_size={DOCUMENT_SIZE} (OFA's document "
                              f"resizing stacks 4 pieces of 480 px); it is {cfg.image_size}")
        if cfg.image_size < MIN_SIDE:
            raise ConfigError(f"task ocr needs task.image_size >= {MIN_SIDE} (ocr_resize keeps every side at "
                              f"least {MIN_SIDE} px); it is {cfg.image_size}")
        # OFA's ocr_dataset picks the prompt by the BPE's class (BertBPE: Chinese, character truncation)
        self._zh = cfg.language == "zh" or getattr(tokenizer, "kind", None) == "bert"
        self._prompt = [tokenizer.bos, *tokenizer.encode(task_prompt("ocr", "zh" if self._zh else "en", tokenizer)),
                        tokenizer.eos]

    # ---- shapes ---------------------------------------------------------------------------------------------
    def lengths(self) -> tuple[int, int]:
        # zh: at most one WordPiece per character of the truncated line; en: words
        per = 1 if self._zh else TOKENS_PER_WORD
        return len(self._prompt), per * self.cfg.max_tgt_length + 1  # + eos

    # ---- text and images ------------------------------------------------------------------------------------
    def target_text(self, text: str) -> str:
        """The normalised, truncated, lower-cased line OFA trains on (without the leading space)."""
        text = normalise_text(text)
        if self._zh:
            return text[:self.cfg.max_tgt_length].lower()
        return " ".join(text.lower().strip().split()[:self.cfg.max_tgt_length])

    def image(self, image: Optional[Image.Image], rng: random.Random, record_id: Any) -> torch.Tensor:
        if image is None:
            raise UserError(f"record {record_id!r} has no image; reconvert the shards with `ofa-preprocess shards`")
        from ofa_scale.data.image_ops import to_uint8_tensor

        return to_uint8_tensor(ocr_resize(image, self.cfg.image_size, rng, self.is_document))

    def decode_text(self, tokens: Sequence[int] | torch.Tensor) -> str:
        """Decoded text with every space removed (OFA's hypothesis and reference form)."""
        ids = [int(t) for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
               if int(t) < len(self.tok)]  # a padded model vocabulary has extra rows
        return self.tok.decode(ids, skip_special_tokens=True).strip().replace(" ", "")

    # ---- training -------------------------------------------------------------------------------------------
    def train_examples(self, record: dict) -> list[Example]:
        meta = record["meta"]
        text = self.target_text(str(meta.get("text", "")))
        if not text.strip():
            return []
        tok = self.tok
        tgt = tok.encode(" " + text)
        rng = random.Random(int(record.get("seed", 0)))
        return [{"task": self.name, "source": list(self._prompt), "target": tgt + [tok.eos],
                 "prev_output": [tok.bos] + tgt, "image": self.image(record.get("image"), rng, meta.get("uniq_id")),
                 "patch_mask": True, "conf": 1.0}]

    # ---- evaluation -----------------------------------------------------------------------------------------
    def eval_item(self, record: dict) -> Optional[EvalItem]:
        meta, image = record["meta"], record.get("image")
        text = self.target_text(str(meta.get("text", "")))
        if not text.strip():
            return None
        uid = tsv_id(meta.get("uniq_id", record.get("key")))
        rng = random.Random(zlib.crc32(str(uid).encode("utf-8")))  # the same placement every run
        return EvalItem(id=uid, source=list(self._prompt), image=self.image(image, rng, uid),
                        decoder_prompt=[self.tok.bos],
                        reference={"text": self.decode_text(self.tok.encode(" " + text))}, image_size=image.size)

    def predict(self, model: torch.nn.Module, items: Sequence[EvalItem], *, device: torch.device,
                dtype: torch.dtype = torch.float32, lockstep: Optional[Lockstep] = None) -> list[dict]:
        best = best_tokens(model, items, generation_config(self.cfg.decoding), pad=self.tok.pad, eos=self.tok.eos,
                           batch_size=self.cfg.decoding.batch_size, device=device, dtype=dtype, lockstep=lockstep)
        return [{"id": item.id, "text": self.decode_text(tokens)} for item, tokens in zip(items, best)]

    def score(self, predictions: Sequence[dict], items: Sequence[EvalItem], *, final: bool = False
              ) -> dict[str, float]:
        """The same at validation and test: accuracy (the released evaluation's score) and ned."""
        check_pairs(predictions, items)
        return ocr_scores([str(p["text"]) for p in predictions], [str(i.reference["text"]) for i in items])

    def result_entry(self, prediction: dict) -> dict:
        return {"image_id": prediction["id"], "ocr": prediction["text"]}


__all__ = ["OCRTask", "levenshtein", "normalise_text", "ocr_resize", "ocr_scores"]
