"""COCO captioning (spec §7.1): stage 1 (cross entropy) and stage 2 (SCST) examples, beam-search prediction,
CIDEr-D validation and the COCOEvalCap test protocol, COCO results entries.

Records come from `ofa-preprocess shards --format caption`: meta `image_id` (TSV column 1), `caption` (column 2
verbatim), `captions` (column 2 split on `&&`: one caption in stage-1 train rows, all of an image's captions in
stage-2 / val / test rows), `objects` (unused, as in OFA).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ofa_scale.evaluation.metrics.caption_text import strip_punctuation
from ofa_scale.evaluation.tasks import ScoreOptions, task_spec
from ofa_scale.finetune.inputs import (TOKENS_PER_WORD, best_tokens, check_pairs, generation_config, square_image,
                                       tsv_id)
from ofa_scale.finetune.prompts_cn import spaced, task_prompt
from ofa_scale.finetune.task import EvalItem, Example, FinetuneTask, Lockstep


def ofa_caption_words(caption: str) -> list[str]:
    """OFA's caption clean-up (caption_dataset.py): every ASCII punctuation character deleted, then split on
    whitespace. No lower-casing: OFA expects lower-case data."""
    return strip_punctuation(caption).split()


class CaptionTask(FinetuneTask):
    """Examples: source bos + BPE(" what does the image describe?") + eos; target " " + the first
    `task.max_tgt_length` words of the punctuation-free caption, + eos; prev_output bos + the caption tokens.

    Every example also carries `"references"`: all the record's captions, punctuation deleted and whitespace
    collapsed (OFA's stage-2 reference list). The SCST step (criterion scst) reads them for the CIDEr-D reward
    before collation (the Collator ignores the key). The CE target of a record with several captions is its
    first caption.

    `task.language: zh` (OFA-CN, MUGE): the prompt "图片描述了什么内容?", a target budget of max_tgt_length BERT
    tokens, and captions scored one character per word as BERT decodes them, without METEOR (prompts_cn.py).

    Evaluation ids are the TSV's image-id (column 1): an int when it is a plain decimal number, as COCO's are,
    else the string. Validation and test TSVs hold one row per image (OFA's `&&` files), so results.json gets
    one entry per image.
    """

    name = "caption"
    source = "caption"
    metrics = ("cider", "bleu4", "meteor", "rouge_l")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self._prompt = [tokenizer.bos, *tokenizer.encode(task_prompt("caption", cfg.language, tokenizer)),
                        tokenizer.eos]
        self._zh = cfg.language == "zh"  # OFA-CN (prompts_cn.py): token budget, character-level scoring

    # ---- shapes ---------------------------------------------------------------------------------------------
    def lengths(self) -> tuple[int, int]:
        if self._zh:  # unspaced Chinese is one "word": the budget counts BERT tokens
            return len(self._prompt), self.cfg.max_tgt_length + 1
        return len(self._prompt), TOKENS_PER_WORD * self.cfg.max_tgt_length + 1  # + eos

    # ---- training -------------------------------------------------------------------------------------------
    def train_examples(self, record: dict) -> list[Example]:
        meta = record["meta"]
        captions = _captions(meta)
        words = ofa_caption_words(captions[0]) if captions else []
        if not words:  # nothing left after removing punctuation: no target to learn
            return []
        tok = self.tok
        tgt = tok.encode(" " + " ".join(words[:self.cfg.max_tgt_length]))
        if self._zh:
            tgt = tgt[:self.cfg.max_tgt_length]
        return [{"task": self.name, "source": list(self._prompt), "target": tgt + [tok.eos],
                 "prev_output": [tok.bos] + tgt, "image": square_image(record.get("image"), self.cfg.image_size,
                                                                        meta.get("uniq_id")),
                 "patch_mask": True, "conf": 1.0,
                 "references": [spaced(tok, c) if self._zh else " ".join(ofa_caption_words(c)) for c in captions]}]

    # ---- evaluation -----------------------------------------------------------------------------------------
    def eval_item(self, record: dict) -> Optional[EvalItem]:
        meta, image = record["meta"], record.get("image")
        captions = [c.strip() for c in _captions(meta) if c.strip()]
        if not captions:
            return None
        return EvalItem(id=tsv_id(meta.get("image_id", meta.get("uniq_id"))), source=list(self._prompt),
                        image=square_image(image, self.cfg.image_size, meta.get("uniq_id")),
                        decoder_prompt=[self.tok.bos], reference={"captions": captions}, image_size=image.size)

    def predict(self, model: torch.nn.Module, items: Sequence[EvalItem], *, device: torch.device,
                dtype: torch.dtype = torch.float32, lockstep: Optional[Lockstep] = None) -> list[dict]:
        cfg = generation_config(self.cfg.decoding)
        tokens = best_tokens(model, items, cfg, pad=self.tok.pad, eos=self.tok.eos,
                             batch_size=self.cfg.decoding.batch_size, device=device, dtype=dtype, lockstep=lockstep)
        return [{"id": item.id, "caption": self.decode_text(t)} for item, t in zip(items, tokens)]

    def decode_text(self, tokens: torch.Tensor) -> str:
        ids = [t for t in tokens.tolist() if t < len(self.tok)]  # a padded model vocabulary has extra rows
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def score(self, predictions: Sequence[dict], items: Sequence[EvalItem], *, final: bool = False
              ) -> dict[str, float]:
        """Validation: OFA's CIDEr-D on punctuation-free text with document frequencies from the evaluated
        references (OFA caches them from the whole validation set, `coco-valid-words.p`), plus BLEU-4 and
        ROUGE-L on the same text; METEOR is left out (Java, slow). `final`: COCOEvalCap's protocol (PTB
        tokenizer, METEOR, CIDEr-D from the references)."""
        check_pairs(predictions, items)
        options = (ScoreOptions(caption_tokenizer="ptb", meteor=True) if final and not self._zh
                   else ScoreOptions(caption_tokenizer="ofa", meteor=False))  # zh: MUGE's BLEU/ROUGE-L/CIDEr-D
        text = (lambda c: spaced(self.tok, c)) if self._zh else str  # zh: one character per word, as OFA-CN decodes
        scores = task_spec("caption").score([text(p["caption"]) for p in predictions],
                                            [[text(c) for c in i.reference["captions"]] for i in items],
                                            options).metrics
        out = {"cider": scores["cider"], "bleu4": scores["bleu4"], "rouge_l": scores["rouge_l"]}
        if final and not self._zh:
            out["meteor"] = scores["meteor"]
        return out

    def result_entry(self, prediction: dict) -> dict:
        return {"image_id": prediction["id"], "caption": prediction["caption"]}


def _captions(meta: dict) -> list[str]:
    captions = meta.get("captions")
    if captions is None:  # shards converted before the `captions` field: split the raw column
        captions = [c for c in str(meta.get("caption", "")).split("&&") if c]
    return [str(c) for c in captions]


__all__ = ["CaptionTask", "ofa_caption_words"]
