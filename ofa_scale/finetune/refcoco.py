"""Visual grounding on RefCOCO / RefCOCO+ / RefCOCOg (spec §7.3): text → 4 `<bin>` tokens, Acc@0.5.

Records come from `ofa-preprocess shards --format refcoco`: meta `uniq_id` (column 0), `image_id`, `text`, `box`
([x0, y0, x1, y1] in the pixels of the record's image: the converter and the loader rescale it with the image
when they shrink it) and `image` (its stored and original sizes).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.grounding import bins_to_box
from ofa_scale.evaluation.tasks import ScoreOptions, task_spec
from ofa_scale.finetune.inputs import TOKENS_PER_WORD, best_tokens, check_pairs, generation_config, square_image
from ofa_scale.finetune.prompts_cn import task_prompt
from ofa_scale.finetune.task import EvalItem, Example, FinetuneTask, Lockstep
from ofa_scale.objectives.text import pre_caption
from ofa_scale.objectives.transforms import box_bins


class RefCOCOTask(FinetuneTask):
    """Examples: the image squashed to S×S (S = task.image_size, 512 in OFA's recipes) and the box scaled with
    it, then divided by `task.box_normaliser` (OFA's max_image_size 512) and quantised to `<bin_i>`
    (spec §2.2); source ' which region does the text " {t} " describe?' with t = pre_caption(text,
    task.max_src_length); target the 4 bins + eos; prev_output bos + the 4 bins. `task.language: zh` (OFA-CN,
    RefCOCO-CN): the source is '这段文字" {t} "描述的是哪个区域？' (prompts_cn.py).

    Predictions: {"id": uniq-id, "box": [x0, y0, x1, y1] in the record image's pixels (what the reference box
    uses), "bins": the 4 bin indices, "orig_box": the box in the original TSV image's pixels (results.json)}.
    """

    name = "refcoco"
    source = "refcoco"
    metrics = ("acc@0.5",)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        if tokenizer.num_bins < 1:
            raise UserError("the refcoco task needs a tokenizer with <bin_i> tokens (num_bins > 0)")
        self._prompt = task_prompt("refcoco", cfg.language, tokenizer)  # zh: OFA-CN's RefCOCO-CN prompt
        self._template = len(tokenizer.encode(self._prompt.format("")))

    # ---- shapes ---------------------------------------------------------------------------------------------
    def lengths(self) -> tuple[int, int]:
        return self._template + TOKENS_PER_WORD * self.cfg.max_src_length + 2, 5  # bos/eos; 4 bins + eos

    # ---- inputs ---------------------------------------------------------------------------------------------
    def _source(self, meta: dict) -> list[int]:
        text = pre_caption(str(meta.get("text", "")), self.cfg.max_src_length)
        return [self.tok.bos, *self.tok.encode(self._prompt.format(text)), self.tok.eos]

    # ---- training -------------------------------------------------------------------------------------------
    def train_examples(self, record: dict) -> list[Example]:
        meta, image = record["meta"], record.get("image")
        pixels = square_image(image, self.cfg.image_size, meta.get("uniq_id"))
        box = _box(meta)
        s = self.cfg.image_size
        rx, ry = s / image.width, s / image.height
        bins = [self.tok.bin_token(b) for b in box_bins([box[0] * rx, box[1] * ry, box[2] * rx, box[3] * ry],
                                                         self.cfg.box_normaliser, self.tok.num_bins)]
        return [{"task": self.name, "source": self._source(meta), "target": bins + [self.tok.eos],
                 "prev_output": [self.tok.bos] + bins, "image": pixels, "patch_mask": True, "conf": 1.0}]

    # ---- evaluation -----------------------------------------------------------------------------------------
    def eval_item(self, record: dict) -> Optional[EvalItem]:
        meta, image = record["meta"], record.get("image")
        stored = meta.get("image") or {}
        width, height = image.size
        orig = (stored.get("orig_width", width), stored.get("orig_height", height))
        return EvalItem(id=str(meta["uniq_id"]), source=self._source(meta),
                        image=square_image(image, self.cfg.image_size, meta.get("uniq_id")),
                        decoder_prompt=[self.tok.bos],
                        reference={"box": _box(meta), "width": width, "height": height, "orig_size": orig},
                        image_size=(width, height))

    def predict(self, model: torch.nn.Module, items: Sequence[EvalItem], *, device: torch.device,
                dtype: torch.dtype = torch.float32, lockstep: Optional[Lockstep] = None) -> list[dict]:
        tok = self.tok
        # Decoding is restricted to <bin> tokens (ids 0-3 stay in the softmax; min_len = max_len_b = 4 bans eos
        # until 4 bins are out). OFA decodes unconstrained and reads the first 4 tokens as bins: a trained model
        # emits bins anyway, but an undertrained one (early validation) would yield tokens that are no box.
        cfg = generation_config(self.cfg.decoding, constraint_range=(tok.bin_offset, tok.bin_offset + tok.num_bins))
        tokens = best_tokens(model, items, cfg, pad=tok.pad, eos=tok.eos, batch_size=self.cfg.decoding.batch_size,
                             device=device, dtype=dtype, lockstep=lockstep)
        out = []
        for item, t in zip(items, tokens):
            bins = [tok.bin_index(x) if tok.is_bin(x) else 0 for x in t.tolist()[:4]]
            bins += [0] * (4 - len(bins))  # a decoding preset without min_len 4 may stop early
            width, height = item.image_size
            # bin/(n−1)·normaliser on the S×S input, then × W/S and × H/S back to the record image
            box = bins_to_box(bins, width, height, num_bins=tok.num_bins, max_image_size=self.cfg.box_normaliser,
                              input_size=self.cfg.image_size)
            ow, oh = item.reference["orig_size"]
            orig = [box[0] * ow / width, box[1] * oh / height, box[2] * ow / width, box[3] * oh / height]
            out.append({"id": item.id, "box": box, "bins": bins, "orig_box": orig})
        return out

    def score(self, predictions: Sequence[dict], items: Sequence[EvalItem], *, final: bool = False
              ) -> dict[str, float]:
        """Acc@0.5 with OFA's rule (IoU ≥ 0.5 and an intersection of positive width and height); the same for
        validation and test."""
        check_pairs(predictions, items)
        scores = task_spec("refcoco").score([list(p["box"]) for p in predictions],
                                            [list(i.reference["box"]) for i in items], ScoreOptions())
        return {"acc@0.5": scores.metrics["acc@0.5"]}

    def result_entry(self, prediction: dict) -> dict:
        return {"uniq_id": str(prediction["id"]), "box": list(prediction.get("orig_box", prediction["box"]))}


def _box(meta: dict) -> list[float]:
    box = meta.get("box")
    if not isinstance(box, list) or len(box) != 4:
        raise UserError(f"refcoco record {meta.get('uniq_id')!r} has no 4-number box; reconvert the shards with "
                        f"`ofa-preprocess shards --format refcoco`")
    return [float(c) for c in box]


__all__ = ["RefCOCOTask"]
