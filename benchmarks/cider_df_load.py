"""Load time of a CIDEr document-frequency cache (`ofa-eval cider-df`), by file layout, side by side.

    python benchmarks/cider_df_load.py [--images 20000] [--repeats 3]

A synthetic caption corpus (Zipf-distributed words, 5 captions of 8-13 words per image, ` <eos>` appended as the
SCST cache stores them) gives one set of counts, written in each layout; each file is loaded `--repeats` times
and the table gives the median seconds and the ratio to the current layout:
* `v1 object, tuple keys`: format 1 (a JSON object of n-grams) read as the previous loader did, converting
  every key to a tuple;
* `v1 object`: format 1 read by the current loader (string keys, no conversion);
* `v2 arrays`: format 2, the current layout (one newline-joined string of n-grams and an integer list).
(COCO's train split has about 113k images: scale the figures by images.)
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ofa_scale.evaluation.metrics.cider import DF_KIND, DocumentFrequencies


def corpus(images: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    words = rng.zipf(1.3, size=images * 5 * 13) % 10000
    docs, k = [], 0
    for _ in range(images):
        doc = []
        for _ in range(5):
            length = 8 + int(rng.integers(0, 6))
            doc.append(" ".join(f"w{t}" for t in words[k:k + length]) + " <eos>")
            k += length
        docs.append(doc)
    return docs


def previous_loader(path: Path) -> dict:
    payload = json.loads(gzip.decompress(path.read_bytes()))
    return {tuple(k.split(" ")): float(v) for k, v in payload["document_frequency"].items()}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    df = DocumentFrequencies.from_references(corpus(args.images))
    with tempfile.TemporaryDirectory(prefix="cider-df-bench-") as tmp:
        v2 = Path(tmp) / "v2.json.gz"
        df.save(v2)
        v1 = Path(tmp) / "v1.json.gz"
        v1.write_bytes(gzip.compress(json.dumps({
            "format_version": 1, "kind": DF_KIND, "n": df.n, "num_documents": df.num_documents,
            "document_frequency": {g: float(c) for g, c in df.counts.items()}}).encode(), compresslevel=6))
        rows = [("v1 object, tuple keys", v1, lambda: previous_loader(v1)),
                ("v1 object", v1, lambda: DocumentFrequencies.load(v1)),
                ("v2 arrays", v2, lambda: DocumentFrequencies.load(v2))]
        results = [(name, path.stat().st_size / 2**20, median_seconds(fn, args.repeats)) for name, path, fn in rows]
    base = results[-1][2]
    print(f"{args.images} images, {len(df.counts)} n-grams, median of {args.repeats} loads")
    print(f"{'layout':<24}{'file MiB':>10}{'load s':>10}{'x v2':>8}")
    for name, mib, seconds in results:
        print(f"{name:<24}{mib:>10.1f}{seconds:>10.2f}{seconds / base:>8.2f}")


if __name__ == "__main__":
    main()
