"""Parallel, pipelined listing: the parts of one listing fetched at once, read back in order.

A cloud listing is one round trip per page of 1,000 keys; listed one page after
another, latency is its whole cost. Here a listing is cut into *parts*: disjoint
key ranges (or folder subtrees) in ascending order, each listed in order by its own
task. ``in_order`` runs up to ``concurrency`` parts at once and yields their pages
part by part, so the diff still sees one ascending stream (invariant 6).

- **Pipelined**: even one part is listed by a task that runs ahead of its reader,
  so the next page is on the wire while the current one is diffed and written.
- **Bounded**: each running part holds at most ``buffer`` entries (and the page that
  fills it); a part the reader has not reached yet stops requesting once its buffer is
  full (back-pressure), so memory is about ``concurrency x buffer`` entries, whatever
  the size of the bucket.
- **Failing fast**: a part that fails ends the whole listing with its error as soon
  as it fails (not when the reader gets to it), and the other parts are cancelled.
  The run then fails with no removals (invariant 1).

Split points: any ascending list of keys cuts the key space into ranges
``(None, s1], (s1, s2], ..., (sn, None)`` that together hold every key exactly once;
good ones only make the parts even. ``Quantiles`` picks them from keys a run has
seen (the ledger's sorted keys, sampled by the last run), and ``spread`` keeps parts
near a page each (a part costs at least a request). A listing with none (an initial
sync) does not wait for the folders it is cut at: ``cut_parts`` lists its first part
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
F = TypeVar("F")

#: a part: a factory of its pages (lists of entries, ascending), started when its turn comes
Part = Callable[[], AsyncIterator[list[T]]]

#: entries (keys) a running part may list ahead of the reader: eight full pages, or a month of day
#: folders of a folder-by-folder listing. A part that cannot run ahead to its end while the reader
#: drains the ones before it is then listed one request after another: at 2,000, SeaweedFS through a
#: 50 ms proxy took 25 s for 100k keys, at 8,000 12 s (bench/listing_peers.py), for 2-3 MiB more
#: peak RSS. Memory is ``concurrency x BUFFER`` entries at most, whatever the size of the bucket.
BUFFER = 8000
#: parts per lister when split points are known: uneven parts still keep every lister busy
PARTS_PER_LISTER = 4
#: folder levels looked into for split points (no history) or parts (folder by folder)
SPLIT_LEVELS = 3
#: the most of a page a part cut from sampled split points is meant to hold: keys added since
#: they were sampled then still fit in the part's one request
PART_OF_PAGE = 0.9


class _Feed(Generic[T]):
    """One running part: its task and the bounded buffer it fills.

    The bound is in entries, not pages: a folder-by-folder listing yields a page per folder,
    often a few dozen keys, and a bound of two such pages would stop a part almost at once.
    """

    __slots__ = ("buffered", "drained", "queue", "task")

    def __init__(self, part: Part[T], buffer: int, failed: asyncio.Future[BaseException]) -> None:
        self.queue: asyncio.Queue[list[T] | None] = asyncio.Queue()
        self.buffered = 0  # entries in ``queue``
        self.drained = asyncio.Event()
        self.task = asyncio.create_task(self._fill(part, buffer, failed))

    async def _fill(self, part: Part[T], buffer: int, failed: asyncio.Future[BaseException]) -> None:
        try:
            pages = part()
            try:
                async for page in pages:
                    if not page:
                        continue
                    while self.buffered >= buffer:  # back-pressure: wait for the reader
                        self.drained.clear()
                        await self.drained.wait()
                    self.buffered += len(page)
                    self.queue.put_nowait(page)
            finally:
                if (close := getattr(pages, "aclose", None)) is not None:
                    await close()
            self.queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not failed.done():
                failed.set_result(exc)

    def took(self, page: list[T] | None) -> list[T] | None:
        """The reader took ``page``: room for more."""
        if page is not None:
            self.buffered -= len(page)
            self.drained.set()
        return page


async def in_order(
    parts: AsyncIterable[Part[T]] | Sequence[Part[T]], concurrency: int, buffer: int = BUFFER
) -> AsyncIterator[list[T]]:
    """The pages of ``parts`` (ascending and disjoint, in that order), up to ``concurrency`` listed at once.

    ``parts`` may be an async iterable: a part is pulled only when there is room to start it,
    so parts discovered while listing (folders) are never all held at once.
    """
    source = _aiter_parts(parts)
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[BaseException] = loop.create_future()
    running: deque[_Feed[T]] = deque()
    exhausted = False

    async def start_more() -> None:
        nonlocal exhausted
        while not exhausted and len(running) < max(1, concurrency):
            part = await anext(source, None)
            if part is None:
                exhausted = True
            else:
                running.append(_Feed(part, buffer, failed))

    try:
        await start_more()
        while running:
            head = running[0]
            while True:
                page = head.took(await _get(head.queue, failed))
                if page is None:
                    break
                yield page
            running.popleft()
            await start_more()
    finally:
        for feed in running:
            feed.task.cancel()
        if running:
            await asyncio.gather(*(f.task for f in running), return_exceptions=True)
        await source.aclose()


def given(page: list[T]) -> Part[T]:
    """A part whose one page is already listed: the objects of a folder level between two of its
    subfolders, read with the level's own listing."""

    async def pages() -> AsyncIterator[list[T]]:
        yield page

    return pages


async def _aiter_parts(parts: AsyncIterable[Part[T]] | Sequence[Part[T]]) -> AsyncGenerator[Part[T], None]:
    if isinstance(parts, AsyncIterable):
        async for part in parts:
            yield part
    else:
        for part in parts:
            yield part


async def _get(queue: asyncio.Queue[list[T] | None], failed: asyncio.Future[BaseException]) -> list[T] | None:
    """The next page of the part being read, or the first failure of any part (once the pages
    already buffered for the reader are out: what was listed before a failure is kept)."""
    if not queue.empty():
        return queue.get_nowait()
    if failed.done():
        raise failed.result()
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait((getter, failed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()  # a page that arrived with a failure elsewhere: the failure wins next time
    raise failed.result()


class Slots:
    """At most ``n`` requests of one listing at a time; of the requests waiting for a slot, the
    one for the keys that come first goes first.

    A parallel walk lists the subfolders of several parts at once. With first-come slots,
    the part the reader waits for shares them with parts it reads later, and the reader
    idles while they all progress together. Ranked by key (a folder's prefix: everything
    under ``a/`` sorts before everything under ``b/``), the slots go to the head first, and
    the parts behind it use what the head does not.
    """

    __slots__ = ("_arrival", "_free", "_waiting")

    def __init__(self, n: int) -> None:
        self._free = max(1, n)
        self._waiting: list[tuple[str, int, asyncio.Future[None]]] = []  # a heap: (rank, arrival, grant)
        self._arrival = 0

    @contextlib.asynccontextmanager
    async def take(self, rank: str) -> AsyncIterator[None]:
        """Hold a slot for the block; ``rank``: the first key the request is for (its prefix)."""
        if self._free and not self._waiting:
            self._free -= 1
        else:
            grant: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._arrival += 1
            heapq.heappush(self._waiting, (rank, self._arrival, grant))
            try:
                await grant
            except asyncio.CancelledError:
                if grant.done() and not grant.cancelled():  # granted, then cancelled: pass the slot on
                    self._release()
                raise  # (a waiter cancelled before its grant stays in the heap, skipped by _release)
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            grant = heapq.heappop(self._waiting)[2]
            if not grant.done():
                grant.set_result(None)  # the slot goes straight to the first waiter by rank
                return
        self._free += 1


class Cut:
    """Where the first part of a listing ends, decided while it lists (``cut_parts``).

    The part reads ``upto`` before each page it keeps (None: no bound yet, or none at all) and
    records in ``seen`` the last key it has kept, so the bound chosen is always past every key it
    has already given out: no key is listed twice or skipped, whenever the split points arrive.
    """

    __slots__ = ("ended", "seen", "upto")

    def __init__(self) -> None:
        self.seen: str | None = None
        self.upto: str | None = None
        #: set when the part has listed its last page (or failed): nothing is left to cut
        self.ended = asyncio.Event()


async def cut_parts(
    first: Callable[[Cut], AsyncIterator[list[T]]],
    discover: Callable[[], Awaitable[list[str]]],
    part: Callable[[str | None, str | None], Part[T]],
    prefix: str,
    concurrency: int,
) -> AsyncIterator[Part[T]]:
    """The parts of a listing with no split points yet: ``first`` lists on from the listing's first
    page at once while ``discover`` finds split points (a request or more per folder level), instead
    of the listing waiting for them. Then ``first`` is cut at the first split point past what it has
    listed, and the ranges after it are parts of their own (``part(after, upto)``, bounds as in
    ``ranges``). If ``first`` reaches the end of the listing before that, it was the whole listing.
    """
    cut = Cut()
    found = asyncio.ensure_future(discover())

    async def listed_by_first() -> AsyncIterator[list[T]]:
        try:
            async for page in first(cut):
                yield page
        finally:
            cut.ended.set()

    try:
        yield listed_by_first
        ended = asyncio.ensure_future(cut.ended.wait())
        try:
            await asyncio.wait((found, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if cut.ended.is_set():
            return  # the first part listed everything (or failed, and in_order reports it)
        later = [s for s in found.result() if cut.seen is None or s > cut.seen]
        picked = usable_splits(later, prefix, concurrency)
        if not picked:
            return  # nothing to cut at: the first part lists on to the end
        cut.upto = picked[0]
        for after, upto in ranges(picked)[1:]:
            yield part(after, upto)
    finally:
        found.cancel()
        await asyncio.gather(found, return_exceptions=True)  # a failure the listing did not wait for


def range_parts(
    pages: Callable[[str | None, str | None, F | None, Cut | None], AsyncIterator[list[T]]],
    splits: Sequence[str],
    prefix: str,
    concurrency: int,
    first: F | None = None,
    discover: Callable[[], Awaitable[list[str]]] | None = None,
) -> AsyncIterator[Part[T]] | list[Part[T]]:
    """The parts of a listing by key ranges. ``pages(lo, hi, first, cut)`` lists one range (bounds
    as in ``ranges``; ``first``: its first page, if already fetched; ``cut``: its upper bound
    decided while it lists). Cut at ``splits``, or, with ``discover`` (no split points yet), at
    the ones it finds while the first part lists (``cut_parts``)."""
    if discover is not None:
        return cut_parts(
            lambda cut: pages(None, None, first, cut),
            discover,
            lambda lo, hi: functools.partial(pages, lo, hi, None, None),
            prefix,
            concurrency,
        )
    return [
        functools.partial(pages, lo, hi, first if lo is None else None, None)
        for lo, hi in ranges(usable_splits(splits, prefix, concurrency))
    ]


async def gather_bounded(calls: Sequence[Callable[[], Awaitable[R]]], limit: int) -> list[R]:
    """``asyncio.gather`` of ``calls``, at most ``limit`` running at once (a level of folder listings)."""
    gate = asyncio.Semaphore(max(1, limit))

    async def one(call: Callable[[], Awaitable[R]]) -> R:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


def ranges(splits: Sequence[str]) -> list[tuple[str | None, str | None]]:
    """``(after, upto)`` bounds of the parts ``splits`` cut: every key in exactly one of them."""
    points: list[str | None] = [None, *splits, None]
    return [(points[i], points[i + 1]) for i in range(len(points) - 1)]


def usable_splits(splits: Sequence[str], prefix: str, concurrency: int) -> list[str]:
    """The split points worth using for ``concurrency`` listers: strictly ascending, under ``prefix``,
    at most ``PARTS_PER_LISTER`` parts per lister, evenly picked from ``splits``; none for one lister
    (its parts would only be listed one after another, at a request more each)."""
    parts = concurrency * PARTS_PER_LISTER if concurrency > 1 else 1
    inside = sorted({s for s in splits if s.startswith(prefix) and s != prefix})
    return _evenly(inside, parts - 1)


def spread(splits: Sequence[str], keys: int, page_size: int) -> list[str]:
    """Of ``splits`` (ascending, evenly spread over a listing of about ``keys`` keys), every n-th:
    parts as large as fit in ``PART_OF_PAGE`` of a page. A part smaller than a page costs a request
    of its own (a billed one on the clouds) and is listed no sooner: 20,000 keys cut in 32 parts
    took 32 requests where 20 pages hold them. One larger than a page costs two requests."""
    if not splits or keys <= 0:
        return list(splits)
    gap = keys / (len(splits) + 1)  # keys between two split points
    every = int(PART_OF_PAGE * page_size // gap)
    return list(splits) if every <= 1 else list(splits[every - 1 :: every])


def _evenly(points: Sequence[str], most: int) -> list[str]:
    """At most ``most`` of ``points`` (ascending), evenly picked: all of them if there are no more.
    Each pick closes its share of ``points``, so the first part holds no more than the others."""
    if most <= 0:
        return []
    if len(points) <= most:
        return list(points)
    step = len(points) / (most + 1)
    return sorted({points[int(step * i) - 1] for i in range(1, most + 1)})


class Quantiles:
    """Keys picked every ``stride``-th from an ascending stream: the next run's split points.

    The stride starts from the size the stream is expected to have (the ledger's live
    count, 0 on an initial sync) and doubles whenever twice ``count`` keys are held, so
    between ``count`` and ``2 x count`` evenly spaced keys are kept however large the listing.
    """

    __slots__ = ("_left", "count", "expected", "keys", "stride")

    def __init__(self, expected: int, count: int = 64) -> None:
        #: the keys the listing is expected to hold (the last run's)
        self.expected = expected
        self.count = count
        self.stride = max(1, expected // (count + 1))
        self._left = self.stride
        self.keys: list[str] = []

    def see(self, key: str) -> None:
        self.see_all((key,))

    def see_all(self, keys: Sequence[str]) -> None:
        """``see`` each of ``keys`` in turn, at the cost of the few it keeps."""
        at = self._left - 1  # the index in ``keys`` of the next one kept
        while at < len(keys):
            self.keys.append(keys[at])
            if len(self.keys) >= 2 * self.count:
                del self.keys[::2]  # keep every other one: the stride doubles
                self.stride *= 2
            at += self.stride
        self._left = at - len(keys) + 1
