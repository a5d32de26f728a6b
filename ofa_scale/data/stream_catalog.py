"""The list of shards of each source and how many samples each holds.

The loader needs exact per-shard sample counts before reading anything: they decide which contiguous slice of
each pass a canonical stream reads, and how many steps a finite epoch has. Counts come from `manifest.json`
(docs/interfaces.md §1) when it exists, else from a scan of the tar headers (no member data is read).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ofa_scale.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardEntry:
    path: str
    samples: int
    sha256: str = ""  # from manifest.json; empty when the catalogue comes from a scan


@dataclass(frozen=True)
class SourceCatalog:
    source: str
    shards: tuple[ShardEntry, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def signature(self) -> dict:
        """What a saved loader state depends on: changing the shards invalidates stream positions."""
        return {"shards": len(self.shards), "samples": self.num_samples}


def count_tar_samples(path: Path) -> int:
    """Number of distinct sample keys in a tar, reading only headers (random-access mode seeks over data)."""
    keys = 0
    last = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key = info.name.split("/")[-1].split(".", 1)[0]
                if key != last:
                    keys += 1
                    last = key
    except (tarfile.TarError, EOFError, OSError):
        pass  # a damaged shard: count what is readable; the reader will skip it and count it
    return keys


def _resolve(root: Path, source: str, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute():
        return p
    for candidate in (root / p, root / source / p.name):
        if candidate.exists():
            return candidate
    return root / p


def _from_manifest(root: Path, manifest: dict, source: str) -> SourceCatalog:
    info = manifest.get("sources", {}).get(source)
    if info is None:
        raise UserError(f"source '{source}' is not in {root / MANIFEST_NAME}; convert it or remove it from the "
                        f"loader composition")
    shards = []
    for s in info.get("shards", []):
        path = _resolve(root, source, s["path"])
        if not path.is_file():
            raise UserError(f"shard {path} listed in {root / MANIFEST_NAME} is missing; re-run the conversion "
                            f"with --resume")
        shards.append(ShardEntry(str(path), int(s["samples"]), str(s.get("sha256") or "")))
    return SourceCatalog(source, tuple(shards))


def _from_scan(root: Path, source: str) -> SourceCatalog:
    paths = sorted((root / source).glob(f"{source}-*.tar"))
    return SourceCatalog(source, tuple(ShardEntry(str(p), count_tar_samples(p)) for p in paths))


def load_catalog(root: str | Path, sources: list[str]) -> dict[str, SourceCatalog]:
    """Catalogue of each requested source under a shard root; raises UserError if one has no samples."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"shard root {root} does not exist; point data.root at the output of "
                        f"`ofa-preprocess shards`")
    manifest = None
    mpath = root / MANIFEST_NAME
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{mpath} is not valid JSON; re-run the conversion") from None
        version = manifest.get("format_version")
        if version != MANIFEST_FORMAT_VERSION:
            raise UserError(f"{mpath} has format_version {version!r}, this loader reads "
                            f"{MANIFEST_FORMAT_VERSION}; re-convert the shards with this version of ofa-scale")
    out = {}
    for source in sources:
        cat = _from_manifest(root, manifest, source) if manifest else _from_scan(root, source)
        if cat.num_samples == 0:
            raise UserError(f"source '{source}' has no samples under {root}; convert it or remove it from the "
                            f"loader composition")
        out[source] = cat
    return out
