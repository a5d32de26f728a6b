"""Damage shards the ways the loader must notice (for the loader fault tests; shard_factory.py writes them)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from ofa_scale.data.shard_writer import file_sha256


def list_sha256(root: str | Path) -> None:
    """Fill in every shard's sha256 in root/manifest.json, as the converter writes it."""
    path = Path(root) / "manifest.json"
    manifest = json.loads(path.read_text())
    for info in manifest["sources"].values():
        for shard in info["shards"]:
            shard["sha256"] = file_sha256(Path(root) / shard["path"])
    path.write_text(json.dumps(manifest))


def cut_after_samples(path: str | Path, keep: int) -> None:
    """Truncate a shard exactly at the tar header of sample `keep`: what is left is a valid, shorter tar."""
    path = Path(path)
    seen: list[str] = []
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            key = info.name.split("/")[-1].split(".", 1)[0]
            if not seen or seen[-1] != key:
                seen.append(key)
                if len(seen) == keep + 1:
                    cut = info.offset
                    break
        else:
            raise ValueError(f"{path} has no sample {keep}")
    with open(path, "r+b") as f:
        f.truncate(cut)


def change_unread_byte(path: str | Path) -> None:
    """Change the shard's last byte, inside the tar's end padding: it reads the same, its sha256 differs."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    assert data[-1] == 0
    data[-1] = 1
    path.write_bytes(bytes(data))
