"""Read a range of samples from one webdataset shard, undecoded.

Built on webdataset's streaming tar iterator (sequential reads, so it works on network file systems). Members are
grouped into samples by key (the part of the file name before the first dot; keys have no dots by contract).
Samples outside the requested index range are read past without being kept, which is how a stream starts
mid-shard.
"""

from __future__ import annotations

import tarfile
from typing import Iterator

from webdataset.tariterators import tar_file_iterator


class ShardReadError(Exception):
    """The shard is truncated or not a valid tar; samples before the damage were already yielded."""


def iter_shard_samples(path: str, first: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Yield samples `first <= index < stop` of a shard as `{"__key__", "__shard__", "__index__", ext: bytes}`.

    Raises ShardReadError when the tar is damaged; the sample being read at that point is dropped.
    """
    index = -1
    current: dict | None = None
    try:
        with open(path, "rb") as f:
            for member in tar_file_iterator(f):
                name = member["fname"].rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                if current is None or key != current["__key__"]:
                    if current is not None and index >= first:
                        yield current
                    index += 1
                    if stop is not None and index >= stop:
                        return
                    current = {"__key__": key, "__shard__": path, "__index__": index}
                if index >= first:
                    current[ext.lower()] = member["data"]
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ShardReadError(f"{path}: {exc}") from exc
    if current is not None and index >= first:
        yield current
