"""Command-line front ends. Each one turns UserError into a one-line message and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from ofa_scale.errors import UserError


def run_cli(fn: Callable[[], int | None], prog: str) -> int:
    try:
        rc = fn()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def subcommand_main(prog: str, description: str, subcommands: dict[str, tuple[str, str]],
                    argv: list[str] | None = None) -> int:
    """Dispatch `prog SUBCOMMAND ...` to the module named in `subcommands` ({name: (module, help)}).

    Each module exposes `add_arguments(parser)` and `run(args) -> int`. Only the chosen subcommand's module is
    imported, so one heavy module (torch, the model) never slows or breaks the others.
    """
    import argparse
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)

    def _go() -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description)
        sub = parser.add_subparsers(dest="command", required=True)
        for name, (module, help_text) in subcommands.items():
            p = sub.add_parser(name, help=help_text, description=help_text)
            p.set_defaults(_module=module)
            if name == command:
                importlib.import_module(module).add_arguments(p)
        args = parser.parse_args(argv)
        return importlib.import_module(args._module).run(args)

    return run_cli(_go, prog)


def require_empty_out(out: str | Path) -> Path:
    """An `--out` directory must be new or empty (as `ofa-preprocess` requires): writing into one that holds
    something would silently mix or replace earlier results. Checked before any slow work starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose an empty or new --out directory.")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose an empty or new --out (or delete it).")
    return out
