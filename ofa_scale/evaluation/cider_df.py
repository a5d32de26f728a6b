"""`ofa-eval cider-df`: cache CIDEr-D document frequencies from a training caption source, OFA's
`coco-train-words.p` equivalent (spec §6.2), for the SCST reward (`task.cider_df`) and cached-df validation.

One document per image: every caption of the image, whichever rows hold them (a stage-1 TSV has one caption
per row, a stage-2 TSV or shard one row per image with `&&`-joined captions; both group by the image-id column).
Sentences are written as the SCST reward scores them (`scst_sentence`: punctuation removed, ` <eos>` appended),
as OFA's cache was built. The same file serves validation: sentences scored without ` <eos>` only meet the
n-grams without it, whose counts are those of a cache built without it.

The file is versioned JSON (`DocumentFrequencies.save`), gzip-compressed for a `.gz` name, written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from ofa_scale.errors import UserError
from ofa_scale.evaluation.metrics.caption_text import scst_sentence
from ofa_scale.evaluation.metrics.cider import DocumentFrequencies
from ofa_scale.evaluation.records import read_jsonl
from ofa_scale.evaluation.tasks import task_spec

Captions = Iterator[tuple[str, list[str]]]  # (image id, captions of one row)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tsv", nargs="+", metavar="F.tsv",
                        help="OFA caption TSV(s): image-id in column 1, caption(s) `&&`-joined in column 2")
    source.add_argument("--shards", metavar="DIR", help="`ofa-preprocess shards --format caption` output")
    source.add_argument("--references", metavar="R.jsonl", help="records with id + captions (ofa-eval score's)")
    parser.add_argument("--out", required=True, metavar="DF.json[.gz]", help="cache file to write")
    # Caches were once written without ` <eos>` unless --scst was given; every cache is SCST-form now (it also
    # serves validation), and the flag stays accepted so scripts that pass it keep working.
    parser.add_argument("--scst", action="store_true", help=argparse.SUPPRESS)


def tsv_captions(paths: list[str]) -> Captions:
    """The image-id and caption columns of caption TSV rows (the converter's `caption` format, spec §7.1), read
    without splitting or decoding the image column."""
    from ofa_scale.data.tsv_formats import amp_list, get_format

    columns = {c.name: c.index for c in get_format("caption").columns}
    id_col, caption_col = columns["image_id"], columns["caption"]
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"caption TSV {path} does not exist")
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                cols = raw.split(b"\t", caption_col + 1)
                if len(cols) <= caption_col:
                    raise UserError(f"{path}:{line_no} has {len(cols)} column(s); a caption TSV row has the "
                                    f"image-id in column {id_col} and the caption in column {caption_col}")
                try:
                    image_id, caption = cols[id_col].decode("utf-8"), cols[caption_col].decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{line_no} is not UTF-8 text") from None
                yield image_id.strip(), amp_list(caption)


def shard_captions(root: str) -> Captions:
    """The `image_id` and `captions` of every record of the `caption` source, images not decoded."""
    import json

    from ofa_scale.data.stream_catalog import load_catalog
    from ofa_scale.data.stream_reader import ShardReadError, iter_shard_samples

    for shard in load_catalog(root, ["caption"])["caption"].shards:
        try:
            for sample in iter_shard_samples(shard.path):
                meta = json.loads(sample["json"])
                captions = meta.get("captions")
                if captions is None:  # shards converted before the `captions` field
                    captions = [c for c in str(meta.get("caption", "")).split("&&") if c]
                yield str(meta.get("image_id", meta.get("uniq_id"))), [str(c) for c in captions]
        except (ShardReadError, KeyError, ValueError) as e:
            raise UserError(f"caption shard {shard.path} cannot be read ({e}); re-run the conversion") from None


def jsonl_captions(path: str) -> Captions:
    spec = task_spec("caption")
    for record in read_jsonl(path, "references"):
        yield str(record["id"]), spec.read_reference(record)


def build_document_frequencies(rows: Captions) -> DocumentFrequencies:
    """Group rows by image id (first-seen order) and count each n-gram once per image."""
    documents: dict[str, list[str]] = {}
    for image_id, captions in rows:
        documents.setdefault(image_id, []).extend(scst_sentence(c) for c in captions if c.strip())
    documents = {k: v for k, v in documents.items() if v}
    if not documents:
        raise UserError("the caption source holds no captions; a CIDEr cache needs the training references")
    return DocumentFrequencies.from_references(list(documents.values()))


def run(args: argparse.Namespace) -> int:
    if args.tsv:
        rows, source = tsv_captions(args.tsv), ", ".join(args.tsv)
    elif args.shards:
        rows, source = shard_captions(args.shards), args.shards
    else:
        rows, source = jsonl_captions(args.references), args.references
    df = build_document_frequencies(rows)
    df.save(args.out)
    print(f"cider-df: {df.num_documents} images, {len(df.counts)} n-grams from {source} -> {args.out}")
    return 0
