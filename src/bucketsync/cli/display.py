"""What the CLI writes to a terminal: keys and JSON that cannot forge terminal output.

Storage allows any character in a key, ESC and newline included, and sync indexes
what storage holds. Printed raw, such a key could move the cursor, recolour or
clear the screen, or fake a line of output. So every key (and every message that
may quote one) is escaped before it is printed, and JSON output escapes what
JSON itself would leave raw (DEL, the C1 controls, bidi overrides).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, TextIO

# C0 and C1 controls, DEL, line/paragraph separators, and the bidi embeddings,
# overrides and isolates (they reorder what follows them on the line).
_CLASS = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[{_CLASS}]")
_IN_QUOTES = re.compile(f"[\\\\'{_CLASS}]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\x1b": "\\e", "\\": "\\\\", "'": "\\'"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x80 else f"\\u{n:04x}"  # bash: \\xHH is a byte, \\uHHHH a character


def shown(key: str) -> str:
    """A key as a human line shows it: unchanged when it is harmless; otherwise in
    bash's ``$'...'`` quoting, which escapes every unsafe character and which a user
    can paste back into a shell to address the same key."""
    if not _UNSAFE.search(key) and not key.startswith("$'"):
        return key
    return "$'" + _IN_QUOTES.sub(_escape, key) + "'"


def safe_text(text: str) -> str:
    """A message for stderr: newlines and tabs kept (messages may be multi-line), every
    other control character escaped (keys inside messages are already quoted)."""
    return _UNSAFE.sub(lambda m: m.group() if m.group() in "\n\t" else _escape(m), text)


def _json_escape(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


def dumps(obj: Any) -> str:
    """One line of JSON: non-ASCII text stays readable, and every unsafe character is a
    ``\\uXXXX`` escape (these characters can only occur inside JSON strings, where an
    escape means the same character, so the result is still the same valid JSON)."""
    return _UNSAFE.sub(_json_escape, json.dumps(obj, ensure_ascii=False))


def print_json(obj: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(dumps(obj) + "\n")


class ProgressLine:
    """One self-overwriting status line on a terminal (stderr), erased by ``clear()``
    so the summary printed after it starts on a clean line."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.shown = False

    def update(self, text: str) -> None:
        self.out.write("\r" + safe_text(text) + "\x1b[K")
        self.out.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False
