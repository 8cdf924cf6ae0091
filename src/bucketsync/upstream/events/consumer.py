"""The events consumer: applies what an event source reports, as storage says it is now.

For each batch a source delivers:

1. ``sift`` (pure): events older than the last applied ordering token of their key
   are dropped without a HEAD; keys that are no items (the hidden folder, folder
   markers) or that the include/exclude filters leave out are dropped; the rest
   collapse to one HEAD per key.
2. HEAD each key, concurrently and bounded. An event is a hint; the HEAD is the truth,
   so duplicated, reordered and stale events converge.
3. ``decide`` (pure) compares each HEAD with the ledger row: an object that is there
   is added or updated (a tombstone's info is kept current, it never comes back); one
   that is gone is a removal.
4. Additions and updates commit at once, in one transaction. Removals wait
   ``RENAME_WINDOW``: a create with the same etag and size within that window makes
   them a rename (the item keeps its id), matched exactly as the sync matches them.
   The removals still due then pass the mass-delete guard (``core.gate``) counted
   over ``GUARD_WINDOW``; a burst past the limits is held (not applied) and a
   reconcile run is requested, which decides under the same guard.
5. A batch is acknowledged only after every effect of it is committed.

Changes are recorded as runs of kind ``events``: one run spans at most ``RUN_SPAN``
seconds of activity, with its counts, so run history, ``status`` and the metrics show
them like any run.

The last ordering token per key is kept in bounded memory (``Tokens``), not in the
ledger: a token only saves a HEAD, never decides an outcome (the HEAD does), so
forgetting one (after a restart, or past ``MAX_TOKENS`` keys) costs one HEAD and is
never wrong, while persisting it would cost a ledger write per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from bucketsync import metrics
from bucketsync.core import failpoints
from bucketsync.core.diff import changed
from bucketsync.core.errors import NotFound
from bucketsync.core.gate import removal_guard
from bucketsync.core.keys import KeyFilter, indexable
from bucketsync.core.model import Counts, Indexed, ItemState, ObjectInfo, RunStatus
from bucketsync.core.retry import backoff
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores import Store
from bucketsync.upstream.events import Batch, Event, EventSource, SourceFailed
from bucketsync.upstream.sync import SyncLoop

log = structlog.get_logger("bucketsync.events")

#: HEADs in flight at once per dataset
HEAD_CONCURRENCY = 16
#: a removal waits this long for the create that would make it a rename
RENAME_WINDOW = 1.0
#: removals applied within this many seconds count together against the guard's limits
GUARD_WINDOW = 60.0
#: an events run spans at most this many seconds of activity
RUN_SPAN = 1.0
#: the consumer wakes at least this often (pending removals fall due, a run closes, stop is seen)
TICK = 0.25
#: events taken from the source's queue into one batch of HEADs and one transaction
MAX_EVENTS = 5000
#: keys whose last ordering token is remembered
MAX_TOKENS = 100_000
#: a removed folder (a watch event for a path with no item) expands to at most this many items
MAX_EXPAND = 10_000
#: a failed source is retried after a backoff growing to this many seconds
RETRY_CAP = 300.0
RETRY_BASE = 2.0
LIVE = ItemState.LIVE


class Tokens:
    """The last ordering token applied per key, for at most ``limit`` keys (least recent go first)."""

    def __init__(self, limit: int = MAX_TOKENS) -> None:
        self.limit = limit
        self._last: OrderedDict[str, str] = OrderedDict()

    def stale(self, event: Event) -> bool:
        last = self._last.get(event.key)
        return event.token is not None and last is not None and event.token < last

    def saw(self, event: Event) -> None:
        if event.token is None:
            return
        last = self._last.get(event.key)
        if last is None or event.token > last:
            self._last[event.key] = event.token
        self._last.move_to_end(event.key)
        if len(self._last) > self.limit:
            self._last.popitem(last=False)


@dataclass(slots=True)
class Sifted:
    """The keys to HEAD (with the earliest ``at`` of their events) and what was dropped, by reason."""

    keys: dict[str, float | None] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def sift(events: Iterable[Event], tokens: Tokens, keep: Callable[[str], bool]) -> Sifted:
    """Pure: which keys need a HEAD. Tokens of the events that pass are remembered."""
    out = Sifted()
    for ev in events:
        if tokens.stale(ev):
            out.dropped["stale"] += 1
            continue
        if not indexable(ev.key) or not keep(ev.key):
            out.dropped["filtered"] += 1
            continue
        tokens.saw(ev)
        at = out.keys.get(ev.key)
        out.keys[ev.key] = ev.at if at is None else (at if ev.at is None else min(at, ev.at))
    return out


@dataclass(slots=True)
class Decided:
    adds: list[ObjectInfo] = field(default_factory=list)
    updates: list[tuple[int, ObjectInfo]] = field(default_factory=list)
    #: tombstones whose object changed: their info stays current, they stay tombstones
    keep_current: list[tuple[int, ObjectInfo]] = field(default_factory=list)
    removals: list[Indexed] = field(default_factory=list)  # live items whose object is gone
    purges: list[Indexed] = field(default_factory=list)  # tombstones whose object is gone
    unchanged: int = 0
    #: keys that are gone and have no row: a removed folder, maybe
    unknown_gone: list[str] = field(default_factory=list)


def decide(heads: dict[str, ObjectInfo | None], rows: dict[str, Indexed]) -> Decided:
    """Pure: what the HEADs (None: not found) mean against the ledger's rows."""
    out = Decided()
    for key, obj in sorted(heads.items()):  # key order, as a listing: the quota keeps the same keys
        row = rows.get(key)
        if obj is None:
            if row is None:
                out.unknown_gone.append(key)
            elif row.state == LIVE:
                out.removals.append(row)
            else:
                out.purges.append(row)
        elif row is None:
            out.adds.append(obj)
        elif not changed(obj, row):
            out.unchanged += 1
        elif row.state == LIVE:
            out.updates.append((row.id, obj))
        else:
            out.keep_current.append((row.id, obj))
    return out


@dataclass(slots=True)
class _Removal:
    row: Indexed
    at: float  # monotonic time the HEAD found it gone
    batch: int  # the batch it came from: acknowledged once this is settled


@dataclass(slots=True)
class _Added:
    id: int
    key: str
    at: float
    run: int


@dataclass(slots=True)
class _Run:
    id: int
    started: float
    counts: Counts = field(default_factory=Counts)
    notes: list[str] = field(default_factory=list)


class _Lost:
    """A test hook: ``BUCKETSYNC_EVENTS_LOSE=0.05`` loses that share of events on arrival, as a
    provider that drops them would (benchmarks and tests of the reconcile's drift count)."""

    def __init__(self) -> None:
        self.share = float(os.environ.get("BUCKETSYNC_EVENTS_LOSE", "0") or 0)
        self.rng = random.Random(int(os.environ.get("BUCKETSYNC_EVENTS_LOSE_SEED", "7")))
        self.lost = 0

    def keep(self, events: list[Event]) -> list[Event]:
        if not self.share:
            return events
        kept = [e for e in events if self.rng.random() >= self.share]
        if len(kept) != len(events):
            self.lost += len(events) - len(kept)
            log.info("events lost on purpose (BUCKETSYNC_EVENTS_LOSE)", lost=len(events) - len(kept), total=self.lost)
        return kept


class Consumer:
    """Applies one dataset's events; ``run`` keeps a source going and falls back to polling when it fails."""

    def __init__(
        self,
        loop: SyncLoop,
        dataset_id: int,
        open_source: Callable[[], EventSource],
        *,
        on_state: Callable[[str | None], None] | None = None,
    ) -> None:
        self.loop = loop
        self.name = loop.name
        self.config = loop.config
        self.store: Store = loop.store
        self.ledger: Ledger = loop.ledger
        self.ds_id = dataset_id
        self.open_source = open_source
        #: told the source's state: None when it delivers, else why it failed
        self.on_state = on_state
        self.filter = KeyFilter(self.config.include, self.config.exclude)
        self.tokens = Tokens()
        self.pending: deque[_Removal] = deque()
        self.recent: dict[tuple[str, int], list[_Added]] = defaultdict(list)
        self.removed_recently: deque[tuple[float, int]] = deque()
        self.unacked: deque[tuple[int, Batch]] = deque()
        self.run_: _Run | None = None
        self.seq = 0
        #: a burst was held: removals wait for the reconcile (set to the loop's listing count then)
        self.holding: int | None = None
        self.sem = asyncio.Semaphore(HEAD_CONCURRENCY)
        self.lose = _Lost()

    # -- the life of a source --------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop``. A failing source degrades the dataset to polling at its
        ``interval`` and is retried with backoff; the first batch it delivers restores events mode."""
        failures = 0
        metrics.EVENT_SOURCE_UP.labels(self.name).set(0)
        while not stop.is_set():
            try:
                source = self.open_source()
            except SourceFailed as exc:
                failures += 1
                self._degrade(str(exc), failures)
            else:
                try:
                    await self._consume(source, stop)
                    failures = 0
                except SourceFailed as exc:
                    failures += 1
                    self._degrade(str(exc), failures)
                finally:
                    with contextlib.suppress(Exception):
                        await source.aclose()
            if failures and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff(failures, RETRY_BASE, RETRY_CAP) + 0.5)

    def _degrade(self, why: str, failures: int) -> None:
        metrics.EVENT_SOURCE_UP.labels(self.name).set(0)
        if not self.loop.events_degraded:
            log.warning(
                "event source failed: polling at the interval until it delivers again",
                dataset=self.name,
                error=why,
                interval=self.config.interval,
            )
            self.loop.events_degraded = True
            self.loop.wake.set()  # events may have been missed: list now, then every interval
        else:
            log.debug("event source still failing", dataset=self.name, error=why, attempts=failures)
        if self.on_state is not None:
            self.on_state(why)

    def _up(self) -> None:
        metrics.EVENT_SOURCE_UP.labels(self.name).set(1)
        if self.loop.events_degraded:
            log.info("event source delivers again: back to events mode", dataset=self.name)
            self.loop.events_degraded = False
        if self.on_state is not None:
            self.on_state(None)

    async def _consume(self, source: EventSource, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[Batch | BaseException] = asyncio.Queue(maxsize=64)
        pump = asyncio.create_task(self._pump(source, queue), name=f"events:{self.name}")
        failed: BaseException | None = None
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set() and failed is None:
                got: list[Batch] = []
                getter = asyncio.ensure_future(queue.get())
                # At rest nothing is due: sleep until a batch or the stop (no ticks: CPU at rest).
                await asyncio.wait({getter, stopping}, timeout=TICK if self._due() else None,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if not getter.done():
                    getter.cancel()  # an asyncio.Queue loses nothing to a cancelled get
                    await asyncio.gather(getter, return_exceptions=True)
                else:
                    items: list[Batch | BaseException] = [getter.result()]
                    n = 0
                    while True:
                        item = items[-1]
                        if isinstance(item, BaseException):
                            failed = item
                            break
                        got.append(item)
                        n += len(item.events)
                        if n >= MAX_EVENTS or queue.empty():
                            break
                        items.append(queue.get_nowait())
                await self.step(got, final=failed is not None or stop.is_set())
        finally:
            stopping.cancel()
            pump.cancel()
            await asyncio.gather(pump, stopping, return_exceptions=True)
        # Stopping or failing: settle what waits (removals past no window), close the run, ack.
        await self.step([], final=True)
        if failed is not None:
            raise failed if isinstance(failed, SourceFailed) else SourceFailed(_describe(failed))

    async def _pump(self, source: EventSource, queue: asyncio.Queue[Batch | BaseException]) -> None:
        delivered = False
        try:
            async for batch in source.batches():
                try:
                    failpoints.raises(f"events.source.{self.name}")  # a source failing, for tests
                except failpoints.FailpointError as exc:
                    raise SourceFailed(str(exc)) from None
                if not delivered:
                    delivered = True
                    self._up()
                if not batch.events:  # a long poll that timed out: nothing to apply, nothing to wake for
                    await self._ack_one(batch)
                    continue
                await queue.put(batch)
            raise SourceFailed(f"the {source.name} source stopped delivering")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which degrades
            await queue.put(exc)

    # -- one step: apply batches, settle due removals, acknowledge ---------------

    def _due(self) -> bool:
        """Something waits for time to pass: a removal's rename window, an open run, an acknowledgement."""
        return bool(self.pending) or self.run_ is not None or bool(self.unacked)

    async def step(self, batches: list[Batch], *, final: bool = False) -> None:
        """Apply ``batches``, settle the removals that are due (all of them when ``final``), and
        acknowledge every batch whose effect is committed. Usable directly in tests."""
        if not batches and not self._due():
            return  # at rest: a tick costs nothing
        events: list[Event] = []
        for b in batches:
            self.seq += 1
            self.unacked.append((self.seq, b))
            events.extend(b.events)
        if events:
            failpoints.hit("events.before_apply")  # kill -9 tests: accepted, not yet applied
            metrics.EVENTS_RECEIVED.labels(self.name).inc(len(events))
            events = self.lose.keep(events)
        async with self.loop.lock:  # never interleaved with a listing run
            if events:
                await self._apply(events)
            await self._settle(final)
            await self._finish_run_if_due(final)
        await self._ack()

    async def _apply(self, events: list[Event]) -> None:
        sifted = sift(events, self.tokens, self.filter)
        in_flight = [k for k in sifted.keys if k in self.loop.in_flight]
        for k in in_flight:  # the outbox writes it now and indexes what it wrote
            del sifted.keys[k]
        if in_flight:
            sifted.dropped["in_flight"] += len(in_flight)
        heads, failed = await self._heads(list(sifted.keys))
        rows = await self.ledger.rows_for(self.ds_id, heads)
        d = decide(heads, rows)
        if d.unknown_gone:  # a removed folder: its items are gone too, as HEADs will say
            more: list[str] = []
            for key in d.unknown_gone:
                more += await self.ledger.live_under(self.ds_id, key + "/", MAX_EXPAND)
            if more:
                heads2, failed2 = await self._heads(more)
                failed += failed2
                d2 = decide(heads2, await self.ledger.rows_for(self.ds_id, heads2))
                d.removals += d2.removals
                d.purges += d2.purges
                d.updates += d2.updates
                d.keep_current += d2.keep_current
        if failed:
            sifted.dropped["head_error"] += failed
            self.loop.wake.set()  # the reconcile lists what could not be HEADed
        over = await self._trim_to_quota(d)
        if over:
            sifted.dropped["quota"] += over
            metrics.QUOTA_SKIPPED.labels(self.name).inc(over)
        for reason, n in sifted.dropped.items():
            metrics.EVENTS_DROPPED.labels(self.name, reason).inc(n)
        metrics.EVENTS_APPLIED.labels(self.name).inc(len(heads))
        # A key found live again cancels its pending removal (deleted, then re-created).
        live = {k for k, v in heads.items() if v is not None}
        if live and self.pending:
            self.pending = deque(r for r in self.pending if r.row.key not in live)
        now = time.monotonic()
        for row in [*d.removals, *d.purges]:
            if not any(r.row.id == row.id for r in self.pending):
                self.pending.append(_Removal(row, now, self.seq))
        if d.adds or d.updates or d.keep_current:
            run = await self._run()
            run.counts.added += len(d.adds)
            run.counts.modified += len(d.updates)
            await self.ledger.write_batch(self.ds_id, run.id, d.adds, [*d.updates, *d.keep_current], run.counts)
            if d.adds:
                ids = await self.ledger.rows_for(self.ds_id, (o.key for o in d.adds))
                for o in d.adds:
                    if o.etag is not None and (got := ids.get(o.key)) is not None:
                        self.recent[(o.etag, o.size)].append(_Added(got.id, o.key, now, run.id))
        if d.unchanged and self.run_ is not None:
            self.run_.counts.unchanged += d.unchanged
        self._observe_latency(sifted.keys, heads)

    async def _trim_to_quota(self, d: Decided) -> int:
        """At its quota a dataset takes no new items (as a listing run): how many adds were dropped."""
        quota = self.config.quota
        if quota is None or not d.adds:
            return 0
        room = max(0, quota - await self.ledger.live_count(self.ds_id))
        over = max(0, len(d.adds) - room)
        if over:
            d.adds = d.adds[:room]
        return over

    async def _heads(self, keys: list[str]) -> tuple[dict[str, ObjectInfo | None], int]:
        out: dict[str, ObjectInfo | None] = {}
        failed = 0

        async def one(key: str) -> None:
            nonlocal failed
            async with self.sem:
                try:
                    info = await self.store.head(key)
                except NotFound:
                    out[key] = None
                    return
                except Exception as exc:  # left to the reconcile, which lists it
                    failed += 1
                    log.warning(
                        "HEAD failed; the reconcile will list it", dataset=self.name, key=key, error=_describe(exc)
                    )
                    return
                out[key] = (
                    info if info.key == key else ObjectInfo(key, info.size, info.modified, info.etag, info.version)
                )

        if len(keys) == 1:
            await one(keys[0])
        else:
            async with asyncio.TaskGroup() as tg:
                for k in keys:
                    tg.create_task(one(k))
        return out, failed

    def _observe_latency(self, keys: dict[str, float | None], heads: dict[str, ObjectInfo | None]) -> None:
        now = time.time()
        hist = metrics.EVENT_LATENCY.labels(self.name)
        for key, at in keys.items():
            if at is not None and key in heads:
                hist.observe(max(0.0, now - at))

    async def _settle(self, final: bool) -> None:
        """Removals past the rename window: renames first, then the rest through the guard."""
        now = time.monotonic()
        cutoff = now - RENAME_WINDOW
        due: list[_Removal] = []
        while self.pending and (final or self.pending[0].at <= cutoff):
            due.append(self.pending.popleft())
        self._forget_old(now)
        if not due:
            return
        current = await self.ledger.rows_for(self.ds_id, (r.row.key for r in due))
        rows = [r.row for r in due if (c := current.get(r.row.key)) is not None and c.id == r.row.id]
        if not rows:
            return
        run = await self._run()
        pairs: list[tuple[int, int, str]] = []
        rest: list[Indexed] = []
        for row in rows:
            match = self._match(row)
            if match is None:
                rest.append(row)
                continue
            pairs.append((row.id, match.id, match.key))
            if row.state == LIVE:
                run.counts.renamed += 1
                if match.run == run.id:
                    run.counts.added -= 1
        if pairs:
            await self.ledger.rename(run.id, pairs, run.counts)
        removals = [r for r in rest if r.state == LIVE]
        purges = [r for r in rest if r.state != LIVE]
        if removals:
            await self._remove(run, removals)
        if purges:
            await self.ledger.remove(None, [r.id for r in purges])

    def _match(self, row: Indexed) -> _Added | None:
        if row.etag is None:
            return None
        found = self.recent.get((row.etag, row.size))
        if not found:
            return None
        added = found.pop(0)
        if not found:
            del self.recent[(row.etag, row.size)]
        return added

    def _forget_old(self, now: float) -> None:
        old = now - 2 * RENAME_WINDOW
        for sig in [s for s, adds in self.recent.items() if adds[-1].at < old]:
            del self.recent[sig]
        while self.removed_recently and self.removed_recently[0][0] < now - GUARD_WINDOW:
            self.removed_recently.popleft()

    async def _remove(self, run: _Run, rows: list[Indexed]) -> None:
        if self.holding is not None and self.loop.listings > self.holding:
            self.holding = None  # a reconcile ran since the burst: it decided
        recent = sum(n for _, n in self.removed_recently)
        live = await self.ledger.live_count(self.ds_id)
        decision = removal_guard(
            removals=len(rows) + recent,
            live_before=live + recent,
            listing_complete=True,
            max_delete_ratio=self.config.max_delete_ratio,
            max_delete_count=self.config.max_delete_count,
        )
        if self.holding is not None or not decision.allowed:
            if self.holding is None:
                self.holding = self.loop.listings
                note = (
                    f"{len(rows)} removals seen through events held by the mass-delete guard "
                    f"({decision.message}); a reconcile run decides"
                )
                run.notes.append(note)
                log.warning(
                    "removals held by the mass-delete guard; reconcile requested",
                    dataset=self.name,
                    removals=len(rows),
                    reason=decision.reason,
                )
            metrics.EVENTS_DROPPED.labels(self.name, "guard").inc(len(rows))
            self.loop.wake.set()
            return
        run.counts.removed += len(rows)
        await self.ledger.remove(run.id, [r.id for r in rows], run.counts)
        self.removed_recently.append((time.monotonic(), len(rows)))

    # -- runs of kind "events" ---------------------------------------------------

    async def _run(self) -> _Run:
        if self.run_ is None:
            run_id = await self.ledger.begin_run(self.ds_id, False, kind="events")
            self.run_ = _Run(run_id, time.monotonic())
        return self.run_

    async def _finish_run_if_due(self, final: bool) -> None:
        run = self.run_
        if run is None or not (final or time.monotonic() - run.started >= RUN_SPAN):
            return
        self.run_ = None
        seconds = time.monotonic() - run.started
        error = "; ".join(run.notes) or None
        await self.ledger.finish_run(run.id, run.counts, RunStatus.OK, error)
        metrics.record_run(self.name, str(RunStatus.OK), run.counts, seconds)
        metrics.set_dataset_items(self.name, await self.ledger.counts_by_state(self.ds_id))
        c = run.counts
        log.info(
            "events applied",
            dataset=self.name,
            run=run.id,
            added=c.added,
            modified=c.modified,
            removed=c.removed,
            renamed=c.renamed,
            unchanged=c.unchanged,
            **({"note": error} if error else {}),
        )

    async def _ack(self) -> None:
        """Acknowledge, in order, every batch none of whose removals still waits."""
        oldest_waiting = min((r.batch for r in self.pending), default=None)
        while self.unacked and (oldest_waiting is None or self.unacked[0][0] < oldest_waiting):
            _, batch = self.unacked.popleft()
            await self._ack_one(batch)

    async def _ack_one(self, batch: Batch) -> None:
        try:
            await batch.ack()
        except Exception as exc:  # the provider redelivers; the HEAD makes that harmless
            log.warning("acknowledging a batch failed; it will be redelivered", dataset=self.name, error=_describe(exc))


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
