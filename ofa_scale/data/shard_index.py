"""`<source>/index.parquet`: one row per written sample (key, uniq_id, shard, line, width, height, bytes).

Each conversion chunk writes a part index whose `shard` column is the chunk's part number; `merge_parts` turns
part numbers into final shard paths. Arrow arrays are built from raw buffers, never with `pa.array`/`pa.table`:
those probe their argument for pandas objects, which imports pandas, about 0.25 s of CPU in every converter
process and, at the end of a conversion, in the parent alone (the largest serial cost of a parallel conversion).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_SCHEMA = pa.schema([("key", pa.string()), ("uniq_id", pa.string()), ("shard", pa.string()),
                          ("line", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
                          ("bytes", pa.int64())])
PART_INDEX_SCHEMA = INDEX_SCHEMA.set(2, pa.field("shard", pa.int32()))  # part number until final names exist
_FLUSH_ROWS = 50_000
_FLUSH_TEXT_BYTES = 256 << 20  # ids are unbounded; keep each batch's strings far below Arrow's 2 GiB offsets


def string_array(values: list[str]) -> pa.Array:
    """Strings of under 2 GiB in all (Arrow's 32-bit offsets; writers flush well before that)."""
    data = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(data) + 1, np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def int_array(values: list[int | None], type_: pa.DataType) -> pa.Array:
    """Integers (None = null) of a fixed-width Arrow type."""
    valid = np.array([v is not None for v in values], dtype=bool)
    ints = np.array([0 if v is None else v for v in values], dtype=f"int{type_.bit_width}")
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(type_, len(values), [validity, pa.py_buffer(ints)],
                                 null_count=int(len(values) - valid.sum()))


def _int_values(arr: pa.Array) -> np.ndarray:
    """The values of an integer array without nulls, read from its data buffer."""
    width = arr.type.bit_width // 8
    return np.frombuffer(arr.buffers()[1], dtype=f"int{arr.type.bit_width}", count=len(arr),
                         offset=arr.offset * width)


def _batch(rows: dict[str, list], schema: pa.Schema) -> pa.RecordBatch:
    cols = [string_array(rows[f.name]) if f.type == pa.string() else int_array(rows[f.name], f.type)
            for f in schema]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


class PartIndexWriter:
    """Rows of one chunk's part index, written in batches to `path`."""

    def __init__(self, path: str | os.PathLike):
        self._writer = pq.ParquetWriter(path, PART_INDEX_SCHEMA)
        self._rows: dict[str, list] = {n: [] for n in PART_INDEX_SCHEMA.names}
        self._text_bytes = 0

    def add(self, key: str, uniq_id: str, part: int, line: int, width: int | None, height: int | None,
            nbytes: int) -> None:
        for name, value in zip(PART_INDEX_SCHEMA.names, (key, uniq_id, part, line, width, height, nbytes)):
            self._rows[name].append(value)
        self._text_bytes += len(key) + 4 * len(uniq_id)  # 4: the most UTF-8 bytes per character
        if len(self._rows["key"]) >= _FLUSH_ROWS or self._text_bytes >= _FLUSH_TEXT_BYTES:
            self._flush()

    def _flush(self) -> None:
        self._writer.write_batch(_batch(self._rows, PART_INDEX_SCHEMA))
        self._rows = {n: [] for n in PART_INDEX_SCHEMA.names}
        self._text_bytes = 0

    def close(self) -> None:
        self._flush()  # also for zero rows: a part index always has its schema and one row group
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._writer.close()


def merge_parts(path: Path, parts: list[tuple[Path, list[str]]]) -> None:
    """Write `path` from part indexes in order, each with the final shard paths its part numbers stand for."""
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, INDEX_SCHEMA) as w:
        for part_path, finals in parts:
            for batch in pq.ParquetFile(part_path).iter_batches():
                if batch.num_rows == 0:
                    continue
                cols = [batch.column(i) for i in range(batch.num_columns)]
                # Looked up in Python: Array.take and to_numpy would import pyarrow.compute and pandas.
                cols[2] = string_array([finals[i] for i in _int_values(cols[2])])
                w.write_batch(pa.RecordBatch.from_arrays(cols, schema=INDEX_SCHEMA))
    os.replace(tmp, path)


__all__ = ["INDEX_SCHEMA", "PART_INDEX_SCHEMA", "PartIndexWriter", "merge_parts"]
