"""img2dataset-style Parquet input (`key`, `jpg` = image bytes, `txt` = caption) as vision-language caption rows.

Files are read one row group at a time, so memory is bounded by the largest row group. Chunks are runs of whole
row groups sized from the file metadata, so they too are independent of the worker count.
"""

from __future__ import annotations

import os
from typing import Iterator

import pyarrow.parquet as pq

from ofa_scale.errors import UserError

COLUMNS = ("key", "jpg", "txt")


def _open(path: str | os.PathLike) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise UserError(f"{path} is not a readable Parquet file ({type(e).__name__}); pass img2dataset "
                        f"output to --vl-parquet.") from None
    missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"Parquet file {path} lacks column(s) {', '.join(missing)}; --vl-parquet expects "
                        f"img2dataset output with columns key, jpg (image bytes) and txt (caption).")
    return pf


def plan_row_groups(path: str | os.PathLike, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """[(first_group, end_group, first_row)] runs of row groups of about `chunk_bytes` uncompressed bytes."""
    md = _open(path).metadata
    out, start, first_row, size, row = [], 0, 0, 0, 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        size += rg.total_byte_size
        row += rg.num_rows
        if size >= chunk_bytes:
            out.append((start, g + 1, first_row))
            start, first_row, size = g + 1, row, 0
    if start < md.num_row_groups:
        out.append((start, md.num_row_groups, first_row))
    return out


def count_rows(path: str | os.PathLike, first_group: int, end_group: int) -> int:
    md = _open(path).metadata
    return sum(md.row_group(g).num_rows for g in range(first_group, end_group))


def iter_rows(path: str | os.PathLike, first_group: int, end_group: int
              ) -> Iterator[tuple[str | None, bytes | None, str | None, int]]:
    """(key, image bytes, caption, approximate byte size) per row, in file order."""
    pf = _open(path)
    for g in range(first_group, end_group):
        table = pf.read_row_group(g, columns=list(COLUMNS))
        keys, imgs, txts = (table.column(c).to_pylist() for c in COLUMNS)
        for k, im, t in zip(keys, imgs, txts):
            size = (len(im) if im else 0) + (len(t) if t else 0)
            yield (None if k is None else str(k)), im, t, size
