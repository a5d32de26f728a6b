"""Validate the image of a row and decide which bytes to store.

Order matters for safety and speed: the pixel count is read from the header *before* any decoding, so a small
file claiming hundreds of megapixels (a decompression bomb) is rejected without allocating it. Valid JPEG/PNG
bytes are stored untouched; other formats are re-encoded (JPEG q95, or PNG when there is alpha); images whose
shorter side exceeds `downscale_shorter_side` are shrunk once here, so the training loader never pays for it.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

from ofa_scale.data.tsv_formats import (BAD_BASE64, IMAGE_TOO_LARGE, NOT_AN_IMAGE, TRUNCATED_IMAGE, RowReject)

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: far above any real photo, far below a bomb's claimed size
_B64_TRANSLATE = bytes.maketrans(b"-_", b"+/")


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    format: str  # "jpeg" | "png"
    width: int
    height: int
    orig_width: int
    orig_height: int

    @property
    def ext(self) -> str:
        return "jpg" if self.format == "jpeg" else "png"

    @property
    def scale_x(self) -> float:
        return self.width / self.orig_width

    @property
    def scale_y(self) -> float:
        return self.height / self.orig_height

    def meta(self) -> dict:
        return {"format": self.format, "width": self.width, "height": self.height,
                "orig_width": self.orig_width, "orig_height": self.orig_height, "scale": self.scale_x}


def decode_base64(s: str | bytes) -> bytes:
    """OFA decodes with urlsafe_b64decode; accept both alphabets, but reject stray characters and bad padding
    (the lenient decoder would silently drop them and hand garbage to PIL)."""
    raw = s.encode("ascii", "replace") if isinstance(s, str) else s
    raw = raw.strip().translate(_B64_TRANSLATE)
    if not raw:
        raise RowReject(BAD_BASE64, "empty image column")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowReject(BAD_BASE64, str(e)[:80]) from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limit below replaces Pillow's bomb warning/error, which depends on a process-global setting.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise RowReject(IMAGE_TOO_LARGE, str(e)[:80]) from None
        except UnidentifiedImageError:
            raise RowReject(NOT_AN_IMAGE, "bytes are not a recognised image format") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise RowReject(NOT_AN_IMAGE, str(e)[:80]) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise RowReject(NOT_AN_IMAGE, f"header claims {w}x{h}")
    if w * h > max_pixels:
        raise RowReject(IMAGE_TOO_LARGE, f"{w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit")
    return im


def _decode_fully(im: Image.Image, cheap: bool) -> None:
    """Decode every byte of the stream so a truncated file is caught here, not in the training loader.
    For JPEG, DCT-domain scaling (draft) still parses all entropy-coded data at a fraction of the cost."""
    if cheap and im.format == "JPEG":
        im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Image.DecompressionBombError as e:
        raise RowReject(IMAGE_TOO_LARGE, str(e)[:80]) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise RowReject(TRUNCATED_IMAGE, str(e)[:80]) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def open_checked(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image in `data`, decoded whole: its pixel count checked before decoding (bombs), then every byte
    (truncation). A RowReject naming the problem otherwise. For readers of single images (ofa-predict,
    ofa-demo) that must apply the converter's checks without its re-encoding."""
    im = _open(data, max_pixels)
    _decode_fully(im, cheap=False)
    return im


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG")
    else:
        (im if im.mode in ("RGB", "L") else im.convert("RGB")).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def check_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                downscale_shorter_side: int | None = None) -> StoredImage:
    """Validate `data` and return what to store. Raises RowReject for anything a loader could not decode."""
    im = _open(data, max_pixels)
    ow, oh = im.size
    fmt = {"JPEG": "jpeg", "PNG": "png"}.get(im.format or "")
    shrink = downscale_shorter_side is not None and min(ow, oh) > downscale_shorter_side
    if fmt is not None and not shrink:
        _decode_fully(im, cheap=True)
        return StoredImage(data, fmt, ow, oh, ow, oh)
    if shrink:
        s = downscale_shorter_side / min(ow, oh)
        size = (max(1, round(ow * s)), max(1, round(oh * s)))
        if im.format == "JPEG":
            im.draft(im.mode if im.mode in ("RGB", "L") else "RGB", size)  # decode at >= target size via DCT
        _decode_fully(im, cheap=False)
        out_fmt = fmt or ("png" if _has_alpha(im) else "jpeg")
        if out_fmt == "jpeg" and im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        elif out_fmt == "png" and im.mode == "P":
            im = im.convert("RGBA" if _has_alpha(im) else "RGB")
        im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        return StoredImage(_encode(im, out_fmt), out_fmt, size[0], size[1], ow, oh)
    # Another format (WebP, GIF, BMP, TIFF…): re-encode once so every loader sees JPEG or PNG only.
    _decode_fully(im, cheap=False)
    try:
        im.seek(0)
    except EOFError:
        pass
    out_fmt = "png" if _has_alpha(im) else "jpeg"
    if out_fmt == "png" and im.mode not in ("RGBA", "LA", "RGB", "L"):
        im = im.convert("RGBA")
    return StoredImage(_encode(im, out_fmt), out_fmt, ow, oh, ow, oh)


__all__ = ["StoredImage", "check_image", "decode_base64", "DEFAULT_MAX_PIXELS"]
