"""What the closed-answer-set tasks share (VQA spec §7.2, SNLI-VE §7.4): a decoder prompt (`task.prompt_type`),
a trie over the candidate answers that constrains the loss and the decoding (spec §6.3), and prediction either by
scoring every candidate (`task.decoding.inference: allcand`) or by trie-constrained beam search with the prompt
forced (`beam`).

Prompt types (spec §7.2), with source = [bos] + prompt + [eos] and answer tokens `a`:
* none:        prev_output = [bos] + a,        target = a + [eos],                        decoder prompt [bos]
* src:         prev_output = source + a,       target = [pad]·(|source|−1) + a + [eos],   decoder prompt source
* prev_output: prev_output = source[:-1] + a,  target = [pad]·(|source|−2) + a + [eos],   decoder prompt source[:-1]
so target[i] = prev_output[i+1] and the loss sees only the answer and its eos.

Constraint (OFA's per-position constraint mask): answer position k (k = 0 … |a|, the last being eos) allows
`trie.get_next_layer([bos] + a[:k])`; prompt positions hold [] (their target is pad, they never reach the loss).
A training answer that is not a candidate has no path in the trie. OFA keeps such an example and masks its own
target token to −inf there: an infinite loss, which fp16 training skips as an overflow (so OFA's training data
can only usefully hold candidate answers). Such examples are dropped here instead, counted in
`skipped["answer_not_in_candidates"]` and logged once per process; with a candidate file built from the training
TSV these are the rows whose answer is outside the top N.

Sources are cut to `lengths()[0]` tokens (bos … eos kept) here rather than by the Collator, so that the decoder
prompt of prev_output/src always matches the encoder's source and the answer is never truncated away; cuts are
counted in `skipped["source_truncated"]`. `task.extra.source_length` overrides the default token budget.
"""

from __future__ import annotations

import itertools
import logging
from abc import abstractmethod
from collections import Counter
from typing import Any, Optional, Sequence

import torch

from ofa_scale.errors import ConfigError
from ofa_scale.evaluation.generation import batch_inputs
from ofa_scale.evaluation.tasks import ScoreOptions, task_spec
from ofa_scale.finetune.inputs import check_pairs, generation_config, square_image
from ofa_scale.finetune.task import EvalItem, Example, FinetuneTask, Lockstep
from ofa_scale.finetune.text_inputs import NO_IMAGE, NO_IMAGE_SIZE
from ofa_scale.model.generate import generate, score_candidates
from ofa_scale.objectives.batching import normalise_images
from ofa_scale.utils.trie import Trie

log = logging.getLogger(__name__)


class ClosedSetTask(FinetuneTask):
    """Subclasses give the source prompt ids, the candidate answers and the default source budget."""

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.skipped: Counter = Counter()
        self._warned: set[str] = set()
        self.candidates: list[str] = []  # the closed answer set, in file order (empty: open-ended)
        self.candidate_ids: list[list[int]] = []
        self.trie: Optional[Trie] = None
        self._by_tokens: dict[tuple[int, ...], str] = {}
        self.source_length()  # a bad task.extra.source_length fails at construction, not in a loader worker

    def set_candidates(self, answers: Sequence[str]) -> None:
        """The closed answer set: each answer's tokens BPE(" " + answer), and the trie over them."""
        tok = self.tok
        self.candidates = list(answers)
        self.candidate_ids = [tok.encode(" " + a) for a in self.candidates]
        self.trie = Trie.from_answers(self.candidate_ids, bos=tok.bos, eos=tok.eos)
        self._by_tokens = {tuple(ids): a for ids, a in zip(self.candidate_ids, self.candidates)}

    # ---- shapes ---------------------------------------------------------------------------------------------
    @abstractmethod
    def default_source_length(self) -> int:
        """Token budget of the source (bos and eos included) unless task.extra.source_length is set."""

    def source_length(self) -> int:
        value = self.cfg.extra.get("source_length", self.default_source_length())
        if isinstance(value, bool) or not isinstance(value, int) or value < 4:
            raise ConfigError(f"task.extra.source_length is {value!r}; give the source token budget (bos and eos "
                              f"included) as an integer >= 4")
        return value

    def max_answer_tokens(self) -> int:
        if self.cfg.constrained_training and self.candidate_ids:  # only candidates are trained on
            return min(self.cfg.max_tgt_length, max(len(c) for c in self.candidate_ids))
        return self.cfg.max_tgt_length

    def lengths(self) -> tuple[int, int]:
        s = self.source_length()
        prompt = {"none": 1, "src": s, "prev_output": s - 1}[self.cfg.prompt_type]
        return s, prompt + self.max_answer_tokens()

    # ---- examples -------------------------------------------------------------------------------------------
    def wrap_source(self, ids: list[int]) -> list[int]:
        """[bos] + ids + [eos], cut to the source budget."""
        budget = self.source_length() - 2
        if len(ids) > budget:
            self._count("source_truncated", f"a {self.name} source of {len(ids) + 2} tokens is cut to "
                                            f"{budget + 2} (task.extra.source_length)")
            ids = ids[:budget]
        return [self.tok.bos, *ids, self.tok.eos]

    def decoder_prompt(self, source: list[int]) -> list[int]:
        kind = self.cfg.prompt_type
        return [self.tok.bos] if kind == "none" else list(source) if kind == "src" else list(source[:-1])

    def answer_tokens(self, answer: str) -> list[int]:
        return self.tok.encode(" " + answer)[:self.cfg.max_tgt_length]

    @abstractmethod
    def source_ids(self, meta: dict) -> list[int]:
        """[bos] + the task's prompt + [eos] of a record (through `wrap_source`)."""

    def example(self, record: dict, answer: str, conf: float) -> list[Example]:
        """The training example of a record answering `answer` (none when the constrained answer is not a
        candidate)."""
        tok = self.tok
        ans = self.answer_tokens(answer)
        constrained = self.cfg.constrained_training and self.trie is not None
        if constrained and not self.trie.contains([tok.bos, *ans, tok.eos]):
            self._count("answer_not_in_candidates",
                        f"{self.name} training answer {answer!r} is not among the {len(self.candidates)} candidate "
                        f"answers; such examples are skipped (trie-constrained training cannot learn them)")
            return []
        meta = record["meta"]
        source = self.source_ids(meta)
        prompt = self.decoder_prompt(source)
        ex: Example = {"task": self.name, "source": source, "prev_output": prompt + ans,
                       "target": [tok.pad] * (len(prompt) - 1) + ans + [tok.eos],
                       "image": self.pixels(record), "conf": float(conf)}
        ex["patch_mask"] = ex["image"] is not None
        if constrained:
            ex["constraint"] = ([[] for _ in range(len(prompt) - 1)]
                                + [self.trie.get_next_layer([tok.bos, *ans[:k]]) for k in range(len(ans) + 1)])
        return [ex]

    def pixels(self, record: dict) -> Optional[torch.Tensor]:
        """The encoder image of a record, uint8 3×S×S; None for a text-only task (GLUE: finetune/text_inputs.py)."""
        return square_image(record.get("image"), self.cfg.image_size, record["meta"].get("uniq_id"))

    def item(self, record: dict, item_id: Any, reference: dict) -> EvalItem:
        meta, image = record["meta"], record.get("image")
        source = self.source_ids(meta)
        pixels = self.pixels(record)
        if pixels is None:  # text only
            pixels, image = NO_IMAGE, None
        return EvalItem(id=item_id, source=source, image=pixels, decoder_prompt=self.decoder_prompt(source),
                        reference=reference, image_size=image.size if image is not None else NO_IMAGE_SIZE)

    def _count(self, what: str, message: str) -> None:
        self.skipped[what] += 1
        if what not in self._warned:  # once per process: the loader's workers each hold a copy of the task
            self._warned.add(what)
            log.warning("%s (further cases are counted, not logged)", message)

    # ---- prediction and score ---------------------------------------------------------------------------------
    # Prediction records and references use the field names of `ofa-eval score`'s table (evaluation/tasks.py):
    # vqa {"answer"} against {"answers": {answer: conf}}, snli_ve {"label"} against {"label"}.
    def predict(self, model: torch.nn.Module, items: Sequence[EvalItem], *, device: torch.device,
                dtype: torch.dtype = torch.float32, lockstep: Optional[Lockstep] = None) -> list[dict]:
        """One answer per item, by all-candidate scoring or constrained beam search."""
        decoding = self.cfg.decoding
        extra = {} if lockstep is None else {"lockstep": lockstep}
        allcand = decoding.inference == "allcand"
        gen_cfg = None if allcand else generation_config(
            decoding, max_len_a=0.0, max_len_b=max((len(i.decoder_prompt) for i in items), default=1) - 1
            + max([self.cfg.max_tgt_length, *map(len, self.candidate_ids)]))
        out: list[str] = []
        with torch.no_grad():
            for start in itertools.count(0, decoding.batch_size):
                chunk = items[start:start + decoding.batch_size]
                # Distributed evaluation: a rank out of items runs empty batches (generation keeps its forwards
                # in step with the others) until every rank is out.
                if (not chunk) if lockstep is None else lockstep(not chunk):
                    break
                inputs = self._device_batch(chunk, device, dtype)
                prompts = [list(i.decoder_prompt) for i in chunk]
                if allcand:
                    scores = score_candidates(model, inputs, self.candidate_ids, decoder_prompts=prompts,
                                              constraint_trie=self.trie, rows_per_pass=decoding.candidate_chunk,
                                              **extra)
                    out.extend(self.candidates[int(j)] for j in scores.argmax(dim=1).tolist())
                    continue
                hyps = generate(model, inputs, gen_cfg, prefix_tokens=[p[1:] for p in prompts],
                                constraint_trie=self.trie if self.cfg.constrained_training else None, **extra)
                # a hypothesis holds the forced prompt (without bos), the answer, then eos
                out.extend(self._hyp_answer(h[0].tokens.tolist()[len(p) - 1:] if h else [])
                           for h, p in zip(hyps, prompts))
        field = task_spec(self.name).prediction_field
        return [{"id": item.id, field: answer} for item, answer in zip(items, out)]

    def score(self, predictions: Sequence[dict], items: Sequence[EvalItem], *, final: bool = False
              ) -> dict[str, float]:
        """The same numbers as `ofa-eval score` (evaluation/tasks.py); validation and test alike."""
        check_pairs(predictions, items)
        spec = task_spec(self.name)
        scores = spec.score([str(p[spec.prediction_field]) for p in predictions],
                            [i.reference[spec.reference_field] for i in items], ScoreOptions())
        return {m: scores.metrics[m] for m in self.metrics}

    def _device_batch(self, chunk: Sequence[EvalItem], device: torch.device, dtype: torch.dtype) -> dict:
        """Model inputs of some items (none: an empty batch of the same layout), images normalised in `dtype`."""
        if chunk:
            batch = batch_inputs(chunk, self.tok.pad)
        else:
            s = self.cfg.image_size
            batch = {"src_tokens": torch.full((0, 2), self.tok.pad, dtype=torch.long),
                     "patch_images": torch.zeros((0, 3, s, s), dtype=torch.uint8),
                     "patch_masks": torch.zeros(0, dtype=torch.bool)}
        masks = batch["patch_masks"].to(device)
        return {"src_tokens": batch["src_tokens"].to(device), "patch_masks": masks,
                "patch_images": normalise_images(batch["patch_images"].to(device), masks, dtype)}

    def _hyp_answer(self, tokens: list[int]) -> str:
        """The answer string of a hypothesis' tokens after the prompt (eos last): the candidate those tokens spell,
        else (open-ended decoding, or no candidate reached) the decoded text."""
        if tokens and tokens[-1] == self.tok.eos:
            tokens = tokens[:-1]
        hit = self._by_tokens.get(tuple(tokens))
        if hit is not None:
            return hit
        ids = [t for t in tokens if t < len(self.tok)]  # a padded model vocabulary has extra rows
        return self.tok.decode(ids, skip_special_tokens=True).strip()
