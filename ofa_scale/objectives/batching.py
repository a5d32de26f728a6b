"""Per-batch mixing: how many records of each source a micro-batch holds, and the fixed-shape collate.

`Composition` turns the config's ratios into integer record counts per micro-batch (the loader asks for them);
`Collator` turns the examples built from those records into `{"vl": GroupBatch, "aux": GroupBatch,
"stats": {...}}` with shapes fixed by the config, so every micro-batch of a run has identical tensor shapes
(pipeline stages and compiled graphs see static shapes). See docs/objectives.md for the design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch

from ofa_scale.errors import ConfigError
from ofa_scale.objectives.config import (GROUPS, PAD_TASK_ID, SOURCE_TASKS, SOURCES, TASK_GROUP, TASK_ID,
                                         ObjectivesConfig)
from ofa_scale.objectives.constraints import ConstraintSets
from ofa_scale.objectives.transforms import INFILL_FILL

GroupBatch = dict[str, Any]
BOS, PAD, EOS = 0, 1, 2
MODEL_KEYS = ("src_tokens", "patch_images", "patch_masks", "prev_output_tokens", "code_masks")
# uint8 fill of rows without an image. OFA gives text-only samples a zero tensor *after* normalisation (grey,
# 127.5 in pixel units, not representable in uint8); `to_model_inputs` zeroes those rows exactly, so this value
# only matters to a consumer that normalises without patch_masks, which then sees the infill hole's near-grey.
# A black (0 → −1) dummy would shift the ResNet's train-mode BatchNorm statistics away from OFA's.
DUMMY_PIXEL = INFILL_FILL


@dataclass(frozen=True)
class Composition:
    """Records per source in one micro-batch, and the resulting fixed batch size of each group."""

    counts: dict[str, int]  # e.g. {"vl": 8, "text": 2, "image": 1, "detection": 1}
    vl_examples_per_row: int  # 2 when itm or grounded captioning is on (OFA), else 1

    @classmethod
    def from_config(cls, cfg: ObjectivesConfig, vl_rows: int) -> "Composition":
        """Scale `cfg.mix` to `vl_rows` image-text rows: count(s) = vl_rows · mix[s] / mix["vl"].

        Counts must be whole numbers (we never alternate aux records between micro-batches, which would break
        the fixed shapes); sources whose tasks are all disabled get 0.
        """
        cfg.validate()
        if vl_rows < 1:
            raise ConfigError(f"train.micro_batch_size is {vl_rows}; it counts image-text rows and must be >= 1")
        counts: dict[str, int] = {}
        for source in SOURCES:
            on = any(cfg.enabled(t) for t in SOURCE_TASKS[source])
            ratio = cfg.mix.get(source, 0)
            if source == "vl":
                counts[source] = vl_rows if on else 0
                continue
            exact = vl_rows * ratio / cfg.mix["vl"]
            if on and exact != int(exact):
                step = cfg.mix["vl"] // math.gcd(cfg.mix["vl"], ratio)
                raise ConfigError(
                    f"objectives.mix gives {exact:g} {source} records per micro-batch of {vl_rows} image-text rows; "
                    f"make train.micro_batch_size a multiple of {step} or change objectives.mix.{source}")
            counts[source] = int(exact) if on else 0
        extra = cfg.enabled("itm") or cfg.enabled("grounded_caption")
        return cls(counts=counts, vl_examples_per_row=2 if extra else 1)

    def loader_counts(self) -> dict[str, int]:
        """`loader.composition`: the sources with at least one record per micro-batch (the loader reads only
        the sources it is given)."""
        return {s: n for s, n in self.counts.items() if n > 0}

    def group_sizes(self) -> dict[str, int]:
        """Fixed batch size per group; a group of size 0 is absent from every batch."""
        sizes = {"vl": self.counts.get("vl", 0) * self.vl_examples_per_row,
                 "aux": sum(self.counts.get(s, 0) for s in ("text", "image", "detection"))}
        return {g: n for g, n in sizes.items() if n > 0}


class Collator:
    """`collator(examples) -> {"vl": GroupBatch, "aux": GroupBatch, "stats": {...}}` with fixed shapes.

    Each group has `batch_size` rows (missing examples become padding rows: target all pad, task id -1),
    `source_length`/`target_length` columns (longer sequences are truncated and counted in
    `stats[group]`), and images of the group's size. `constraint_masks` appear only when some example of the
    group carries a `constraint`: a compact `ConstraintSets` (objectives/constraints.py) standing for the
    (B, T, vocab_size) boolean mask, which the loss resolves on the device for the positions it computes.
    """

    def __init__(self, cfg: ObjectivesConfig, composition: Composition, vocab_size: Optional[int] = None,
                 task_ids: Optional[dict[str, int]] = None):
        self.cfg = cfg
        self.sizes = composition.group_sizes()
        self.vocab_size = vocab_size
        # Pretraining: the objectives' TASKS order and groups. Finetuning passes its own {task name: id} (the
        # index into the trainer's task list, e.g. {"refcoco": 0}); its examples all go to the "vl" group.
        self.task_ids = dict(TASK_ID) if task_ids is None else dict(task_ids)
        self.task_group = dict(TASK_GROUP) if task_ids is None else {t: "vl" for t in task_ids}
        spn = cfg.scaled.sample_patch_num
        # OFA samples patches on the image-text batch only on steps that also carry an auxiliary batch.
        self.sample_patch_num = {"vl": spn if "aux" in self.sizes else 0, "aux": 0}

    def __call__(self, examples: Iterable[dict]) -> dict[str, Any]:
        by_group: dict[str, list[dict]] = {g: [] for g in self.sizes}
        for ex in examples:
            if ex["task"] not in self.task_group:
                raise ValueError(f"a {ex['task']!r} example arrived but this collator batches "
                                 f"{', '.join(self.task_group)} examples")
            group = self.task_group[ex["task"]]
            if group not in by_group:
                raise ValueError(f"a {ex['task']} example arrived but group {group!r} has batch size 0 in this "
                                 f"composition")
            by_group[group].append(ex)
        batch: dict[str, Any] = {}
        stats: dict[str, dict[str, int]] = {}
        for group, rows in by_group.items():
            batch[group], stats[group] = self._collate_group(group, rows)
        batch["stats"] = stats
        return batch

    def _collate_group(self, group: str, rows: Sequence[dict]) -> tuple[GroupBatch, dict[str, int]]:
        shape = getattr(self.cfg, group)
        b, s_len, t_len, size = self.sizes[group], shape.source_length, shape.target_length, shape.image_size
        if len(rows) > b:
            raise ValueError(f"{len(rows)} {group} examples for a group of batch size {b}; the loader must deliver "
                             f"exactly the composition's record counts")
        src = torch.full((b, s_len), PAD, dtype=torch.long)
        prev = torch.full((b, t_len), PAD, dtype=torch.long)
        tgt = torch.full((b, t_len), PAD, dtype=torch.long)
        # Rows without an image (text-only and padding rows) hold mid-grey; `to_model_inputs` makes them exactly
        # zero after normalisation, as OFA's dummy images are (see DUMMY_PIXEL).
        images = torch.full((b, 3, size, size), DUMMY_PIXEL, dtype=torch.uint8)
        patch_masks = torch.zeros(b, dtype=torch.bool)
        code_masks = torch.zeros(b, dtype=torch.bool)
        conf = torch.ones(b, dtype=torch.float32)
        task_ids = torch.full((b,), PAD_TASK_ID, dtype=torch.long)
        constrained = any(r.get("constraint") is not None for r in rows)
        if constrained and self.vocab_size is None:
            raise ValueError("examples carry constraints but the Collator was built without vocab_size")
        st = {"examples": len(rows), "padding_rows": b - len(rows), "source_truncated": 0, "target_truncated": 0,
              "target_tokens": 0}
        for i, ex in enumerate(rows):
            source = list(ex["source"])
            if len(source) > s_len:
                source = source[:s_len - 1] + [EOS]  # keep the eos the encoder was trained to end on
                st["source_truncated"] += 1
            target, prev_out = list(ex["target"]), list(ex["prev_output"])
            if len(target) > t_len:
                target, prev_out = target[:t_len], prev_out[:t_len]
                st["target_truncated"] += 1
            src[i, :len(source)] = torch.tensor(source, dtype=torch.long)
            tgt[i, :len(target)] = torch.tensor(target, dtype=torch.long)
            prev[i, :len(prev_out)] = torch.tensor(prev_out, dtype=torch.long)
            image = ex.get("image")
            if bool(ex["patch_mask"]) != (image is not None):
                # patch_masks is what marks a row's image as a dummy on the device; the two must agree.
                raise ValueError(f"{ex['task']} example has patch_mask={bool(ex['patch_mask'])} but "
                                 f"{'no' if image is None else 'an'} image; patch_mask must be True exactly when "
                                 f"there is an image")
            if image is not None:
                if tuple(image.shape) != (3, size, size) or image.dtype != torch.uint8:
                    raise ValueError(f"{ex['task']} image has shape {tuple(image.shape)} / {image.dtype}; group "
                                     f"{group!r} expects uint8 3x{size}x{size}")
                images[i] = image
            patch_masks[i] = bool(ex["patch_mask"])
            code_masks[i] = bool(ex.get("code_mask", False))
            conf[i] = float(ex["conf"])
            task_ids[i] = self.task_ids[ex["task"]]
        st["target_tokens"] = int((tgt != PAD).sum())
        out: GroupBatch = {"src_tokens": src, "patch_images": images, "patch_masks": patch_masks,
                           "prev_output_tokens": prev, "target": tgt, "code_masks": code_masks, "conf": conf,
                           "task_ids": task_ids, "sample_patch_num": self.sample_patch_num[group]}
        if constrained:
            out["constraint_masks"] = ConstraintSets.build([r.get("constraint") for r in rows], b, t_len,
                                                           self.vocab_size)
        if any("references" in r for r in rows):
            # SCST (finetune/scst.py) rewards generated captions against each row's reference captions: a plain
            # list per row, [] for padding rows, never sent to the model
            out["references"] = [list(r.get("references", [])) for r in rows] + [[] for _ in range(b - len(rows))]
        return out, st


def constraint_mask(constraint: Any, t_len: int, vocab_size: int) -> torch.Tensor:
    """(T, V) allowed-token mask of one example, dense (the reference for `ConstraintSets`, which the Collator
    builds instead).

    `constraint` is either {"range": (start, end)} — ids 0–3 and [start, end) at every position, OFA's
    `constraint_range` — or a list with, per target position, the allowed ids (positions beyond the list
    allow everything; they are padding or unconstrained).
    """
    m = torch.ones((t_len, vocab_size), dtype=torch.bool)
    if isinstance(constraint, dict) and "range" in constraint:
        start, end = constraint["range"]
        m[:, 4:start] = False
        m[:, end:] = False
        return m
    for pos, allowed in enumerate(list(constraint)[:t_len]):
        row = torch.zeros(vocab_size, dtype=torch.bool)
        row[torch.as_tensor(list(allowed), dtype=torch.long)] = True
        m[pos] = row
    return m


def group_names(batch: dict[str, Any]) -> list[str]:
    """The group keys of a collated batch, in GROUPS order (skips "stats")."""
    return [g for g in GROUPS if g in batch]


def normalise_images(images: torch.Tensor, patch_masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B,3,H,W) → `(x/255 − 0.5)/0.5` in `dtype`; rows whose patch_mask is False (no image) become exactly
    0, OFA's dummy image (+0.0 everywhere, whatever uint8 they held)."""
    # fp32 arithmetic first (exactly OFA's ToTensor + Normalize), then the compute dtype.
    out = images.float().div_(255.0).sub_(0.5).div_(0.5)
    out.masked_fill_(~patch_masks.bool().view(-1, 1, 1, 1), 0.0)
    return out.to(dtype)


def to_model_inputs(group: GroupBatch, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """Model kwargs of one group on `device`: images normalised there (`normalise_images`), in `dtype`."""
    patch_masks = group["patch_masks"].to(device, non_blocking=True)
    images = normalise_images(group["patch_images"].to(device, non_blocking=True), patch_masks, dtype)
    spn = int(group.get("sample_patch_num") or 0)
    return {"src_tokens": group["src_tokens"].to(device, non_blocking=True),
            "patch_images": images,
            "patch_masks": patch_masks,
            "prev_output_tokens": group["prev_output_tokens"].to(device, non_blocking=True),
            "code_masks": group["code_masks"].to(device, non_blocking=True),
            "sample_patch_num": spn if spn > 0 else None}


def loss_inputs(group: GroupBatch, device: torch.device | str) -> dict:
    """The loss's per-row tensors of one group on `device` (target, conf, task_ids, optional constraints)."""
    out = {"target": group["target"].to(device, non_blocking=True),
           "conf": group["conf"].to(device, non_blocking=True),
           "task_ids": group["task_ids"].to(device, non_blocking=True)}
    if "constraint_masks" in group:
        out["constraint_masks"] = group["constraint_masks"].to(device, non_blocking=True)
    return out
