"""`ofa-preprocess sample`: a deterministic synthetic OFA pretraining corpus in the exact OFA TSV formats (and,
from the same scenes, the finetuning TSVs of sample_finetune.py under OUT/finetune/).

The images show a small world of coloured shapes on textured backgrounds. Every caption, question/answer,
grounding box and detection box is computed from the same scene description the image was drawn from, so the
text is *true* for the pixels and a model trained on the corpus can learn it.

image_examples rows carry 256 "codes" for the central 128x128 region. No VQGAN is available offline, so the
codes come from a fixed colour quantiser (see `colour_codes`): they stand in for VQGAN codes — same count,
range and raster order — but are NOT VQGAN codes and carry no learned semantics.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

COLOURS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 220), "yellow": (240, 210, 30),
    "purple": (148, 70, 189), "orange": (255, 127, 14), "white": (250, 250, 250), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "star": "stars"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BACKGROUNDS = ("striped", "checkered", "dotted", "noisy", "plain")
# Detection category names; one contains a comma on purpose (OFA splits objects on the first 5 commas only).
CATEGORY = {"circle": (1, "circle"), "square": (2, "square"), "triangle": (3, "triangle"),
            "diamond": (4, "diamond"), "star": (5, "star, five-pointed")}
DATASETS_CAPTION = ("coco", "cc3m", "sbu", "cc12m", "vg")
# Realistic-ish mix of vision-language row types (captions dominate OFA's pretraining pairs).
VL_TYPE_WEIGHTS = (("caption", 0.55), ("qa", 0.30), ("visual_grounding", 0.15))
TSV_NAMES = ("vision_language_examples.tsv", "text_examples.tsv", "image_examples.tsv", "detection_examples.tsv")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, exactly the drawn extent

    @property
    def size(self) -> str:
        return "large" if (self.box[2] - self.box[0]) >= 48 else "small"

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]


# ----------------------------------------------------------------------------------------------- scenes
def make_scene(rng: random.Random, width: int, height: int, max_shapes: int = 5) -> Scene:
    """Place 1..max_shapes non-overlapping shapes (rejection sampling on their boxes)."""
    n = rng.randint(1, max_shapes)
    shapes: list[Shape] = []
    for _ in range(n * 20):
        if len(shapes) == n:
            break
        side = rng.randint(max(12, min(width, height) // 8), max(16, min(width, height) // 3))
        x0 = rng.randint(2, width - side - 2)
        y0 = rng.randint(2, height - side - 2)
        box = (x0, y0, x0 + side, y0 + side)
        if any(not (box[2] + 3 < s.box[0] or s.box[2] + 3 < box[0] or box[3] + 3 < s.box[1] or s.box[3] + 3 < box[1])
               for s in shapes):
            continue
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), box))
    return Scene(width, height, rng.choice(BACKGROUNDS), tuple(shapes))


def _background(scene: Scene, rng: random.Random) -> Image.Image:
    base = tuple(rng.randint(90, 170) for _ in range(3))
    other = tuple(min(255, c + rng.randint(20, 50)) for c in base)
    img = Image.new("RGB", (scene.width, scene.height), base)
    draw = ImageDraw.Draw(img)
    step = rng.randint(6, 14)
    if scene.background == "striped":
        for x in range(-scene.height, scene.width, step * 2):
            draw.line([(x, 0), (x + scene.height, scene.height)], fill=other, width=step // 2 + 1)
    elif scene.background == "checkered":
        for y in range(0, scene.height, step):
            for x in range((y // step % 2) * step, scene.width, step * 2):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=other)
    elif scene.background == "dotted":
        for y in range(step // 2, scene.height, step):
            for x in range(step // 2, scene.width, step):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=other)
    # Mild pixel noise on every background so images are not trivially compressible.
    nrng = np.random.default_rng(rng.getrandbits(32))
    amp = 28 if scene.background == "noisy" else 8
    arr = np.asarray(img, dtype=np.int16) + nrng.integers(-amp, amp + 1, size=(scene.height, scene.width, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _polygon(kind: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    pts = []  # star: 5 outer points touching the box top, inner radius 0.45
    for i in range(10):
        rad = r if i % 2 == 0 else 0.45 * r
        a = -np.pi / 2 + i * np.pi / 5
        pts.append((cx + rad * np.cos(a), cy + r * 0.1 + rad * np.sin(a)))
    return pts


def render(scene: Scene, rng: random.Random) -> Image.Image:
    img = _background(scene, rng)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        x0, y0, x1, y1 = s.box
        if s.kind == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif s.kind == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon(_polygon(s.kind, s.box), fill=fill)
    return img


def encode_image(img: Image.Image, rng: random.Random, png_share: float = 0.2) -> str:
    buf = io.BytesIO()
    if rng.random() < png_share:
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=rng.choice((85, 90, 95)))
    return base64.urlsafe_b64encode(buf.getvalue()).decode("ascii")


def colour_codes(img: Image.Image) -> list[int]:
    """Stand-in for VQGAN codes: 16x16 grid over the central 128x128 region of a 256x256 image, one code per
    8x8 patch = its mean colour quantised to 5 bits red, 4 bits green, 4 bits blue (2^13 = 8192 codes)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float64)[64:192, 64:192]
    means = arr.reshape(16, 8, 16, 8, 3).mean(axis=(1, 3))
    r = np.minimum(means[..., 0] // 8, 31).astype(np.int64)
    g = np.minimum(means[..., 1] // 16, 15).astype(np.int64)
    b = np.minimum(means[..., 2] // 16, 15).astype(np.int64)
    return (r * 256 + g * 16 + b).reshape(-1).tolist()


# ----------------------------------------------------------------------------------------------- language
def _count_phrase(n: int, thing: str) -> str:
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {thing if n == 1 else PLURAL.get(thing, thing + 's')}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_groups(scene: Scene) -> list[tuple[str, str, int]]:
    """(colour, kind, count) per distinct coloured shape, in drawing order of first occurrence."""
    groups: dict[tuple[str, str], int] = {}
    for s in scene.shapes:
        groups[(s.colour, s.kind)] = groups.get((s.colour, s.kind), 0) + 1
    return [(colour, kind, n) for (colour, kind), n in groups.items()]


def listing(groups: list[tuple[str, str, int]]) -> str:
    """'a red circle, two blue squares and a green star' for the given groups, in their order."""
    parts = []
    for colour, kind, n in groups:
        words = _count_phrase(n, kind).split(" ", 1)
        parts.append(f"{words[0]} {colour} {words[1]}" if n > 1 else f"{_article(colour)} {colour} {kind}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def background_phrase(scene: Scene) -> str:
    return "a plain" if scene.background == "plain" else f"a {scene.background}"


def describe(scene: Scene, rng: random.Random) -> str:
    """A true caption with the capitals and punctuation of web captions."""
    shapes_text = listing(shape_groups(scene))
    bg = background_phrase(scene)
    template = rng.choice((
        "{L} on {B} background.", "A picture of {L} on {B} background", "{L}, drawn on {B} background!",
        "There are {L} on {B} background.", "Close-up: {L} over {B} pattern.",
    ))
    text = template.format(L=shapes_text, B=bg)
    return text[0].upper() + text[1:]


def _unique(scene: Scene, pred) -> Shape | None:
    hits = [s for s in scene.shapes if pred(s)]
    return hits[0] if len(hits) == 1 else None


def ask(scene: Scene, rng: random.Random) -> tuple[str, list[tuple[float, str]], list[str], str]:
    """(question, [(conf, answer)], gt_objects, question_type) — the answer is true for the scene."""
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    qtype = rng.choice(("how many", "how many", "what color", "is there", "what shape"))
    if qtype == "what color":
        s = _unique(scene, lambda t: kinds.count(t.kind) == 1)
        if s is not None:
            return f"What color is the {s.kind}?", [(1.0, s.colour)], [s.kind], "what color"
        qtype = "how many"
    if qtype == "what shape":
        s = _unique(scene, lambda t: colours.count(t.colour) == 1)
        if s is not None:
            q = rng.choice(("What shape is the {c} object?", "what shape is the {c} thing"))
            return q.format(c=s.colour), [(1.0, s.kind)], [f"{s.colour} object"], "what shape"
        qtype = "is there"
    if qtype == "is there":
        colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if rng.random() < 0.5 and scene.shapes:
            s = rng.choice(scene.shapes)
            colour, kind = s.colour, s.kind
        present = any(s.colour == colour and s.kind == kind for s in scene.shapes)
        ans = "yes" if present else "no"
        # VQA-style soft scores: most annotators agree, one or two disagree.
        refs = [(1.0, ans)] if rng.random() < 0.7 else [(0.3, "no" if present else "yes"), (1.0, ans)]
        return f"Is there {_article(colour)} {colour} {kind} in the image?", refs, [f"{colour} {kind}"], "is there"
    # how many: of a kind, or of a colour
    if rng.random() < 0.5:
        kind = rng.choice(SHAPES)
        n = kinds.count(kind)
        q, objs = f"How many {PLURAL[kind]} are there?", [kind]
    else:
        colour = rng.choice(list(COLOURS))
        n = colours.count(colour)
        q, objs = f"how many {colour} shapes are in the picture", [f"{colour} shape"]
    refs = [(1.0, str(n))] if rng.random() < 0.8 else [(0.6, NUMBER_WORDS[n]), (1.0, str(n))]
    return q, refs, objs, "how many"


def refer(scene: Scene, rng: random.Random) -> tuple[str, Shape] | None:
    """A referring expression that picks out exactly one shape, or None if no shape is unique enough."""
    order = list(scene.shapes)
    rng.shuffle(order)
    for s in order:
        text = expression(scene, s, rng)
        if text is not None:
            return text, s
    return None


def expression(scene: Scene, s: Shape, rng: random.Random) -> str | None:
    """A referring expression true of `s` only (by name, size or left/right), or None. Draws from `rng` only
    when it returns a plain name, so `refer` keeps its random sequence."""
    same_name = [t for t in scene.shapes if t.name == s.name]
    if len(same_name) == 1:
        return rng.choice(("the {n}", "The {n}.", "{n}")).format(n=s.name)
    same_size = [t for t in same_name if t.size == s.size]
    if len(same_size) == 1:
        return f"the {s.size} {s.name}"
    if len(same_name) == 2:
        left = min(same_name, key=lambda t: t.cx)
        if left.cx != max(same_name, key=lambda t: t.cx).cx:
            return f"the {s.name} on the {'left' if s is left else 'right'}"
    return None


GENERAL_SENTENCES = (
    "Geometry is the branch of mathematics that studies shapes, sizes and the properties of space.",
    "A circle is the set of points at a fixed distance from a centre.",
    "Painters have mixed red and yellow to make orange for centuries.",
    "The committee met on Tuesday; the report is due in March.",
    "Rain is expected later this week, with clearer skies by the weekend.",
    "Sorting a list of n items takes O(n log n) comparisons in the worst case.",
    "She said: \"the museum opens at 9 a.m., not 10.\"",
    "Triangles with equal sides also have equal angles.",
    "Most stars visible at night are larger than the Sun.",
    "A diamond, in heraldry, is called a lozenge.",
)


def paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 6)):
        if rng.random() < 0.4:
            sentences.append(rng.choice(GENERAL_SENTENCES))
            continue
        c1, c2 = rng.sample(list(COLOURS), 2)
        k1, k2 = rng.sample(SHAPES, 2)
        n = rng.randint(2, 9)
        sentences.append(rng.choice((
            f"The {c1} {k1} sits to the left of the {c2} {k2}.",
            f"There were {NUMBER_WORDS[n]} {c1} {PLURAL[k1]} and no {PLURAL[k2]} at all.",
            f"{_article(k1).capitalize()} {k1} has {({'triangle': 3, 'square': 4, 'diamond': 4, 'star': 10}).get(k1, 'no')} corners, "
            f"which makes it easy to tell apart from {_article(k2)} {k2}.",
            f"If you paint {_article(k1)} {k1} {c1}, it is still a {k1}.",
            f"Count the {PLURAL[k2]}: {', '.join(str(i) for i in range(1, n + 1))}.",
        )))
    return " ".join(sentences)


# ----------------------------------------------------------------------------------------------- rows
def _quirky_id(prefix: str, i: int, rng: random.Random) -> str:
    """Ids as real corpora have them: dots, '#', spaces, slashes-free."""
    style = rng.random()
    if style < 0.5:
        return f"{prefix}.{i:06d}"
    if style < 0.7:
        return f"{prefix}#{i}"
    if style < 0.85:
        return f"{prefix} {i:05d}.jpg"
    return f"{prefix}_{i}"


def _box_str(box) -> str:
    return ",".join(f"{v:.2f}" for v in box)


def _vl_row(i: int, seed: int) -> tuple[str, str | None]:
    """One vision_language row (8 columns) and the caption to list in all_captions.txt (or None)."""
    rng = random.Random(f"{seed}-vl-{i}")
    w, h = rng.randint(96, 320), rng.randint(96, 320)
    scene = make_scene(rng, w, h)
    image = encode_image(render(scene, rng), rng)
    r = rng.random()
    vtype = "caption" if r < VL_TYPE_WEIGHTS[0][1] else (
        "qa" if r < VL_TYPE_WEIGHTS[0][1] + VL_TYPE_WEIGHTS[1][1] else "visual_grounding")
    uid = _quirky_id("vl", i, rng)
    if vtype == "visual_grounding":
        ref = refer(scene, rng)
        if ref is None:
            vtype = "caption"
        else:
            text, s = ref
            return "\t".join([uid, image, text, "", _box_str(s.box), s.name, "refcoco", vtype]), None
    if vtype == "qa":
        q, refs, objs, _ = ask(scene, rng)
        refs_s = "&&".join(f"{c:.1f}|!+{a}" for c, a in refs)
        return "\t".join([uid, image, "", q, refs_s, "&&".join(objs), "vqa", vtype]), None
    caption = describe(scene, rng)
    objs = "&&".join(dict.fromkeys(s.name for s in scene.shapes))
    dataset = rng.choice(DATASETS_CAPTION)
    return "\t".join([uid, image, caption, "", "", objs, dataset, "caption"]), caption


def _text_row(i: int, seed: int) -> str:
    rng = random.Random(f"{seed}-text-{i}")
    return f"{_quirky_id('pile', i, rng)}\t{paragraph(rng)}"


def _image_row(i: int, seed: int, code_fn=colour_codes) -> str:
    rng = random.Random(f"{seed}-image-{i}")
    scene = make_scene(rng, 256, 256)
    b64 = encode_image(render(scene, rng), rng, png_share=0.1)
    # Codes come from the decoded stored bytes, so anyone can recompute them from the shard exactly.
    stored = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
    codes = " ".join(map(str, code_fn(stored)))
    return f"{_quirky_id('img', i, rng)}\t{b64}\t{codes}"


def _detection_row(i: int, seed: int) -> str:
    rng = random.Random(f"{seed}-det-{i}")
    scene = make_scene(rng, rng.randint(128, 320), rng.randint(128, 320), max_shapes=6)
    image = encode_image(render(scene, rng), rng)
    objs = "&&".join(f"{_box_str(s.box)},{CATEGORY[s.kind][0]},{CATEGORY[s.kind][1]}" for s in scene.shapes)
    return f"{_quirky_id('det', i, rng)}\t{image}\t{objs}"


def negative_files(captions: list[str]) -> dict[str, str]:
    objects = sorted({f"{c} {k}" for c in COLOURS for k in SHAPES} | set(SHAPES))
    type2ans = {
        "how many": [str(n) for n in range(10)],
        "what color": list(COLOURS),
        "what shape": list(SHAPES),
        "is there": ["yes", "no"],
        "other": ["yes", "no", "left", "right", "background", "nothing"],
    }
    return {
        "all_captions.txt": "\n".join(dict.fromkeys(captions)) + "\n",
        "object.txt": "\n".join(objects) + "\n",
        "type2ans.json": json.dumps(type2ans, indent=1) + "\n",
    }


def write_sample_corpus(out_dir: str | Path, rows: int = 2000, seed: int = 0,
                        vqgan: str | Path | None = None) -> dict[str, Path]:
    """Write the four OFA pretraining TSVs and negative_sample/ under `out_dir`; return their paths.

    `rows` vision-language rows, rows//4 text rows, rows//8 image and detection rows (OFA mixes 2 text, 1 image
    and 1 detection example per 8 pair rows). Output is byte-identical for the same (rows, seed)."""
    if rows < 1:
        raise UserError(f"--rows must be at least 1 (got {rows}).")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror}; choose a writable --out.") from None
    vl_lines, captions = [], []
    for i in range(rows):
        line, cap = _vl_row(i, seed)
        vl_lines.append(line)
        if cap is not None:
            captions.append(cap)
    n_aux = max(1, rows // 8)
    code_fn, codes_note = colour_codes, "colour-quantiser stand-in for VQGAN codes"
    if vqgan is not None:  # real image-infilling codes (issue 11 §4); imported here: torch is heavy
        from ofa_scale.vqgan.image_codes import centre_code_fn

        code_fn, codes_note = centre_code_fn(vqgan), f"VQGAN codes ({Path(vqgan).resolve()})"
    contents = {
        "vision_language_examples.tsv": vl_lines,
        "text_examples.tsv": [_text_row(i, seed) for i in range(max(1, rows // 4))],
        "image_examples.tsv": [_image_row(i, seed, code_fn) for i in range(n_aux)],
        "detection_examples.tsv": [_detection_row(i, seed) for i in range(n_aux)],
    }
    paths: dict[str, Path] = {}
    for name, lines in contents.items():
        atomic_write_bytes(out / name, ("\n".join(lines) + "\n").encode("utf-8"))
        paths[name] = out / name
    for name, text in negative_files(captions).items():
        atomic_write_text(out / "negative_sample" / name, text)
        paths[name] = out / "negative_sample" / name
    atomic_write_json(out / "sample_corpus.json", {"format_version": 1, "rows": rows, "seed": seed,
                                                   "codes": codes_note})
    return paths


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write the TSVs and negative_sample/ into")
    parser.add_argument("--rows", type=int, default=2000, help="vision-language rows (others scale with it)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed; same seed, same bytes")
    parser.add_argument("--finetune-images", type=int, default=256, metavar="N",
                        help="training images of the finetuning TSVs in OUT/finetune/ (caption, vqa, refcoco, "
                             "snli_ve, imagenet; 0 writes none)")
    parser.add_argument("--finetune-eval-images", type=int, default=64, metavar="N",
                        help="images of each held-out finetuning split (val, test), disjoint from training")
    parser.add_argument("--ocr-font", default=None, metavar="PATH",
                        help="CJK font for the OCR text lines (ocr_*.tsv, as many lines as finetuning images); "
                             "default: fonts-wqy-microhei or fontconfig's Chinese font, and none written (with a note) when there is none; 'none' writes no OCR lines")
    parser.add_argument("--text-rows", type=int, default=512, metavar="N",
                        help="training rows of each text-only finetuning TSV in OUT/text/ (gigaword, glue_*; "
                             "0 writes none)")
    parser.add_argument("--text-eval-rows", type=int, default=128, metavar="N",
                        help="rows of each held-out text split (val, test)")
    parser.add_argument("--vqgan", default=None, metavar="DIR",
                        help="image_examples codes from this VQGAN (model.yaml + last.ckpt) instead of the colour "
                             "quantiser stand-in")
    parser.add_argument("--image-gen-rows", type=int, default=256, metavar="N",
                        help="training rows of the text-to-image TSV in OUT/image_gen/ (caption + 1024 codes; 0 "
                             "writes none; codes from --vqgan when given)")
    parser.add_argument("--image-gen-eval-rows", type=int, default=32, metavar="N",
                        help="rows of each held-out text-to-image split (val, test)")
    parser.add_argument("--image-gen-code-size", type=int, default=256, metavar="S",
                        help="text-to-image codes of the picture shrunk to SxS: (S/8)^2 codes (default 256: OFA's "
                             "32x32; match task.extra.code_image_size)")


def run(args: argparse.Namespace) -> int:
    paths = write_sample_corpus(args.out, rows=args.rows, seed=args.seed, vqgan=args.vqgan)
    for name in TSV_NAMES:
        n = sum(1 for _ in open(paths[name], "rb"))
        print(f"{paths[name]}: {n} rows")
    print(f"{Path(args.out) / 'negative_sample'}: all_captions.txt, object.txt, type2ans.json")
    if args.finetune_images:
        # imported here: sample_finetune builds on this module's scenes
        from ofa_scale.data.sample_finetune import write_finetune_corpus

        for name, path in write_finetune_corpus(Path(args.out) / "finetune", args.finetune_images,
                                                args.finetune_eval_images, seed=args.seed).items():
            print(f"{path}: {sum(1 for _ in open(path, 'rb'))} rows")
        from ofa_scale.data.sample_ocr import write_ocr_corpus  # OFA-OCR lines (issue 13 §2)

        ocr = {}
        if args.ocr_font != "none":
            try:
                ocr = write_ocr_corpus(Path(args.out) / "finetune", args.finetune_images, args.finetune_eval_images,
                                       seed=args.seed, font=args.ocr_font)
            except UserError as e:
                if args.ocr_font:  # a font the user named must work
                    raise
                # the rest of the corpus needs no CJK font: say what is missing instead of failing the whole sample
                print(f"OCR lines not written: {e}")
        for path in ocr.values():
            print(f"{path}: {sum(1 for _ in open(path, 'rb'))} rows")
        from ofa_scale.data.sample_classes import write_classes_corpus  # ImageNet-style classes (issue 11 §1)

        for path in write_classes_corpus(Path(args.out) / "finetune", args.finetune_images, args.finetune_eval_images,
                                         seed=args.seed).values():
            print(f"{path}: {sum(1 for _ in open(path, 'rb'))} rows")
    if args.image_gen_rows:
        from ofa_scale.data.sample_image_gen import write_image_gen_corpus  # text-to-image (issue 11 §5)

        for path in write_image_gen_corpus(Path(args.out) / "image_gen", args.image_gen_rows,
                                           args.image_gen_eval_rows, seed=args.seed, vqgan=args.vqgan,
                                           code_image_size=args.image_gen_code_size).values():
            print(f"{path}: {sum(1 for _ in open(path, 'rb'))} rows")
    if args.text_rows:
        from ofa_scale.data.sample_text_tasks import write_text_corpus  # Gigaword and GLUE (issue 11)

        for path in write_text_corpus(Path(args.out) / "text", args.text_rows, args.text_eval_rows,
                                      seed=args.seed).values():
            print(f"{path}: {sum(1 for _ in open(path, 'rb'))} rows")
    return 0
