"""Text-to-image TSVs of `ofa-preprocess sample` (issue 11 §5): "a red circle on a plain background" captions with
the 1024 codes of their 256×256 pictures, in the `image_gen` layout `uniq-id, codes, caption` (spec §7.6).

Each picture is one shape of the sample world (sample_corpus.py: its colours and shapes) drawn at a fixed place
and size, the centre 128×128, on a fixed grey with mild noise, so the caption alone fixes the picture: a model
small enough for CPU tests can learn it. Without a VQGAN the codes come from the colour quantiser
(`ColourCodec`, the same 13-bit colour bins as the pretraining corpus' image_examples stand-in, here on the whole
image: 32×32 patches of 8×8 pixels), which can also turn codes back into pixels; with `--vqgan DIR` they are that
VQGAN's codes. `--image-gen-code-size S` (default 256, OFA's) codes the picture shrunk to S×S (area average): an
(S/8)×(S/8) grid, for task.extra.code_image_size S (finetune/image_gen.py) — 128 gives 256 codes, which a CPU test
can learn in minutes.

`oracle` is the checker the generator's own truth allows: decode generated codes, find the dominant shape colour
and the shape drawn in it, and compare both with the caption's words. Random codes score about 1/8 on colour
and rarely draw a shape at all.

Files: OUT/image_gen_{train,val,test}.tsv (disjoint random streams) and sample_image_gen.json.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ofa_scale.data.sample_corpus import COLOURS, SHAPES, Shape, _article, _polygon
from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json

SPLITS = ("train", "val", "test")
MAX_ROWS = 1_000_000
IMAGE_SIZE = 256
PATCH = 8
GRID = IMAGE_SIZE // PATCH  # 32: 1024 codes, the decoder's code grid for code_image_size 256
BOX = (64, 64, 192, 192)  # every shape fills the centre 128×128
# mid-bin of the colour quantiser's 5/4/4-bit bins, so the background's noise keeps one code
BACKGROUND = (132, 136, 136)
TEMPLATES = ("{a} {c} {k} on a plain background", "a picture of {a} {c} {k}", "{a} {c} {k} in the middle",
             "an image of {a} {c} {k} on a plain background")
# A patch mean within this RGB distance of a palette colour counts as that colour (backgrounds are greys in
# [90, 170] per channel, at least ~100 away from every palette colour).
COLOUR_DISTANCE = 60.0
# ... and a patch this close to the background's colour is background (the plain background's noise moves a
# patch mean by a few levels; a purple-ish background may sit near the purple of the palette)
BACKGROUND_DISTANCE = 30.0


# ----------------------------------------------------------------------------------------------- codes
class ColourCodec:
    """The colour-quantiser stand-in for a VQGAN on 256×256 images: code = mean colour of an 8×8 patch in 5 bits
    red, 4 green, 4 blue (8192 codes, raster order); decoding fills each patch with its bin's centre colour.
    Same interface as ofa_scale.vqgan.VQGAN where generation uses it (`n_embed`, `encode`, `decode`)."""

    n_embed = 8192

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, 256, 256, 3) -> int64 (N, 32, 32)."""
        arr = np.asarray(images, dtype=np.float64)
        n, h, w, _ = arr.shape
        means = arr.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, 3).mean(axis=(2, 4))
        r = np.minimum(means[..., 0] // 8, 31).astype(np.int64)
        g = np.minimum(means[..., 1] // 16, 15).astype(np.int64)
        b = np.minimum(means[..., 2] // 16, 15).astype(np.int64)
        return torch.from_numpy(r * 256 + g * 16 + b)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, h, w) or (N, h·w) square -> uint8 (N, 8h, 8w, 3)."""
        codes = torch.as_tensor(codes).long().cpu()
        if codes.dim() == 2:
            side = int(round(codes.shape[1] ** 0.5))
            codes = codes.view(codes.shape[0], side, side)
        if bool(((codes < 0) | (codes >= self.n_embed)).any()):
            raise UserError(f"colour codes must be in [0, {self.n_embed})")
        rgb = torch.stack([(codes // 256) * 8 + 4, (codes // 16 % 16) * 16 + 8, (codes % 16) * 16 + 8], dim=-1)
        pixels = rgb.repeat_interleave(PATCH, dim=1).repeat_interleave(PATCH, dim=2)
        return pixels.clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class ImageGenRow:
    uid: str
    colour: str
    kind: str
    caption: str
    image: Image.Image  # 256×256 RGB


def make_row(split: str, index: int, seed: int) -> ImageGenRow:
    """The index-th row of a split: the same for the same (split, index, seed) whatever the split sizes."""
    rng = random.Random(f"{seed}-imagegen-{split}-{index}")
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    image = _draw(Shape(kind, colour, BOX), rng)
    caption = rng.choice(TEMPLATES).format(a=_article(colour), c=colour, k=kind)
    return ImageGenRow(f"{split}-{index}", colour, kind, caption, image)


def _draw(shape: Shape, rng: random.Random) -> Image.Image:
    """The shape on a fixed mid-grey with mild pixel noise (the sample world's plain background without its random
    tint): the caption then fixes every patch's colour bin, which a CPU-sized model can learn in minutes."""
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-8, 9, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    grey = np.clip(np.asarray(BACKGROUND, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey)
    _paint(ImageDraw.Draw(image), shape.kind, shape.box, COLOURS[shape.colour])
    return image


def _paint(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    """`kind` filling `box` exactly as sample_corpus.render draws it."""
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif kind == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:
        draw.polygon(_polygon(kind, box), fill=fill)


def vqgan_code_fn(vqgan_dir: str | Path) -> Callable[[Image.Image], list[int]]:
    """`f(S×S PIL image) -> (S/8)² codes` with the VQGAN of `vqgan_dir`."""
    from ofa_scale.vqgan.checkpoint import load_vqgan

    model = load_vqgan(vqgan_dir, device="cpu")
    return lambda img: model.encode(np.asarray(img.convert("RGB"))[None]).reshape(-1).tolist()


def write_image_gen_corpus(out_dir: str | Path, rows: int, eval_rows: int, seed: int = 0,
                           vqgan: Optional[str | Path] = None, code_image_size: int = IMAGE_SIZE
                           ) -> dict[str, Path]:
    """OUT/image_gen_{split}.tsv with `rows` training and `eval_rows` val/test rows, the codes of each picture
    shrunk to `code_image_size` pixels; byte-identical for the same arguments (and VQGAN)."""
    for flag, n in (("--image-gen-rows", rows), ("--image-gen-eval-rows", eval_rows)):
        if not 1 <= n <= MAX_ROWS:
            raise UserError(f"{flag} must be between 1 and {MAX_ROWS} (got {n}).")
    if not PATCH <= code_image_size <= IMAGE_SIZE or code_image_size % PATCH:
        raise UserError(f"--image-gen-code-size must be a multiple of {PATCH} between {PATCH} and {IMAGE_SIZE} "
                        f"(got {code_image_size}).")
    grid = code_image_size // PATCH
    if vqgan is None:
        codec = ColourCodec()
        code_fn, note = (lambda img: codec.encode(np.asarray(img)[None]).reshape(-1).tolist()), "colour quantiser"
    else:
        code_fn, note = vqgan_code_fn(vqgan), f"VQGAN codes ({Path(vqgan).resolve()})"
    out = Path(out_dir)
    paths, counts = {}, {}
    for split, n in (("train", rows), ("val", eval_rows), ("test", eval_rows)):
        lines = []
        for i in range(n):
            row = make_row(split, i, seed)
            image = row.image
            if code_image_size != IMAGE_SIZE:
                image = image.resize((code_image_size, code_image_size), Image.BOX)
            codes = code_fn(image)
            if len(codes) != grid * grid:
                raise UserError(f"the VQGAN gives {len(codes)} codes for a {code_image_size}x{code_image_size} "
                                f"picture; text-to-image rows need {grid * grid} (an f=8 VQGAN, as OFA's)")
            lines.append(f"{row.uid}\t{' '.join(map(str, codes))}\t{row.caption}")
        name = f"image_gen_{split}.tsv"
        atomic_write_bytes(out / name, ("\n".join(lines) + "\n").encode("utf-8"))
        paths[name], counts[name] = out / name, n
    atomic_write_json(out / "sample_image_gen.json", {"format_version": 1, "seed": seed, "codes": note,
                                                      "code_image_size": code_image_size, "rows": counts})
    return paths


# ----------------------------------------------------------------------------------------------- the oracle
def caption_words(caption: str) -> tuple[Optional[str], Optional[str]]:
    """(colour, shape) the caption names (the first of each), None where it names none."""
    words = caption.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    kind = next((w for w in words if w in SHAPES or w.rstrip("s") in SHAPES), None)
    return colour, None if kind is None else (kind if kind in SHAPES else kind.rstrip("s"))


def _patch_labels(image: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid) palette index of each code patch; -1 where the patch is background (close to the median colour
    of the patches outside BOX, where this world draws nothing) or near no palette colour."""
    arr = np.asarray(image, dtype=np.float64)
    patch = arr.shape[0] // grid
    means = arr.reshape(grid, patch, grid, patch, 3).mean(axis=(1, 3))
    inside = [v * grid // IMAGE_SIZE for v in BOX]
    outside = np.ones((grid, grid), dtype=bool)
    outside[inside[1]:inside[3], inside[0]:inside[2]] = False
    background = np.median(means[outside], axis=0)
    palette = np.asarray(list(COLOURS.values()), dtype=np.float64)
    dist = np.linalg.norm(means[:, :, None, :] - palette[None, None], axis=-1)
    labels = dist.argmin(-1)
    keep = (dist.min(-1) <= COLOUR_DISTANCE) & (np.linalg.norm(means - background, axis=-1) > BACKGROUND_DISTANCE)
    return np.where(keep, labels, -1)


def _shape_mask(kind: str, box: tuple[int, int, int, int], grid: int) -> np.ndarray:
    """(grid, grid) bool: the code patches at least half covered by `kind` drawn in `box` (pixels of the 256×256
    picture), as render draws it."""
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _paint(ImageDraw.Draw(img), kind, box, 255)
    block = IMAGE_SIZE // grid
    cover = np.asarray(img, dtype=np.float64).reshape(grid, block, grid, block).mean(axis=(1, 3)) / 255.0
    return cover >= 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def judge(image: np.ndarray) -> tuple[Optional[str], Optional[str]]:
    """(dominant palette colour, best-matching shape) of a uint8 square RGB picture decoded from codes (256×256
    for OFA's 32×32 grid, 8 pixels per code); None where there is none. The shape is the template (drawn where
    this world draws, or in the colour region's bounding square) with the highest IoU with the dominant colour's
    patches, both on the picture's own code grid (side / 8: a smaller grid draws coarser outlines)."""
    image = np.asarray(image)
    side = image.shape[0]
    if image.shape[:2] != (side, side) or side % PATCH or IMAGE_SIZE % (side // PATCH):
        raise ValueError(f"the oracle judges square pictures of 8-pixel code patches whose grid divides "
                         f"{IMAGE_SIZE // PATCH}, not {image.shape[:2]}")
    grid = side // PATCH
    labels = _patch_labels(image, grid)
    if not bool((labels >= 0).any()):
        return None, None
    index = int(np.bincount(labels[labels >= 0]).argmax())
    mask = labels == index
    ys, xs = np.nonzero(mask)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1  # shapes are drawn in square boxes
    block = IMAGE_SIZE // grid  # a code patch's side in the 256×256 picture the templates are drawn in
    fitted = (int(xs.min()) * block, int(ys.min()) * block, int(xs.min() + extent) * block,
              int(ys.min() + extent) * block)
    ious = {kind: max(_iou(_shape_mask(kind, box, grid), mask) for box in (BOX, fitted)) for kind in SHAPES}
    return list(COLOURS)[index], max(ious, key=ious.get)


@dataclass
class OracleScore:
    colour: float  # fraction of pictures whose dominant colour is the caption's
    shape: float  # fraction whose dominant-colour region is the caption's shape
    both: float  # fraction with both right

    @property
    def mean(self) -> float:
        return (self.colour + self.shape) / 2


def oracle(images: Sequence[np.ndarray], captions: Sequence[str]) -> OracleScore:
    """How often decoded pictures show what their captions say (module docstring)."""
    if len(images) != len(captions) or not captions:
        raise ValueError("oracle needs one caption per picture, and at least one")
    colour = shape = both = 0
    for image, caption in zip(images, captions):
        want_c, want_k = caption_words(caption)
        got_c, got_k = judge(np.asarray(image))
        colour += got_c == want_c
        shape += got_c is not None and got_k == want_k
        both += got_c == want_c and got_k == want_k
    n = len(captions)
    return OracleScore(colour / n, shape / n, both / n)


__all__ = ["ColourCodec", "ImageGenRow", "make_row", "write_image_gen_corpus", "oracle", "judge", "caption_words",
           "OracleScore", "GRID"]
