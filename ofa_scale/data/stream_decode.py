"""Turn one undecoded shard sample into a raw record (docs/interfaces.md §2).

When the image is decoded at reduced scale (JPEG draft mode), every box in the metadata is divided by the same
factor and the stored size/scale fields are updated, so meta and image always agree.
"""

from __future__ import annotations

import json

from ofa_scale.data.image_ops import decode_rgb
from ofa_scale.data.tsv_formats import iter_boxes

# Pretraining sources (interfaces.md §1); fine-tuning formats converted by the same tool are sources too.
SOURCES = ("vl", "text", "image", "detection")
IMAGE_SOURCES = frozenset({"vl", "image", "detection"})  # a sample of these without an image is an error


class RecordDecodeError(Exception):
    """A sample's JSON or image bytes cannot be decoded."""


def _rescale_meta(meta: dict, factor: int, width: int, height: int) -> None:
    image = meta.get("image")
    if isinstance(image, dict):
        image["width"], image["height"] = width, height
        if "scale" in image:
            image["scale"] = float(image["scale"]) / factor
    for box in iter_boxes(meta):  # every `box` list, whatever the format nests it in
        box[:] = [float(c) / factor for c in box]


def decode_record(sample: dict, source: str, min_size: int | None = None) -> dict:
    """Raw record without its seed: `{"source", "key", "meta", "image"}`; raises RecordDecodeError."""
    try:
        meta = json.loads(sample["json"])
    except KeyError:
        raise RecordDecodeError(f"sample {sample['__key__']} has no .json member") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordDecodeError(f"sample {sample['__key__']}: bad JSON ({exc})") from None
    image = None
    data = sample.get("jpg", sample.get("png"))
    if data is None and source in IMAGE_SOURCES:
        raise RecordDecodeError(f"sample {sample['__key__']} of image source '{source}' has no image")
    if data is not None:
        try:
            image, factor = decode_rgb(data, min_size)
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError...) on bad bytes
            raise RecordDecodeError(f"sample {sample['__key__']}: image does not decode ({exc})") from None
        if factor > 1:
            _rescale_meta(meta, factor, image.width, image.height)
    return {"source": source, "key": sample["__key__"], "meta": meta, "image": image}
