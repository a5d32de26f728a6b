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
    """The shard is damaged or not a valid tar; samples before the damage were already yielded.

    `available`: how many leading samples of the shard are intact (the one being read at the damage is dropped).
    `kind`: the loader counter it goes to (loader.stats())."""

    kind = "corrupt_shards"

    def __init__(self, message: str, available: int):
        super().__init__(message)
        self.available = available


class ShardTruncatedError(ShardReadError):
    """A valid tar that ends before sample `stop`: cut at a member boundary, fewer samples than catalogued."""

    kind = "truncated_shards"


def iter_shard_samples(path: str, first: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Yield samples `first <= index < stop` of a shard as `{"__key__", "__shard__", "__index__", ext: bytes}`.

    Raises ShardReadError when the tar is damaged (the sample being read at that point is dropped), and
    ShardTruncatedError, after the last sample, when the shard holds fewer than `stop` samples: a tar cut at a
    member boundary reads as a valid, shorter one, so only the catalogued count can tell.
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
        raise ShardReadError(f"{path}: {exc}", available=max(index, 0)) from exc
    if current is not None and index >= first:
        yield current
    if stop is not None and index + 1 < stop:
        raise ShardTruncatedError(f"{path} ends after {index + 1} samples", available=index + 1)
