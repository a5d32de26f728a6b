"""The bounds on one `ofa-demo` request: image file size, image pixels, text length.

The page is served to whoever can reach the port, so every request is checked before the model sees it; a
violation is a `UserError` whose one sentence the page shows. The upload size is also enforced by gradio itself
(`launch(max_file_size=...)`), so an oversized file is refused before it is written to disk; the check here keeps
the bound when the app is driven any other way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ofa_scale.data.image_check import open_checked
from ofa_scale.data.tsv_formats import IMAGE_TOO_LARGE, RowReject
from ofa_scale.errors import UserError


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 10 * 2**20    # 10 MiB: any phone photo, not a disk-filling upload
    max_pixels: int = 25_000_000         # 25 MP: decoding it takes ~75 MB, far from the machine's memory
    max_text_chars: int = 500            # a question or an instruction, not a document
    concurrency: int = 1                 # requests the model runs at once (one model, one device)
    queue_size: int = 16                 # requests waiting; more are refused by gradio with "queue is full"

    def validate(self) -> "Limits":
        for name in ("max_image_bytes", "max_pixels", "max_text_chars", "concurrency", "queue_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return self


def read_image(path: Optional[str | Path], limits: Limits) -> bytes:
    """The bytes of the uploaded image at `path`, checked to be one whole image within the bounds."""
    if not path:
        raise UserError("upload an image first")
    path = Path(path)
    if not path.is_file():
        raise UserError("the uploaded image is gone from the server; upload it again")
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise UserError(f"the image is {_size(size)}; this demo takes images up to {_size(limits.max_image_bytes)}")
    data = path.read_bytes()
    try:
        # the pixel count is checked from the header, before any decoding (a small file can claim a huge image)
        with open_checked(data, max_pixels=limits.max_pixels):
            pass
    except RowReject as e:
        if e.code == IMAGE_TOO_LARGE:
            raise UserError(f"the image is too large for this demo: {e.detail}") from None
        raise UserError(f"that file is not an image this demo can read ({e.detail or e.code})") from None
    return data


def check_text(text: Optional[str], limits: Limits, *, what: str, required: bool) -> str:
    """`text` stripped; a UserError when it is required and empty or longer than the bound."""
    text = (text or "").strip()
    if required and not text:
        raise UserError(f"type a {what} first")
    if len(text) > limits.max_text_chars:
        raise UserError(f"the {what} has {len(text)} characters; this demo takes up to {limits.max_text_chars}")
    return text


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"
