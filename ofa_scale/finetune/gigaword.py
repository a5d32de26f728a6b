"""Gigaword headline generation (spec §7.7): article in, lower-cased headline out, text only.

Records come from `ofa-preprocess shards --format gigaword` (data/tsv_formats.py): meta `source` (the article)
and `target` (the headline); no id column, so the id is the converter's line number.

* Source: ' what is the summary of article " {article} "?' with article = pre_caption(·, task.max_src_length)
  and `<unk>` -> `unk`, encoded and cut to task.max_src_length tokens, then bos/eos; no image.
* Target: BPE(headline) with headline = pre_caption(·, task.max_tgt_length), `<unk>` -> `unk` (no leading
  space, as OFA encodes it) + eos; prev_output = [bos] + the headline tokens.
* `task.extra.noise_ratio` (OFA's --noise-ratio; the recipes 0.2): in training each decoder *input* token after
  bos is replaced, with that probability, by a random text token id in [4, code_offset) (OFA: [4, 50265)); the
  target stays clean. Evaluation never adds noise.
* Prediction: beam search with `task.decoding` (OFA: beam 6, lenpen 0.7, max_len_b 32, no-repeat 3), the decoded
  text as `{"id", "summary"}`.
* Metrics rouge_l (best), rouge1, rouge2: ROUGE F1 with stemming on the hypothesis after OFA's fix_tokenization
  and `1` -> `#`, against the raw lower-cased reference headline (evaluation/metrics/gigaword.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ofa_scale.errors import ConfigError
from ofa_scale.evaluation.generation import _text as decoded_text
from ofa_scale.evaluation.tasks import ScoreOptions, task_spec
from ofa_scale.finetune.inputs import TOKENS_PER_WORD, best_tokens, check_pairs, generation_config
from ofa_scale.finetune.task import EvalItem, Example, FinetuneTask, Lockstep
from ofa_scale.finetune.text_inputs import NO_IMAGE, NO_IMAGE_SIZE
from ofa_scale.objectives.builders import record_rng
from ofa_scale.objectives.text import pre_caption

PROMPT = ' what is the summary of article " {} "?'


def gigaword_text(text: str, max_words: int) -> str:
    """OFA's summary_dataset text preparation: pre_caption, then `<unk>` -> `unk`."""
    return pre_caption(text, max_words).replace("<unk>", "unk")


def add_noise(tokens: list[int], ratio: float, high: int, rng) -> list[int]:
    """OFA's add_noise_to_tgt: each token independently, with probability `ratio`, becomes a uniform id in
    [4, high)."""
    return [rng.randrange(4, high) if rng.random() < ratio else t for t in tokens]


class GigawordTask(FinetuneTask):
    name = "gigaword"
    source = "gigaword"
    metrics = ("rouge_l", "rouge1", "rouge2")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.noise_ratio = cfg.extra.get("noise_ratio", 0.0)
        if isinstance(self.noise_ratio, bool) or not isinstance(self.noise_ratio, (int, float)) \
                or not 0.0 <= self.noise_ratio < 1.0:
            raise ConfigError(f"task.extra.noise_ratio is {self.noise_ratio!r}; give a probability in [0, 1)")

    # ---- shapes ---------------------------------------------------------------------------------------------
    def lengths(self) -> tuple[int, int]:
        # source: OFA cuts the encoded prompt to max_src_length tokens; target: words -> tokens budget + eos
        return self.cfg.max_src_length + 2, TOKENS_PER_WORD * self.cfg.max_tgt_length + 1

    def source_ids(self, meta: dict) -> list[int]:
        article = gigaword_text(str(meta.get("source", "")), self.cfg.max_src_length)
        return [self.tok.bos, *self.tok.encode(PROMPT.format(article))[:self.cfg.max_src_length], self.tok.eos]

    # ---- training -------------------------------------------------------------------------------------------
    def train_examples(self, record: dict) -> list[Example]:
        meta, tok = record["meta"], self.tok
        headline = gigaword_text(str(meta.get("target", "")), self.cfg.max_tgt_length)
        if not headline:
            return []
        target = tok.encode(headline)[:self.lengths()[1] - 1]
        prev = target
        if self.noise_ratio > 0:
            rng = record_rng(record.get("seed", 0), "gigaword_noise")
            prev = add_noise(target, self.noise_ratio, tok.code_offset, rng)
        return [{"task": self.name, "source": self.source_ids(meta), "target": target + [tok.eos],
                 "prev_output": [tok.bos, *prev], "image": None, "patch_mask": False, "conf": 1.0}]

    # ---- evaluation -----------------------------------------------------------------------------------------
    def eval_item(self, record: dict) -> Optional[EvalItem]:
        meta = record["meta"]
        return EvalItem(id=str(meta.get("uniq_id")), source=self.source_ids(meta), image=NO_IMAGE,
                        decoder_prompt=[self.tok.bos], reference={"summary": str(meta.get("target", ""))},
                        image_size=NO_IMAGE_SIZE)

    def predict(self, model: torch.nn.Module, items: Sequence[EvalItem], *, device: torch.device,
                dtype: torch.dtype = torch.float32, lockstep: Optional[Lockstep] = None) -> list[dict]:
        tok = self.tok
        best = best_tokens(model, items, generation_config(self.cfg.decoding), pad=tok.pad, eos=tok.eos,
                           batch_size=self.cfg.decoding.batch_size, device=device, dtype=dtype, lockstep=lockstep)
        return [{"id": item.id, "summary": decoded_text(tok, tokens)} for item, tokens in zip(items, best)]

    def score(self, predictions: Sequence[dict], items: Sequence[EvalItem], *, final: bool = False
              ) -> dict[str, float]:
        """The same numbers as `ofa-eval score --task gigaword`; validation and test alike."""
        check_pairs(predictions, items)
        scores = task_spec("gigaword").score([str(p["summary"]) for p in predictions],
                                             [str(i.reference["summary"]) for i in items], ScoreOptions())
        return {m: scores.metrics[m] for m in self.metrics}

    def result_entry(self, prediction: dict) -> dict:
        return {"id": str(prediction["id"]), "summary": prediction["summary"]}


__all__ = ["GigawordTask", "PROMPT", "add_noise", "gigaword_text"]
