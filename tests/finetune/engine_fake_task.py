"""A small finetuning task for the engine tests (trainer, validation, `ofa-eval run`), independent of the real task
modules: it reads `caption` shards, learns the first words of the first caption, predicts with beam search (so
generation, lockstep and ZeRO-3 are exercised) and scores an exact-match rate on the first predicted word.

`FAKE_SCORES=0.1,0.3,...` in the environment makes `score` return those values for the main metric in turn
(the best-pointer tests script the validation results with it).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ofa_scale.finetune import task as task_module
from ofa_scale.finetune.inputs import best_tokens, generation_config, square_image
from ofa_scale.finetune.task import EvalItem, FinetuneTask

PROMPT = " what does the image describe?"
TARGET_TOKENS = 6


class FakeCaptionTask(FinetuneTask):
    name = "caption"
    source = "caption"
    metrics = ("match", "length", "first")
    score_calls = 0

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.prompt = [tokenizer.bos, *tokenizer.encode(PROMPT), tokenizer.eos]

    def lengths(self) -> tuple[int, int]:
        return len(self.prompt), TARGET_TOKENS + 1

    def _target(self, meta: dict) -> list[int]:
        return self.tok.encode(" " + meta["captions"][0].lower())[:TARGET_TOKENS]

    def train_examples(self, record: dict) -> list[dict]:
        ans = self._target(record["meta"])
        return [{"task": self.name, "source": list(self.prompt), "target": ans + [self.tok.eos],
                 "prev_output": [self.tok.bos] + ans, "patch_mask": True, "conf": 1.0,
                 "image": square_image(record["image"], self.cfg.image_size, record["key"])}]

    def eval_item(self, record: dict) -> Optional[EvalItem]:
        meta = record["meta"]
        if meta["captions"][0].startswith("skip"):
            return None
        return EvalItem(id=int(meta["image_id"]), source=list(self.prompt),
                        image=square_image(record["image"], self.cfg.image_size, record["key"]),
                        decoder_prompt=[self.tok.bos], reference={"caption": meta["captions"][0].lower()},
                        image_size=record["image"].size)

    def predict(self, model, items: Sequence[EvalItem], *, device, dtype=torch.float32, lockstep=None) -> list[dict]:
        # Odd image ids decode exactly 3 more steps than even ones, so data-parallel ranks (record i on rank
        # i mod 2) run different numbers of decoder steps: without lockstep a ZeRO-3 evaluation would hang.
        tokens = []
        for item in items:
            n = self.cfg.decoding.max_len_b + 3 * (int(item.id) % 2)
            tokens += best_tokens(model, [item], generation_config(self.cfg.decoding, min_len=n, max_len_b=n),
                                  pad=self.tok.pad, eos=self.tok.eos, batch_size=1, device=device, dtype=dtype,
                                  lockstep=lockstep)
        return [{"id": it.id, "caption": self.tok.decode([t for t in tok.tolist() if t != self.tok.eos]).strip(),
                 "tokens": len(tok), "first": int(tok[0])} for it, tok in zip(items, tokens)]

    def score(self, predictions, items, *, final: bool = False) -> dict[str, float]:
        assert [p["id"] for p in predictions] == [it.id for it in items]
        words = [(p["caption"].split() or [""])[0] == it.reference["caption"].split()[0]
                 for p, it in zip(predictions, items)]
        # `first` (the mean first predicted token id) moves with the weights: runs that should have the same
        # weights must agree on it
        out = {"match": sum(words) / len(words), "length": sum(p["tokens"] for p in predictions) / len(predictions),
               "first": sum(p["first"] for p in predictions) / len(predictions)}
        scripted = os.environ.get("FAKE_SCORES")
        if scripted:
            values = [float(v) for v in scripted.split(",")]
            out["match"] = values[min(FakeCaptionTask.score_calls, len(values) - 1)]
        FakeCaptionTask.score_calls += 1
        if final:
            out["final"] = 1.0
        return out

    def result_entry(self, prediction: dict) -> dict:
        return {"image_id": prediction["id"], "caption": prediction["caption"]}


def install() -> None:
    """Make task.name=caption build this task (in this process)."""
    task_module._REGISTRY["caption"] = f"{__name__}:FakeCaptionTask"
