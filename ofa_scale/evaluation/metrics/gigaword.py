"""Gigaword summarisation metric (spec §7.7): PTB-style re-tokenisation of the decoded text, `1` -> `#`, then
ROUGE-1/2/L F1 with Porter stemming from Google's `rouge-score` package (what OFA's HF-datasets metric wraps;
its tokenizer lower-cases and keeps only [a-z0-9]).

Only the hypothesis is rewritten. OFA scores the references as they are, lower-cased (utils/eval_utils.py):
Gigaword's headlines are already PTB-tokenised with digits as `#`, and running `fix_tokenization` or `1` -> `#`
over a reference would change what it scores against (e.g. a literal `1` in a reference would stop matching).

OFA reports the bootstrap median (`.mid.fmeasure`) of 1000 resamples; that is a random estimate of the mean,
so we report the plain mean of the per-summary F1 (deterministic; the two agree to ~1e-4).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ofa_scale.errors import UserError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")  # rouge-score's names
# metrics.json keys (issue 11 §0), rouge_l as the caption metrics spell it
METRIC_NAMES = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rouge_l"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = ("s", "d", "ll")


def _is_number(token: str) -> bool:
    return bool(token) and all(ch.isdigit() or ch == "," for ch in token)


def _is_capital(token: str) -> bool:
    return len(token) == 1 and token.isupper()


def _spelt_letter_follows(tokens: list[str], i: int) -> bool:
    """tokens[i+1:i+3] is a single capital letter and a full stop."""
    return i + 2 < len(tokens) and _is_capital(tokens[i + 1]) and tokens[i + 2] == "."


def fix_tokenization(text: str) -> str:
    """Undo BPE-decoding artefacts so the text is tokenised like Gigaword references: brackets to -lrb- etc.,
    straight double quotes to alternating `` and '', `don ' t` -> `do n't`, `' s` -> `'s` (also 'd, 'll),
    lone single quotes to alternating ` and ', `3 , 000` -> `3,000`, `3 . 5` -> `3.5`, `U . N .` -> `U.N.`."""
    tokens = text.split()
    out: list[str] = []
    open_double = open_single = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok in _BRACKETS:
            out.append(_BRACKETS[tok])
        elif tok == '"':
            out.append("''" if open_double else "``")
            open_double = not open_double
        elif tok == "'" and nxt == "t" and out and out[-1].endswith("n"):
            out[-1] = out[-1][:-1]
            out.append("n't")
            i += 1
        elif tok == "'" and nxt in _CLITICS:
            out.append("'" + nxt)
            i += 1
        elif tok == "'":
            out.append("'" if open_single else "`")
            open_single = not open_single
        elif tok == "," and out and nxt is not None and _is_number(out[-1]) and _is_number(nxt):
            out[-1] += "," + nxt
            i += 1
        elif tok == "." and out and nxt is not None and out[-1].isdigit() and nxt.isdigit():
            out[-1] += "." + nxt
            i += 1
        elif tok == "." and out and _is_capital(out[-1]) and _spelt_letter_follows(tokens, i):
            # an abbreviation spelt with spaces ("U . N ."): glue "." and each following "X ." onto the first letter
            out[-1] += "."
            while _spelt_letter_follows(tokens, i):
                out[-1] += tokens[i + 1] + "."
                i += 2
        else:
            out.append(tok)
        i += 1
    return " ".join(out)


def prepare_summary(text: str) -> str:
    """Decoded summary -> scoring form: lower-case, `<unk>` -> ` unk`, fix_tokenization, every `1` -> `#`."""
    return fix_tokenization(text.lower().replace("<unk>", " unk")).replace("1", "#")


def prepare_reference(text: str) -> str:
    """A reference headline in scoring form: lower-cased and stripped, nothing else (module docstring)."""
    return text.lower().strip()


def rouge_f1(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """({rouge1, rouge2, rouge_l: mean F1}, per-summary F1 arrays under the same keys) on prepared texts,
    stemming on."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("Gigaword scoring needs rouge-score (pip install rouge-score)") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per = {METRIC_NAMES[name]: np.zeros(len(hypotheses)) for name in ROUGE_TYPES}
    for i, (hyp, ref) in enumerate(zip(hypotheses, references, strict=True)):
        scores = scorer.score(ref, hyp)
        for name in ROUGE_TYPES:
            per[METRIC_NAMES[name]][i] = scores[name].fmeasure
    means = {name: float(v.mean()) if len(v) else 0.0 for name, v in per.items()}
    return means, per
