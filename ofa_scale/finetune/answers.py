"""VQA candidate answers: `ofa-preprocess vqa-answers` and the reader the VQA task uses (spec §6.3, §7.2).

OFA decodes VQA over a closed set, `trainval_ans2label.pkl` (3,129 answers). This writes the equivalent from a
training TSV in OFA's VQA format (question-id, image-id, question, answers `conf|!+answer` joined by `&&`,
objects, image base64): one answer per line, most frequent first.

What is counted: each row's *training target*, i.e. its highest-confidence answer (the answer OFA trains on,
`objectives.builders.best_answer`). The standard 3,129-answer list is built the same way, from each question's
most common annotator answer. Ties in count are broken by the answer string in code-point order, so the file does
not depend on the row order of the TSV. Rows that do not parse (wrong column count, malformed answers, bad UTF-8,
blank lines) are counted by reason and reported, never fatal; the image column is never decoded.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ofa_scale.data.tsv_formats import (BAD_ANSWERS, BAD_UTF8, BLANK_LINE, FORMATS, WRONG_COLUMN_COUNT, RowReject,
                                        qa_answers)
from ofa_scale.errors import UserError
from ofa_scale.objectives.builders import best_answer
from ofa_scale.utils.io import atomic_write_text

DEFAULT_TOP = 3129  # the size of OFA's trainval_ans2label.pkl
_VQA = FORMATS["vqa"]
_ANSWERS_COLUMN = next(c.index for c in _VQA.columns if c.name == "answers")


@dataclass
class AnswerCounts:
    """Training-target counts over one or more VQA TSVs, and the rows that could not be read."""

    counts: Counter = field(default_factory=Counter)
    rows: int = 0  # lines read (bad ones included)
    bad: Counter = field(default_factory=Counter)  # reject code -> rows

    def ranked(self, top: int | None = None) -> list[tuple[str, int]]:
        """(answer, count), most frequent first, ties by answer string; the first `top` (None: all)."""
        order = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return order if top is None else order[:top]

    def coverage(self, top: int | None = None) -> float:
        """Fraction of readable rows whose target is among the `top` most frequent answers."""
        total = sum(self.counts.values())
        return sum(n for _, n in self.ranked(top)) / total if total else 0.0


def _row_target(raw: bytes) -> str:
    """The training target of one TSV line; RowReject for a line that is not a VQA row."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RowReject(BAD_UTF8) from None
    line = line.rstrip("\r\n")
    if not line.strip():
        raise RowReject(BLANK_LINE)
    cols = line.split("\t")
    if len(cols) != _VQA.n_columns:
        raise RowReject(WRONG_COLUMN_COUNT, f"expected {_VQA.n_columns}, got {len(cols)}")
    answer, _ = best_answer(qa_answers(cols[_ANSWERS_COLUMN]))
    if "\n" in answer or "\r" in answer:  # could not be written one per line
        raise RowReject(BAD_ANSWERS, "answer holds a line break")
    return answer


def count_answers(paths: Iterable[str | Path]) -> AnswerCounts:
    out = AnswerCounts()
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--input {p} does not exist; give the VQA training TSV")
        with open(p, "rb") as f:
            for raw in f:
                out.rows += 1
                try:
                    out.counts[_row_target(raw)] += 1
                except RowReject as e:
                    out.bad[e.code] += 1
    return out


def write_answers(path: str | Path, answers: Iterable[str]) -> None:
    atomic_write_text(path, "".join(a + "\n" for a in answers))


def load_answers(path: str | Path | None) -> list[str]:
    """The candidate answers of a file with one answer per line (file order; blank lines and surrounding
    whitespace ignored, duplicates kept once)."""
    if not path:
        raise UserError("task.answers is not set; give the VQA candidate file (one answer per line, e.g. from "
                        "`ofa-preprocess vqa-answers --input vqa_train.tsv --out answers.txt`)")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"VQA candidate answer file {p} does not exist; build it with `ofa-preprocess vqa-answers "
                        f"--input vqa_train.tsv --out {p}` or set task.answers")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"VQA candidate answer file {p} is not UTF-8 text; give one answer per line") from None
    answers = list(dict.fromkeys(s for s in (line.strip() for line in text.splitlines()) if s))
    if not answers:
        raise UserError(f"VQA candidate answer file {p} holds no answer; give one answer per line")
    return answers


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, nargs="+", action="extend", metavar="TSV",
                        help="VQA training TSV(s) in OFA's format (the answers column is read)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help=f"keep the N most frequent answers (default {DEFAULT_TOP}, OFA's trainval_ans2label)")
    parser.add_argument("--out", required=True, help="answer file to write, one answer per line")


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise UserError(f"--top is {args.top}; give the number of answers to keep (>= 1)")
    counts = count_answers(args.input)
    ranked = counts.ranked(args.top)
    if not ranked:
        raise UserError(f"no readable VQA row in {', '.join(args.input)} ({counts.rows} lines); check that the "
                        f"files are OFA VQA TSVs with {_VQA.n_columns} tab-separated columns")
    write_answers(args.out, [a for a, _ in ranked])
    good = sum(counts.counts.values())
    print(f"{counts.rows} rows read, {good} used, {sum(counts.bad.values())} bad"
          + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(counts.bad.items()))})" if counts.bad else ""))
    print(f"{len(counts.counts)} distinct answers; wrote the {len(ranked)} most frequent to {args.out}, covering "
          f"{100 * counts.coverage(args.top):.2f}% of the rows' training targets")
    return 0
