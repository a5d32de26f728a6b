"""Write small shards in the docs/interfaces.md §1 format for loader tests (webdataset.TarWriter).

Every sample's image is a flat colour derived from its line number, so a test can check that the decoded image
belongs to the record, and every sample carries boxes (vl grounding / detection) so box rescaling can be checked.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image

IMAGE_SOURCES = ("vl", "image", "detection", "refcoco")  # refcoco: a fine-tuning format, converted alike


def colour_of(line: int) -> tuple[int, int, int]:
    return (line * 37) % 256, (line * 91) % 256, (line * 53) % 256


def sample_key(line: int, source: str) -> str:
    return f"{line:09d}-{source}_id_{line}"


def _meta(source: str, line: int, width: int, height: int) -> dict:
    meta: dict = {"uniq_id": f"{source}.id#{line}", "source": source, "line": line}
    if source in IMAGE_SOURCES:
        meta["image"] = {"format": "jpeg", "width": width, "height": height, "orig_width": width,
                         "orig_height": height, "scale": 1.0}
    box = [width * 0.25, height * 0.25, width * 0.75, height * 0.5]
    if source == "vl":
        meta.update(type="visual_grounding", caption=f"thing {line}", question="", answers=[], box=box,
                    gt_objects=["thing"], dataset_name="factory")
    elif source == "text":
        meta["text"] = f"Sentence number {line}. Another one."
    elif source == "image":
        meta["codes"] = [(line + i) % 8192 for i in range(256)]
    elif source == "detection":
        meta["objects"] = [{"box": box, "cat_id": "1", "cat_name": "thing"}]
    elif source == "refcoco":
        meta.update(image_id=str(line), text=f"the thing {line}", box=box)
    return meta


def _jpeg(line: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour_of(line)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_source(root: Path, source: str, shard_sizes: list[int], image_size: tuple[int, int] = (32, 24),
                 first_line: int = 1) -> tuple[list[dict], list[str]]:
    """Write `OUT/<source>/<source>-%06d.tar` shards; returns (manifest shard entries, keys in order)."""
    folder = Path(root) / source
    folder.mkdir(parents=True, exist_ok=True)
    entries, keys = [], []
    line = first_line
    for index, count in enumerate(shard_sizes):
        path = folder / f"{source}-{index:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(count):
                key = sample_key(line, source)
                sample = {"__key__": key,
                          "json": json.dumps(_meta(source, line, *image_size)).encode()}
                if source in IMAGE_SOURCES:
                    sample["jpg"] = _jpeg(line, image_size)
                sink.write(sample)
                keys.append(key)
                line += 1
        entries.append({"path": f"{source}/{path.name}", "samples": count, "bytes": path.stat().st_size,
                        "sha256": ""})
    return entries, keys


def write_dataset(root: str | Path, shard_sizes: dict[str, list[int]], image_size: tuple[int, int] = (32, 24),
                  manifest: bool = True) -> dict[str, list[str]]:
    """Shards for several sources plus manifest.json; returns every source's keys."""
    root = Path(root)
    sources, keys = {}, {}
    for source, sizes in shard_sizes.items():
        entries, keys[source] = write_source(root, source, sizes, image_size)
        sources[source] = {"rows_read": len(keys[source]), "samples_written": len(keys[source]), "rejected": 0,
                           "shards": entries}
    if manifest:
        (root / "manifest.json").write_text(json.dumps({"format_version": 1, "command": "shard_factory",
                                                        "tool_version": "test", "sources": sources}))
    return keys


def truncate(path: str | Path, keep_fraction: float = 0.5) -> None:
    """Cut a shard file short, as an interrupted copy would."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
