"""A corpus of OFA TSVs holding one row per defect the converter must reject, between good rows.

`write_bad_corpus(dir)` returns, per source, the file and the expected outcome of every line: a reject code
(`tsv_formats.*`) or None for a row that must be written. Good rows include the accepted oddities: CRLF line
endings, a missing final newline, a very large (but valid) image and a category name with commas.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ofa_scale.data import tsv_formats as F


def output_digest(out: str | Path) -> dict[str, str]:
    """Every file a consumer of a conversion reads (shards, indexes, rejects), by path -> sha256."""
    files = sorted(p for p in Path(out).rglob("*") if p.is_file() and ".parts" not in p.parts
                   and not p.name.startswith(".") and p.name != "manifest.json")
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def jpeg(w: int, h: int, seed: int = 0, quality: int = 90) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(w: int, h: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def flat_jpeg(w: int, h: int) -> bytes:
    """A very large but valid image that is small on disk (flat colour compresses to almost nothing)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (40, 90, 160)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def png_bomb(w: int = 30000, h: int = 30000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


@dataclass
class BadFile:
    path: Path
    expected: list[str | None]  # per line (1-based line i -> expected[i-1]): reject code or None (written)

    @property
    def n_good(self) -> int:
        return sum(e is None for e in self.expected)


def _write(path: Path, lines: list[bytes], endings: list[bytes], final_newline: bool) -> None:
    out = b""
    for i, (line, end) in enumerate(zip(lines, endings)):
        out += line + (end if (i < len(lines) - 1 or final_newline) else b"")
    path.write_bytes(out)


def _vl(uid: str, img: bytes | str, caption="", question="", refs="", objs="", ds="coco", typ="caption") -> bytes:
    image = img if isinstance(img, str) else _b64(img)
    return "\t".join([uid, image, caption, question, refs, objs, ds, typ]).encode("utf-8")


def write_bad_corpus(root: str | Path) -> dict[str, BadFile]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good = jpeg(64, 48, 1)
    truncated = jpeg(64, 48, 2)
    truncated = truncated[: len(truncated) // 2]
    rows: list[tuple[bytes, str | None]] = [
        (_vl("ok.1", good, "A red circle."), None),
        (b"\t".join(_vl("cols", good, "x").split(b"\t")[:7]), F.WRONG_COLUMN_COUNT),
        (_vl("b64", "@@not-base64!!", "x"), F.BAD_BASE64),
        (_vl("notimg", b"this is plain text, not an image", "x"), F.NOT_AN_IMAGE),
        (_vl("trunc", truncated, "x"), F.TRUNCATED_IMAGE),
        (_vl("bomb", png_bomb(), "x"), F.IMAGE_TOO_LARGE),
        (_vl("outside", good, "the circle", refs="10,10,90,40", typ="visual_grounding"), F.BOX_OUTSIDE_IMAGE),
        (_vl("degenerate", good, "the circle", refs="30,10,20,40", typ="visual_grounding"), F.BOX_DEGENERATE),
        (_vl("nan", good, "the circle", refs="nan,1,20,40", typ="visual_grounding"), F.BOX_NOT_FINITE),
        (_vl("nonnum", good, "the circle", refs="a,b,c,d", typ="visual_grounding"), F.BOX_NOT_NUMERIC),
        (_vl("emptycap", good, "   "), F.EMPTY_TEXT),
        (_vl("badutf8", good, "caf").replace(b"caf", b"caf\xff\xfe"), F.BAD_UTF8),
        (b"", F.BLANK_LINE),
        (_vl("badrefs", good, question="what?", refs="yes", typ="qa"), F.BAD_ANSWERS),
        (_vl("badtype", good, "x", typ="pose"), F.BAD_TYPE),
        (_vl("ok.vg", good, "The circle", refs="4.5,6,60,40.25", objs="circle", typ="visual_grounding"), None),
        (_vl("ok qa#1", png(40, 30, 3), question="How many circles?", refs="0.6|!+two&&1.0|!+2", typ="qa"), None),
        (_vl("ok.big", flat_jpeg(6000, 4000), "A huge flat picture."), None),
        (_vl("ok.last", good, "Last row, no final newline!"), None),
    ]
    vl_end = [b"\n"] * len(rows)
    vl_end[15] = b"\r\n"  # CRLF rows are fine
    vl_end[16] = b"\r\n"
    vl = root / "vl.tsv"
    _write(vl, [r for r, _ in rows], vl_end, final_newline=False)

    text_rows = [
        (b"t1\tSome text. More text.", None),
        (b"t2\t   ", F.EMPTY_TEXT),
        (b"", F.BLANK_LINE),
        (b"t3\tbad \xc3\x28 utf8", F.BAD_UTF8),
        (b"t4\ttoo\tmany", F.WRONG_COLUMN_COUNT),
        (b"t5\tWindows line ending.", None),
    ]
    text = root / "text.tsv"
    _write(text, [r for r, _ in text_rows], [b"\n", b"\n", b"\n", b"\n", b"\n", b"\r\n"], final_newline=True)

    img256 = _b64(jpeg(256, 256, 4))
    codes_ok = " ".join(str(i * 31 % 8192) for i in range(256))
    image_rows = [
        (f"i1\t{img256}\t{codes_ok}".encode(), None),
        (f"i2\t{img256}\t{' '.join(['1'] * 255)}".encode(), F.BAD_CODES),
        (f"i3\t{img256}\t{' '.join(['8192'] * 256)}".encode(), F.BAD_CODES),
        (f"i4\t{img256}\t{' '.join(['x'] * 256)}".encode(), F.BAD_CODES),
        (f"i5\t{_b64(jpeg(128, 128, 5))}\t{codes_ok}".encode(), F.WRONG_IMAGE_SIZE),
        (f"i6\t{_b64(png(256, 256, 6))}\t{codes_ok}".encode(), None),
    ]
    image = root / "image.tsv"
    _write(image, [r for r, _ in image_rows], [b"\n"] * len(image_rows), final_newline=True)

    det_img = _b64(jpeg(100, 80, 7))
    det_rows = [
        (f"d1\t{det_img}\t1,2,30,40,5,star, five-pointed&&50,10,99,79,1,circle".encode(), None),
        (f"d2\t{det_img}\t1,2,300,40,1,circle".encode(), F.BOX_OUTSIDE_IMAGE),
        (f"d3\t{det_img}\t1,2,30,circle".encode(), F.BAD_OBJECT),
        (f"d4\t{det_img}\t5,5,5,40,1,circle".encode(), F.BOX_DEGENERATE),
        (f"d5\t{det_img}\t".encode(), F.EMPTY_TEXT),
        (f"d6\t{det_img}\t0,0,100.5,80,2,square".encode(), None),  # within 1 px tolerance: clipped
    ]
    det = root / "detection.tsv"
    _write(det, [r for r, _ in det_rows], [b"\n"] * len(det_rows), final_newline=True)

    neg = root / "negative_sample"
    neg.mkdir(exist_ok=True)
    (neg / "all_captions.txt").write_text("a red circle.\n")
    (neg / "object.txt").write_text("circle\nsquare\n")
    (neg / "type2ans.json").write_text(json.dumps({"how many": ["1", "2"], "other": ["yes", "no"]}))

    return {
        "vl": BadFile(vl, [e for _, e in rows]),
        "text": BadFile(text, [e for _, e in text_rows]),
        "image": BadFile(image, [e for _, e in image_rows]),
        "detection": BadFile(det, [e for _, e in det_rows]),
    }
