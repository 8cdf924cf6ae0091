"""What the queue sources share: which keys belong to a driver, and what a bad message is.

A queue may carry events for other buckets, containers or prefixes (one queue for
several buckets is a common setup), so every queue source maps a provider key to the
driver's relative key here, and drops the rest, as a listing would never show them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from bucketsync.core.keys import indexable


class Malformed(ValueError):
    """A message no parser understands; the source logs it with its id and drops it."""


@dataclass(frozen=True, slots=True)
class Scope:
    """The driver's bucket (or container) and prefix, as in its URL."""

    bucket: str
    prefix: str

    def key(self, bucket: str, key: str) -> str | None:
        """``key`` relative to the prefix, or ``None`` when it is not an item of this driver.

        Outside the bucket or prefix, the prefix itself, folder markers and the hidden
        folder are not items (invariant 5), exactly as in a listing.
        """
        if bucket != self.bucket or not key.startswith(self.prefix):
            return None
        relative = key[len(self.prefix) :]
        return relative if relative and indexable(relative) else None


def timestamp(text: object) -> float | None:
    """An ISO-8601 event time (``2026-11-29T17:04:20.355Z``) as POSIX seconds; ``None`` if absent or unreadable.

    Only the latency histogram uses it, so a bad time never drops the event.
    """
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def hex_token(value: object, width: int = 32) -> str | None:
    """A hexadecimal ordering token, left-padded to ``width`` and upper-cased.

    S3's ``sequencer`` is a hex number of varying length, ordered by its value: padding
    to one width makes plain string comparison order it. ``None`` when absent.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > width:
        raise Malformed(f"sequencer {value!r} is not a hexadecimal string of at most {width} digits")
    try:
        int(value, 16)
    except ValueError:
        raise Malformed(f"sequencer {value!r} is not hexadecimal") from None
    return value.upper().rjust(width, "0")
