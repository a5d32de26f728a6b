"""What `ofa-predict` reads: a folder of images, a TSV in the task's format, or a JSONL of {"id"?, "image", "text"?}.

Every input becomes a `PredictInput` in input order. Problems with one input (a missing file, a TSV row whose
needed column does not parse, a JSONL line that is not JSON) are recorded on that input as `error` instead of
raised, so one bad line never stops a run; images are only opened when their batch is built (`open_image`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from PIL import Image

from ofa_scale.data.image_check import decode_base64, open_checked
from ofa_scale.data.tsv_formats import FORMATS, RowReject
from ofa_scale.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class PredictInput:
    id: Any
    image: Optional[Path | bytes] = None  # a file, or the decoded bytes of a TSV image column
    text: str = ""                        # question / expression / hypothesis / instruction
    meta: dict[str, Any] = field(default_factory=dict)  # extra task fields (vqa "objects", snli_ve "premise")
    error: Optional[str] = None


def read_inputs(path: str | Path, *, tsv_format: Optional[str], default_text: str = "") -> Iterator[PredictInput]:
    """The inputs at `path` in order. `tsv_format`: the task's TSV format (None: the task reads no TSV).
    `default_text` is the text of inputs that carry none (a folder, or JSONL lines without "text")."""
    path = Path(path)
    if path.is_dir():
        yield from _folder(path, default_text)
    elif not path.is_file():
        raise UserError(f"--input {path} does not exist; pass a folder of images, a .tsv or a .jsonl file")
    elif path.suffix.lower() == ".jsonl":
        yield from _jsonl(path, default_text)
    elif path.suffix.lower() == ".tsv":
        if tsv_format is None:
            raise UserError(f"this task reads no TSV; pass a folder of images or a .jsonl of "
                            f"{{\"image\", \"text\"}} as --input")
        yield from _tsv(path, tsv_format)
    else:
        raise UserError(f"--input {path} is neither a folder, a .tsv nor a .jsonl file")


def _folder(root: Path, text: str) -> Iterator[PredictInput]:
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--input {root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for p in files:
        yield PredictInput(id=p.name, image=p, text=text)


def _json_objects(path: Path) -> Iterator[tuple[int, dict | PredictInput]]:
    """(line number, object) per non-blank line, or (line number, an error input) for a line that is not one."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, PredictInput(id=f"line {number}", error=f"line {number} is not JSON: {e.msg}")
                continue
            if not isinstance(row, dict):
                yield number, PredictInput(id=f"line {number}", error=f"line {number} is not a JSON object")
                continue
            yield number, row


def _jsonl(path: Path, default_text: str) -> Iterator[PredictInput]:
    for number, row in _json_objects(path):
        if isinstance(row, PredictInput):
            yield row
            continue
        image = row.get("image")
        item = PredictInput(id=row.get("id", Path(str(image)).name if image else f"line {number}"),
                            text=str(row.get("text", default_text) or ""),
                            meta={k: v for k, v in row.items() if k not in ("id", "image", "text")})
        if not image:
            item.error = "no \"image\" path"
        else:
            image = Path(str(image))
            item.image = image if image.is_absolute() else path.parent / image  # relative to the JSONL
        yield item


# The TSV columns each task needs; other columns (answers, labels, boxes: references) may be absent or malformed.
_NEEDED = {"caption": (), "vqa": ("question",), "refcoco": ("text",), "snli_ve": ("hypothesis",),
           "ocr": ()}  # ocr: the text column is the transcription, not an input
_TEXT = {"vqa": "question", "refcoco": "text", "snli_ve": "hypothesis"}


def _tsv(path: Path, fmt_name: str) -> Iterator[PredictInput]:
    fmt = FORMATS[fmt_name]
    width = max([c.index for c in fmt.columns] + [fmt.image_column, fmt.id_column or 0]) + 1
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            item = PredictInput(id=cols[fmt.id_column] if fmt.id_column is not None else number)
            if len(cols) < width:
                item.error = f"line {number} has {len(cols)} columns, the {fmt_name} format {fmt.n_columns}"
                yield item
                continue
            fields: dict[str, Any] = {}
            for col in fmt.columns:
                try:
                    fields[col.name] = col.parse(cols[col.index])
                except RowReject as e:
                    if col.name in _NEEDED[fmt_name]:
                        item.error = f"column {col.name}: {e.reason}"
            try:
                item.image = decode_base64(cols[fmt.image_column])
            except RowReject as e:
                item.error = item.error or f"image column: {e.reason}"
            item.text = str(fields.pop(_TEXT.get(fmt_name, ""), "") or "")
            if fmt_name == "snli_ve":
                fields["premise"] = fields.pop("caption", "")
            item.meta = fields
            yield item


def read_captions(path: str | Path, *, default_text: str = "") -> Iterator[PredictInput]:
    """Text-only inputs (image_gen) in order: a .txt with one caption per line (id = line number), a .jsonl of
    {"id"?, "text" or "caption"} (id = line number when absent), or a TSV in the image_gen format (id, codes,
    caption; the codes column is not read). Blank lines are skipped; an empty caption is the task's error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in (".txt", ".jsonl", ".tsv"):
        raise UserError(f"--input {path}: image_gen reads captions from a .txt, .jsonl or .tsv file")
    if not path.is_file():
        raise UserError(f"--input {path} does not exist; pass a .txt, .jsonl or .tsv of captions")
    if suffix == ".jsonl":
        for number, row in _json_objects(path):
            if isinstance(row, PredictInput):
                yield row
            else:
                text = row.get("text", row.get("caption", default_text))
                yield PredictInput(id=row.get("id", number), text=str(text or ""))
        return
    caption_col = FORMATS["image_gen"].n_columns - 1  # TSV: id, codes, caption
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if suffix == ".txt":
                yield PredictInput(id=number, text=line)
                continue
            cols = line.split("\t")
            if len(cols) <= caption_col:
                yield PredictInput(id=cols[0], error=f"line {number} has {len(cols)} columns, the image_gen "
                                                     f"format {caption_col + 1} (id, codes, caption)")
            else:
                yield PredictInput(id=cols[0], text=cols[caption_col])


def open_image(source: Path | bytes) -> Image.Image:
    """The RGB image of a file or of TSV bytes; a UserError naming the problem when it cannot be read whole."""
    if isinstance(source, Path):
        if not source.is_file():
            raise UserError(f"image file {source} does not exist")
        data = source.read_bytes()
    else:
        data = source
    try:
        im = open_checked(data)  # the converter's checks: bombs, truncation
    except RowReject as e:
        raise UserError(f"unreadable image: {e.reason}") from None
    return im.convert("RGB")
