"""The scorable tasks: which record fields hold predictions and references, and how a list of them is scored.

Records are JSON objects keyed by `id`. Prediction / reference fields per task:

| task                | prediction                      | reference                                         |
|---------------------|---------------------------------|---------------------------------------------------|
| caption             | `caption` (str)                 | `captions` (list of str, or one `&&`-joined str)  |
| vqa                 | `answer` (str)                  | `answers` ([{answer, conf}] or {answer: conf})    |
| refcoco / grounding | `box` [x0,y0,x1,y1] px, or `bins` (4 ints, needs ref `width`/`height`) | `box` px |
| snli_ve, imagenet   | `label`                         | `label`                                           |
| glue_<name>         | `label` (word or raw label)     | `label` (word or raw label)                       |
| gigaword            | `summary` (str)                 | `summary` (str)                                   |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ofa_scale.errors import UserError
from ofa_scale.evaluation.labels import GLUE_EXTRA_METRICS, GLUE_TASKS, GLUE_WORDS, SNLI_VE_WORDS, label_word
from ofa_scale.evaluation.metrics import classification
from ofa_scale.evaluation.metrics.caption_text import CAPTION_TOKENIZERS, split_references
from ofa_scale.evaluation.metrics.grounding import bins_to_box, grounding_hit
from ofa_scale.evaluation.metrics.vqa import answer_confidences


@dataclass(frozen=True)
class ScoreOptions:
    caption_tokenizer: str = "ofa"       # "ofa" (punctuation strip) or "ptb" (COCOEvalCap; Java)
    meteor: bool = False                 # caption METEOR (Java)
    cider_df: str | None = None          # cached CIDEr document frequencies; None = from the references

    def __post_init__(self) -> None:
        if self.caption_tokenizer not in CAPTION_TOKENIZERS:
            raise UserError(f"caption tokenizer must be one of {', '.join(CAPTION_TOKENIZERS)}, "
                            f"not {self.caption_tokenizer!r}")


@dataclass
class TaskScores:
    metrics: dict[str, float]                                   # corpus-level values (fractions)
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)      # what the numbers depend on (tokenizer, …)


class FieldError(UserError):
    pass


def _need(record: dict, name: str, kind: str) -> Any:
    if name not in record:
        raise FieldError(f"record {record.get('id')!r} has no '{name}' field ({kind}); see `ofa-eval score --help`")
    return record[name]


def _text(record: dict, name: str) -> str:
    value = _need(record, name, "a string")
    if not isinstance(value, str):
        raise FieldError(f"record {record.get('id')!r}: '{name}' must be a string, got {value!r}")
    return value


def _box(record: dict, name: str) -> list[float]:
    value = _need(record, name, "[x0, y0, x1, y1]")
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
        raise FieldError(f"record {record.get('id')!r}: '{name}' must be 4 finite numbers [x0, y0, x1, y1], "
                         f"got {value!r}")
    return [float(v) for v in value]


def _label(record: dict, name: str = "label") -> str:
    value = _need(record, name, "a label")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise FieldError(f"record {record.get('id')!r}: '{name}' must be a string or integer label, got {value!r}")
    return str(value).strip()


# ------------------------------------------------------------------------------------------------ readers
def _caption_refs(ref: dict) -> list[str]:
    value = _need(ref, "captions", "reference captions")
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        refs = [r for r in split_references(value) if r.strip()]  # "a&&" leaves an empty part
        if refs:
            return refs
    raise FieldError(f"record {ref.get('id')!r}: 'captions' must be a non-empty list of strings or an "
                     f"'&&'-joined string, got {value!r}")


def _vqa_refs(ref: dict) -> dict[str, float]:
    value = _need(ref, "answers", "reference answers with confidences")
    try:
        return answer_confidences(value)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FieldError(f"record {ref.get('id')!r}: 'answers' must be [{{'answer': str, 'conf': float}}, …] "
                         f"or {{answer: conf}}, got {value!r}") from None


def _grounding_pred(pred: dict, ref: dict) -> list[float]:
    if "box" in pred or "bins" not in pred:
        return _box(pred, "box")
    bins = pred["bins"]
    if not isinstance(bins, list) or len(bins) != 4 or not all(isinstance(b, int) for b in bins):
        raise FieldError(f"record {pred.get('id')!r}: 'bins' must be 4 integers, got {bins!r}")
    width, height = ref.get("width"), ref.get("height")
    if not all(isinstance(v, (int, float)) and v > 0 for v in (width, height)):
        raise FieldError(f"record {pred.get('id')!r} gives 'bins', so its reference needs positive 'width' and "
                         "'height' (original image size); or predict 'box' in pixels")
    return bins_to_box(bins, width, height)


# ------------------------------------------------------------------------------------------------ scorers
def _score_caption(preds: list[str], refs: list[list[str]], options: ScoreOptions) -> TaskScores:
    from ofa_scale.evaluation.metrics.caption import score_captions
    from ofa_scale.evaluation.metrics.cider import DocumentFrequencies

    df = DocumentFrequencies.load(options.cider_df) if options.cider_df else None
    scores = score_captions(preds, refs, tokenizer=options.caption_tokenizer, with_meteor=options.meteor,
                            document_frequencies=df)  # pycocoevalcap's scorers; CIDEr-D by hand only with df
    return TaskScores(scores.metrics, scores.per_sample, {
        "caption_tokenizer": options.caption_tokenizer,
        "cider_document_frequencies": options.cider_df or "references"})


def _score_vqa(preds: list[str], refs: list[dict[str, float]], options: ScoreOptions) -> TaskScores:
    each = np.array([r.get(p.strip(), 0.0) for p, r in zip(preds, refs)], dtype=float)
    return TaskScores({"vqa_score": float(each.mean()) if len(each) else 0.0}, {"vqa_score": each})


def _score_grounding(preds: list[list[float]], refs: list[list[float]], options: ScoreOptions) -> TaskScores:
    each = np.array([grounding_hit(p, r) for p, r in zip(preds, refs)], dtype=float)
    return TaskScores({"acc@0.5": float(each.mean()) if len(each) else 0.0}, {"acc@0.5": each})


def _accuracy_scorer(extra: tuple[str, ...] = ()) -> Callable[[list[str], list[str], ScoreOptions], TaskScores]:
    def score(preds: list[str], refs: list[str], options: ScoreOptions) -> TaskScores:
        correct = np.array([p == r for p, r in zip(preds, refs)], dtype=float)
        metrics = {"accuracy": classification.accuracy(preds, refs)}
        if "mcc" in extra:
            metrics["mcc"] = classification.matthews_corrcoef(preds, refs, positive="yes")
        if "f1" in extra:
            metrics["f1"] = classification.f1_positive(preds, refs, positive="yes")
        return TaskScores(metrics, {"correct": correct})
    return score


def _score_gigaword(preds: list[str], refs: list[str], options: ScoreOptions) -> TaskScores:
    from ofa_scale.evaluation.metrics.gigaword import prepare_reference, prepare_summary, rouge_f1

    # only the hypotheses are re-tokenised; OFA scores the raw lower-cased references (metrics/gigaword.py)
    means, per = rouge_f1([prepare_summary(p) for p in preds], [prepare_reference(r) for r in refs])
    return TaskScores(means, per, {"rouge": "rouge-score, Porter stemming, mean F1"})


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class TaskSpec:
    name: str
    prediction_field: str
    reference_field: str
    read_prediction: Callable[[dict, dict], Any]   # (prediction record, its reference record) -> value
    read_reference: Callable[[dict], Any]
    score: Callable[[list, list, ScoreOptions], TaskScores]
    main_metric: str
    empty_prediction: Any = ""   # stands in for a missing prediction (--allow-missing); always scores 0


def _words(mapping: dict[str, str]) -> tuple[Callable, Callable]:
    return (lambda p, r: label_word(_label(p), mapping)), (lambda r: label_word(_label(r), mapping))


def _build_registry() -> dict[str, TaskSpec]:
    grounding = dict(prediction_field="box", reference_field="box", read_prediction=_grounding_pred,
                     read_reference=lambda r: _box(r, "box"), score=_score_grounding, main_metric="acc@0.5",
                     empty_prediction=[0.0, 0.0, 0.0, 0.0])
    tasks = [
        TaskSpec("caption", "caption", "captions", lambda p, r: _text(p, "caption"), _caption_refs,
                 _score_caption, "cider"),
        TaskSpec("vqa", "answer", "answers", lambda p, r: _text(p, "answer"), _vqa_refs, _score_vqa, "vqa_score"),
        TaskSpec("refcoco", **grounding),
        TaskSpec("grounding", **grounding),
        TaskSpec("snli_ve", "label", "label", *_words(SNLI_VE_WORDS), _accuracy_scorer(), "accuracy"),
        TaskSpec("imagenet", "label", "label", *_words({}), _accuracy_scorer(), "accuracy"),
        TaskSpec("gigaword", "summary", "summary", lambda p, r: _text(p, "summary"), lambda r: _text(r, "summary"),
                 _score_gigaword, "rouge_l"),
    ]
    for name in GLUE_TASKS:
        extra = GLUE_EXTRA_METRICS.get(name, ())
        main = "mcc" if "mcc" in extra else "accuracy"
        tasks.append(TaskSpec(f"glue_{name}", "label", "label", *_words(GLUE_WORDS[name]), _accuracy_scorer(extra),
                              main))
    return {t.name: t for t in tasks}


TASKS: dict[str, TaskSpec] = _build_registry()


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
