"""The diff: a pure, streaming merge of a listing against the ledger's snapshot.

Both inputs are sorted by key (ascending code points). Like rclone's
``matchListings``, it walks them with two pointers and never buffers either side,
so memory stays flat however large the dataset. Out-of-order or duplicate keys on
either side raise ``OrderError``: a wrong order would turn into false removals.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

from bucketsync.errors import OrderError
from bucketsync.model import Change, ChangeKind, Indexed, ObjectInfo

_K = TypeVar("_K", ObjectInfo, Indexed)
ADDED, MODIFIED, REMOVED, UNCHANGED = ChangeKind.ADDED, ChangeKind.MODIFIED, ChangeKind.REMOVED, ChangeKind.UNCHANGED


def changed(new: ObjectInfo, old: Indexed) -> bool:
    """Whether the object differs from what was indexed: size, etag, version or modified time.

    An etag or version only counts when both sides have one (a store that cannot
    give one must not make every item look modified).
    """
    return (
        new.size != old.size
        or new.modified != old.modified
        or (new.etag is not None and old.etag is not None and new.etag != old.etag)
        or (new.version is not None and old.version is not None and new.version != old.version)
    )


async def diff(listing: AsyncIterable[ObjectInfo], snapshot: AsyncIterable[Indexed]) -> AsyncIterator[Change]:
    """Yield one ``Change`` per key present on either side, in key order."""
    lit, sit = aiter(listing), aiter(snapshot)
    new = await anext(lit, None)
    old = await anext(sit, None)
    while new is not None or old is not None:
        if old is None or (new is not None and new.key < old.key):
            assert new is not None
            yield Change(ADDED, new.key, new, None)
            new = await _next(lit, new, "listing")
        elif new is None or old.key < new.key:
            yield Change(REMOVED, old.key, None, old)
            old = await _next(sit, old, "ledger snapshot")
        else:
            yield Change(MODIFIED if changed(new, old) else UNCHANGED, new.key, new, old)
            new = await _next(lit, new, "listing")
            old = await _next(sit, old, "ledger snapshot")


async def _next(it: AsyncIterator[_K], prev: _K, side: str) -> _K | None:
    nxt = await anext(it, None)
    if nxt is not None and nxt.key <= prev.key:
        what = "a duplicate" if nxt.key == prev.key else "out of order"
        raise OrderError(f"{side} is not in ascending key order: {nxt.key!r} after {prev.key!r} ({what})")
    return nxt
