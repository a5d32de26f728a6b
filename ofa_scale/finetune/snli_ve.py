"""SNLI-VE (spec §7.4): does the image (and the premise) entail the hypothesis? Answers "yes", "no", "maybe".

Records come from `ofa-preprocess shards --format snli_ve`: meta `uniq_id` (column 0), `image_id`, `hypothesis`,
`caption` (the text premise) and `label`, already the answer word (entailment → yes, contradiction → no,
neutral → maybe; data/tsv_formats.py).

* Image: Resize((S, S)) bicubic (S = task.image_size, 480).
* Source, with task.add_caption: ' can image and text1 " {premise} " imply text2 " {hypothesis} "?', else
  ' does the image describe " {hypothesis} "?', both texts through pre_caption(·, task.max_src_length).
* Target: BPE(" " + label), conf 1; OFA's recipe uses prompt type prev_output and a trie over {"no", "yes",
  "maybe"} (finetune/closed_set.py), label smoothing 0.
* Prediction `{"id", "label"}` by all-candidate scoring (OFA's evaluation; `task.decoding.inference: beam` also
  works), metric `accuracy`, results entry `{"uniq_id", "answer"}`.

`task.extra.source_length` sets the source token budget (default: 2 tokens per word of premise and hypothesis,
+ the prompt).
"""

from __future__ import annotations

from typing import Optional

from ofa_scale.finetune.closed_set import ClosedSetTask
from ofa_scale.finetune.inputs import TOKENS_PER_WORD
from ofa_scale.finetune.task import EvalItem, Example
from ofa_scale.objectives.builders import ITM_CAPTION_PROMPT
from ofa_scale.objectives.text import pre_caption

LABELS = ("no", "yes", "maybe")  # OFA's ans2label {"no": 0, "yes": 1, "maybe": 2}
PREMISE_PROMPT = ' can image and text1 " {} " imply text2 " {} "?'
HYPOTHESIS_PROMPT = ITM_CAPTION_PROMPT  # ' does the image describe " {} "?'


class SNLIVETask(ClosedSetTask):
    name = "snli_ve"
    source = "snli_ve"
    metrics = ("accuracy",)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.set_candidates(LABELS)

    def default_source_length(self) -> int:
        template = PREMISE_PROMPT.format("", "") if self.cfg.add_caption else HYPOTHESIS_PROMPT.format("")
        texts = 2 if self.cfg.add_caption else 1
        return len(self.tok.encode(template)) + 2 + TOKENS_PER_WORD * self.cfg.max_src_length * texts

    def source_ids(self, meta: dict) -> list[int]:
        n = self.cfg.max_src_length
        hypothesis = pre_caption(str(meta.get("hypothesis", "")), n)
        if self.cfg.add_caption:
            text = PREMISE_PROMPT.format(pre_caption(str(meta.get("caption", "")), n), hypothesis)
        else:
            text = HYPOTHESIS_PROMPT.format(hypothesis)
        return self.wrap_source(self.tok.encode(text))

    # ---- training and evaluation ----------------------------------------------------------------------------
    def train_examples(self, record: dict) -> list[Example]:
        return self.example(record, str(record["meta"]["label"]), 1.0)

    def eval_item(self, record: dict) -> Optional[EvalItem]:
        meta = record["meta"]
        return self.item(record, str(meta.get("uniq_id")), {"label": str(meta["label"])})

    def result_entry(self, prediction: dict) -> dict:
        return {"uniq_id": prediction["id"], "answer": prediction["label"]}


__all__ = ["SNLIVETask", "LABELS", "PREMISE_PROMPT"]
