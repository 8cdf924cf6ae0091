"""Keys: what may be indexed, what may be written, and include/exclude globs."""

from __future__ import annotations

import re
from collections.abc import Iterable

from bucketsync.core.errors import InvalidKey

HIDDEN = ".bucketsync/"
MAX_KEY_BYTES = 1024


#: The same rule as ``key_problem``, as a regex for the OpenAPI document (the fuzzer generates
#: keys from it). Written for both ECMA and Python regexes: ``[\s\S]`` because ``.`` stops at
#: a newline, and lookaheads for the segment rules.
KEY_PATTERN = (
    r"^(?!/)(?!\.bucketsync(?:/|{end}))(?!\.\.?(?:/|{end}))(?![\s\S]*/\.\.?(?:/|{end}))(?![\s\S]*//)"
    r"(?![\s\S]*/{end})[^\x00]+{end}"
).format(end=r"(?![\s\S])")  # the very end: '$' also matches before a final newline in Python


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an item, or None. The one rule for keys, end to end.

    Listings index exactly the keys this accepts, and the API and CLI address exactly
    those, so every item is reachable. Refused are only real hazards: keys that
    traverse or would not survive as a path (empty, '.' or '..' segments, a leading
    '/'), folder markers, NUL, text that is not UTF-8, over-long keys, and the hidden
    folder. Other control characters (ESC, newline, ...) are allowed, as in buckets.
    Written as plain string tests: listings call this for every object.
    """
    if not key:
        return "key is empty"
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"key is longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/"):
        return f"key {key!r} starts with '/'"
    if key.endswith("/"):
        return f"key {key!r} ends with '/' (a folder, not an item)"
    if "\x00" in key:
        return f"key {key!r} contains a NUL character"
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            return f"key {key!r} is not valid UTF-8"
    if (
        "//" in key
        or key in (".", "..")
        or key.startswith(("./", "../"))
        or key.endswith(("/.", "/.."))
        or "/./" in key
        or "/../" in key
    ):
        return f"key {key!r} has an empty, '.' or '..' segment"
    if key.startswith(HIDDEN) or key == HIDDEN[:-1]:
        return f"key {key!r} is inside the hidden folder {HIDDEN}"
    return None


def indexable(key: str) -> bool:
    """True for keys that are items (``key_problem`` finds nothing).

    Every store's listing filters through this one predicate (invariant 5): folder
    markers, the hidden folder, and keys the API could not address are not items.
    """
    # The common key decided in a few C-level scans (listings call this per object): no
    # leading '.' or '/', no "/." or "//" anywhere, no NUL, short ASCII. Anything else takes
    # the full rule.
    if (
        key
        and key[0] not in "./"
        and key[-1] != "/"
        and len(key) <= MAX_KEY_BYTES // 4
        and "/." not in key
        and "//" not in key
        and "\x00" not in key
        and key.isascii()
    ):
        return True
    return key_problem(key) is None


def check_key(key: str) -> str:
    """Validate a key a user wants to write or address; return it unchanged, or raise InvalidKey."""
    problem = key_problem(key)
    if problem is not None:
        raise InvalidKey(problem)
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
