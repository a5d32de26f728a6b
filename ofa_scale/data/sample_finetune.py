"""The finetuning TSVs of `ofa-preprocess sample`: caption, VQA, RefCOCO and SNLI-VE rows (spec §7) drawn from the
same synthetic scenes as the pretraining corpus, so every recipe in configs/finetune runs end to end offline.

Every label is computed from the scene the image was drawn from, so it is true for the pixels. Each split (train,
val, test) draws its own scenes from its own random streams and its own id range, so held-out rows never show a
training (or pretraining) image. Within a split the four tasks share the images, as COCO-based tasks do.

Files (OUT/finetune/), in OFA's column orders:
  caption_stage1_train.tsv       uniq-id, image-id, caption, objects, image     one caption per line
  caption_stage2_train.tsv,      image-id, image-id, captions joined by &&, objects, image   one line per image
  caption_{val,test}.tsv
  vqa_{split}.tsv                question-id (int), image-id, question, conf|!+answer&&..., objects, image
  refcoco_{split}.tsv            uniq-id, image-id, expression, "x0,y0,x1,y1" (pixels), image
  snli_ve_{split}.tsv            uniq-id, image-id, image, hypothesis, premise caption, entailment|contradiction|neutral
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ofa_scale.data.sample_corpus import (
    COLOURS, NUMBER_WORDS, PLURAL, SHAPES, Scene, _article, _box_str, ask, background_phrase, encode_image,
    expression, listing, make_scene, render, shape_groups,
)
from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json

SPLITS = ("train", "val", "test")
# Image ids of split s are ID_BASE[s] + index: disjoint ranges, and numeric like COCO's.
ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
MAX_IMAGES = 1_000_000
CAPTIONS_PER_IMAGE = 3
QUESTIONS_PER_IMAGE = 2
EXPRESSIONS_PER_IMAGE = 2
# At most 4 shapes: the longest caption then has 20 words, OFA's max_tgt_length, so targets are never cut.
MAX_SHAPES = 4
SNLI_LABELS = ("entailment", "contradiction", "neutral")
CAPTION_TEMPLATES = ("{L} on {B} background", "a picture of {L} on {B} background", "{L} drawn on {B} background.",
                     "an image of {L} on {B} background", "{L} over {B} pattern")
# Claims no picture can settle: true or false of a drawn shape alike (SNLI-VE's neutral).
NEUTRAL_TEMPLATES = ("the {n} was painted by a child", "the {n} is made of paper", "the {n} is for sale",
                     "someone drew the {n} yesterday", "the {n} is the artist's favourite")
# name -> (task format, split); the order is the order of the CLI report.
FILES: dict[str, tuple[str, str]] = {
    "caption_stage1_train.tsv": ("caption", "train"),
    "caption_stage2_train.tsv": ("caption", "train"),
    "caption_val.tsv": ("caption", "val"),
    "caption_test.tsv": ("caption", "test"),
    **{f"{task}_{split}.tsv": (task, split) for task in ("vqa", "refcoco", "snli_ve") for split in SPLITS},
}


@dataclass(frozen=True)
class SceneImage:
    image_id: int
    scene: Scene
    image: str  # base64 as stored in the TSVs


def scene_image(split: str, index: int, seed: int) -> SceneImage:
    """The index-th image of a split: the same for the same (split, index, seed) whatever the split sizes."""
    rng = random.Random(f"{seed}-ft-{split}-{index}")
    scene = make_scene(rng, rng.randint(96, 224), rng.randint(96, 224), max_shapes=MAX_SHAPES)
    # JPEG only and at most 224 px: each image is repeated on ~11 rows, and PNGs of noisy backgrounds are 4x larger
    return SceneImage(ID_BASE[split] + index, scene, encode_image(render(scene, rng), rng, png_share=0.0))


def _task_rng(img: SceneImage, task: str, seed: int) -> random.Random:
    # one stream per task, so changing one task's rows leaves the others' bytes alone
    return random.Random(f"{seed}-ft-{img.image_id}-{task}")


def _objects(scene: Scene) -> str:
    """Detector-style object labels (category names only, like VinVL's tags): they name no colour or count."""
    return "&&".join(dict.fromkeys(s.kind for s in scene.shapes))


# ----------------------------------------------------------------------------------------------- per task
def captions(img: SceneImage, seed: int) -> list[str]:
    """CAPTIONS_PER_IMAGE distinct lower-case captions, each listing every shape group (in varying order)."""
    rng = _task_rng(img, "caption", seed)
    groups = shape_groups(img.scene)
    out: list[str] = []
    for _ in range(CAPTIONS_PER_IMAGE * 10):
        if len(out) == CAPTIONS_PER_IMAGE:
            break
        order = list(groups)
        rng.shuffle(order)
        text = rng.choice(CAPTION_TEMPLATES).format(L=listing(order), B=background_phrase(img.scene))
        if text not in out:
            out.append(text)
    return out


def questions(img: SceneImage, seed: int) -> list[tuple[int, str, str]]:
    """(question-id, lower-cased question, answers column) for up to QUESTIONS_PER_IMAGE distinct questions."""
    rng = _task_rng(img, "vqa", seed)
    seen: dict[str, str] = {}
    for _ in range(QUESTIONS_PER_IMAGE * 5):
        if len(seen) == QUESTIONS_PER_IMAGE:
            break
        q, refs, _, _ = ask(img.scene, rng)
        seen.setdefault(q.lower(), "&&".join(f"{c:.1f}|!+{a}" for c, a in refs))
    return [(img.image_id * 10 + k, q, a) for k, (q, a) in enumerate(seen.items())]


def expressions(img: SceneImage, seed: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Up to EXPRESSIONS_PER_IMAGE (expression, box) pairs, each expression true of exactly one shape."""
    rng = _task_rng(img, "refcoco", seed)
    order = list(img.scene.shapes)
    rng.shuffle(order)
    out = []
    for s in order:
        text = expression(img.scene, s, rng)
        if text is not None:
            out.append((text, s.box))
        if len(out) == EXPRESSIONS_PER_IMAGE:
            break
    return out


def hypotheses(img: SceneImage, seed: int) -> list[tuple[str, str]]:
    """One (hypothesis, label) per SNLI-VE label, in random order: entailment is true of the scene,
    contradiction false, neutral undecidable from any picture. True and false claims share their templates,
    so only the image (or the premise) tells them apart."""
    rng = _task_rng(img, "snli_ve", seed)
    scene = img.scene
    present = {(s.colour, s.kind) for s in scene.shapes}
    counts = {k: sum(s.kind == k for s in scene.shapes) for k in SHAPES}

    def claim(true: bool) -> str:
        form = rng.choice(("exists", "count", "total"))
        if form == "exists":
            pool = sorted(present) if true else [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
            colour, kind = rng.choice(pool)
            return f"there is {_article(colour)} {colour} {kind} in the picture"
        if form == "count":
            kind = rng.choice(sorted(k for k in SHAPES if counts[k]))
            n = counts[kind] if true else rng.choice([m for m in range(1, MAX_SHAPES + 2) if m != counts[kind]])
            return f"the picture shows {NUMBER_WORDS[n]} {kind if n == 1 else PLURAL[kind]}"
        total = len(scene.shapes) if true else rng.choice([m for m in range(1, MAX_SHAPES + 2)
                                                          if m != len(scene.shapes)])
        return f"there {'is' if total == 1 else 'are'} {NUMBER_WORDS[total]} shape{'' if total == 1 else 's'} " \
               f"in total"

    shape = rng.choice(scene.shapes)
    rows = [(claim(True), "entailment"), (claim(False), "contradiction"),
            (rng.choice(NEUTRAL_TEMPLATES).format(n=shape.name), "neutral")]
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------------------------- files
def _split_rows(split: str, n_images: int, seed: int) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {name: [] for name, (_, s) in FILES.items() if s == split}
    cap_file = "caption_stage2_train.tsv" if split == "train" else f"caption_{split}.tsv"
    for i in range(n_images):
        img = scene_image(split, i, seed)
        iid, objs = str(img.image_id), _objects(img.scene)
        caps = captions(img, seed)
        if split == "train":
            rows["caption_stage1_train.tsv"] += ["\t".join([str(img.image_id * 10 + k), iid, c, objs, img.image])
                                                 for k, c in enumerate(caps)]
        rows[cap_file].append("\t".join([iid, iid, "&&".join(caps), objs, img.image]))
        rows[f"vqa_{split}.tsv"] += ["\t".join([str(qid), iid, q, a, objs, img.image])
                                     for qid, q, a in questions(img, seed)]
        rows[f"refcoco_{split}.tsv"] += ["\t".join([str(img.image_id * 10 + k), iid, text, _box_str(box), img.image])
                                         for k, (text, box) in enumerate(expressions(img, seed))]
        rows[f"snli_ve_{split}.tsv"] += ["\t".join([f"{iid}#{k}", iid, img.image, hyp, caps[0], lab])
                                         for k, (hyp, lab) in enumerate(hypotheses(img, seed))]
    return rows


def write_finetune_corpus(out_dir: str | Path, images: int, eval_images: int, seed: int = 0) -> dict[str, Path]:
    """Write FILES under `out_dir` from `images` training scenes and `eval_images` scenes per held-out split
    (val, test); return their paths. Byte-identical for the same arguments."""
    for flag, n in (("--finetune-images", images), ("--finetune-eval-images", eval_images)):
        if not 1 <= n <= MAX_IMAGES:
            raise UserError(f"{flag} must be between 1 and {MAX_IMAGES} (got {n}).")
    out = Path(out_dir)
    sizes = {"train": images, "val": eval_images, "test": eval_images}
    paths, counts = {}, {}
    for split in SPLITS:
        for name, lines in _split_rows(split, sizes[split], seed).items():
            atomic_write_bytes(out / name, ("\n".join(lines) + "\n").encode("utf-8"))
            paths[name], counts[name] = out / name, len(lines)
    atomic_write_json(out / "sample_finetune.json", {
        "format_version": 1, "seed": seed, "images": sizes,
        "files": {name: {"format": FILES[name][0], "split": FILES[name][1], "rows": counts[name]} for name in FILES}})
    return {name: paths[name] for name in FILES}
