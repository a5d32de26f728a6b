"""`ofa-preprocess`: sample corpus, TSV → webdataset shards, tokenizer training.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; they are
imported lazily so `ofa-preprocess --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ofa_scale.cli import run_cli

SUBCOMMANDS = {
    "sample": ("ofa_scale.data.sample_corpus", "write a deterministic synthetic OFA pretraining corpus"),
    "shards": ("ofa_scale.data.convert", "convert OFA TSVs to validated webdataset shards"),
    "train-tokenizer": ("ofa_scale.data.tokenizer_train", "train a SentencePiece tokenizer on corpus text"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported, so one heavy or broken module can't slow or break the rest."""
    parser = argparse.ArgumentParser(prog="ofa-preprocess", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def _go() -> int:
        command = next((a for a in argv if not a.startswith("-")), None)
        args = build_parser(command).parse_args(argv)
        return importlib.import_module(args._module).run(args)

    return run_cli(_go, "ofa-preprocess")


if __name__ == "__main__":
    sys.exit(main())
