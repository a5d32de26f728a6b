"""VQA v2 as OFA's `vqa_gen` (spec §7.2): question (+ object tags) → the answer, over a closed candidate set.

Records come from `ofa-preprocess shards --format vqa`: meta `uniq_id` (question-id, TSV column 0), `image_id`,
`question`, `answers` ([{"answer", "conf"}] from `conf|!+answer&&…`), `objects` (the VinVL tags, `&&`-split).

* Image: Resize((S, S)) bicubic (S = task.image_size, 480).
* Source: " " + pre_question(question, task.max_src_length) with "?" appended if missing; with task.add_object
  BPE(" object: " + the first task.max_object_length tags joined by spaces) follows; bos … eos.
* Target: the highest-confidence answer (`objectives.builders.best_answer`: OFA's `max(ref_dict, key=…)`, the
  first on ties, a repeated answer keeping its last confidence), BPE(" " + answer) cut to task.max_tgt_length
  tokens; `conf` = its confidence (the loss weight). Prompt type, trie constraint and the handling of answers
  outside the candidate set: see finetune/closed_set.py.
* Candidates: `task.answers`, one answer per line (`ofa-preprocess vqa-answers`, OFA's trainval_ans2label). They
  are the only answers decoding can produce; evaluation never adds the references' answers (that would leak the
  labels). Needed for trie-constrained training and for all-candidate inference; open-ended training
  (`task.constrained_training: false`) with beam inference decodes without a trie, as OFA's
  `--unconstrained-training`.
* Prediction `{"id", "answer"}`, metric `vqa_score` (the reference confidence of the predicted answer, 0 if
  absent, averaged), results entry EvalAI's `{"question_id": int, "answer": str}`.

`task.extra.source_length` sets the source token budget (default: 2 tokens per word of the question and of the
tags, + the fixed pieces).
"""

from __future__ import annotations

from typing import Optional

from ofa_scale.evaluation.metrics.vqa import answer_confidences
from ofa_scale.finetune.answers import load_answers
from ofa_scale.finetune.closed_set import ClosedSetTask
from ofa_scale.finetune.inputs import TOKENS_PER_WORD, tsv_id
from ofa_scale.finetune.task import EvalItem, Example
from ofa_scale.objectives.builders import best_answer
from ofa_scale.objectives.text import pre_question

OBJECT_PREFIX = " object: "


class VQATask(ClosedSetTask):
    name = "vqa"
    source = "vqa"
    metrics = ("vqa_score",)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        # Open-ended training with beam inference is the one case that needs no candidate file.
        if cfg.answers or cfg.constrained_training or cfg.decoding.inference == "allcand":
            self.set_candidates(load_answers(cfg.answers))

    def default_source_length(self) -> int:
        fixed = 3  # bos, "?", eos
        if self.cfg.add_object:
            fixed += len(self.tok.encode(OBJECT_PREFIX)) + TOKENS_PER_WORD * self.cfg.max_object_length
        return fixed + TOKENS_PER_WORD * self.cfg.max_src_length

    def source_ids(self, meta: dict) -> list[int]:
        cfg, tok = self.cfg, self.tok
        question = pre_question(str(meta.get("question", "")), cfg.max_src_length)
        if not question.endswith("?"):
            question += "?"
        ids = tok.encode(" " + question)
        if cfg.add_object:
            # OFA: predict_objects.strip().split('&&')[:max_object_length], joined by spaces
            tags = "&&".join(meta.get("objects") or []).strip().split("&&")[:cfg.max_object_length]
            ids += tok.encode(OBJECT_PREFIX + " ".join(tags))
        return self.wrap_source(ids)

    # ---- training and evaluation ----------------------------------------------------------------------------
    def train_examples(self, record: dict) -> list[Example]:
        answer, conf = best_answer(record["meta"].get("answers") or [])
        return self.example(record, answer, conf)

    def eval_item(self, record: dict) -> Optional[EvalItem]:
        answers = record["meta"].get("answers") or []
        if not answers:
            return None
        return self.item(record, tsv_id(record["meta"].get("uniq_id")), {"answers": answer_confidences(answers)})

    def result_entry(self, prediction: dict) -> dict:
        """EvalAI's entry; the question-id is an int whenever the TSV's id is a plain decimal number."""
        return {"question_id": prediction["id"], "answer": prediction["answer"]}


__all__ = ["VQATask", "OBJECT_PREFIX"]
