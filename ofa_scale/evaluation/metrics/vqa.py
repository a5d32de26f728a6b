"""VQA soft score (spec §7.2): the confidence stored for the predicted answer string, 0 if it is not among the
reference answers. The confidences are the precomputed VQA accuracies min(1, #annotators/3)-style values of the
TSV's `conf|!+answer` field (our shards keep them as `answers: [{"answer", "conf"}]`)."""

from __future__ import annotations

from typing import Mapping, Sequence


def answer_confidences(answers: Sequence[Mapping] | Mapping[str, float]) -> dict[str, float]:
    """{answer: conf} from the shard/record list form or an already-built mapping. A repeated answer keeps its
    highest confidence."""
    if isinstance(answers, Mapping):
        items = [(str(a), float(c)) for a, c in answers.items()]
    else:
        items = [(str(a["answer"]), float(a["conf"])) for a in answers]
    table: dict[str, float] = {}
    for answer, conf in items:
        answer = answer.strip()
        table[answer] = max(conf, table.get(answer, conf))
    return table


def vqa_score(prediction: str, answers: Sequence[Mapping] | Mapping[str, float]) -> float:
    return answer_confidences(answers).get(prediction.strip(), 0.0)
