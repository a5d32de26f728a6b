"""The rows `ofa-preprocess image-codes` reads: image files of a folder, or lines of an OFA code-generation TSV.

TSV rows are those of OFA's `generate_code.py` (spec §10.5.4): 2 columns `image-id, image-base64` or 4 columns
`uniq-id, image-id, image-base64, text`. A folder contributes every image file below it (sorted by relative path,
hidden names skipped); its id is that relative path and its caption (image_gen rows) the text of a `NAME.txt` next
to it, else the file name with `_`/`-` read as spaces.

Every row carries the position just after it (a byte offset, or a file count), which is what a resumed run restarts
from, and a problem with a row is a `RowReject` for the rejects file, never an exception.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ofa_scale.data import tsv_chunks
from ofa_scale.data.image_check import decode_base64
from ofa_scale.data.tsv_formats import BAD_UTF8, BLANK_LINE, NOT_AN_IMAGE, WRONG_COLUMN_COUNT, RowReject
from ofa_scale.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Row:
    number: int  # 1-based line (TSV) or file number (folder): the reject's line and the Gumbel seed index
    end: int  # input position just after this row
    uid: str = ""
    data: bytes | None = None
    caption: str | None = None
    reject: RowReject | None = None
    shown: bytes | str = b""


class FolderInput:
    kind = "folder"

    def __init__(self, root: Path):
        self.root = root
        self.files = sorted(
            (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix())
        if not self.files:
            raise UserError(f"input folder {root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for p in self.files:
            st = p.stat()
            h.update(f"{p.relative_to(self.root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return {"kind": self.kind, "path": str(self.root), "files": len(self.files), "listing_sha256": h.hexdigest()}

    def total(self) -> int:
        return len(self.files)

    def rows(self, position: int, number: int) -> Iterator[Row]:
        for i in range(position, len(self.files)):
            path = self.files[i]
            rel = path.relative_to(self.root).as_posix()
            row = Row(number=i + 1, end=i + 1, uid=rel, shown=rel)
            try:
                row.data = path.read_bytes()
            except OSError as e:
                row.reject = RowReject(NOT_AN_IMAGE, f"cannot read the file ({e.strerror or e})")
            row.caption = self._caption(path)
            yield row

    @staticmethod
    def _caption(path: Path) -> str:
        side = path.with_suffix(".txt")
        if side.is_file():
            text = side.read_text(encoding="utf-8", errors="replace")
        else:
            text = re.sub(r"[_-]+", " ", path.stem)
        return " ".join(text.split())


class TsvInput:
    kind = "tsv"

    def __init__(self, path: Path):
        self.path = path

    def fingerprint(self) -> dict:
        st = self.path.stat()
        return {"kind": self.kind, "path": str(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def total(self) -> int:
        return tsv_chunks.count_lines(self.path, 0, self.path.stat().st_size)

    def rows(self, position: int, number: int) -> Iterator[Row]:
        end = position
        for raw, n in tsv_chunks.iter_lines(self.path, position, self.path.stat().st_size):
            number += 1
            end += n
            row = Row(number=number, end=end, shown=raw)
            try:
                self._parse(raw, row)
            except RowReject as e:
                row.reject = e
            yield row

    @staticmethod
    def _parse(raw: bytes, row: Row) -> None:
        if not raw.strip():
            raise RowReject(BLANK_LINE)
        cols = raw.split(b"\t")
        if len(cols) not in (2, 4):
            raise RowReject(WRONG_COLUMN_COUNT, f"{len(cols)} columns; expected 2 (image-id, image-base64) or 4 "
                                                "(uniq-id, image-id, image-base64, text)")
        image_col = 1 if len(cols) == 2 else 2
        row.uid = cols[0].decode("utf-8", "replace")
        try:
            texts = [c.decode("utf-8") for i, c in enumerate(cols) if i != image_col]
        except UnicodeDecodeError as e:
            raise RowReject(BAD_UTF8, f"invalid byte at position {e.start}") from None
        row.caption = texts[-1] if len(cols) == 4 else None
        row.data = decode_base64(cols[image_col])


def open_input(path: str | os.PathLike) -> FolderInput | TsvInput:
    p = Path(path).resolve()
    if p.is_dir():
        return FolderInput(p)
    if p.is_file():
        return TsvInput(p)
    raise UserError(f"--input {path} does not exist; pass a folder of images or a TSV (image-id, image-base64[, …])")


__all__ = ["Row", "FolderInput", "TsvInput", "open_input", "IMAGE_SUFFIXES"]
