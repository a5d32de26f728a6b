"""Trivial baselines of the finetuning tasks: what a model that ignores its input scores on an evaluation split.

    python -m ofa_scale.finetune.baselines --config RECIPE [--train TRAIN_SHARDS] --data EVAL_SHARDS [--set k=v]...

A finetuned model is only worth its metric if it beats these (issue 10's end-to-end check):
* caption: the most frequent training caption, predicted for every image;
* vqa:     the most frequent training answer (each question's target: its highest-confidence answer);
* refcoco: the whole image as the box;
* snli_ve: the most frequent training label;
* imagenet: the most frequent training class.
Ties go to the value met first in the training shards. Scores come from the task's own `score` with the test
protocol (`final=True`, what `ofa-eval run` reports), on the same items `ofa-eval run` reads, so the numbers
compare one to one.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from ofa_scale.errors import UserError
from ofa_scale.finetune.evaluate import read_items, read_records
from ofa_scale.finetune.task import EvalItem, FinetuneTask

# what each baseline predicts, for the printed line
DESCRIPTIONS = {"caption": "the most frequent training caption", "vqa": "the majority training answer",
                "refcoco": "the whole-image box", "snli_ve": "the majority training label",
                "imagenet": "the majority training class"}


def _most_frequent(values: Iterable[Any], what: str, train_dir: str | Path) -> Any:
    counts = Counter(values)
    if not counts:
        raise UserError(f"{train_dir} gives no training {what}; point --train at the task's training shards")
    return counts.most_common(1)[0][0]  # Counter keeps first-met order among equal counts


def constant_value(task: FinetuneTask, train_dir: str | Path) -> Any:
    """The constant prediction of the task's baseline, learnt from the training shards (None for refcoco, whose
    box depends on each image's size only)."""
    if task.name == "refcoco":
        return None
    from ofa_scale.finetune.caption import _captions
    from ofa_scale.objectives.builders import best_answer

    metas = (r["meta"] for r in read_records(task, train_dir))
    if task.name == "caption":
        return _most_frequent((c.strip() for m in metas for c in _captions(m) if c.strip()), "captions", train_dir)
    if task.name == "vqa":
        return _most_frequent((best_answer(m["answers"])[0] for m in metas if m.get("answers")), "answers",
                              train_dir)
    if task.name == "snli_ve":
        return _most_frequent((str(m["label"]) for m in metas), "labels", train_dir)
    if task.name == "imagenet":
        from ofa_scale.finetune.imagenet import clean_name

        return _most_frequent((clean_name(m["class_name"]) for m in metas), "classes", train_dir)
    raise UserError(f"no trivial baseline for task {task.name!r}; the baselines cover {', '.join(DESCRIPTIONS)}")


def baseline_predictions(task: FinetuneTask, items: list[EvalItem], value: Any) -> list[dict]:
    """Prediction records in the shape the task's `score` reads."""
    if task.name == "refcoco":
        return [{"id": it.id, "box": [0.0, 0.0, float(it.image_size[0]), float(it.image_size[1])]} for it in items]
    field = {"caption": "caption", "vqa": "answer", "snli_ve": "label", "imagenet": "label"}[task.name]
    return [{"id": it.id, field: value} for it in items]


def baseline_metrics(task: FinetuneTask, train_dir: str | Path, eval_dir: str | Path, *, limit: int = 0
                     ) -> tuple[Any, dict[str, float]]:
    """(the constant prediction, the task's test-protocol metrics of the baseline on `eval_dir`)."""
    value = constant_value(task, train_dir)
    items = [item for _, item in read_items(task, eval_dir, limit=limit)[0]]
    if not items:
        raise UserError(f"{eval_dir} gives no evaluation items for task {task.name}")
    predictions = baseline_predictions(task, items, value)
    return value, {k: float(v) for k, v in task.score(predictions, items, final=True).items()}


def main(argv: list[str] | None = None) -> int:
    from ofa_scale.cli import run_cli

    parser = argparse.ArgumentParser(prog="python -m ofa_scale.finetune.baselines", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, metavar="RECIPE", help="the finetuning recipe YAML (task.*)")
    parser.add_argument("--train", default=None, metavar="SHARDS",
                        help="the task's training shards (default: the recipe's data.train)")
    parser.add_argument("--data", required=True, metavar="SHARDS", help="the evaluation shards")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N records (0 = all)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the metrics as JSON here")
    args = parser.parse_args(argv)

    def go() -> int:
        from ofa_scale.data.tokenizer import load_tokenizer
        from ofa_scale.finetune.task import make_task
        from ofa_scale.training.config import load_training_config

        # the recipe validates data.train, so --train goes in as an override
        cfg = load_training_config(args.config, args.overrides + ([f"data.train={args.train}"] if args.train else []))
        if not cfg.finetuning:
            raise UserError(f"{args.config} sets no task.name; baselines are for finetuning recipes")
        tok = load_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path, num_bins=cfg.objectives.num_bins)
        task = make_task(cfg.task, tok)
        value, metrics = baseline_metrics(task, cfg.data.train, args.data, limit=args.limit)
        shown = f" ({value!r})" if value is not None else ""
        print(f"baseline {task.name}: {DESCRIPTIONS[task.name]}{shown}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if args.out:
            from ofa_scale.utils.io import atomic_write_json

            atomic_write_json(args.out, {"task": task.name, "baseline": DESCRIPTIONS[task.name],
                                         "value": value, **metrics})
        return 0

    return run_cli(go, parser.prog)


if __name__ == "__main__":
    raise SystemExit(main())
