"""The diff: a pure, streaming merge of a listing against the ledger's snapshot.

Both inputs are sorted by key (ascending code points). Like rclone's
``matchListings``, it walks them with two pointers and never buffers either side,
so memory stays flat however large the dataset. Out-of-order or duplicate keys on
either side raise ``OrderError``: a wrong order would turn into false removals.

A listing may report a sub-tree it could not read as a ``ListingGap`` in key order.
Ledger keys the gap covers are neither removed nor changed (no ``Change`` at all:
they keep their last known state); everything around the gap merges as usual. A
gap is checked for order like a key, and a listing that yields a key inside a gap
it reported is out of order too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator

from bucketsync.core.errors import OrderError
from bucketsync.core.model import Change, ChangeKind, Indexed, ListingGap, ObjectInfo

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


async def diff(
    listing: AsyncIterable[ObjectInfo | ListingGap],
    snapshot: AsyncIterable[Indexed],
    gaps: list[ListingGap] | None = None,
) -> AsyncIterator[Change]:
    """Yield one ``Change`` per key present on either side, in key order, except for
    ledger keys under a gap. Every gap the listing reported is appended to ``gaps``."""
    lit, sit = aiter(listing), aiter(snapshot)
    open_gaps: deque[ListingGap] = deque()  # reported, and not yet passed by the snapshot side
    seen = gaps if gaps is not None else []
    new = await _next_listed(lit, None, open_gaps, seen)
    old = await anext(sit, None)
    while new is not None or old is not None:
        if old is None or (new is not None and new.key < old.key):
            assert new is not None
            yield Change(ADDED, new.key, new, None)
            new = await _next_listed(lit, new, open_gaps, seen)
        elif new is None or old.key < new.key:
            if not (open_gaps and _under_gap(open_gaps, old.key)):
                yield Change(REMOVED, old.key, None, old)
            old = await _next(sit, old)
        else:
            yield Change(MODIFIED if changed(new, old) else UNCHANGED, new.key, new, old)
            new = await _next_listed(lit, new, open_gaps, seen)
            old = await _next(sit, old)


def _under_gap(open_gaps: deque[ListingGap], key: str) -> bool:
    """Whether ``key`` (ascending from call to call) is covered; forgets gaps it has passed."""
    while open_gaps:
        gap = open_gaps[0]
        if gap.covers(key):
            return True
        if key < gap.prefix:
            return False
        open_gaps.popleft()  # the snapshot is past this gap for good
    return False


async def _next_listed(
    it: AsyncIterator[ObjectInfo | ListingGap],
    prev: ObjectInfo | ListingGap | None,
    open_gaps: deque[ListingGap],
    seen: list[ListingGap],
) -> ObjectInfo | None:
    """The listing's next object; gaps on the way are checked for order and recorded."""
    nxt = await anext(it, None)
    if type(nxt) is ObjectInfo and type(prev) is ObjectInfo:  # the hot path: one key after another
        if nxt.key <= prev.key:
            _check_listing_order(prev, nxt)
        return nxt
    while nxt is not None:
        if prev is not None:
            _check_listing_order(prev, nxt)
        if not isinstance(nxt, ListingGap):
            return nxt
        open_gaps.append(nxt)
        seen.append(nxt)
        prev = nxt
        nxt = await anext(it, None)
    return None


def _check_listing_order(prev: ObjectInfo | ListingGap, nxt: ObjectInfo | ListingGap) -> None:
    prev_pos = prev.prefix if isinstance(prev, ListingGap) else prev.key
    pos = nxt.prefix if isinstance(nxt, ListingGap) else nxt.key
    if pos <= prev_pos:
        what = "a duplicate" if pos == prev_pos else "out of order"
        raise OrderError(f"listing is not in ascending key order: {pos!r} after {prev_pos!r} ({what})")
    if isinstance(prev, ListingGap) and prev.covers(pos):
        raise OrderError(f"listing is not in ascending key order: {pos!r} inside the gap {prev.prefix!r} it reported")


async def _next(it: AsyncIterator[Indexed], prev: Indexed) -> Indexed | None:
    nxt = await anext(it, None)
    if nxt is not None and nxt.key <= prev.key:
        what = "a duplicate" if nxt.key == prev.key else "out of order"
        raise OrderError(f"ledger snapshot is not in ascending key order: {nxt.key!r} after {prev.key!r} ({what})")
    return nxt
