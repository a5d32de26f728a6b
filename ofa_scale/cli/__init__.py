"""Command-line front ends. Each one turns UserError into a one-line message and a non-zero exit."""

from __future__ import annotations

import sys
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
