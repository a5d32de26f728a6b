"""`ofa-eval score`: metrics from a predictions JSONL and a references JSONL (no model involved)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ofa_scale.evaluation.records import PairedRecords, pair_records, read_jsonl
from ofa_scale.evaluation.results import eval_document, results_table, summary_text, write_results
from ofa_scale.evaluation.tasks import TASKS, ScoreOptions, task_spec


def score_and_write(task: str, paired: PairedRecords, options: ScoreOptions, out_dir: str | Path,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score paired records, write results.parquet + eval.json into `out_dir`, return the eval document."""
    spec = task_spec(task)
    t0 = time.perf_counter()
    scores = spec.score(paired.predictions, paired.references, options)
    document = eval_document(task, spec.main_metric, paired, scores,
                             {"scoring_seconds": round(time.perf_counter() - t0, 3), **(extra or {})})
    write_results(out_dir, document, results_table(paired, scores))
    return document


def add_score_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--caption-tokenizer", choices=("ofa", "ptb"), default="ofa",
                        help="caption text preparation: 'ofa' strips punctuation (OFA's CIDEr during training), "
                             "'ptb' is COCOEvalCap's Stanford PTB tokenizer (needs Java)")
    parser.add_argument("--meteor", action="store_true", help="also compute caption METEOR (needs Java)")
    parser.add_argument("--cider-df", default=None, metavar="FILE",
                        help="cached CIDEr document frequencies (ofa-eval cider-df output, or OFA's *-words.p); "
                             "default: computed from the references")


def options_from_args(args: argparse.Namespace) -> ScoreOptions:
    return ScoreOptions(caption_tokenizer=args.caption_tokenizer, meteor=args.meteor, cider_df=args.cider_df)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=list(TASKS), metavar="TASK",
                        help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--predictions", required=True, metavar="P.jsonl",
                        help="one JSON object per line: id + the task's prediction field "
                             "(caption / answer / box or bins / label / summary)")
    parser.add_argument("--references", required=True, metavar="R.jsonl",
                        help="one JSON object per line: id + the task's reference field "
                             "(captions / answers / box / label / summary)")
    parser.add_argument("--out", required=True, metavar="DIR", help="writes DIR/results.parquet and DIR/eval.json")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score references without a prediction as wrong instead of failing")
    add_score_options(parser)


def run(args: argparse.Namespace) -> int:
    spec = task_spec(args.task)
    options = options_from_args(args)
    paired = pair_records(spec, read_jsonl(args.predictions, "predictions"), read_jsonl(args.references, "references"),
                          allow_missing=args.allow_missing)
    document = score_and_write(args.task, paired, options, args.out, {
        "predictions_file": str(Path(args.predictions).resolve()),
        "references_file": str(Path(args.references).resolve())})
    print(summary_text([document], args.out))
    return 0
