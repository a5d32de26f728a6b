"""`ofa-eval`: score predictions against references, generate-and-score with a checkpoint, build CIDEr caches.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; only the chosen
one is imported, so `ofa-eval score` never imports torch or the model.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ofa_scale.cli import run_cli

SUBCOMMANDS = {
    "score": ("ofa_scale.evaluation.score", "score a predictions JSONL against a references JSONL"),
    "generate": ("ofa_scale.evaluation.generate_cli",
                 "generate with a checkpoint on held-out shard records, then score"),
    "cider-df": ("ofa_scale.evaluation.cider_df", "cache CIDEr-D document frequencies from reference captions"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (`score` must not pay for torch or the model)."""
    parser = argparse.ArgumentParser(prog="ofa-eval", description=__doc__.splitlines()[0])
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

    return run_cli(_go, "ofa-eval")


if __name__ == "__main__":
    sys.exit(main())
