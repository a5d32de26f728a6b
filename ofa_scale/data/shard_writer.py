"""Byte-reproducible webdataset tar shards.

Every tar header field that could vary between runs (mtime, owner, mode) is fixed, so the same samples give the
same bytes and the same sha256 whichever worker or machine wrote them. A shard is written under a temporary name
and renamed when complete; the hash is computed while writing.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

KEY_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
MAX_ID_CHARS = 64


def sample_key(line_number: int, uniq_id: str) -> str:
    """interfaces.md §1: `f"{line:09d}-{sanitised_id}"`; webdataset splits on the first dot, so no dots."""
    return f"{line_number:09d}-{KEY_ID_CHARS.sub('_', uniq_id)[:MAX_ID_CHARS]}"


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.n

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.n += len(b)
        return len(b)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Write one tar shard; `add` a sample's members (ext -> bytes) under a key, then `close`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._file = open(self.tmp, "wb")
        self._hw = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hw, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    @property
    def bytes_written(self) -> int:
        return self._hw.n

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> ShardInfo:
        self._tar.close()  # writes the end-of-archive blocks through the hashing writer
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return ShardInfo(self.path, self.samples, self._hw.n, self._hw.sha.hexdigest())

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # flushing the buffer fails again on a full disk; the file is deleted either way
        finally:
            self.tmp.unlink(missing_ok=True)


class ShardSequence:
    """Roll over to a new shard once the current one reaches `max_bytes` (a shard holds at least one sample).
    `name(i)` gives the path of the i-th shard of this sequence."""

    def __init__(self, name, max_bytes: int):
        self.name = name
        self.max_bytes = max_bytes
        self.current: ShardWriter | None = None
        self.done: list[ShardInfo] = []

    @property
    def index(self) -> int:
        """Index of the shard the next sample goes to."""
        if self.current is not None and self.current.bytes_written >= self.max_bytes:
            return len(self.done) + 1
        return len(self.done)

    def add(self, key: str, members: dict[str, bytes]) -> int:
        if self.current is not None and self.current.bytes_written >= self.max_bytes:
            self.done.append(self.current.close())
            self.current = None
        if self.current is None:
            self.current = ShardWriter(self.name(len(self.done)))
        self.current.add(key, members)
        return len(self.done)

    def close(self) -> list[ShardInfo]:
        if self.current is not None:
            self.done.append(self.current.close())
            self.current = None
        return self.done

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
