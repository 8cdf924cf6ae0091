"""HTTP ``Range`` (RFC 9110 section 14) for item content: one byte range or the whole object.

Players and labelling tools ask for one range at a time. A header we do not
understand (other units, several ranges, bad syntax) is ignored and the whole
object is served, as the RFC allows; a range that starts past the end is 416.
"""

from __future__ import annotations

import re
from typing import Final

_ONE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.ASCII)


class Unsatisfiable:
    def __repr__(self) -> str:
        return "UNSATISFIABLE"


UNSATISFIABLE: Final = Unsatisfiable()


def parse(header: str | None, size: int) -> tuple[int, int] | Unsatisfiable | None:
    """``(offset, length)`` to serve as 206, ``UNSATISFIABLE`` for a 416, or None for the whole object."""
    if header is None or (m := _ONE.match(header)) is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None  # "bytes=-": not a range
    if not first:  # "bytes=-N": the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        start = max(0, size - suffix)
        return start, size - start
    start = int(first)
    if last and int(last) < start:
        return None  # syntactically invalid: ignore the header
    if start >= size:
        return UNSATISFIABLE
    end = min(int(last), size - 1) if last else size - 1
    return start, end - start + 1
