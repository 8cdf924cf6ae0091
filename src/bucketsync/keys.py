"""Keys: what may be indexed, what may be written, and include/exclude globs."""

from __future__ import annotations

import re
from collections.abc import Iterable

from bucketsync.errors import InvalidKey

HIDDEN = ".bucketsync/"
MAX_KEY_BYTES = 1024


def indexable(key: str) -> bool:
    """True for keys that are items: not a folder marker, not in the hidden folder.

    Every store's listing filters through this one predicate (invariant 5).
    """
    return bool(key) and not key.endswith("/") and not key.startswith(HIDDEN)


def check_key(key: str) -> str:
    """Validate a key a user wants to write or address; return it unchanged.

    Rejects anything that could escape the driver's prefix or a local folder, and
    the hidden folder, which belongs to bucketsync.
    """
    if not key:
        raise InvalidKey("key is empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"key is longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise InvalidKey(f"key {key!r} contains a NUL or control character")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in key):
        raise InvalidKey(f"key {key!r} is not valid UTF-8")
    if key.startswith("/"):
        raise InvalidKey(f"key {key!r} starts with '/'")
    if key.endswith("/"):
        raise InvalidKey(f"key {key!r} ends with '/' (a folder, not an item)")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKey(f"key {key!r} has an empty, '.' or '..' segment")
    if key.startswith(HIDDEN) or key == HIDDEN.rstrip("/"):
        raise InvalidKey(f"key {key!r} is inside the hidden folder {HIDDEN}")
    return key


def _glob_to_regex(pattern: str) -> str:
    """Translate one glob to a regex over the whole key.

    ``*`` and ``?`` stay within one segment, ``**`` spans segments (``**/`` also
    matches nothing), ``[...]`` is a character class. A pattern without ``/``
    matches the last segment at any depth, as in .gitignore.
    """
    if "/" not in pattern:
        pattern = "**/" + pattern
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


class KeyFilter:
    """Include/exclude globs compiled once; an empty include means everything."""

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        inc = list(include)
        exc = list(exclude)
        self._include_globs, self._exclude_globs = inc, exc
        self._include = re.compile("|".join(f"(?:{_glob_to_regex(p)})" for p in inc)) if inc else None
        self._exclude = re.compile("|".join(f"(?:{_glob_to_regex(p)})" for p in exc)) if exc else None
        self.trivial = self._include is None and self._exclude is None

    def __call__(self, key: str) -> bool:
        if self._include is not None and self._include.fullmatch(key) is None:
            return False
        return self._exclude is None or self._exclude.fullmatch(key) is None

    def refusal(self, key: str) -> str | None:
        """Why ``key`` is outside the filters, naming the filter; None when it is inside."""
        if self._include is not None and self._include.fullmatch(key) is None:
            return f"key {key!r} matches none of the include patterns {self._include_globs}"
        for pattern in self._exclude_globs:
            if re.fullmatch(_glob_to_regex(pattern), key):
                return f"key {key!r} matches the exclude pattern {pattern!r}"
        return None


def validate_glob(pattern: str) -> str:
    """Raise ValueError for a glob that cannot compile (used by config validation)."""
    if not pattern:
        raise ValueError("empty glob pattern")
    try:
        re.compile(_glob_to_regex(pattern))
    except re.error as exc:
        raise ValueError(f"invalid glob {pattern!r}: {exc}") from None
    return pattern
