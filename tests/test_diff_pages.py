"""The page-level diff (``diff_pages``): the same merge as ``diff`` wherever the pages are cut,
with no object for an unchanged live item."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketsync.core.diff import Step, diff, diff_pages
from bucketsync.core.errors import OrderError
from bucketsync.core.model import Change, ChangeKind, Indexed, ItemState, ListingGap, ObjectInfo, SnapshotRow

T = TypeVar("T")
Entry = ObjectInfo | ListingGap

KEY_CHARS = "ab/-0\u00e9\U0001f600"
keys_st = st.text(alphabet=KEY_CHARS, min_size=1, max_size=4)
sigs = st.tuples(
    st.integers(min_value=0, max_value=2),
    st.sampled_from([1.0, 2.0]),
    st.one_of(st.none(), st.sampled_from(["e1", "e2"])),
    st.one_of(st.none(), st.sampled_from(["v1", "v2"])),
)
states = st.sampled_from([ItemState.LIVE, ItemState.LIVE, ItemState.TOMBSTONE])


def cut(items: Sequence[T], sizes: Sequence[int]) -> list[list[T]]:
    """``items`` in pages of the given sizes (cycled; 0 makes an empty page)."""
    pages: list[list[T]] = []
    i = 0
    for n in (sizes[k % len(sizes)] for k in range(10_000)):
        if i >= len(items):
            break
        pages.append(list(items[i : i + n]))
        i += n
    return pages


async def agen(items: Sequence[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


def row(i: Indexed) -> SnapshotRow:
    return (i.id, i.key, i.size, i.modified, i.etag, i.version, str(i.state))


def expand(steps: list[Step]) -> list[tuple[str, str, ObjectInfo | None, Indexed | None]]:
    """Every change in order; an unchanged live key is matched to the listed objects."""
    return [(str(c.kind), c.key, c.new, c.old) for s in steps for c in s.changes]


async def run_pages(
    listing: Sequence[Entry], snapshot: Sequence[Indexed], new_sizes: Sequence[int], old_sizes: Sequence[int], step: int
) -> tuple[list[Step], list[ListingGap]]:
    gaps: list[ListingGap] = []
    lp, sp = cut(listing, new_sizes), cut([row(i) for i in snapshot], old_sizes)
    return [s async for s in diff_pages(agen(lp), agen(sp), gaps, step)], gaps


async def run_reference(listing: Sequence[Entry], snapshot: Sequence[Indexed]) -> tuple[list[Change], list[ListingGap]]:
    gaps: list[ListingGap] = []
    return [c async for c in diff(agen(listing), agen(snapshot), gaps)], gaps


page_sizes = st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=4).filter(any)


@settings(max_examples=150, deadline=None)
@given(
    old=st.dictionaries(keys_st, st.tuples(sigs, states), max_size=25),
    new=st.dictionaries(keys_st, sigs, max_size=25),
    gap_at=st.one_of(st.none(), keys_st),
    new_sizes=page_sizes,
    old_sizes=page_sizes,
    step=st.integers(min_value=1, max_value=7),
)
async def test_the_same_changes_as_the_per_key_diff_wherever_the_pages_are_cut(
    old: dict[str, tuple[tuple[int, float, str | None, str | None], ItemState]],
    new: dict[str, tuple[int, float, str | None, str | None]],
    gap_at: str | None,
    new_sizes: list[int],
    old_sizes: list[int],
    step: int,
) -> None:
    listing: list[Entry] = [ObjectInfo(k, *new[k]) for k in sorted(new)]
    if gap_at is not None:  # a gap reported in place of every listed key under it
        listing = [o for o in listing if not (isinstance(o, ObjectInfo) and o.key.startswith(gap_at))]
        at = next((n for n, o in enumerate(listing) if isinstance(o, ObjectInfo) and o.key > gap_at), len(listing))
        listing.insert(at, ListingGap(gap_at, "denied"))
    snapshot = [Indexed(n, k, *old[k][0], old[k][1]) for n, k in enumerate(sorted(old))]
    steps, gaps = await run_pages(listing, snapshot, new_sizes, old_sizes, step)
    reference, ref_gaps = await run_reference(listing, snapshot)

    # the changes are the reference's, minus unchanged live items, which are only counted
    want = [
        (str(c.kind), c.key, c.new, c.old)
        for c in reference
        if not (c.kind is ChangeKind.UNCHANGED and c.old is not None and c.old.state == ItemState.LIVE)
    ]
    assert expand(steps) == want
    unchanged_live = sum(
        1 for c in reference if c.kind is ChangeKind.UNCHANGED and c.old is not None and c.old.state == ItemState.LIVE
    )
    assert sum(s.unchanged for s in steps) == unchanged_live
    # every listed object once, in order, with its key
    objects = [o for o in listing if isinstance(o, ObjectInfo)]
    assert [o for s in steps for o in s.listed] == objects
    assert [k for s in steps for k in s.keys] == [o.key for o in objects]
    assert gaps == ref_gaps
    # no stretch covers more than ``step`` keys (a gap is not a key)
    assert all(len(s.listed) + sum(1 for c in s.changes if c.new is None) <= step for s in steps)


async def test_a_page_that_differs_in_its_last_etag() -> None:
    keys = [f"k{i:03d}" for i in range(10)]
    snapshot = [Indexed(i, k, 1, 1.0, "e", None, ItemState.LIVE) for i, k in enumerate(keys)]
    listing = [ObjectInfo(k, 1, 1.0, "e") for k in keys[:-1]] + [ObjectInfo(keys[-1], 1, 1.0, "f")]
    steps, _ = await run_pages(listing, snapshot, [5], [5], 128)
    [change] = [c for s in steps for c in s.changes]
    assert (change.kind, change.key, change.old) == (ChangeKind.MODIFIED, "k009", snapshot[-1])
    assert sum(s.unchanged for s in steps) == 9


async def test_page_boundaries_not_aligned_with_the_snapshot_batches() -> None:
    """Pages of 7 against snapshot batches of 3 (and the reverse): a removal, an addition and a
    modification on either side of a boundary are each found once."""
    keys = [f"k{i:03d}" for i in range(30)]
    snapshot = [Indexed(i, k, 1, 1.0, "e", None, ItemState.LIVE) for i, k in enumerate(keys) if k != "k007"]
    listing = [ObjectInfo(k, 2 if k == "k006" else 1, 1.0, "e") for k in keys if k != "k009"]
    for sizes in (([7], [3]), ([3], [7])):
        steps, _ = await run_pages(listing, snapshot, *sizes, 4)
        got = [(c.kind, c.key) for s in steps for c in s.changes]
        assert got == [(ChangeKind.MODIFIED, "k006"), (ChangeKind.ADDED, "k007"), (ChangeKind.REMOVED, "k009")]
        assert sum(s.unchanged for s in steps) == 27


async def test_an_unchanged_tombstone_is_a_change_not_a_count() -> None:
    """The sync treats a tombstone apart (invariant 3): it gets its Change even when unchanged."""
    snapshot = [Indexed(1, "a", 1, 1.0, "e", None, ItemState.TOMBSTONE)]
    steps, _ = await run_pages([ObjectInfo("a", 1, 1.0, "e")], snapshot, [1], [1], 128)
    [change] = [c for s in steps for c in s.changes]
    assert change.kind is ChangeKind.UNCHANGED and change.old == snapshot[0]
    assert sum(s.unchanged for s in steps) == 0


@pytest.mark.parametrize(
    ("pages", "message"),
    [
        ([["a", "c", "b"]], "'b' after 'c' (out of order)"),
        ([["a", "b"], ["b", "c"]], "'b' after 'b' (a duplicate)"),  # across a page boundary
        ([["a", "c"], [], ["b"]], "'b' after 'c' (out of order)"),  # an empty page in between
    ],
)
async def test_a_listing_out_of_order_within_or_across_pages_raises(pages: list[list[str]], message: str) -> None:
    listing = [[ObjectInfo(k, 1, 1.0) for k in page] for page in pages]
    with pytest.raises(OrderError, match=re.escape(f"listing is not in ascending key order: {message}")):
        async for _ in diff_pages(agen(listing), agen([])):
            pass


@pytest.mark.parametrize("pages", [[["a", "c", "b"]], [["a", "b"], ["b"]]])
async def test_a_snapshot_out_of_order_within_or_across_batches_raises(pages: list[list[str]]) -> None:
    snapshot = [[(1, k, 1, 1.0, None, None, "live") for k in page] for page in pages]
    with pytest.raises(OrderError, match="ledger snapshot is not in ascending key order"):
        async for _ in diff_pages(agen([]), agen(snapshot)):
            pass


async def test_a_key_inside_a_gap_it_reported_raises_across_pages() -> None:
    listing: list[list[Entry]] = [[ObjectInfo("a", 1, 1.0), ListingGap("b/", "denied")], [ObjectInfo("b/x", 1, 1.0)]]
    with pytest.raises(OrderError, match="inside the gap"):
        async for _ in diff_pages(agen(listing), agen([])):
            pass
