"""Split TSV files into line-aligned byte ranges and stream their lines.

Chunk boundaries depend only on the file and the chunk size (never on the worker count), which is what makes
the shards identical for any `--workers N`. Nothing here reads a whole file into memory.
"""

from __future__ import annotations

import os
from typing import Iterator

_BLOCK = 1 << 22  # 4 MiB reads for counting


def plan_ranges(path: str | os.PathLike, chunk_bytes: int) -> list[tuple[int, int]]:
    """[(start, end)] covering the file; each boundary is moved forward to just after the next newline."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    bounds = [0]
    with open(path, "rb") as f:
        target = chunk_bytes
        while target < size:
            f.seek(target)
            f.readline()  # finish the line that straddles the boundary
            pos = f.tell()
            if pos >= size:
                break
            if pos > bounds[-1]:
                bounds.append(pos)
            target = max(pos, target) + chunk_bytes
    bounds.append(size)
    return list(zip(bounds[:-1], bounds[1:]))


def count_lines(path: str | os.PathLike, start: int, end: int) -> int:
    """Lines in [start, end): newlines, plus one for a final line without a newline at end of file."""
    n = 0
    last = b""
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(_BLOCK, left))
            if not block:
                break
            n += block.count(b"\n")
            last = block[-1:]
            left -= len(block)
    if end > start and last != b"\n":
        n += 1
    return n


def iter_lines(path: str | os.PathLike, start: int, end: int) -> Iterator[tuple[bytes, int]]:
    """(line without its line ending, raw byte length) for every line in [start, end). CRLF is accepted."""
    with open(path, "rb", buffering=1 << 20) as f:
        f.seek(start)
        pos = start
        while pos < end:
            line = f.readline()
            if not line:
                break
            n = len(line)
            if pos == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark (spreadsheet exports) is not part of the first id
            pos += n
            if line.endswith(b"\n"):
                line = line[:-1]
                if line.endswith(b"\r"):
                    line = line[:-1]
            yield line, n
