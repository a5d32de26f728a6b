"""The ImageNet-style classification TSVs of `ofa-preprocess sample` (issue 11 §1): one coloured shape per image,
its class the shape's colour and kind ("red circle"), drawn in the sample corpus' world so the label is true for
the pixels, with a synset_words-style class file for `task.class_names`.

* Classes: every colour × shape of data/sample_corpus.py (8 × 5 = 40), in a fixed order; class k (1-based, the
  TSV's label index) has the WordNet-style id n9000000k, so the class file reads like Caffe's synset_words.txt:
  `n90000001 red circle`.
* Each image: a textured background (the pretraining scenes' backgrounds) with one shape of the class covering
  most of it, so a random crop of training still shows its colour and usually its outline.
* Splits train, val and test draw their images and labels from their own random streams (held-out rows never
  repeat a training image); labels are uniform over the classes.

Files (OUT/finetune/), in OFA's column order (`ofa-preprocess shards --format imagenet`):
  imagenet_{train,val,test}.tsv   image (base64), label index (1-based), class name
  imagenet_synset_words.txt       n9000000k class name, one line per class in label-index order
"""

from __future__ import annotations

import random
from pathlib import Path

from ofa_scale.data.sample_corpus import BACKGROUNDS, COLOURS, SHAPES, Scene, Shape, encode_image, render
from ofa_scale.data.sample_finetune import MAX_IMAGES, SPLITS
from ofa_scale.errors import UserError
from ofa_scale.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

CLASSES: tuple[tuple[str, str], ...] = tuple((colour, kind) for colour in COLOURS for kind in SHAPES)
SYNSET_FILE = "imagenet_synset_words.txt"


def class_name(index: int) -> str:
    """The name of class `index` (0-based)."""
    colour, kind = CLASSES[index]
    return f"{colour} {kind}"


def wnid(index: int) -> str:
    """The WordNet-style id of class `index` (0-based): n9 followed by the 1-based label index in 7 digits."""
    return f"n9{index + 1:07d}"


def synset_words() -> str:
    return "".join(f"{wnid(k)} {class_name(k)}\n" for k in range(len(CLASSES)))


def class_row(split: str, index: int, seed: int) -> list[str]:
    """The index-th row of a split: [image base64, label index (1-based), class name]."""
    rng = random.Random(f"{seed}-cls-{split}-{index}")
    label = rng.randrange(len(CLASSES))
    colour, kind = CLASSES[label]
    width, height = rng.randint(96, 160), rng.randint(96, 160)
    side = int(min(width, height) * rng.uniform(0.55, 0.85))
    x0, y0 = rng.randint(2, width - side - 2), rng.randint(2, height - side - 2)
    scene = Scene(width, height, rng.choice(BACKGROUNDS), (Shape(kind, colour, (x0, y0, x0 + side, y0 + side)),))
    return [encode_image(render(scene, rng), rng, png_share=0.0), str(label + 1), class_name(label)]


def write_classes_corpus(out_dir: str | Path, images: int, eval_images: int, seed: int = 0) -> dict[str, Path]:
    """OUT/imagenet_{train,val,test}.tsv (`images` training rows, `eval_images` per held-out split) and the class
    file; byte-identical for the same arguments. Returns {file name: path} (the TSVs)."""
    if not (1 <= images <= MAX_IMAGES and 1 <= eval_images <= MAX_IMAGES):
        raise UserError(f"--finetune-images and --finetune-eval-images must be between 1 and {MAX_IMAGES} (got "
                        f"{images} and {eval_images}).")
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for split, n in zip(SPLITS, (images, eval_images, eval_images)):
        paths[f"imagenet_{split}.tsv"] = path = out / f"imagenet_{split}.tsv"
        atomic_write_bytes(path, "".join("\t".join(class_row(split, i, seed)) + "\n" for i in range(n)).encode())
    atomic_write_text(out / SYNSET_FILE, synset_words())
    atomic_write_json(out / "sample_classes.json", {"format_version": 1, "seed": seed,
                                                    "images": {"train": images, "eval": eval_images},
                                                    "classes": len(CLASSES), "class_file": SYNSET_FILE})
    return paths


__all__ = ["CLASSES", "SYNSET_FILE", "class_name", "class_row", "synset_words", "wnid", "write_classes_corpus"]
