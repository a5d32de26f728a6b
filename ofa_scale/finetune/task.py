"""What every finetuning task module provides (one module per task: caption.py, vqa.py, refcoco.py, snli_ve.py).

A task owns the whole walk of one of OFA's finetuning datasets (spec §7): the shard records of its `--format`
→ training examples for the Collator → evaluation items → predictions with the task's decoding preset → the
task's metrics → the public results file entries. The trainer (finetune/trainer.py) and `ofa-eval run`
(finetune/evaluate.py) only talk to this interface.

Shard records arrive from the loader as `{"key": str, "meta": {<format fields>, "uniq_id", ...}, "image": PIL}`
(data/tsv_formats.py lists each format's fields).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from ofa_scale.errors import ConfigError
from ofa_scale.finetune.config import TaskSection

# A training example, as objectives.batching.Collator takes it: {"task": name, "source": [ids] (bos … eos),
# "target": [ids], "prev_output": [ids] (same length as target), "image": uint8 3×S×S, "patch_mask": True,
# "conf": float, and optionally "constraint": per-target-position lists of allowed ids}.
Example = dict[str, Any]

# Called once per decoding step (and once per evaluation batch) with "this rank has finished"; returns True when
# every rank has. Under ZeRO-3 and TP each forward is collective, so ranks keep stepping until all are done.
Lockstep = Callable[[bool], bool]


@dataclass
class EvalItem:
    """One evaluation sample."""

    id: Any                      # the TSV's own id: caption image-id, VQA question-id (int), RefCOCO/SNLI-VE uniq-id
    source: list[int]            # bos + prompt + eos
    image: torch.Tensor          # uint8 3×S×S
    decoder_prompt: list[int]    # forced decoder prefix, starting with bos ([bos] for prompt type none)
    reference: dict[str, Any]    # what `score` needs (captions, answers with confidences, box, label …)
    image_size: tuple[int, int]  # (W, H) of the stored image (boxes are reported in its pixels)


class FinetuneTask(ABC):
    name: ClassVar[str]             # task.name
    source: ClassVar[str]           # the shard source / `ofa-preprocess shards --format` it reads
    metrics: ClassVar[tuple[str, ...]]  # metrics.json keys; metrics[0] is the main one (best checkpoint)

    def __init__(self, cfg: TaskSection, tokenizer: Any):
        self.cfg = cfg
        self.tok = tokenizer

    # ---- shapes ---------------------------------------------------------------------------------------------
    @abstractmethod
    def lengths(self) -> tuple[int, int]:
        """(source_length, target_length) of the fixed-shape training batch, in tokens incl. bos/eos."""

    # ---- training -------------------------------------------------------------------------------------------
    @abstractmethod
    def train_examples(self, record: dict) -> list[Example]:
        """The training example(s) of one shard record (usually one; none for a record without a target)."""

    # ---- evaluation -----------------------------------------------------------------------------------------
    @abstractmethod
    def eval_item(self, record: dict) -> Optional[EvalItem]:
        """The evaluation item of one shard record (None: skip, e.g. no reference)."""

    @abstractmethod
    def predict(self, model: torch.nn.Module, items: Sequence[EvalItem], *, device: torch.device,
                dtype: torch.dtype = torch.float32, lockstep: Optional[Lockstep] = None) -> list[dict]:
        """One prediction record per item, in order: {"id": item.id, <the task's prediction field>: …}. The model
        is in eval mode; `lockstep` (distributed evaluation) is passed to generation."""

    @abstractmethod
    def score(self, predictions: Sequence[dict], items: Sequence[EvalItem], *, final: bool = False
              ) -> dict[str, float]:
        """The task's metrics (keys `metrics`) over paired predictions and items. `final`: the test-time
        protocol (caption: pycocoevalcap with the PTB tokenizer and METEOR) instead of the fast validation one."""

    @abstractmethod
    def result_entry(self, prediction: dict) -> dict:
        """The public results.json entry of one prediction (COCO caption, EvalAI VQA, RefCOCO box, SNLI-VE)."""

    @property
    def main_metric(self) -> str:
        return self.cfg.best_metric or self.metrics[0]


_REGISTRY = {
    "caption": "ofa_scale.finetune.caption:CaptionTask",
    "vqa": "ofa_scale.finetune.vqa:VQATask",
    "refcoco": "ofa_scale.finetune.refcoco:RefCOCOTask",
    "snli_ve": "ofa_scale.finetune.snli_ve:SNLIVETask",
    "ocr": "ofa_scale.finetune.ocr:OCRTask",
    "gigaword": "ofa_scale.finetune.gigaword:GigawordTask",
    "image_gen": "ofa_scale.finetune.image_gen:ImageGenTask",
    "imagenet": "ofa_scale.finetune.imagenet:ImageNetTask",
    # one class for the seven GLUE tasks (glue_cola, glue_sst2, …: the converter's format names)
    **{name: "ofa_scale.finetune.glue:GLUETask" for name in ("glue_cola", "glue_sst2", "glue_mrpc", "glue_qqp",
                                                              "glue_mnli", "glue_rte", "glue_qnli")},
}


def make_task(cfg: TaskSection, tokenizer: Any) -> FinetuneTask:
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"task.name is {cfg.name!r}; use one of {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[cfg.name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, tokenizer)
