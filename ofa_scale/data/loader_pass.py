"""One loader pass over converted shards: per-source counts and throughput (the data part of `make demo`).

    python -m ofa_scale.data.loader_pass --root OUT [--composition vl=4,text=1,image=1,detection=1]
        [--streams 2] [--workers 2] [--epochs 1] [--decode-min-size vl=480]
"""

from __future__ import annotations

import argparse
import sys
import time

from ofa_scale.cli import run_cli
from ofa_scale.data.loader import ShardLoader
from ofa_scale.data.loader_config import LoaderConfig
from ofa_scale.data.stream_catalog import load_catalog
from ofa_scale.data.stream_decode import SOURCES
from ofa_scale.errors import UserError


def _pairs(text: str, flag: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not value.strip().isdigit():
            raise UserError(f"{flag} item '{item}' must look like source=N, e.g. {flag} vl=4,text=1")
        out[name.strip()] = int(value)
    return out


def _default_composition(root: str) -> dict[str, int]:
    """OFA's pretraining mix (8 pairs : 2 text : 1 image : 1 detection), over the sources that exist."""
    wanted = {"vl": 8, "text": 2, "image": 1, "detection": 1}
    present = {}
    for source in SOURCES:
        try:
            load_catalog(root, [source])
        except UserError:
            continue
        present[source] = wanted[source]
    if not present:
        raise UserError(f"no converted source found under {root}; run `ofa-preprocess shards` first")
    return present


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loader_pass", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="output folder of `ofa-preprocess shards`")
    parser.add_argument("--composition", default="", help="records per micro-batch, e.g. vl=4,text=1")
    parser.add_argument("--streams", type=int, default=2, help="canonical streams (global / micro batch)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--decode-min-size", default="", help="e.g. vl=480,detection=384")
    args = parser.parse_args(argv)
    composition = _pairs(args.composition, "--composition") or _default_composition(args.root)
    cfg = LoaderConfig(root=args.root, composition=composition, num_streams=args.streams, mode="epochs",
                       epochs=args.epochs, num_workers=args.workers,
                       decode_min_size=_pairs(args.decode_min_size, "--decode-min-size"))
    loader = ShardLoader(cfg)
    start = time.perf_counter()
    batches = sum(1 for _ in loader)
    seconds = time.perf_counter() - start
    stats = loader.stats()
    records = stats["data/records"]
    print(f"loader pass: {batches} micro-batches ({loader.steps_per_epoch} steps/epoch x {args.epochs} epochs x "
          f"{loader.streams_per_rank} streams), {records} records in {seconds:.1f}s "
          f"({records / max(seconds, 1e-9):.0f} records/s, {args.workers} workers)")
    columns = {"records": "records", "dropped_epoch_remainder": "dropped", "corrupt_shards": "corrupt shards",
               "truncated_shards": "truncated shards", "missing_samples": "missing", "skipped_samples": "undecodable",
               "refilled": "refilled"}
    print(f"{'source':10}" + "".join(f" {title:>{len(title) + 1}}" for title in columns.values()))
    for source in composition:
        print(f"{source:10}" + "".join(f" {stats[f'data/{source}/{key}']:>{len(title) + 1}d}"
                                       for key, title in columns.items()))
    return 0


def main() -> None:
    sys.exit(run_cli(run, "loader_pass"))


if __name__ == "__main__":
    main()
