"""Label words of the classification tasks (spec §7.4, §7.8): raw dataset labels -> the words OFA predicts."""

from __future__ import annotations

from typing import Any

SNLI_VE_WORDS = {"contradiction": "no", "entailment": "yes", "neutral": "maybe"}

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "rte", "qnli")
GLUE_WORDS: dict[str, dict[str, str]] = {
    "cola": {"0": "no", "1": "yes"},
    "sst2": {"0": "negative", "1": "positive"},
    "mrpc": {"0": "no", "1": "yes"},
    "qqp": {"0": "no", "1": "yes"},
    "mnli": {"0": "maybe", "1": "yes", "2": "no",
             "neutral": "maybe", "entailment": "yes", "contradiction": "no"},
    "rte": {"not_entailment": "no", "entailment": "yes"},
    "qnli": {"0": "no", "1": "yes", "not_entailment": "no", "entailment": "yes"},
}
# Extra metrics beyond accuracy, with "yes" as the positive class.
GLUE_EXTRA_METRICS = {"cola": ("mcc",), "mrpc": ("f1",), "qqp": ("f1",)}


def label_word(value: Any, mapping: dict[str, str]) -> str:
    """A label as its word: raw labels (ints, dataset names) are mapped, words pass through unchanged."""
    text = str(value).strip()
    return mapping.get(text.lower(), text)
