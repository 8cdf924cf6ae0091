"""The diff: a pure, streaming, order-checking merge of a listing against the ledger snapshot."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketsync.core.diff import changed, diff
from bucketsync.core.errors import OrderError
from bucketsync.core.model import Change, ChangeKind, Indexed, ItemState, ListingGap, ObjectInfo

T = TypeVar("T", ObjectInfo, Indexed, ObjectInfo | ListingGap)

# Keys from a small alphabet, so both sides share many keys; it includes characters whose
# code-point order differs from their UTF-8/UTF-16 order, and '/', '-' and '0' around it.
KEY_CHARS = "ab/-0\u00e9\U0001f600\uff5e"
keys_st = st.text(alphabet=KEY_CHARS, min_size=1, max_size=4)
sizes = st.integers(min_value=0, max_value=3)
modifieds = st.sampled_from([1.0, 2.0, 1.5e9])
etags = st.one_of(st.none(), st.sampled_from(["e1", "e2"]))
versions = st.one_of(st.none(), st.sampled_from(["v1", "v2"]))
Sig = tuple[int, float, str | None, str | None]
sigs = st.tuples(sizes, modifieds, etags, versions)


async def agen(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


def obj(key: str, sig: Sig = (1, 1.0, "e", None)) -> ObjectInfo:
    size, modified, etag, version = sig
    return ObjectInfo(key, size, modified, etag, version)


def idx(key: str, sig: Sig = (1, 1.0, "e", None), id_: int = 0) -> Indexed:
    size, modified, etag, version = sig
    return Indexed(id_, key, size, modified, etag, version, ItemState.LIVE)


def sig_of(x: ObjectInfo | Indexed) -> Sig:
    return (x.size, x.modified, x.etag, x.version)


async def collect(listing: Sequence[ObjectInfo], snapshot: Sequence[Indexed]) -> list[Change]:
    return [c async for c in diff(agen(listing), agen(snapshot))]


def sides(old: dict[str, Sig], new: dict[str, Sig]) -> tuple[list[ObjectInfo], list[Indexed]]:
    listing = [obj(k, new[k]) for k in sorted(new)]
    snapshot = [idx(k, old[k], id_=i) for i, k in enumerate(sorted(old))]
    return listing, snapshot


def compatible(a: str | None, b: str | None) -> bool:
    """An etag or version only counts when both sides have one."""
    return a is None or b is None or a == b


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(
    old=st.dictionaries(keys_st, sigs, max_size=25),
    new=st.dictionaries(keys_st, sigs, max_size=25),
)
async def test_applying_changes_yields_the_new_listing(old: dict[str, Sig], new: dict[str, Sig]) -> None:
    listing, snapshot = sides(old, new)
    changes = await collect(listing, snapshot)

    # Every key on either side appears exactly once, in ascending code-point order.
    keys = [c.key for c in changes]
    assert keys == sorted(set(old) | set(new))

    state = dict(old)
    for c in changes:
        if c.kind is ChangeKind.ADDED:
            assert c.key not in old and c.key in new and c.old is None and c.new is not None
            assert c.new == obj(c.key, new[c.key])
            state[c.key] = sig_of(c.new)
        elif c.kind is ChangeKind.REMOVED:
            assert c.key in old and c.key not in new and c.new is None and c.old is not None
            assert c.old.key == c.key and sig_of(c.old) == old[c.key]
            del state[c.key]
        else:
            assert c.key in old and c.key in new and c.new is not None and c.old is not None
            assert c.new.key == c.old.key == c.key
            assert sig_of(c.old) == old[c.key] and sig_of(c.new) == new[c.key]
            o, n = old[c.key], new[c.key]
            same = o[0] == n[0] and o[1] == n[1] and compatible(o[2], n[2]) and compatible(o[3], n[3])
            if c.kind is ChangeKind.UNCHANGED:
                assert same, f"UNCHANGED although {o} != {n}"
            else:
                assert c.kind is ChangeKind.MODIFIED
                assert not same, f"MODIFIED although {o} == {n}"
                state[c.key] = sig_of(c.new)
    # Unchanged keys keep the indexed info, which equals the listed one up to a missing etag or version.
    assert state.keys() == new.keys()
    for k, (size, modified, etag, version) in new.items():
        s_size, s_modified, s_etag, s_version = state[k]
        assert (s_size, s_modified) == (size, modified)
        assert compatible(s_etag, etag) and compatible(s_version, version)


@settings(max_examples=200, deadline=None)
@given(
    old=st.dictionaries(keys_st, st.tuples(sizes, modifieds, st.sampled_from(["e1", "e2"]), st.just("v")), max_size=25),
    new=st.dictionaries(keys_st, st.tuples(sizes, modifieds, st.sampled_from(["e1", "e2"]), st.just("v")), max_size=25),
)
async def test_applying_changes_is_exact_when_every_object_has_an_etag(
    old: dict[str, Sig], new: dict[str, Sig]
) -> None:
    listing, snapshot = sides(old, new)
    state = dict(old)
    for c in await collect(listing, snapshot):
        if c.kind is ChangeKind.REMOVED:
            del state[c.key]
        elif c.kind is ChangeKind.UNCHANGED:
            assert c.new is not None and state[c.key] == sig_of(c.new)
        else:
            assert c.new is not None
            state[c.key] = sig_of(c.new)
    assert state == new


@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(keys_st, min_size=2, max_size=30, unique=True),
    data=st.data(),
    side=st.sampled_from(["listing", "snapshot"]),
    duplicate=st.booleans(),
)
async def test_out_of_order_or_duplicate_input_raises(
    keys: list[str], data: st.DataObject, side: str, duplicate: bool
) -> None:
    ordered = sorted(keys)
    at = data.draw(st.integers(min_value=1, max_value=len(ordered) - 1))
    bad = list(ordered)
    if duplicate:
        bad.insert(at, bad[at - 1])
    else:
        bad[at - 1], bad[at] = bad[at], bad[at - 1]
    other = data.draw(st.lists(keys_st, max_size=10, unique=True).map(sorted))
    if side == "listing":
        listing, snapshot = [obj(k) for k in bad], [idx(k) for k in other]
    else:
        listing, snapshot = [obj(k) for k in other], [idx(k) for k in bad]
    with pytest.raises(OrderError) as exc:
        await collect(listing, snapshot)
    msg = str(exc.value)
    assert ("listing" if side == "listing" else "ledger snapshot") in msg
    assert ("a duplicate" if duplicate else "out of order") in msg


# ---------------------------------------------------------------- examples


async def test_simple_merge() -> None:
    listing = [obj("a"), obj("b", (2, 1.0, "e", None)), obj("d")]
    snapshot = [idx("b"), idx("c"), idx("d")]
    changes = await collect(listing, snapshot)
    assert [(c.kind, c.key) for c in changes] == [
        (ChangeKind.ADDED, "a"),
        (ChangeKind.MODIFIED, "b"),
        (ChangeKind.REMOVED, "c"),
        (ChangeKind.UNCHANGED, "d"),
    ]


async def test_empty_sides() -> None:
    assert await collect([], []) == []
    assert [c.kind for c in await collect([obj("a")], [])] == [ChangeKind.ADDED]
    assert [c.kind for c in await collect([], [idx("a")])] == [ChangeKind.REMOVED]


async def test_code_point_order_not_utf16() -> None:
    """U+FF5E < U+1F600 in code points, but not in UTF-16; the diff must use code points."""
    keys = ["a", "\uff5e", "\U0001f600"]
    assert keys == sorted(keys)
    changes = await collect([obj(k) for k in keys], [idx(k) for k in keys])
    assert [c.kind for c in changes] == [ChangeKind.UNCHANGED] * 3
    with pytest.raises(OrderError):
        await collect([obj("a"), obj("\U0001f600"), obj("\uff5e")], [])


@pytest.mark.parametrize(
    ("new", "old", "is_changed"),
    [
        (obj("k", (1, 1.0, "e", "v")), idx("k", (1, 1.0, "e", "v")), False),
        (obj("k", (2, 1.0, "e", "v")), idx("k", (1, 1.0, "e", "v")), True),
        (obj("k", (1, 2.0, "e", "v")), idx("k", (1, 1.0, "e", "v")), True),
        (obj("k", (1, 1.0, "f", "v")), idx("k", (1, 1.0, "e", "v")), True),
        (obj("k", (1, 1.0, "e", "w")), idx("k", (1, 1.0, "e", "v")), True),
        # A side without an etag or version must not make every item look modified.
        (obj("k", (1, 1.0, None, None)), idx("k", (1, 1.0, "e", "v")), False),
        (obj("k", (1, 1.0, "e", "v")), idx("k", (1, 1.0, None, None)), False),
    ],
)
def test_changed(new: ObjectInfo, old: Indexed, is_changed: bool) -> None:
    assert changed(new, old) is is_changed


@pytest.mark.parametrize("side", ["listing", "snapshot"])
@pytest.mark.parametrize("duplicate", [False, True], ids=["swapped", "duplicate"])
async def test_bad_pair_deep_in_the_stream(side: str, duplicate: bool) -> None:
    """A bad pair after 9,000 good keys still raises, after the good part was yielded."""
    keys = [f"k{i:06d}" for i in range(10_000)]
    bad = list(keys)
    if duplicate:
        bad[9_001] = bad[9_000]
    else:
        bad[9_000], bad[9_001] = bad[9_001], bad[9_000]
    listing = [obj(k) for k in (bad if side == "listing" else keys)]
    snapshot = [idx(k) for k in (bad if side == "snapshot" else keys)]
    seen = 0
    with pytest.raises(OrderError, match=r"k009001|k009000"):
        async for _ in diff(agen(listing), agen(snapshot)):
            seen += 1
    # The good keys before the pair come out (plus at most the pair's first key and its partner).
    assert 9_000 <= seen <= 9_002


async def test_out_of_order_after_other_side_ends() -> None:
    """The order check holds when only one side is left."""
    with pytest.raises(OrderError):
        await collect([obj("x"), obj("y"), obj("b")], [idx("a")])
    with pytest.raises(OrderError):
        await collect([obj("a")], [idx("x"), idx("y"), idx("b")])


# ---------------------------------------------------------------- streaming


class Bounded:
    """A sorted stream that fails if it is consumed more than ``ahead`` items ahead of the output."""

    def __init__(self, n: int, ahead: int, prefix: str) -> None:
        self.n, self.ahead, self.prefix = n, ahead, prefix
        self.produced = 0
        self.received = 0  # changes the consumer has received so far

    async def objects(self) -> AsyncIterator[ObjectInfo]:
        for i in range(self.n):
            if self.produced - self.received >= self.ahead:
                raise AssertionError(f"consumed {self.produced} items while only {self.received} changes came out")
            self.produced += 1
            yield obj(f"{self.prefix}{i:07d}")

    async def indexed(self) -> AsyncIterator[Indexed]:
        async for o in self.objects():
            yield idx(o.key)


async def test_diff_streams_the_listing() -> None:
    n = 50_000
    listing = Bounded(n, ahead=2, prefix="k")
    changes = diff(listing.objects(), agen([]))
    first = await anext(changes)
    assert first.key == "k0000000"
    assert listing.produced <= 2, "the listing was drained before the first change came out"
    listing.received = 1
    async for _ in changes:
        listing.received += 1
    assert listing.received == n == listing.produced


async def test_diff_streams_both_sides() -> None:
    n = 20_000
    # The same keys on both sides: each step pulls one from each and yields one change.
    listing = Bounded(n, ahead=3, prefix="k")
    snapshot = Bounded(n, ahead=3, prefix="k")
    changes = diff(listing.objects(), snapshot.indexed())
    first = await anext(changes)
    assert first.kind is ChangeKind.UNCHANGED
    assert listing.produced <= 2 and snapshot.produced <= 2
    received = 1
    async for _ in changes:
        received += 1
        listing.received = snapshot.received = received
    assert received == n


async def test_diff_stops_pulling_when_the_consumer_stops() -> None:
    listing = Bounded(1_000_000, ahead=2, prefix="k")
    changes = diff(listing.objects(), agen([]))
    for i in range(10):
        await anext(changes)
        listing.received = i + 1
    await changes.aclose()  # type: ignore[attr-defined]
    assert listing.produced <= 11


# ---------------------------------------------------------------- gaps (a part of the listing could not be read)


def gap(prefix: str, exact: bool = False) -> ListingGap:
    return ListingGap(prefix, f"cannot read {prefix}", exact)


async def collect_gaps(
    listing: Sequence[ObjectInfo | ListingGap], snapshot: Sequence[Indexed]
) -> tuple[list[Change], list[ListingGap]]:
    seen: list[ListingGap] = []
    changes = [c async for c in diff(agen(listing), agen(snapshot), seen)]
    return changes, seen


async def test_ledger_keys_under_a_gap_keep_their_state_and_the_rest_syncs() -> None:
    """The unreadable folder b/ sorts between a and c: a key after it still syncs, removals included."""
    snapshot = [idx("a"), idx("b/1"), idx("b/2"), idx("b0"), idx("c"), idx("d")]
    listing: list[ObjectInfo | ListingGap] = [
        obj("a", (2, 1.0, "e", None)),  # modified before the gap
        gap("b/"),
        obj("b1"),  # added right after it
        obj("c"),  # unchanged after it
    ]  # b0 and d are gone: removed; b/1 and b/2 are under the gap: no change at all
    changes, seen = await collect_gaps(listing, snapshot)
    assert [(c.kind, c.key) for c in changes] == [
        (ChangeKind.MODIFIED, "a"),
        (ChangeKind.REMOVED, "b0"),
        (ChangeKind.ADDED, "b1"),
        (ChangeKind.UNCHANGED, "c"),
        (ChangeKind.REMOVED, "d"),
    ]
    assert seen == [gap("b/")]


async def test_an_exact_gap_covers_one_key() -> None:
    snapshot = [idx("a.jpg"), idx("a.jpg.bak"), idx("b")]
    changes, seen = await collect_gaps([gap("a.jpg", exact=True), obj("b")], snapshot)
    assert [(c.kind, c.key) for c in changes] == [(ChangeKind.REMOVED, "a.jpg.bak"), (ChangeKind.UNCHANGED, "b")]
    assert seen == [gap("a.jpg", exact=True)]


async def test_gaps_at_the_edges_and_in_a_row() -> None:
    snapshot = [idx("a/1"), idx("m/1"), idx("n/1"), idx("z/1"), idx("zz")]
    listing: list[ObjectInfo | ListingGap] = [gap("a/"), gap("m/"), gap("n/"), gap("z/")]
    changes, seen = await collect_gaps(listing, snapshot)
    assert [(c.kind, c.key) for c in changes] == [(ChangeKind.REMOVED, "zz")]
    assert [g.prefix for g in seen] == ["a/", "m/", "n/", "z/"]
    changes, seen = await collect_gaps([gap("")], snapshot)  # a gap over everything removes nothing
    assert changes == [] and seen == [gap("")]


@pytest.mark.parametrize(
    "listing",
    [
        [obj("b"), gap("a/")],  # a gap before a key it sorts before
        [gap("a/"), obj("a/x")],  # a key inside the gap reported before it
        [gap("a/"), gap("a/b/")],  # a gap inside a gap
        [gap("a/"), gap("a/")],  # the same gap twice
        [obj("a/x"), gap("a/")],  # a key that the gap covers, before it
        [gap("k", exact=True), obj("k")],  # an exact gap's own key listed too
    ],
    ids=["gap-after-key", "key-in-gap", "gap-in-gap", "duplicate-gap", "covered-key-first", "exact-then-key"],
)
async def test_gaps_are_checked_for_order(listing: list[ObjectInfo | ListingGap]) -> None:
    with pytest.raises(OrderError, match="listing is not in ascending key order"):
        await collect_gaps(listing, [idx("a/x"), idx("k")])


@settings(max_examples=200, deadline=None)
@given(
    old=st.dictionaries(keys_st, sigs, max_size=25),
    new=st.dictionaries(keys_st, sigs, max_size=25),
    prefix=st.text(alphabet=KEY_CHARS, min_size=1, max_size=2),
)
async def test_applying_changes_outside_a_gap_yields_the_new_listing_there(
    old: dict[str, Sig], new: dict[str, Sig], prefix: str
) -> None:
    """With a gap at ``prefix``: keys under it are untouched, every other key ends as listed."""
    listed = {k: v for k, v in new.items() if not k.startswith(prefix)}
    listing: list[ObjectInfo | ListingGap] = [obj(k, listed[k]) for k in sorted(listed)]
    listing.insert(sum(1 for k in listed if k < prefix), gap(prefix))  # in key order, where b/ would be
    snapshot = [idx(k, old[k], id_=i) for i, k in enumerate(sorted(old))]
    changes, seen = await collect_gaps(listing, snapshot)
    assert seen == [gap(prefix)]
    assert not any(c.key.startswith(prefix) for c in changes), "a key under the gap changed"
    state = dict(old)
    for c in changes:
        if c.kind is ChangeKind.REMOVED:
            del state[c.key]
        elif c.new is not None:
            state[c.key] = sig_of(c.new)
    assert {k for k in state if not k.startswith(prefix)} == set(listed)
    assert {k: v for k, v in state.items() if k.startswith(prefix)} == {
        k: v for k, v in old.items() if k.startswith(prefix)
    }
