"""Evaluation inputs from raw `vl` shard records (docs/interfaces.md §2): one sample per record and task.

Prompts are the pretraining builders' strings (ofa_scale.objectives.builders), so a pretrained model is asked
exactly what it was trained on; images get the finetuning-evaluation transform instead of augmentation
(spec §7.1–§7.3: a plain bicubic resize to S×S, aspect ratio not kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
from PIL import Image

from ofa_scale.data.image_ops import to_uint8_tensor
from ofa_scale.evaluation.metrics.caption_text import split_references
from ofa_scale.evaluation.model_source import InputGeometry
from ofa_scale.objectives.builders import CAPTION_PROMPT, GROUNDING_PROMPT
from ofa_scale.objectives.text import pre_caption, pre_question

GENERATION_TASKS = ("caption", "vqa", "grounding")
# The shard record type that feeds each task.
RECORD_TYPE = {"caption": "caption", "vqa": "qa", "grounding": "visual_grounding"}


@dataclass
class EvalSample:
    task: str
    id: str
    source: list[int]           # bos + prompt + eos
    image: torch.Tensor         # uint8 3×S×S
    reference: dict[str, Any]   # the references.jsonl record (id + the task's reference field)
    image_size: tuple[int, int]  # (W, H) of the stored image the reference box refers to


def _square(img: Image.Image, size: int) -> torch.Tensor:
    return to_uint8_tensor(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def _source(tok: Any, text: str, geometry: InputGeometry) -> list[int]:
    ids = tok.encode(text)
    if geometry.max_source_tokens is not None:
        ids = ids[:max(geometry.max_source_tokens - 2, 1)]
    return [tok.bos, *ids, tok.eos]


def sample_from_record(record: dict, task: str, tok: Any, geometry: InputGeometry) -> Optional[EvalSample]:
    """The `task` sample of a vl record, or None when the record is of another type or has no usable reference."""
    meta, image = record["meta"], record["image"]
    if meta.get("type") != RECORD_TYPE[task] or image is None:
        return None
    key = str(record["key"])
    size = image.size
    if task == "caption":
        refs = [r for r in split_references(meta.get("caption") or "") if r.strip()]
        if not refs:
            return None
        return EvalSample(task, key, _source(tok, CAPTION_PROMPT, geometry), _square(image, geometry.image_size),
                          {"id": key, "captions": refs}, size)
    if task == "vqa":
        answers = meta.get("answers") or []
        if not answers:
            return None
        question = pre_question(meta.get("question") or "", geometry.max_src_words)
        return EvalSample(task, key, _source(tok, " " + question, geometry), _square(image, geometry.image_size),
                          {"id": key, "answers": answers}, size)
    box = meta.get("box")
    if not box or len(box) != 4:
        return None
    prompt = GROUNDING_PROMPT.format(pre_caption(meta.get("caption") or "", geometry.max_src_words))
    return EvalSample(task, key, _source(tok, prompt, geometry), _square(image, geometry.grounding_image_size),
                      {"id": key, "box": [float(c) for c in box], "width": size[0], "height": size[1]}, size)


def collect_samples(records: Iterable[dict], tasks: Iterable[str], limit: int, tok: Any,
                    geometry: InputGeometry) -> dict[str, list[EvalSample]]:
    """The first `limit` samples of each task, in record order; stops reading once every task is full."""
    tasks = list(tasks)
    out: dict[str, list[EvalSample]] = {t: [] for t in tasks}
    for record in records:
        for task in tasks:
            if len(out[task]) < limit:
                sample = sample_from_record(record, task, tok, geometry)
                if sample is not None:
                    out[task].append(sample)
        if all(len(v) >= limit for v in out.values()):
            break
    return out


def read_vl_records(root: str, seed: int = 0) -> Iterator[dict]:
    """Every `vl` record of a shard root once, in shard order (the loader in finite mode, no shuffling)."""
    from ofa_scale.data.loader import ShardLoader
    from ofa_scale.data.loader_config import LoaderConfig

    loader = ShardLoader(LoaderConfig(root=root, composition={"vl": 1}, num_streams=1, seed=seed, mode="epochs",
                                      epochs=1, shuffle_buffer=0, num_workers=0, on_corrupt="skip"))
    for batch in loader:
        yield from batch
