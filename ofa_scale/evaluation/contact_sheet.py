"""One PNG that shows many generated images at once, each with its caption underneath (Pillow only).

Used per text-to-image run (`ofa-predict --task image_gen`, `ofa-eval run`), where it is logged to mlflow beside
the images, so a run can be judged at a glance."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

PAD = 4
LINE_HEIGHT = 12  # Pillow's built-in bitmap font is ~11 px high
CAPTION_LINES = 3
MAX_TILES = 1024  # a sheet of every image of a 30k-caption evaluation would be unreadable and huge


def write_contact_sheet(images: Sequence[Image.Image], captions: Sequence[str], out: Path, *,
                        columns: Optional[int] = None, tile: int = 128) -> Path:
    """A grid of `images` (each fitted into a `tile`-px square, aspect kept) with `captions[i]` wrapped under image
    i, `columns` wide (default: the smallest square grid), saved as the PNG `out`; returns `out`."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    if len(images) > MAX_TILES:
        raise ValueError(f"{len(images)} images: a contact sheet holds at most {MAX_TILES}")
    columns = max(1, min(columns or math.ceil(math.sqrt(len(images))), len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = tile + 2 * PAD, tile + 2 * PAD + CAPTION_LINES * LINE_HEIGHT
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    chars = max(8, tile // 6)  # the default font is ~6 px per character
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w + PAD, (i // columns) * cell_h + PAD
        thumb = image.convert("RGB")
        thumb.thumbnail((tile, tile), Image.Resampling.BICUBIC)
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        lines = textwrap.wrap(str(caption), chars, max_lines=CAPTION_LINES, placeholder="...") or [""]
        for j, line in enumerate(lines):
            try:
                draw.text((x, y + tile + 2 + j * LINE_HEIGHT), line, fill="black", font=font)
            except UnicodeError:  # Pillow's bitmap fallback font is Latin-1 only (e.g. an OFA-CN caption)
                line = line.encode("latin-1", "replace").decode("latin-1")
                draw.text((x, y + tile + 2 + j * LINE_HEIGHT), line, fill="black", font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def write_ranked_pngs(images: Sequence[Image.Image], directory: Path, item_id) -> list[Path]:
    """Save one caption's images, best first, as directory/<id>_<rank>.png (id made file-safe); their paths."""
    from ofa_scale.predict.cli import safe_name

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, image in enumerate(images):
        path = directory / f"{safe_name(item_id)}_{rank}.png"
        image.save(path, format="PNG")
        paths.append(path)
    return paths


class RankedSheet:
    """Collects a run's captions for its contact sheet: one row per caption (the first `max_rows`), its best
    `max_columns` images left to right, each labelled; only thumbnails are kept, so memory stays bounded."""

    def __init__(self, *, max_rows: int = 64, max_columns: int = 8, tile: int = 128):
        self.max_rows, self.max_columns, self.tile = max_rows, max_columns, tile
        self.rows: list[tuple[list[Image.Image], list[str]]] = []

    def add(self, caption: str, ranked: Sequence[Image.Image], labels: Sequence[str]) -> None:
        if len(self.rows) >= self.max_rows:
            return
        thumbs, texts = [], []
        for rank, (image, label) in enumerate(zip(ranked[:self.max_columns], labels)):
            thumb = image.convert("RGB")
            thumb.thumbnail((self.tile, self.tile), Image.Resampling.BICUBIC)
            thumbs.append(thumb)
            texts.append(f"#{rank + 1} {label}" + (f": {caption}" if rank == 0 else ""))
        self.rows.append((thumbs, texts))

    def write(self, out: Path) -> Path:
        """The sheet as the PNG `out` (rows padded with blank tiles to the widest row)."""
        if not self.rows:
            raise ValueError("no captions were added to the contact sheet")
        columns = max(len(images) for images, _ in self.rows)
        blank = Image.new("RGB", (self.tile, self.tile), "white")
        images, captions = [], []
        for row_images, row_texts in self.rows:
            pad = columns - len(row_images)
            images += list(row_images) + [blank] * pad
            captions += list(row_texts) + [""] * pad
        return write_contact_sheet(images, captions, out, columns=columns, tile=self.tile)


__all__ = ["write_contact_sheet", "write_ranked_pngs", "RankedSheet"]
