"""`ofa-preprocess`: sample corpus, TSV → webdataset shards, tokenizer training, VQA candidate answers.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; they are
imported lazily so `ofa-preprocess --help` stays fast.
"""

from __future__ import annotations

import sys

from ofa_scale.cli import subcommand_main

SUBCOMMANDS = {
    "sample": ("ofa_scale.data.sample_corpus", "write a deterministic synthetic OFA pretraining corpus"),
    "shards": ("ofa_scale.data.convert", "convert OFA TSVs to validated webdataset shards"),
    "train-tokenizer": ("ofa_scale.data.tokenizer_train", "train a SentencePiece tokenizer on corpus text"),
    "vqa-answers": ("ofa_scale.finetune.answers", "VQA candidate answers from a training TSV, most frequent first"),
    "image-codes": ("ofa_scale.vqgan.image_codes", "VQGAN codes of images: image_examples or image_gen TSV rows"),
}


def main(argv: list[str] | None = None) -> int:
    return subcommand_main("ofa-preprocess", __doc__.splitlines()[0], SUBCOMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
