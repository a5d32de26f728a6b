"""The OCR TSVs of `ofa-preprocess sample` (OFA-OCR, spec §10.2.1): Chinese text lines rendered with a CJK font.

Each row is `uniq-id, image (base64), text`, OFA's `ocr_scene_*.tsv` layout. A line is 2–8 characters drawn from
a fixed set of common simplified characters and digits, rendered with Pillow in a CJK TrueType font at a random
size, colour and margin on a light, slightly noisy background, so the transcription is exactly what the pixels
show. Splits draw from their own random streams and id ranges, as the other finetuning TSVs do.

The font: `--ocr-font PATH`, else the first CJK font found on the usual Debian paths (fonts-wqy-microhei, the
smallest package: scripts/install_system_packages.sh installs it), else `fc-match :lang=zh`. No font is a clear
error naming the package to install (`--ocr-font none` writes no OCR lines).

Files (OUT/finetune/): ocr_train.tsv, ocr_val.tsv, ocr_test.tsv, and ocr_vocab/vocab.txt: a small BERT WordPiece
vocabulary covering these lines and the Chinese prompt, so the OCR recipe (data.tokenizer.kind bert) runs offline
and with a small softmax; real data uses OFA's utils/BERT_CN_dict/vocab.txt.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ofa_scale.data.sample_corpus import encode_image
from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_text

SPLITS = ("train", "val", "test")
ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}  # disjoint id ranges per split
# Common simplified characters (and digits) the lines are made of; every one is in BERT-CN's vocab.txt.
CHARSET = "中国人大小上下左右天地日月山水火木金土东西南北前后年时分工作学生电话路口门店公司银行出入0123456789"
MIN_CHARS, MAX_CHARS = 2, 8
# Font files of Debian packages with CJK glyphs, smallest package first (fonts-wqy-microhei: 1.6 MB).
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
)
FONT_PACKAGE = "fonts-wqy-microhei"


def find_cjk_font(path: str | None = None) -> Path:
    """The font file to render with: `path` when given (must exist), else a known Debian CJK font, else
    fontconfig's match for Chinese."""
    if path:
        if not Path(path).is_file():
            raise UserError(f"--ocr-font {path} does not exist; pass a TrueType/OpenType font with Chinese glyphs")
        return Path(path)
    for candidate in FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    if shutil.which("fc-match"):
        found = subprocess.run(["fc-match", "--format=%{file}", ":lang=zh"], capture_output=True, text=True,
                               check=False).stdout.strip()
        # fc-match always answers something; only a font that really covers Chinese will do
        if found and Path(found).is_file() and _has_cjk_glyphs(Path(found)):
            return Path(found)
    raise UserError(f"no font with Chinese glyphs found for the OCR sample lines; install Debian's {FONT_PACKAGE} "
                    f"(scripts/install_system_packages.sh) or pass --ocr-font PATH")


def _has_cjk_glyphs(font_path: Path) -> bool:
    """A font without CJK glyphs draws every character as the same 'missing' box."""
    font = ImageFont.truetype(str(font_path), 24)
    masks = {bytes(font.getmask(ch)) for ch in "中国人"}
    return len(masks) == 3


def write_sample_vocab(out_dir: str | Path) -> Path:
    """A BERT vocab.txt (one WordPiece a line, BERT's specials first) for the sample lines and the Chinese OCR
    prompt: every character of CHARSET and the prompt, ASCII digits and letters with their `##` continuations."""
    from ofa_scale.finetune.prompts_cn import OCR_PROMPT_ZH

    alnum = "0123456789abcdefghijklmnopqrstuvwxyz"
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", *alnum, *[f"##{c}" for c in alnum],
              *dict.fromkeys(c for c in CHARSET + OCR_PROMPT_ZH if c not in alnum and c != "?")]
    path = Path(out_dir) / "vocab.txt"
    atomic_write_text(path, "\n".join(pieces) + "\n")
    return path


def line_text(rng: random.Random) -> str:
    return "".join(rng.choice(CHARSET) for _ in range(rng.randint(MIN_CHARS, MAX_CHARS)))


def render_line(text: str, font_path: Path, rng: random.Random) -> Image.Image:
    """One text line: random size, ink, margins and a light noisy background."""
    font = ImageFont.truetype(str(font_path), rng.randint(22, 36))
    x0, y0, x1, y1 = font.getbbox(text)
    mx, my = rng.randint(4, 16), rng.randint(3, 10)
    w, h = x1 - x0 + 2 * mx, y1 - y0 + 2 * my
    paper = np.array([rng.randint(200, 255) for _ in range(3)], dtype=np.float64)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 6.0, (h, w, 1))
    img = Image.fromarray(np.clip(paper + noise, 0, 255).astype(np.uint8))
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    ImageDraw.Draw(img).text((mx - x0, my - y0), text, font=font, fill=ink)
    return img


def ocr_row(split: str, index: int, seed: int, font_path: Path) -> str:
    """The index-th row of a split: the same for the same (split, index, seed, font) whatever the split sizes."""
    rng = random.Random(f"{seed}-ocr-{split}-{index}")
    text = line_text(rng)
    image = encode_image(render_line(text, font_path, rng), rng, png_share=0.0)
    return "\t".join([str(ID_BASE[split] + index), image, text])


def write_ocr_corpus(out_dir: str | Path, images: int, eval_images: int, seed: int = 0,
                     font: str | None = None) -> dict[str, Path]:
    """Write ocr_{train,val,test}.tsv under `out_dir` (`images` training lines, `eval_images` per held-out
    split); return their paths. Byte-identical for the same arguments and font file."""
    font_path = find_cjk_font(font)
    out = Path(out_dir)
    paths = {"ocr_vocab/vocab.txt": write_sample_vocab(out / "ocr_vocab")}
    for split, n in (("train", images), ("val", eval_images), ("test", eval_images)):
        name = f"ocr_{split}.tsv"
        lines = [ocr_row(split, i, seed, font_path) for i in range(n)]
        atomic_write_bytes(out / name, ("\n".join(lines) + "\n").encode("utf-8"))
        paths[name] = out / name
    return paths
