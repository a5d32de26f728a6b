"""METEOR 1.5 through pycocoevalcap's `Meteor` (its bundled jar and English paraphrase table; Java, offline).

The library leaves its Java process to `__del__`; we close it as soon as the score is read, so repeated
evaluations (validation every N updates) do not accumulate 2 GB JVMs.
"""

from __future__ import annotations

import numpy as np

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.caption_text import java_executable


def meteor(gts: dict, res: dict) -> tuple[float, np.ndarray]:
    """(corpus METEOR from pooled statistics, per-hypothesis METEOR) for pycocoevalcap's {key: [refs]} and
    {key: [hyp]} dicts of tokenised captions."""
    java_executable()
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        raise UserError("METEOR needs pycocoevalcap (pip install pycocoevalcap)") from None
    if not res:
        return 0.0, np.zeros(0)
    scorer = Meteor()
    try:
        corpus, per_sentence = scorer.compute_score(gts, res)
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        scorer.meteor_p.stdout.close()
        scorer.meteor_p.stderr.close()
    return float(corpus), np.asarray(per_sentence, dtype=float)
