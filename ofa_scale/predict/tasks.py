"""The `ofa-predict` tasks on top of the finetuning task modules (ofa_scale/finetune/*.py).

Each predict task names the finetuning task whose prompts and decoding preset it uses, the recipe its `task:`
section comes from, and how one user input (image + text) becomes that task's EvalItem: through the task's own
`eval_item` / `item` on a record dict shaped like a shard record, so the prompt is built by the same code the
recipe trains and validates with. References the record would carry are placeholders; nothing scores them.

`instruct` is OFA's generic interface: the user's text is the whole encoder source and decoding is the caption
preset's plain beam search (no constraint), with the caption recipe's image geometry.

A model on the `bert` tokenizer is OFA-CN (OFA itself picks its prompts by the BPE class): without a run's own task
section or `--recipe`, its tasks take the Chinese recipes (MUGE caption, Chinese RefCOCO; `task.language: zh`), so
a bare `ofa-convert import-ofa --tokenizer-kind bert` model dir gets the Chinese prompts; OFA-CN has none for VQA
or SNLI-VE, which are refused in one sentence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from ofa_scale.errors import UserError
from ofa_scale.finetune.config import TaskSection
from ofa_scale.finetune.inputs import TOKENS_PER_WORD
from ofa_scale.finetune.task import EvalItem, FinetuneTask, make_task
from ofa_scale.utils.config import apply_overrides, from_dict, load_yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "configs" / "finetune"
NOT_YET = ("classify",)
_NOT_YET_REASON = "not available yet: needs the ImageNet recipe"
IMAGE_GEN = "image_gen"  # text → images: its own flow (predict/image_gen.py), not a finetuning task's predict


@dataclass(frozen=True)
class PredictSpec:
    name: str          # --task
    finetune: str      # the finetuning task module (task.name)
    recipe: str        # configs/finetune/<recipe>.yaml: its `task:` section when the model has none of its own
    recipe_zh: Optional[str]  # the same for an OFA-CN model (bert tokenizer); None: OFA-CN has no such prompt
    field: str         # the output line's field
    needs_text: bool   # an input without text is an error
    tsv_format: Optional[str]  # the TSV format --input may be in (None: no TSV)


SPECS = {s.name: s for s in (
    PredictSpec("caption", "caption", "caption_stage1_base", "muge_caption_base", "caption", False, "caption"),
    PredictSpec("vqa", "vqa", "vqa_base", None, "answer", True, "vqa"),
    PredictSpec("grounding", "refcoco", "refcoco_base", "refcoco_cn_base", "box", True, "refcoco"),
    PredictSpec("snli_ve", "snli_ve", "snli_ve_base", None, "label", True, "snli_ve"),
    PredictSpec("instruct", "caption", "caption_stage1_base", "muge_caption_base", "text", True, None),
    PredictSpec("ocr", "ocr", "ocr_base", "ocr_base", "text", False, "ocr"),
)}
TASK_CHOICES = (*SPECS, IMAGE_GEN, *NOT_YET)


def get_spec(name: str) -> PredictSpec:
    if name in NOT_YET:
        raise UserError(f"--task {name} is {_NOT_YET_REASON}")
    if name not in SPECS:
        raise UserError(f"--task {name!r} is unknown; use one of {', '.join(SPECS)}")
    return SPECS[name]


def task_section(spec: PredictSpec, *, run_task: Optional[dict], recipe: Optional[str], answers: Optional[str],
                 overrides: list[str], batch_size: int, tokenizer: Any = None) -> TaskSection:
    """The `task:` section to predict with: the `--recipe` file's, else the run's own when it was finetuned on
    this task (its geometry), else the task's base recipe (its Chinese one when `tokenizer` is OFA-CN's bert);
    then `--set` overrides (keys inside `task.`).

    VQA: with `answers` the recipe's candidate set and inference (all-candidate scoring) apply; without, the
    answer is decoded open-ended by beam search (no candidate file, no trie)."""
    if recipe:
        data = load_yaml(recipe).get("task") or {}
        if data.get("name") != spec.finetune:
            raise UserError(f"--recipe {recipe} is a {data.get('name') or 'pretraining'} recipe; --task "
                            f"{spec.name} needs a {spec.finetune} recipe")
    elif run_task and run_task.get("name") == spec.finetune:
        data = dict(run_task)
    else:
        name = spec.recipe
        if getattr(tokenizer, "kind", None) == "bert":
            name = spec.recipe_zh
            if name is None:
                raise UserError(f"--task {spec.name} has no Chinese prompt in OFA-CN, and this model uses OFA-CN's "
                                f"bert tokenizer; use caption, grounding, instruct or ocr, or pass --recipe")
        path = RECIPES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise UserError(f"the {name} recipe is not at {path}; pass --recipe configs/finetune/"
                            f"{name}.yaml from an ofa-scale checkout")
        data = load_yaml(path)["task"]
    data = apply_overrides(data, list(overrides))
    data.setdefault("decoding", {})["batch_size"] = batch_size
    if spec.name == "vqa":
        if answers:
            data["answers"] = str(answers)
        else:
            data.update(answers=None, constrained_training=False)
            data["decoding"]["inference"] = "beam"
    section = from_dict(TaskSection, data, prefix="task")
    section.validate()
    return section


class Predictor:
    """A predict task bound to its finetuning task: inputs → EvalItems, and predictions → output fields."""

    def __init__(self, spec: PredictSpec, section: TaskSection, tokenizer: Any):
        self.spec = spec
        self.task: FinetuneTask = make_task(section, tokenizer)
        self.tok = tokenizer

    def item(self, item_id: Any, image: Image.Image, text: str, meta: dict) -> EvalItem:
        """The EvalItem of one input; a UserError (reported on its output line) when the input cannot be one."""
        text = text.strip()
        if self.spec.needs_text and not text:
            raise UserError(f"empty {'question' if self.spec.name == 'vqa' else 'text'}")
        name, key = self.spec.name, str(item_id)
        if name in ("caption", "instruct"):
            # one placeholder reference: eval_item skips records without captions
            item = self.task.eval_item({"key": key, "meta": {"image_id": key, "uniq_id": key, "captions": ["-"]},
                                        "image": image})
            if name == "instruct":
                budget = TOKENS_PER_WORD * self.task.cfg.max_src_length
                item = dataclasses.replace(item, source=[self.tok.bos, *self.tok.encode(" " + text)[:budget],
                                                         self.tok.eos])
            return item
        if name == "vqa":
            objects = meta.get("objects") or []
            record = {"key": key, "meta": {"uniq_id": key, "question": text,
                                           "objects": [str(o) for o in objects]}, "image": image}
            return self.task.item(record, key, {})
        if name == "snli_ve":
            record = {"key": key, "meta": {"uniq_id": key, "hypothesis": text,
                                           "caption": str(meta.get("premise", "") or "")}, "image": image}
            return self.task.item(record, key, {})
        if name == "ocr":  # a placeholder transcription: eval_item skips records without one
            return self.task.eval_item({"key": key, "meta": {"uniq_id": key, "text": "-"}, "image": image})
        # grounding: the box placeholder is the reference; the image passed is the original, so the predicted
        # box is in original pixels
        return self.task.eval_item({"key": key, "image": image, "meta": {
            "uniq_id": key, "text": text, "box": [0.0, 0.0, 1.0, 1.0],
            "image": {"orig_width": image.width, "orig_height": image.height}}})

    def output(self, prediction: dict) -> Any:
        if self.spec.name == "caption" or self.spec.name == "instruct":
            return prediction["caption"]
        if self.spec.name == "grounding":
            return [round(float(c), 2) for c in prediction["box"]]
        return prediction[self.spec.field]
