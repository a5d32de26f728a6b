"""Caption metrics from pycocoevalcap's scorers, in COCOEvalCap's pipeline (spec §7.1).

`coco_caption_metrics(results, references)` is the final test protocol of OFA's `coco_eval.py`: PTB tokenizer
on both sides, then `Bleu(4)`, `Meteor()`, `Rouge()`, `Cider()` in that order over the images that have a result,
each scorer handed `{image_id: [sentence]}` dicts as COCOEvalCap hands them. We drive the scorers ourselves
rather than call `COCOEvalCap.evaluate()`, because that always runs SPICE too, whose first use downloads Stanford
CoreNLP models (no network here, and minutes of Java on a cluster): SPICE is left out. The tokenizer is the
library's jar run by `caption_text.ptb_tokenize` (see there why not its wrapper class).

`score_captions(...)` is the same pipeline with choices: OFA's training-time text preparation (`ofa`: punctuation
stripped, no PTB), METEOR optional, and CIDEr-D from cached document frequencies (`metrics/cider.CiderD`, the
one metric kept by hand: pycocoevalcap's `Cider` cannot take a cache). Values are as pycocoevalcap returns
them: fractions, CIDEr-D on its ×10 scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.caption_text import tokenize_captions
from ofa_scale.evaluation.metrics.cider import CiderD, DocumentFrequencies

COCO_CAPTION_METRICS = ("bleu4", "meteor", "rouge_l", "cider")  # metrics.json keys (issue 10 §4)


@dataclass(frozen=True)
class CaptionScores:
    metrics: dict[str, float]              # bleu1..bleu4, [meteor], rouge_l, cider
    per_sample: dict[str, np.ndarray]      # the same keys, one value per hypothesis
    tokenized_hypotheses: list[str]


def _library_scores(gts: dict, res: dict, with_meteor: bool, cider: CiderD | None
                    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """pycocoevalcap's scorers in COCOEvalCap's order on {key: [refs]} / {key: [hyp]} dicts; CIDEr-D by `cider`
    (a cached-frequency CiderD) when given, else by the library's Cider."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    metrics: dict[str, float] = {}
    per: dict[str, np.ndarray] = {}
    corpus, each = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        metrics[f"bleu{k + 1}"], per[f"bleu{k + 1}"] = float(corpus[k]), np.asarray(each[k], dtype=float)
    if with_meteor:
        from ofa_scale.evaluation.metrics.meteor import meteor

        metrics["meteor"], per["meteor"] = meteor(gts, res)
    score, each = Rouge().compute_score(gts, res)
    metrics["rouge_l"], per["rouge_l"] = float(score), np.asarray(each, dtype=float)
    if cider is None:
        score, each = Cider().compute_score(gts, res)
        metrics["cider"], per["cider"] = float(score), np.asarray(each, dtype=float)
    else:
        each = cider.score_per_hypothesis([res[k][0] for k in res], [gts[k] for k in res])
        metrics["cider"], per["cider"] = float(each.mean()), each
    return metrics, per


def score_captions(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *,
                   keys: Sequence[Hashable] | None = None, tokenizer: str = "ofa", with_meteor: bool = False,
                   document_frequencies: DocumentFrequencies | None = None) -> CaptionScores:
    """`references[i]` are the reference captions of `hypotheses[i]`; `keys[i]` its image id (default i: the
    scorers only need distinct keys, in order). With `document_frequencies` CIDEr-D uses the cache (OFA's
    validation and SCST setting); without, the references' own statistics (COCOEvalCap)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    keys = list(range(len(hypotheses))) if keys is None else list(keys)
    if len(keys) != len(hypotheses) or len(set(keys)) != len(keys):
        raise ValueError("score_captions needs one distinct key per hypothesis")
    sizes = [len(r) for r in references]
    if any(size == 0 for size in sizes):
        raise ValueError(f"hypothesis {keys[sizes.index(0)]!r} has no references")
    # Tokenise both sides in one call (one Java start for ptb); PTB works line by line, so this equals
    # COCOEvalCap's two calls.
    flat = tokenize_captions(list(hypotheses) + [r for refs in references for r in refs], tokenizer)
    hyps, rest = flat[:len(hypotheses)], flat[len(hypotheses):]
    gts, start = {}, 0
    for key, size in zip(keys, sizes):
        gts[key] = rest[start:start + size]
        start += size
    res = {key: [hyp] for key, hyp in zip(keys, hyps)}
    if not hyps:
        names = ["bleu1", "bleu2", "bleu3", "bleu4"] + (["meteor"] if with_meteor else []) + ["rouge_l", "cider"]
        return CaptionScores({n: 0.0 for n in names}, {n: np.zeros(0) for n in names}, [])
    cider = CiderD(document_frequencies) if document_frequencies is not None else None
    metrics, per = _library_scores(gts, res, with_meteor, cider)
    return CaptionScores(metrics=metrics, per_sample=per, tokenized_hypotheses=hyps)


def coco_caption_metrics(results: Sequence[Mapping[str, Any]], references: Mapping[Hashable, Sequence[str]]
                         ) -> dict[str, float]:
    """COCOEvalCap's numbers for a results.json list `[{"image_id", "caption"}]` against `{image_id: [captions]}`
    (raw text: the PTB tokenizer prepares both sides): {bleu4, meteor, rouge_l, cider}.

    As OFA's `coco_eval.py` (`params['image_id'] = cocoRes.getImgIds()`), the images scored are those with a
    result, in the references' order; an image id may be an int in one and its decimal string in the other
    (JSON object keys are strings). A result for an image without references, a second result for an image, or
    a caption that is not a string is refused in one sentence (COCOEvalCap would fail an assert)."""
    by_text: dict[str, Hashable] = {}
    for key in references:
        if str(key) in by_text:
            raise UserError(f"the caption references hold image id {key!r} twice (as {by_text[str(key)]!r} too)")
        by_text[str(key)] = key
    captions: dict[Hashable, str] = {}
    for i, entry in enumerate(results):
        if not isinstance(entry, Mapping) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise UserError(f"caption result {i} must be {{'image_id': id, 'caption': str}}, got {entry!r:.120}")
        key = by_text.get(str(entry["image_id"]))
        if key is None:
            raise UserError(f"caption result {i} is for image {entry['image_id']!r}, which has no references")
        if key in captions:
            raise UserError(f"image {entry['image_id']!r} has more than one caption result; COCO results hold "
                            "one per image")
        captions[key] = entry["caption"]
    keys = [k for k in references if k in captions]
    scores = score_captions([captions[k] for k in keys], [list(references[k]) for k in keys], keys=keys,
                            tokenizer="ptb", with_meteor=True)
    return {name: scores.metrics[name] for name in COCO_CAPTION_METRICS}
