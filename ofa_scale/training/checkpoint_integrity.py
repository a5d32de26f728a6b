"""Per-file sha256 of a checkpoint, written into its own manifest and checked before a resume loads it.

A checkpoint is `complete` once `STEP_DIR/manifest.json` exists: it is the last file written into the step
directory (after every rank's files and trainer.json), and `latest` moves only after it. A bit flip or a truncated
file in any of the files it lists makes the checkpoint `damaged`.

Hashing is spread over the ranks, since one rank reading every GB of a large checkpoint would stall the whole job:
rank 0 lists the files (the directory is on a shared filesystem, as the rest of the checkpoint logic assumes) and
assigns them by size, every rank hashes its share, and rank 0 gathers the digests (saving) or every rank gathers
the problems (verifying, so all ranks reach the same decision). Without a process group one process does it all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ofa_scale.data.shard_writer import file_sha256
from ofa_scale.parallel import collectives
from ofa_scale.utils.io import atomic_write_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MANIFEST).is_file()


def _list_files(tag_dir: Path) -> dict[str, int]:
    """{relative posix path: size} of every file in the step directory except the manifest itself."""
    return {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Files per rank, largest first onto the least-loaded rank, so one rank does not hash all the big files."""
    load = [0] * world
    shares: list[list[str]] = [[] for _ in range(world)]
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].append(name)
        load[r] += size
    return shares


def write_manifest(tag_dir: Path) -> None:
    """Collective (call after the barrier that follows every rank's writes): hash the step directory's files and
    have rank 0 write manifest.json."""
    me, world = collectives.rank(), collectives.world_size()
    sizes = collectives.broadcast_object(_list_files(tag_dir) if me == 0 else None, src=0)
    mine = {name: file_sha256(tag_dir / name) for name in _shares(sizes, world)[me]}
    parts = collectives.gather_object(mine, 0)
    if me == 0:
        digests = {k: v for part in parts for k, v in part.items()}
        atomic_write_json(tag_dir / MANIFEST, {
            "format_version": MANIFEST_FORMAT_VERSION,
            "files": {name: {"size": sizes[name], "sha256": digests[name]} for name in sorted(sizes)}})


def _read_manifest(tag_dir: Path) -> tuple[Optional[dict[str, dict]], Optional[str]]:
    path = tag_dir / MANIFEST
    if not path.is_file():
        return None, f"no {MANIFEST}"
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
        return {str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in files.items()}, None
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged manifest is a damaged checkpoint
        return None, f"{MANIFEST} is unreadable ({type(e).__name__})"


def _check(tag_dir: Path, name: str, expected: dict) -> Optional[str]:
    path = tag_dir / name
    try:
        size = path.stat().st_size
    except OSError:
        return f"{name} is missing"
    if size != expected["size"]:
        return f"{name} has {size} bytes, {expected['size']} were written"
    try:
        digest = file_sha256(path)
    except OSError as e:
        return f"{name} is unreadable ({e.strerror or e})"
    return None if digest == expected["sha256"] else f"{name} does not match its sha256"


def find_damage(tag_dir: Path) -> Optional[str]:
    """Collective: why the checkpoint in `tag_dir` is damaged (the first problem found), or None when every file
    matches its manifest. Every rank returns the same answer."""
    me, world = collectives.rank(), collectives.world_size()
    files, problem = collectives.broadcast_object(_read_manifest(tag_dir) if me == 0 else None, src=0)
    if files is None:
        return problem
    share = _shares({k: v["size"] for k, v in files.items()}, world)[me]
    mine = [p for p in (_check(tag_dir, name, files[name]) for name in share) if p is not None]
    found = sorted(p for part in collectives.all_gather_object(mine) for p in part)
    if not found:
        return None
    return found[0] + (f" (and {len(found) - 1} more files)" if len(found) > 1 else "")
