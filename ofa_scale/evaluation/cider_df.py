"""`ofa-eval cider-df`: build the cached CIDEr-D document frequencies from a references JSONL (one document per
record's `captions`), e.g. from the train split for the SCST reward (`--scst` writes sentences as the reward
scores them: prepared and ending in ` <eos>`)."""

from __future__ import annotations

import argparse

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.caption_text import prepare_caption, scst_sentence
from ofa_scale.evaluation.metrics.cider import DocumentFrequencies
from ofa_scale.evaluation.records import read_jsonl
from ofa_scale.evaluation.tasks import task_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--references", required=True, metavar="R.jsonl", help="records with id + captions")
    parser.add_argument("--out", required=True, metavar="DF.json[.gz]", help="cache file to write")
    parser.add_argument("--scst", action="store_true", help="append ' <eos>' to every sentence (SCST reward form)")


def run(args: argparse.Namespace) -> int:
    spec = task_spec("caption")
    records = read_jsonl(args.references, "references")
    if not records:
        raise UserError(f"{args.references} has no records; a CIDEr cache needs reference captions")
    prepare = scst_sentence if args.scst else prepare_caption
    documents = [[prepare(c) for c in spec.read_reference(r)] for r in records]
    df = DocumentFrequencies.from_references(documents)
    df.save(args.out)
    print(f"cider-df: {df.num_documents} documents, {len(df.counts)} n-grams -> {args.out}")
    return 0
