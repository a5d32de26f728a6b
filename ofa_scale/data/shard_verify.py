"""Check a shard against the sha256 manifest.json lists for it (`data.verify_shards`).

A shard is hashed once per process and file version (path, size, mtime): streams of a pass and later passes
reopen the same shards, and hashing is a full read.
"""

from __future__ import annotations

import os

from ofa_scale.data.shard_writer import file_sha256

_checked: dict[tuple, bool] = {}


def shard_matches(path: str, sha256: str) -> bool:
    """Whether the file's bytes hash to `sha256`; an unreadable file does not match."""
    try:
        st = os.stat(path)
        key = (path, sha256, st.st_size, st.st_mtime_ns)
        if key not in _checked:
            _checked[key] = file_sha256(path) == sha256
    except OSError:
        return False
    return _checked[key]
