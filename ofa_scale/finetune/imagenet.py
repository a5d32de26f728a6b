"""ImageNet-1K classification (spec §7.5): the model names the image's class, decoding under a trie over the class
names.

Records come from `ofa-preprocess shards --format imagenet` (data/tsv_formats.py): meta `label_index` (1-based,
Caffe synset_words order), `class_name` and `uniq_id` (the converter's line number: the format has no id column),
and the image.

* Candidates: `task.class_names`, a user-supplied file with one class per line. A line may be a Caffe
  `synset_words.txt` line (`n01440764 tench, Tinca tinca`): the leading WordNet id is dropped and the rest is the
  class name; or the bare class name as the TSV's class-name column spells it. Repeated names count once (OFA's
  class2label dict has one key per name). A record's target is its `class_name` column (OFA reads columns 0 and
  2), so the file must spell names as that column does: training rows whose name is not in the file are skipped
  and counted (`skipped["answer_not_in_candidates"]`, finetune/closed_set.py), evaluation rows are kept and can
  only be wrong (counted in `skipped["label_not_in_class_names"]`).
* Source: [bos] + BPE(" what does the image describe?") + [eos]. OFA's prompt type none: prev_output =
  [bos] + BPE(" " + name), target = BPE(" " + name) + [eos], and the trie's constraint at every decoder position,
  so the loss and its label smoothing see only tokens that continue a class name.
* Images: training — timm's RandAugment pipeline with OFA's RandomAugment; evaluation — Resize((S, S)) bicubic
  (finetune/imagenet_transforms.py). `task.extra.train_augment: none` (default `ofa`) trains on the evaluation
  resize instead: for classes that RandAugment's colour operations (solarize, posterize, equalize, colour) can
  change, such as the sample world's "red circle". Both normalised with ImageNet's mean/std (`normalise_images`,
  which the finetuning workload applies to this task's training batches instead of OFA's 0.5/0.5).
* Prediction {"id", "label"} by all-candidate scoring over the class names (`task.decoding.inference: allcand`,
  model/candidates.py: the VQA recipe's fast batched scorer); metric `accuracy`; results.json entries
  {"id", "label"} (label: the class name).
* Validation during training reads `task.valid_fraction` of data.valid (evenly spaced records, the same ones at
  every validation), as OFA validates on a subset of the validation split; `ofa-eval run` reads all of it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ofa_scale.errors import ConfigError, UserError
from ofa_scale.evaluation.generation import batch_inputs
from ofa_scale.finetune import imagenet_transforms
from ofa_scale.finetune.closed_set import ClosedSetTask
from ofa_scale.finetune.task import EvalItem, Example
from ofa_scale.objectives.builders import CAPTION_PROMPT

PROMPT = CAPTION_PROMPT  # " what does the image describe?"
# A synset_words.txt line starts with its WordNet noun id: "n01440764 tench, Tinca tinca".
_WNID = re.compile(r"n\d{8}\s+")
# task.extra.train_augment: OFA's training pipeline, or the evaluation resize (module docstring)
TRAIN_AUGMENT = ("ofa", "none")
# Marks the shallow copy of a record that train_examples builds, so `pixels` applies the training transform.
_TRAINING = "_imagenet_training"


def clean_name(text: str) -> str:
    return " ".join(str(text).split())


def read_class_names(path: str | Path) -> list[str]:
    """The class names of a synset_words-style file, in file order, each once (module docstring)."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"task.class_names {p} cannot be read ({e}); give a UTF-8 file with one class name per "
                        f"line (synset_words.txt lines 'n01440764 tench, Tinca tinca' work too)") from None
    names = [clean_name(_WNID.sub("", line.strip(), count=1)) for line in lines]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise UserError(f"task.class_names {p} holds no class names; give one class name per line")
    return names


class ImageNetTask(ClosedSetTask):
    name = "imagenet"
    source = "imagenet"
    metrics = ("accuracy",)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        if not cfg.class_names:
            raise ConfigError("task.class_names is not set; give the synset_words-style file of the class names "
                              "(one per line, in the TSV's label-index order)")
        self.set_candidates(read_class_names(cfg.class_names))
        self._names = set(self.candidates)
        self._train_transform: Optional[imagenet_transforms.TrainTransform] = None  # built on first use (timm)
        self._augment = cfg.extra.get("train_augment", "ofa")
        if self._augment not in TRAIN_AUGMENT:
            raise ConfigError(f"task.extra.train_augment is {self._augment!r}; give one of "
                              f"{', '.join(TRAIN_AUGMENT)}")

    def default_source_length(self) -> int:
        return len(self.tok.encode(PROMPT)) + 2

    def source_ids(self, meta: dict) -> list[int]:
        return self.wrap_source(self.tok.encode(PROMPT))

    # ---- images ---------------------------------------------------------------------------------------------
    def pixels(self, record: dict) -> torch.Tensor:
        if not record.get(_TRAINING) or record.get("image") is None or self._augment == "none":
            # (no image: eval_pixels says what to do)
            return imagenet_transforms.eval_pixels(record.get("image"), self.cfg.image_size,
                                                   record["meta"].get("uniq_id"))
        if self._train_transform is None:
            self._train_transform = imagenet_transforms.TrainTransform(self.cfg.image_size)
        return self._train_transform(record["image"], int(record.get("seed", 0)))

    def normalise_images(self, images: torch.Tensor, patch_masks: torch.Tensor, dtype: torch.dtype
                         ) -> torch.Tensor:
        """ImageNet mean/std instead of OFA's 0.5/0.5 (finetune/workload.py uses it for training batches)."""
        return imagenet_transforms.normalise_images(images, patch_masks, dtype)

    def _device_batch(self, chunk, device, dtype) -> dict:
        if not chunk:  # an empty batch: nothing to normalise
            return super()._device_batch(chunk, device, dtype)
        batch = batch_inputs(chunk, self.tok.pad)
        masks = batch["patch_masks"].to(device)
        return {"src_tokens": batch["src_tokens"].to(device), "patch_masks": masks,
                "patch_images": self.normalise_images(batch["patch_images"].to(device), masks, dtype)}

    # ---- training and evaluation ----------------------------------------------------------------------------
    def train_examples(self, record: dict) -> list[Example]:
        return self.example({**record, _TRAINING: True}, clean_name(record["meta"]["class_name"]), 1.0)

    def eval_item(self, record: dict) -> Optional[EvalItem]:
        meta = record["meta"]
        label = clean_name(meta["class_name"])
        if label not in self._names:
            self._count("label_not_in_class_names",
                        f"imagenet evaluation label {label!r} is not among the {len(self.candidates)} names of "
                        f"task.class_names; such items are evaluated but cannot be predicted right")
        return self.item(record, str(meta.get("uniq_id")), {"label": label})

    def result_entry(self, prediction: dict) -> dict:
        return {"id": str(prediction["id"]), "label": prediction["label"]}


__all__ = ["ImageNetTask", "PROMPT", "read_class_names"]
