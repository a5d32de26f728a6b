"""METEOR 1.5 through pycocoevalcap (its bundled jar and English paraphrase table; Java, fully offline)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.caption_text import java_executable


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
    """(corpus METEOR from pooled statistics, per-hypothesis METEOR) on tokenised captions."""
    java_executable()
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        raise UserError("--meteor needs pycocoevalcap (pip install pycocoevalcap)") from None
    if not hypotheses:
        return 0.0, np.zeros(0)
    scorer = Meteor()
    try:
        gts = {i: list(refs) for i, refs in enumerate(references)}
        res = {i: [hyp] for i, hyp in enumerate(hypotheses)}
        corpus, per_sentence = scorer.compute_score(gts, res)
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        scorer.meteor_p.stdout.close()
        scorer.meteor_p.stderr.close()
    return float(corpus), np.asarray(per_sentence, dtype=float)
