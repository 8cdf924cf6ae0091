"""Parallel, pipelined listing (stores/parallel.py): order, bounded buffers, failures, split points.

The machinery on its own here, with parts that are plain generators; the stores' use of it
(key ranges on S3 and GCS, folders on SeaweedFS) is checked against the emulators in
test_store_s3.py / test_store_gcs.py and through a real sync in test_sync_parallel.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from bucketsync.core.errors import PermissionDenied
from bucketsync.stores.parallel import (
    Cut,
    Part,
    Quantiles,
    Slots,
    cut_parts,
    in_order,
    ranges,
    spread,
    usable_splits,
)


def pages_of(name: str, n: int, produced: list[str], gate: asyncio.Event | None = None) -> Part[str]:
    async def pages() -> AsyncIterator[list[str]]:
        for i in range(n):
            if gate is not None:
                await gate.wait()
            produced.append(f"{name}{i}")
            yield [f"{name}{i}"]

    return pages


async def test_parts_are_read_back_in_order_whatever_order_they_finish_in() -> None:
    produced: list[str] = []
    slow = asyncio.Event()
    parts = [pages_of("a", 3, produced, slow), pages_of("b", 3, produced), pages_of("c", 2, produced)]
    it = in_order(parts, concurrency=3, buffer=8)
    first = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0.01)
    assert produced[:5] == ["b0", "b1", "b2", "c0", "c1"]  # later parts listed while the first waits
    slow.set()
    got = [*(await first), *[k async for page in it for k in page]]
    assert got == ["a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1"]


async def test_a_part_not_being_read_stops_at_its_buffer() -> None:
    produced: list[str] = []
    parts = [pages_of("a", 1, produced, asyncio.Event()), pages_of("b", 100, produced)]
    it = in_order(parts, concurrency=2, buffer=2)
    waiting = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0.01)
    # "b" has filled its buffer of 2 entries and holds a third page it cannot put: nothing more is listed
    assert produced == ["b0", "b1", "b2"]
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await it.aclose()


async def test_only_concurrency_parts_run_at_once() -> None:
    running = 0
    most = 0

    def part(i: int) -> Part[int]:
        async def pages() -> AsyncIterator[list[int]]:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0)
            yield [i]
            running -= 1

        return pages

    got = [k async for page in in_order([part(i) for i in range(20)], concurrency=3) for k in page]
    assert got == list(range(20))
    assert most == 3


async def test_a_failing_part_ends_the_listing_and_stops_the_others() -> None:
    produced: list[str] = []
    cancelled = asyncio.Event()

    async def endless() -> AsyncIterator[list[str]]:
        try:
            await asyncio.Event().wait()  # the part being read never answers
            yield ["never"]
        finally:
            cancelled.set()

    async def failing() -> AsyncIterator[list[str]]:
        yield ["x0"]
        raise PermissionDenied("list part 2: denied")

    parts: list[Part[str]] = [endless, failing, pages_of("c", 3, produced)]
    with pytest.raises(PermissionDenied, match="part 2"):
        _ = [page async for page in in_order(parts, concurrency=3)]
    assert cancelled.is_set()  # the failure did not wait for the first part to finish


async def test_parts_may_come_from_an_async_iterable_pulled_on_demand() -> None:
    pulled: list[int] = []

    async def parts() -> AsyncIterator[Part[str]]:
        for i in range(6):
            pulled.append(i)
            yield pages_of(f"p{i}-", 1, [])

    it = in_order(parts(), concurrency=2)
    assert await anext(it) == ["p0-0"]
    assert len(pulled) <= 3  # two running, one started after the first finished: not all six
    assert [k async for page in it for k in page] == [f"p{i}-0" for i in range(1, 6)]


async def test_slots_bound_the_requests_and_serve_the_first_keys_first() -> None:
    slots = Slots(2)
    running: list[str] = []
    order: list[str] = []
    peak = 0
    release = asyncio.Event()

    async def request(rank: str) -> None:
        nonlocal peak
        async with slots.take(rank):
            running.append(rank)
            order.append(rank)
            peak = max(peak, len(running))
            await release.wait()
            running.remove(rank)

    first = [asyncio.create_task(request(r)) for r in ("m/", "n/")]
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(request(r)) for r in ("z/", "b/", "k/", "a/")]
    await asyncio.sleep(0.01)
    assert order == ["m/", "n/"]  # the others wait
    release.set()
    await asyncio.gather(*first, *waiting)
    assert peak == 2
    assert order == ["m/", "n/", "a/", "b/", "k/", "z/"]  # by rank, not by arrival


async def test_a_cancelled_waiter_never_keeps_a_slot() -> None:
    slots = Slots(1)
    hold, granted = asyncio.Event(), asyncio.Event()
    tasks: dict[str, asyncio.Task[None]] = {}

    async def holder() -> None:
        async with slots.take("a"):
            await hold.wait()
        # The slot was just handed to "c" (b was cancelled while it waited); "c" has not run yet.
        tasks["c"].cancel()

    async def waiter(rank: str, started: asyncio.Event | None = None) -> None:
        async with slots.take(rank):
            if started is not None:
                started.set()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    tasks["b"] = asyncio.create_task(waiter("b"))
    tasks["c"] = asyncio.create_task(waiter("c"))
    await asyncio.sleep(0)
    tasks["b"].cancel()
    await asyncio.sleep(0)
    hold.set()
    await h
    for rank in "bc":
        with pytest.raises(asyncio.CancelledError):
            await tasks[rank]
    await asyncio.wait_for(waiter("d", granted), 1)  # neither kept the one slot
    assert granted.is_set()


def test_ranges_cover_every_key_once() -> None:
    keys = ["a", "a/", "a/b", "a0", "b", "é", "z"]
    cut = ranges(["a/", "a0", "é"])
    assert cut == [(None, "a/"), ("a/", "a0"), ("a0", "é"), ("é", None)]
    for key in keys:
        inside = [(lo, hi) for lo, hi in cut if (lo is None or key > lo) and (hi is None or key <= hi)]
        assert len(inside) == 1, key


def test_usable_splits_are_under_the_prefix_ascending_and_few() -> None:
    assert usable_splits(["p/b", "q/a", "p/a", "p/a", "p/"], "p/", 8) == ["p/a", "p/b"]
    # 4 parts per lister: 8 parts for 2 listers
    picked = usable_splits([f"p/{i:03d}" for i in range(100)], "p/", 2)
    assert picked == ["p/011", "p/024", "p/036", "p/049", "p/061", "p/074", "p/086"]
    assert usable_splits(["p/a", "p/b"], "p/", 1) == []  # one lister: one part


def test_spread_cuts_parts_of_most_of_a_page() -> None:
    # 400 keys sampled from 20,000 as Quantiles picks them: the last of every 50
    samples = [f"{i:05d}" for i in range(49, 20_000, 50)]
    picked = spread(samples, 20_000, 1000)
    bounds = [-1, *map(int, picked), 19_999]
    sizes = {b - a for a, b in itertools.pairwise(bounds)}
    assert sizes == {900, 200}  # 22 parts of 900 keys (9/10 of a page), then the rest
    assert spread(samples, 2_000_000, 1000) == samples  # parts of 5,000 keys: every point kept
    assert spread([], 20_000, 1000) == []


def test_quantiles_stay_bounded_and_evenly_spaced() -> None:
    q = Quantiles(expected=0, count=4)  # an initial sync: the size is not known
    keys = [f"{i:06d}" for i in range(10_000)]
    for key in keys:
        q.see(key)
    assert 4 <= len(q.keys) < 8
    gaps = {int(b) - int(a) for a, b in zip(q.keys, q.keys[1:], strict=False)}
    assert len(gaps) == 1  # one stride between every two picked keys
    known = Quantiles(expected=10_000, count=4)
    for key in keys:
        known.see(key)
    assert known.keys == ["001999", "003999", "005999", "007999", "009999"]


# --- an initial listing that goes on while its split points are found (cut_parts) ---------------

KEYS = [f"k{i:03d}" for i in range(40)]


class Ranged:
    """A key range lister as the stores write theirs: pages of 4 keys in ``(after, upto]``; with a
    ``Cut``, ``upto`` is read before each page and ``seen`` kept. ``listed`` holds every page it
    gave out, ``progress`` is set after each. The first part (the one with a ``Cut``) waits for
    ``go`` before any page past its third: a server slow to answer it."""

    def __init__(self) -> None:
        self.listed: list[list[str]] = []
        self.progress = asyncio.Event()
        self.go = asyncio.Event()

    async def pages(self, after: str | None, upto: str | None, cut: Cut | None = None) -> AsyncIterator[list[str]]:
        keys = [k for k in KEYS if after is None or k > after]
        for at in range(0, len(keys), 4):
            page = keys[at : at + 4]
            await asyncio.sleep(0)
            if cut is not None:
                if at >= 12:
                    await self.go.wait()
                upto = cut.upto
            if upto is not None and page[-1] > upto:
                page = [k for k in page if k <= upto]
                self.listed.append(page)
                yield page
                return
            if cut is not None:
                cut.seen = page[-1]
            self.listed.append(page)
            self.progress.set()
            yield page

    def parts(self, discover: asyncio.Future[list[str]], concurrency: int = 2) -> AsyncIterator[list[str]]:
        async def found() -> list[str]:
            return await discover

        return in_order(
            cut_parts(
                lambda cut: self.pages(None, None, cut),
                found,
                lambda after, upto: lambda: self.pages(after, upto),
                "",
                concurrency,
            ),
            concurrency,
        )

    async def until_listed(self, n: int) -> None:
        while sum(map(len, self.listed)) < n:
            self.progress.clear()
            await self.progress.wait()


async def test_the_first_part_lists_on_while_split_points_are_found_and_is_cut_past_what_it_has() -> None:
    ranged = Ranged()
    discover: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    reading = asyncio.ensure_future(_all(ranged.parts(discover)))
    await ranged.until_listed(12)  # three pages listed with no split point known
    assert ranged.listed == [KEYS[0:4], KEYS[4:8], KEYS[8:12]]
    # split points inside what the first part has listed are passed over: it is cut at k021
    discover.set_result(["k005", "k010", "k021", "k030"])
    await ranged.until_listed(16)
    assert ranged.listed[3] == KEYS[22:26]  # the part after the cut, (k021, k030], while the first waits
    ranged.go.set()
    assert await reading == KEYS  # every key once, in order
    assert [KEYS[20], KEYS[21]] in ranged.listed  # the first part's last page, cut after k021
    assert sum(map(len, ranged.listed)) == len(KEYS)  # nothing listed twice


async def test_a_first_part_that_reaches_the_end_first_is_the_whole_listing() -> None:
    ranged = Ranged()
    ranged.go.set()
    discover: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    assert await _all(ranged.parts(discover)) == KEYS
    assert sum(map(len, ranged.listed)) == len(KEYS)  # nothing listed twice
    assert discover.cancelled()  # split points no longer needed: not waited for


async def test_no_split_point_past_the_first_part_leaves_it_unbounded() -> None:
    ranged = Ranged()
    discover: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    reading = asyncio.ensure_future(_all(ranged.parts(discover)))
    await ranged.until_listed(12)
    discover.set_result(["k001", "k002"])  # all behind it
    await asyncio.sleep(0.01)
    ranged.go.set()
    assert await reading == KEYS
    assert sum(map(len, ranged.listed)) == len(KEYS)


async def test_split_points_that_cannot_be_found_fail_the_listing() -> None:
    ranged = Ranged()
    discover: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    reading = asyncio.ensure_future(_all(ranged.parts(discover)))
    await ranged.progress.wait()
    discover.set_exception(PermissionDenied("list with a delimiter: denied"))
    with pytest.raises(PermissionDenied, match="delimiter"):
        await reading


async def _all(pages: AsyncIterator[list[str]]) -> list[str]:
    return [key async for page in pages for key in page]
