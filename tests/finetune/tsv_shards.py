"""Finetuning TSVs in OFA's layout → `ofa-preprocess shards --format F` → records as the loader yields them."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from ofa_scale.cli.preprocess import main as preprocess
from ofa_scale.data.loader import ShardLoader
from ofa_scale.data.loader_config import LoaderConfig


def image_b64(width: int, height: int, colour=(200, 40, 40)) -> str:
    """A JPEG as OFA's TSVs store it (urlsafe base64); left half `colour`, right half its inverse."""
    img = Image.new("RGB", (width, height), colour)
    img.paste(tuple(255 - c for c in colour), (width // 2, 0, width, height))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return base64.urlsafe_b64encode(buf.getvalue()).decode()


def shard_records(tmp: Path, fmt: str, rows: list[list[str]], *extra_args: str) -> list[dict]:
    """Write `rows` as a TSV, convert it with the CLI, and read every record back in file order."""
    tsv = tmp / f"{fmt}.tsv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows))
    out = tmp / f"{fmt}_shards"
    assert preprocess(["shards", "--format", fmt, "--input", str(tsv), "--out", str(out), "--no-progress",
                       *extra_args]) == 0
    loader = ShardLoader(LoaderConfig(root=str(out), composition={fmt: 1}, num_streams=1, mode="epochs", epochs=1,
                                      shuffle_buffer=0, num_workers=0, on_corrupt="fail"))
    records = [r for batch in loader for r in batch]
    assert len(records) == len(rows)
    return sorted(records, key=lambda r: r["meta"]["line"])
