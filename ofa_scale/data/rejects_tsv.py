"""Lines of `rejects.tsv`: one per rejected input row, every field bounded and escaped.

A reject row must stay one short, printable TSV line whatever the input held: a 50 MB id or a NUL byte in a
rejected row would otherwise make rejects.tsv as large as the corpus, or unreadable by line-based tools. Each
field is cut to a fixed number of characters (the cut is marked with how much was left out) and then escaped:
backslash, tab, CR and LF as `\\\\`, `\\t`, `\\r`, `\\n`; every other control character (NUL included) as `\\xNN`.
"""

from __future__ import annotations

import re

COLUMNS = ("source", "line_number", "uniq_id", "reason", "line")
HEADER = "\t".join(COLUMNS) + "\n"
MAX_ID_CHARS = 256
MAX_REASON_CHARS = 300
MAX_LINE_CHARS = 200
# UTF-8 takes at most 4 bytes per character: decoding this many bytes always yields enough characters.
_BYTES_PER_CHAR = 4
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\r": "\\r", "\n": "\\n"}
_NEEDS_ESCAPE = re.compile(r"[\x00-\x1f\x7f\\]")


def _escape(s: str) -> str:
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), s)


def field(value: str | bytes, limit: int) -> str:
    """`value` cut to `limit` characters (noting its full length), then escaped. Of undecoded bytes only the
    first ones are decoded (invalid UTF-8 is shown as U+FFFD), so a huge field costs nothing."""
    if isinstance(value, bytes):
        head = value[:limit * _BYTES_PER_CHAR]
        text = head.decode("utf-8", "replace")
        if len(head) < len(value) or len(text) > limit:
            return _escape(text[:limit]) + f"…({len(value)} bytes in all)"
        return _escape(text)
    if len(value) > limit:
        return _escape(value[:limit]) + f"…({len(value)} chars in all)"
    return _escape(value)


def line(source: str, line_number: int, uniq_id: str | bytes, reason: str, shown: str | bytes) -> str:
    """One rejects.tsv line, with its newline."""
    return "\t".join((field(source, MAX_ID_CHARS), str(line_number), field(uniq_id, MAX_ID_CHARS),
                      field(reason, MAX_REASON_CHARS), field(shown, MAX_LINE_CHARS))) + "\n"


__all__ = ["COLUMNS", "HEADER", "field", "line"]
