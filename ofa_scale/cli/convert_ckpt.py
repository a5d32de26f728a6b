"""`ofa-convert`: move OFA weights between formats.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int` (as in
`ofa-preprocess`); add a format by adding a row to SUBCOMMANDS.
"""

from __future__ import annotations

import sys

from ofa_scale.cli import subcommand_main

SUBCOMMANDS = {
    "import-ofa": ("ofa_scale.model.checkpoint",
                   "import a fairseq/OFA, OFA-CN or prompt-tuned (prefix/adapter/BitFit) OFA checkpoint (.pt) "
                   "into an ofa-scale model directory (safetensors + config)"),
    "export": ("ofa_scale.parallel.export_cli",
               "consolidate a canonical checkpoint (any tp/pp/dp/ZeRO layout) into a model directory "
               "(safetensors + config)"),
}


def main(argv: list[str] | None = None) -> int:
    return subcommand_main("ofa-convert", __doc__.splitlines()[0], SUBCOMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
