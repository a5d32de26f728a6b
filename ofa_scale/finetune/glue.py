"""GLUE (spec §7.8): CoLA, SST-2, MRPC, QQP, MNLI, RTE and QNLI as one-token classification by the decoder.

Records come from `ofa-preprocess shards --format glue_<task>` (data/tsv_formats.py): no image, the sentence
fields of the task's columns and `label`, already the label word (CoLA 1 -> yes, MNLI 0 -> maybe, …); the id is
the converter's line number. `task.name` is the format name, e.g. `glue_cola`.

* Source: the task's template (TEMPLATES) over its sentences, each lower-cased, whitespace-normalised and cut to
  `task.max_src_length` words (OFA's nlu datasets; punctuation kept), wrapped in bos/eos; no image.
* Prompt type `src` (OFA's recipes): the decoder input is the whole source, bos … eos, and the one target is the
  label word at the position of the source's eos: prev_output = source, target = [pad]·(|source|−1) + [label].
  No eos follows the label (OFA's `target_item[:-1] = pad`); the constraint there allows only the label words.
  This is the closed-set machinery's `src` example (finetune/closed_set.py) without its final eos step.
* Prediction: all-candidate scoring over the label words with the source as decoder prompt (model/candidates.py).
  With the trie constraint, the score of a label is the log-probability of its token at the eos position among
  the label words only (the eos step after it is the trie's only continuation, log-probability 0): OFA's argmax
  of the masked logits at the last decoder position.
* Metrics: accuracy; CoLA also Matthews correlation (its best metric), MRPC and QQP also F1, "yes" positive
  (evaluation/tasks.py, the same numbers as `ofa-eval score`). results.json: `{"id", "label"}` (the label word).

`task.extra.source_length` sets the source token budget (default: 2 tokens per word of each sentence + the
template; the fixed-shape batch pads every row to it, so recipes set it from their data; cuts are counted).
"""

from __future__ import annotations

from typing import Optional

import torch

from ofa_scale.errors import ConfigError
from ofa_scale.evaluation.labels import GLUE_WORDS
from ofa_scale.finetune.closed_set import ClosedSetTask
from ofa_scale.finetune.inputs import TOKENS_PER_WORD
from ofa_scale.finetune.task import EvalItem, Example
from ofa_scale.finetune.text_inputs import glue_sentence, text_batch

# task -> (template, the record fields it formats, in order); OFA's nlu datasets verbatim
TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "glue_cola": (' is the text " {} " grammatically correct?', ("sentence",)),
    "glue_sst2": (' is the sentiment of text " {} " positive or negative?', ("sentence",)),
    "glue_mrpc": (' does text1 " {} " and text2 " {} " have the same semantics?', ("sentence1", "sentence2")),
    "glue_qqp": (' is question " {} " and question " {} " equivalent?', ("question1", "question2")),
    "glue_mnli": (' can text1 " {} " imply text2 " {} "?', ("sentence1", "sentence2")),
    "glue_rte": (' can text1 " {} " imply text2 " {} "?', ("sentence1", "sentence2")),
    "glue_qnli": (' does " {} " contain the answer to question " {} "?', ("sentence", "question")),
}
# task -> its label words, in OFA's ans2label order (MNLI: maybe 0, yes 1, no 2)
LABEL_WORDS: dict[str, tuple[str, ...]] = {
    f"glue_{name}": tuple(dict.fromkeys(words.values())) for name, words in GLUE_WORDS.items()}
# metrics.json keys, the best-checkpoint metric first
METRICS: dict[str, tuple[str, ...]] = {name: ("accuracy",) for name in TEMPLATES}
METRICS.update(glue_cola=("mcc", "accuracy"), glue_mrpc=("accuracy", "f1"), glue_qqp=("accuracy", "f1"))


class GLUETask(ClosedSetTask):
    """One GLUE task; which one is `task.name` (a key of TEMPLATES)."""

    def __init__(self, cfg, tokenizer):
        # per instance: one class serves the seven tasks (name and source are the format name)
        self.name = self.source = cfg.name
        self.metrics = METRICS[cfg.name]
        self.template, self.fields = TEMPLATES[cfg.name]
        super().__init__(cfg, tokenizer)
        if cfg.decoding.inference != "allcand" or cfg.prompt_type != "src":
            raise ConfigError(f"{cfg.name} predicts one label token at the source's eos: set task.prompt_type=src "
                              f"and task.decoding.inference=allcand (OFA's GLUE recipes)")
        self.set_candidates(LABEL_WORDS[cfg.name])

    def default_source_length(self) -> int:
        template = len(self.tok.encode(self.template.format(*[""] * len(self.fields))))
        return template + 2 + TOKENS_PER_WORD * self.cfg.max_src_length * len(self.fields)

    def source_ids(self, meta: dict) -> list[int]:
        texts = [glue_sentence(str(meta.get(f, "")), self.cfg.max_src_length) for f in self.fields]
        return self.wrap_source(self.tok.encode(self.template.format(*texts)))

    def pixels(self, record: dict) -> Optional[torch.Tensor]:
        return None  # text only: no image input at all (finetune/text_inputs.py)

    # ---- training and evaluation ----------------------------------------------------------------------------
    def train_examples(self, record: dict) -> list[Example]:
        examples = self.example(record, str(record["meta"]["label"]), 1.0)
        for ex in examples:  # the label ends the sequence: drop the closed-set example's eos step
            ex["prev_output"], ex["target"] = ex["prev_output"][:-1], ex["target"][:-1]
            if "constraint" in ex:
                ex["constraint"] = ex["constraint"][:-1]
        return examples

    def eval_item(self, record: dict) -> Optional[EvalItem]:
        meta = record["meta"]
        return self.item(record, str(meta.get("uniq_id")), {"label": str(meta["label"])})

    def _device_batch(self, chunk, device, dtype) -> dict:
        return text_batch(chunk, self.tok.pad, device)

    def result_entry(self, prediction: dict) -> dict:
        return {"id": str(prediction["id"]), "label": prediction["label"]}


__all__ = ["GLUETask", "TEMPLATES", "LABEL_WORDS", "METRICS"]
