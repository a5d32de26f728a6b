"""COCO caption metrics in one call: BLEU-1..4, ROUGE-L, CIDEr-D and (optionally) METEOR on the same
tokenised text, as pycocoevalcap's COCOEvalCap reports them (SPICE is left out: it downloads Stanford models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ofa_scale.evaluation.metrics.bleu import bleu
from ofa_scale.evaluation.metrics.caption_text import tokenize_captions
from ofa_scale.evaluation.metrics.cider import CiderD, DocumentFrequencies
from ofa_scale.evaluation.metrics.rouge_l import rouge_l


@dataclass(frozen=True)
class CaptionScores:
    metrics: dict[str, float]
    per_sample: dict[str, np.ndarray]
    tokenized_hypotheses: list[str]


def score_captions(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, tokenizer: str = "ofa",
                   with_meteor: bool = False, document_frequencies: DocumentFrequencies | None = None
                   ) -> CaptionScores:
    """`references[i]` are the reference captions of `hypotheses[i]`. With `document_frequencies` CIDEr-D uses
    the cache (OFA's validation setting); without, the references' own statistics (COCOEvalCap)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    sizes = [len(r) for r in references]
    # Tokenise everything in one call (one Java start for ptb).
    flat = tokenize_captions(list(hypotheses) + [r for refs in references for r in refs], tokenizer)
    hyps, rest = flat[:len(hypotheses)], flat[len(hypotheses):]
    refs, start = [], 0
    for size in sizes:
        refs.append(rest[start:start + size])
        start += size

    b = bleu(hyps, refs)
    rouge_mean, rouge_each = rouge_l(hyps, refs)
    cider_each = CiderD(document_frequencies).score(hyps, refs)
    metrics = {f"bleu{k + 1}": float(v) for k, v in enumerate(b.corpus)}
    metrics["rougeL"] = rouge_mean
    metrics["cider"] = float(cider_each.mean()) if len(cider_each) else 0.0
    per_sample = {f"bleu{k + 1}": b.per_sentence[:, k] for k in range(b.per_sentence.shape[1])}
    per_sample["rougeL"] = rouge_each
    per_sample["cider"] = cider_each
    if with_meteor:
        from ofa_scale.evaluation.metrics.meteor import meteor

        metrics["meteor"], per_sample["meteor"] = meteor(hyps, refs)
    return CaptionScores(metrics=metrics, per_sample=per_sample, tokenized_hypotheses=hyps)
