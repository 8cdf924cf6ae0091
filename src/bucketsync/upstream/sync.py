"""Upstream sync: one ``SyncLoop`` per dataset.

A run lists the store, diffs it against the ledger's snapshot, writes additions
and modifications in batches as it goes, and holds removals until the listing is
complete: only then are renames matched (same etag and size) and the remaining
removals put through the guard. A failed listing therefore never removes anything
(invariant 1), and a run past the mass-delete limits removes nothing (invariant 4).

A store that can scope a failure to a sub-tree (``stores.PartialListing``) reports it
as a ``ListingGap``: the diff leaves every ledger key under it alone, the rest of the
run (removals included) goes on, and the run ends ``partial`` with the gaps named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from bucketsync import metrics
from bucketsync.config import DatasetConfig
from bucketsync.core import failpoints
from bucketsync.core.diff import Step, diff_pages
from bucketsync.core.errors import BucketsyncError, LedgerError
from bucketsync.core.gate import removal_guard
from bucketsync.core.keys import KeyFilter
from bucketsync.core.model import (
    Change,
    ChangeKind,
    Counts,
    Indexed,
    ItemState,
    ListingGap,
    ObjectInfo,
    RunStatus,
    SnapshotRow,
)
from bucketsync.ledger.ledger import Ledger
from bucketsync.logs import debug_enabled
from bucketsync.stores import SplitListing, Store, listing_pages
from bucketsync.stores.parallel import Quantiles, spread
from bucketsync.upstream.pacing import Pacer

log = structlog.get_logger("bucketsync.sync")

BATCH = 5000
#: a run checks every this many keys (one step of ``diff_pages``, a fraction of a millisecond)
#: whether its slice of the event loop is used up (pacing.py: the API, /healthz and the
#: other datasets' runs share the loop)
CHECK_EVERY = 128
#: over-quota objects kept as possible rename targets; past this many, a rename in a
#: full dataset is reported as a removal (memory stays bounded on huge buckets)
MAX_DEFERRED = 50_000
#: a run with no split points of its own (the first of this process) reads them from the ledger
#: when the dataset has more items than this (a few pages: a smaller listing is one or two requests)
SPLITS_FROM_LEDGER = 2000
#: split points kept from one listing for the next (``stores.parallel.Quantiles``): enough that
#: the parts picked from them (``parallel.spread``) come out close to a page each
SPLIT_SAMPLES = 256
LIVE = ItemState.LIVE
ADDED, MODIFIED, REMOVED = ChangeKind.ADDED, ChangeKind.MODIFIED, ChangeKind.REMOVED


class Interrupted(BucketsyncError):
    """The agent is shutting down; the run stops after its current batch."""


@dataclass(slots=True)
class RunResult:
    dataset: str
    run: int | None
    status: RunStatus
    counts: Counts
    error: str | None = None
    dry_run: bool = False
    seconds: float = 0.0
    gaps: list[ListingGap] = field(default_factory=list)
    #: a dry run's plan: the keys it would remove and rename (bounded), whatever the guard says
    plan: Plan | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "dataset": self.dataset,
            "run": self.run,
            "status": str(self.status),
            **self.counts.as_dict(),
            "error": self.error,
            "gaps": [g.as_json() for g in self.gaps],
            "dry_run": self.dry_run,
            "seconds": round(self.seconds, 3),
        }
        if self.plan is not None:
            out |= self.plan.as_json()
        return out


#: how many keys a dry run lists per kind (the counts are always exact)
PLAN_KEYS = 1000


@dataclass(slots=True)
class Plan:
    """What a dry run would remove and rename: the first ``PLAN_KEYS`` keys of each, and the counts."""

    removals: int = 0
    renames: int = 0
    remove_keys: list[str] = field(default_factory=list)
    rename_keys: list[tuple[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "would_remove": {
                "count": self.removals,
                "keys": self.remove_keys,
                "truncated": self.removals > len(self.remove_keys),
            },
            "would_rename": {
                "count": self.renames,
                "renames": [{"from": old, "to": new} for old, new in self.rename_keys],
                "truncated": self.renames > len(self.rename_keys),
            },
        }


@dataclass(slots=True)
class _Pending:
    """What a run holds until its listing is complete."""

    adds: list[ObjectInfo] = field(default_factory=list)
    updates: list[tuple[int, ObjectInfo]] = field(default_factory=list)
    removals: list[Indexed] = field(default_factory=list)  # live items missing from the listing
    purges: list[Indexed] = field(default_factory=list)  # tombstones whose object is gone
    deferred: list[ObjectInfo] = field(default_factory=list)  # over quota: rename targets only
    dry_adds: list[tuple[str | None, int, str]] = field(default_factory=list)  # dry runs match renames here
    over_quota: int = 0  # new objects not added because the dataset is at its quota
    renames: list[tuple[str, str]] = field(default_factory=list)  # (old key, new key): dry-run plan, debug log
    gaps: list[ListingGap] = field(default_factory=list)  # sub-trees the listing could not read
    #: the counts as of the run's last committed write: what a run that fails to write records
    committed: Counts = field(default_factory=Counts)
    #: listed keys sampled for the next run's split points
    sample: Quantiles = field(default_factory=lambda: Quantiles(0))


class RemoteDiff(Protocol):
    """Listing and diffing done elsewhere (a sync worker process: upstream/workers): the same
    steps ``listing_steps`` yields, with the listing's gaps appended to ``gaps`` as they come
    and, once the last step is taken, the listed keys' sample in ``sample``. A step from there
    carries the keys of what was listed but not the objects (``Step.listed`` is empty)."""

    def steps(
        self, ds_id: int, splits: Sequence[str], gaps: list[ListingGap], sample: Quantiles
    ) -> AsyncGenerator[Step, None]: ...


async def listing_steps(
    store: Store,
    keep: KeyFilter,
    snapshot: AsyncIterable[Sequence[SnapshotRow]],
    splits: Sequence[str],
    gaps: list[ListingGap],
    sample: Quantiles,
    step: int,
) -> AsyncGenerator[Step, None]:
    """A run's diff: the store's listing (cut at ``splits``, filtered) against the ledger's
    snapshot, in steps of at most ``step`` keys; listed keys are fed to ``sample`` for the
    next run's split points. The same code in this process and in a sync worker."""
    listing = listing_pages(store, "", splits)
    pages = listing if keep.trivial else _filtered(listing, keep)
    steps = diff_pages(pages, snapshot, gaps, step)
    try:
        async for s in steps:
            sample.see_all(s.keys)
            yield s
    finally:
        # A run that stops early ends its listing and its snapshot (a read transaction that pins
        # the WAL) now, outermost first, not whenever the garbage collector gets to them.
        for part in (steps, pages, listing, snapshot):
            if (aclose := getattr(part, "aclose", None)) is not None:
                await aclose()


async def _filtered(
    pages: AsyncIterable[Sequence[ObjectInfo | ListingGap]], keep: Callable[[str], bool]
) -> AsyncIterator[Sequence[ObjectInfo | ListingGap]]:
    async for page in pages:
        # a gap may hide kept keys: it always passes
        yield [o for o in page if isinstance(o, ListingGap) or keep(o.key)]


class SyncLoop:
    def __init__(
        self,
        name: str,
        config: DatasetConfig,
        store: Store,
        ledger: Ledger,
        pacer: Pacer | None = None,
        *,
        no_change_log_level: str = "info",
        remote: RemoteDiff | None = None,
    ) -> None:
        self.name = name
        #: where listing and diffing run when not in this process (``agent.sync_workers``)
        self.remote = remote
        self.pacer = pacer or Pacer()  # an agent's runs share one
        #: the level of the one line a run that changed nothing logs (busy polls make it noise)
        self.no_change_log_level = no_change_log_level
        self.config = config
        self.store = store
        self.ledger = ledger
        self.filter = KeyFilter(config.include, config.exclude)
        #: live counts of the run in progress (the API and the CLI show them)
        self.progress: Counts | None = None
        self.current_run: int | None = None
        self.next_run_at: float | None = None
        #: keys the outbox is writing now, and when it last finished one: a run leaves
        #: those alone, so it neither removes a key being written nor reports an
        #: upload's own object as a foreign change
        self.in_flight: set[str] = set()
        self.touched: dict[str, float] = {}
        #: the last finished run was stopped by the mass-delete guard (a failed run leaves it as it was)
        self.guard_blocked = False
        self._lock = asyncio.Lock()  # one run at a time per dataset
        self._applying = asyncio.Lock()  # a run or an events batch writes, not both (see ``lock``)
        self.wake = asyncio.Event()  # set to start a run now
        #: the ledger lost commits: run at start-up even when manual, until a run completes ok
        self.resync = False
        #: events mode: the event source failed, so the loop polls at ``interval`` until it delivers again
        self.events_degraded = False
        #: listing runs finished by this loop (the first one of an events-mode dataset is its start-up
        #: catch-up, not a reconcile of missed events: it does not count as drift)
        self.listings = 0
        #: where the last complete listing's keys fall (``stores.parallel.Quantiles``): the next
        #: listing is cut there into parts listed in parallel
        self.splits: list[str] = []
        #: a run whose end could not be recorded (the ledger failed to write): recorded first next time
        self._unfinished: tuple[int, Counts, RunStatus, str | None, list[ListingGap]] | None = None

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def lock(self) -> asyncio.Lock:
        """Held by a run, and by the events consumer while it applies a batch: the two never interleave.
        (Not the run lock itself: the consumer applying a batch is no run in progress.)"""
        return self._applying

    @property
    def period(self) -> float:
        """Time between listing runs: ``interval`` when polling (or while the event source is failing),
        ``reconcile_interval`` in events mode."""
        if self.config.sync == "events" and not self.events_degraded:
            return self.config.reconcile_interval
        return self.config.interval

    async def idle(self) -> None:
        """Wait until no run of this dataset is in progress (a reload replaces the loop after)."""
        async with self._lock:
            pass

    async def run_once(
        self,
        *,
        dry_run: bool = False,
        force: bool = False,
        stop: asyncio.Event | None = None,
        started: asyncio.Future[int | None] | None = None,
    ) -> RunResult:
        """One run. ``started`` (if given) gets the run id (None for a dry run) once it begins."""
        async with self._lock, self._applying:
            return await self._run(dry_run=dry_run, force=force, stop=stop, started=started)

    async def _run(
        self, *, dry_run: bool, force: bool, stop: asyncio.Event | None, started: asyncio.Future[int | None] | None
    ) -> RunResult:
        t0 = time.monotonic()
        if self._unfinished is not None:
            await self.ledger.finish_run(*self._unfinished)
            self._unfinished = None
        ds_id = await self.ledger.dataset_id(self.name)
        live_before = await self.ledger.live_count(ds_id)
        run_id = None if dry_run else await self.ledger.begin_run(ds_id, force)
        counts = self.progress = Counts()
        self.current_run = run_id
        if started is not None and not started.done():
            started.set_result(run_id)
        structlog.contextvars.bind_contextvars(dataset=self.name, run=run_id)
        log.debug("run started", dry_run=dry_run, force=force, items=live_before)
        pending = _Pending(sample=Quantiles(live_before, SPLIT_SAMPLES))
        if not self.splits and live_before > SPLITS_FROM_LEDGER and isinstance(self.store, SplitListing):
            self.splits = await self.ledger.key_quantiles(ds_id, SPLIT_SAMPLES, live_before)
        plan = None
        status, error = RunStatus.OK, None
        try:
            try:
                await self._walk(ds_id, run_id, counts, pending, stop)
                complete = True
            except LedgerError:
                raise  # the ledger, not the listing, failed: nothing more can be written
            except Exception as exc:  # any failure mid-listing: no removals (invariant 1)
                complete, status, error = False, RunStatus.FAILED, _describe(exc)
                counts.errors += 1
            await self._flush(ds_id, run_id, counts, pending)  # what was listed before an error is kept
            if complete:
                self.splits = pending.sample.keys
                await self._match_renames(ds_id, run_id, counts, pending)
                if pending.gaps:  # complete but for these sub-trees: removals elsewhere go on
                    status, error = RunStatus.PARTIAL, _describe_gaps(pending.gaps)
                    counts.errors += len(pending.gaps)
                if pending.over_quota and status in (RunStatus.OK, RunStatus.PARTIAL):
                    quota = (
                        f"over quota: the dataset is at its quota of {self.config.quota} items; "
                        f"{pending.over_quota} new objects were not added"
                    )
                    error = f"{error}; {quota}" if error else quota
                    metrics.QUOTA_SKIPPED.labels(self.name).inc(pending.over_quota)
                decision = removal_guard(
                    removals=len(pending.removals),
                    live_before=live_before,
                    listing_complete=complete,
                    max_delete_ratio=self.config.max_delete_ratio,
                    max_delete_count=self.config.max_delete_count,
                    force=force,
                )
                if dry_run:
                    plan = _plan(pending, counts)
                if decision.allowed:
                    await self._remove(run_id, counts, pending)
                else:
                    status, error = RunStatus.ABORTED, decision.message
                    log.warning(
                        "removals refused by the mass-delete guard",
                        reason=decision.reason,
                        removals=len(pending.removals),
                        message=decision.message,
                    )
                    if not dry_run:
                        metrics.GUARD_ABORTS.labels(self.name, decision.reason).inc()
                if not dry_run:
                    metrics.LISTING_GAPS.labels(self.name).set(len(pending.gaps))
        except LedgerError as exc:  # a full disk, say: the run fails, recording only what committed
            status, error = RunStatus.FAILED, str(exc)
            counts = replace(pending.committed, errors=pending.committed.errors + 1)
        except BaseException as exc:  # cancelled or crashed mid-run: record it, then propagate
            status, error = RunStatus.FAILED, _describe(exc) if isinstance(exc, Exception) else "cancelled"
            raise
        finally:
            seconds = time.monotonic() - t0
            if run_id is not None:
                try:
                    await asyncio.shield(self._finish(ds_id, run_id, counts, status, error, pending.gaps))
                except LedgerError as exc:
                    self._unfinished = (run_id, counts, status, error, pending.gaps)
                    log.error("could not record the end of the run; recorded at the next one", error=str(exc))
            self.progress = self.current_run = None
            self._record(status, counts, seconds, dry_run, error, pending.gaps)
            structlog.contextvars.unbind_contextvars("dataset", "run")
        return RunResult(self.name, run_id, status, counts, error, dry_run, seconds, pending.gaps, plan)

    async def _finish(
        self, ds_id: int, run_id: int, counts: Counts, status: RunStatus, error: str | None, gaps: list[ListingGap]
    ) -> None:
        await self.ledger.finish_run(run_id, counts, status, error, gaps)
        if self.resync and status is RunStatus.OK:  # not partial: the gaps were not listed
            await self.ledger.resync_done(self.name)
            self.resync = False
            log.info("full re-sync after lost ledger commits done")
        metrics.set_dataset_items(self.name, await self.ledger.counts_by_state(ds_id))

    async def _walk(
        self, ds_id: int, run_id: int | None, counts: Counts, p: _Pending, stop: asyncio.Event | None
    ) -> None:
        # The snapshot holds a read connection for the whole diff (PostgreSQL: one of a bounded
        # pool): it is opened before the run takes a turn, never while holding one. A run that
        # held a turn while it waited for a connection, held by runs that waited for a turn,
        # was a deadlock as soon as more datasets synced at once than the pool had connections.
        # (A sync worker process reads the snapshot itself.)
        snapshot = await _opened(self.ledger.snapshot_pages(ds_id)) if self.remote is None else None
        try:
            async with _Turns(self.pacer) as turns:
                await self._diff(ds_id, run_id, counts, p, stop, turns, snapshot)
        finally:
            if snapshot is not None:
                await snapshot.aclose()

    def _cut_at(self, live: int) -> list[str]:
        """Where this run's listing is cut: the last run's split points (``live`` keys then),
        spread out to parts of about a page of the store's listing (``parallel.spread``)."""
        if isinstance(self.store, SplitListing):
            return spread(self.splits, live, self.store.page_size)
        return self.splits

    async def _diff(
        self,
        ds_id: int,
        run_id: int | None,
        counts: Counts,
        p: _Pending,
        stop: asyncio.Event | None,
        turns: _Turns,
        snapshot: AsyncGenerator[list[SnapshotRow]] | None,
    ) -> None:
        t0 = time.monotonic()
        self.touched = {k: t for k, t in self.touched.items() if t >= t0}
        quota = self.config.quota
        live = await self.ledger.live_count(ds_id) if quota is not None else 0
        # The one seam between listing + diffing and everything else: the steps come from this
        # process, or from a sync worker process (upstream/workers) that does the same there.
        splits = self._cut_at(p.sample.expected)
        if self.remote is not None:
            steps = self.remote.steps(ds_id, splits, p.gaps, p.sample)
        else:
            assert snapshot is not None  # opened by _walk before the run took its turn
            steps = listing_steps(self.store, self.filter, snapshot, splits, p.gaps, p.sample, CHECK_EVERY)
        # A stretch of at most CHECK_EVERY keys between two looks at the slice (pacing.py).
        async with contextlib.aclosing(steps):  # a run that stops early ends its listing (and its worker job) now
            while (step := await self._next(steps, turns, stop)) is not None:
                await turns.tick()
                counts.listed += len(step.keys)
                changes, unchanged = step.changes, step.unchanged
                if self.in_flight or self.touched:
                    changes, unchanged = self._settled(step, t0)
                counts.unchanged += unchanged
                for ch in changes:
                    self._take(ch, counts, p, quota, live)
                if len(p.adds) + len(p.updates) >= BATCH:
                    async with turns.paused():  # a commit waits for the disk, not for the CPU
                        await self._flush(ds_id, run_id, counts, p)
                    if stop is not None and stop.is_set():
                        raise Interrupted("interrupted by shutdown or reload; nothing was removed")

    async def _next(self, steps: AsyncIterator[Step], turns: _Turns, stop: asyncio.Event | None) -> Step | None:
        """The next step. In process, making it is this run's CPU work on the loop: within its
        turn. From a worker, it is a wait like a commit's: the turn goes to other runs meanwhile,
        or two runs waiting on their workers would hold every turn while the loop sits idle.

        A stop that comes during that wait ends it (``Interrupted``; what was listed before is
        still written): the agent's grace period is for batches being committed, not for a worker
        still starting or listing on a busy machine. Once stopped, a run goes on to the end of its
        batch as before (``_diff`` checks after each commit)."""
        if self.remote is None:
            return await anext(steps, None)
        async with turns.paused():
            if stop is None or stop.is_set():
                return await anext(steps, None)
            step = asyncio.ensure_future(anext(steps, None))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((step, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                if not step.done():
                    step.cancel()
                    await asyncio.gather(step, return_exceptions=True)
            if step.cancelled():
                raise Interrupted(
                    "interrupted by shutdown or reload while waiting for a sync worker; nothing was removed"
                )
            return step.result()

    def _owned(self, key: str, t0: float) -> bool:
        """Downstream owns ``key`` right now (writing it, or wrote it during this run): the run
        leaves it alone, and the next run sees it settled."""
        return key in self.in_flight or self.touched.get(key, -1.0) >= t0

    def _settled(self, step: Step, t0: float) -> tuple[list[Change], int]:
        """The step's changes and unchanged count without the keys downstream owns."""
        owned = {k for k in step.keys if self._owned(k, t0)}
        changes = [ch for ch in step.changes if ch.key not in owned and not self._owned(ch.key, t0)]
        # an owned key the diff found unchanged is in the count, not in the changes
        listed_changes = sum(1 for ch in step.changes if ch.new is not None and ch.key in owned)
        return changes, step.unchanged - (len(owned) - listed_changes)

    def _take(self, ch: Change, counts: Counts, p: _Pending, quota: int | None, live: int) -> None:
        """One key that is not an unchanged live item: into the batch, the removals or the counts."""
        kind, new, old = ch.kind, ch.new, ch.old
        if kind is ADDED:
            assert new is not None
            if quota is not None and live + counts.added >= quota:
                p.over_quota += 1
                if len(p.deferred) < MAX_DEFERRED:  # bounded: a rename target at quota, maybe
                    p.deferred.append(new)
                return
            counts.added += 1
            p.adds.append(new)
            if debug_enabled():  # per-key lines only when someone reads them: a bulk sync adds millions
                log.debug("added", key=new.key, size=new.size)
        elif old is not None and old.state != LIVE:
            # A tombstone: upstream never brings it back (invariant 3). Keep its info
            # current for a later restore; forget it once the object itself is gone.
            if kind is MODIFIED and new is not None:
                p.updates.append((old.id, new))
            elif kind is REMOVED:
                p.purges.append(old)
        elif kind is MODIFIED:
            assert new is not None and old is not None
            counts.modified += 1
            p.updates.append((old.id, new))
            if debug_enabled():
                log.debug("modified", key=new.key, size=new.size)
        elif kind is REMOVED:
            assert old is not None
            p.removals.append(old)
        else:
            counts.unchanged += 1

    async def _flush(self, ds_id: int, run_id: int | None, counts: Counts, p: _Pending) -> None:
        if not p.adds and not p.updates:
            return
        if run_id is None:  # dry run: remember the additions' signatures for rename matching
            p.dry_adds.extend((o.etag, o.size, o.key) for o in p.adds)
        else:
            await self.ledger.write_batch(ds_id, run_id, p.adds, p.updates, counts)
            p.committed = replace(counts)
            failpoints.hit("sync.after_batch")
        p.adds.clear()
        p.updates.clear()

    async def _match_renames(self, ds_id: int, run_id: int | None, counts: Counts, p: _Pending) -> None:
        """A removed key and an added key with the same etag and size are one item, moved."""
        sources = [*p.removals, *p.purges]
        if not sources:
            return
        sigs = {(o.etag, o.size) for o in sources if o.etag is not None}
        rescued = [o for o in p.deferred if (o.etag, o.size) in sigs]
        if rescued:  # a rename at quota adds nothing: let its new key in, to be paired below
            p.adds.extend(rescued)
            counts.added += len(rescued)
            p.over_quota -= len(rescued)
            await self._flush(ds_id, run_id, counts, p)
        by_sig: dict[tuple[str, int], list[tuple[int, str, bool]]] = defaultdict(list)
        if run_id is None:
            candidates = [(0, key, etag, size, True) for etag, size, key in p.dry_adds]
        else:
            last = await self.ledger.last_ok_run(ds_id)
            since = await self.ledger.added_since(ds_id, last.id if last else 0)
            # An item being removed is no rename target, not even of itself: one first seen after the
            # last listing (by events, or by a failed run) and gone now would otherwise "move" onto its
            # own key, and the rename would delete it past the guard.
            gone = {o.id for o in sources}
            candidates = [(i, k, e, s, first == run_id) for i, k, e, s, first in since if i not in gone]
        for new_id, key, etag, size, now in candidates:
            if etag is not None:
                by_sig[(etag, size)].append((new_id, key, now))
        pairs: list[tuple[int, int, str]] = []
        keep_keys = run_id is None or debug_enabled()  # for the dry-run plan or the debug log; bounded otherwise
        still_removed: list[Indexed] = []
        still_purged: list[Indexed] = []
        for old in sources:
            matches = by_sig.get((old.etag, old.size)) if old.etag is not None else None
            if matches:
                new_id, key, now = matches.pop(0)
                pairs.append((old.id, new_id, key))
                if now:
                    counts.added -= 1
                else:
                    counts.unchanged -= 1
                if old.state == LIVE:
                    counts.renamed += 1
                    if keep_keys and (len(p.renames) < PLAN_KEYS or debug_enabled()):
                        p.renames.append((old.key, key))
            elif old.state == LIVE:
                still_removed.append(old)
            else:
                still_purged.append(old)
        if not pairs:
            return
        p.removals, p.purges = still_removed, still_purged
        if run_id is not None:
            await self.ledger.rename(run_id, pairs, counts)
            p.committed = replace(counts)
        if debug_enabled():
            for old_key, new_key in p.renames:
                log.debug("renamed", key=new_key, old_key=old_key)

    async def _remove(self, run_id: int | None, counts: Counts, p: _Pending) -> None:
        if debug_enabled():
            for o in p.removals:
                log.debug("removed", key=o.key)
        ids = [o.id for o in p.removals]
        counts.removed += len(ids)
        if run_id is None:
            return
        for i in range(0, len(ids), BATCH):
            # The run's row counts each batch as it commits; a failure leaves what committed.
            done = replace(counts, removed=counts.removed - len(ids) + min(len(ids), i + BATCH))
            await self.ledger.remove(run_id, ids[i : i + BATCH], done)
            p.committed = done
        if p.purges:
            await self.ledger.remove(None, [o.id for o in p.purges])

    def _record(
        self,
        status: RunStatus,
        counts: Counts,
        seconds: float,
        dry_run: bool,
        error: str | None,
        gaps: list[ListingGap],
    ) -> None:
        fields = counts.as_dict()
        if status is RunStatus.OK:
            changed = counts.added or counts.modified or counts.removed or counts.renamed or counts.errors
            level = "info" if changed or dry_run else self.no_change_log_level
            log.log(_LEVELS[level], "run finished", status=str(status), seconds=round(seconds, 3), **fields)
        else:
            extra = {"gaps": [g.prefix for g in gaps]} if gaps else {}
            log.warning("run finished", status=str(status), seconds=round(seconds, 3), error=error, **extra, **fields)
        if dry_run:
            return
        metrics.record_run(self.name, str(status), counts, seconds)
        if self.config.sync == "events" and self.listings and status is not RunStatus.FAILED:
            _record_drift(self.name, counts)
        self.listings += 1
        if status is not RunStatus.FAILED:  # a failed run says nothing about the guard
            self.set_guard_blocked(status is RunStatus.ABORTED)

    def set_guard_blocked(self, blocked: bool) -> None:
        self.guard_blocked = blocked
        metrics.GUARD_BLOCKED.labels(self.name).set(blocked)

    async def run(
        self,
        stop: asyncio.Event,
        on_error: Callable[[Exception], None] | None = None,
        on_result: Callable[[RunResult], None] | None = None,
    ) -> None:
        """Loop ``run_once`` until ``stop``: every ``interval`` (with jitter) for ``poll``
        datasets, only when woken for ``manual`` ones. A failing run backs off and the
        loop goes on; it never takes the other datasets down with it."""
        failures = 0
        first = True
        while not stop.is_set():
            if first and self.resync:  # lost ledger commits: a full re-sync now, even for manual
                delay = 0.0
            elif self.config.sync == "manual":
                delay = None
            elif first:  # sync at start-up; a little jitter keeps many datasets from starting in lockstep
                delay = random.uniform(0, min(1.0, self.period / 10))
            elif failures:
                delay = min(self.period, 5.0 * 2 ** min(failures - 1, 8)) * random.uniform(0.8, 1.0)
            else:
                delay = self.period * random.uniform(0.9, 1.1)
            self.next_run_at = time.time() + delay if delay is not None else None
            await _wait_any(stop, self.wake, delay)
            self.wake.clear()
            first = False
            if stop.is_set():
                break
            try:
                result = await self.run_once(stop=stop)
                failures = failures + 1 if result.status is RunStatus.FAILED else 0
                if on_result is not None:
                    on_result(result)
            except Exception as exc:  # a bug or the ledger failing: log, count, back off, go on
                failures += 1
                metrics.LOOP_ERRORS.labels(self.name).inc()
                if isinstance(exc, LedgerError):  # a full disk, say: the message says it all
                    log.error("sync loop error", dataset=self.name, error=str(exc))
                else:
                    log.exception("sync loop error", dataset=self.name)
                if on_error is not None:
                    on_error(exc)


async def _opened(pages: AsyncIterator[list[SnapshotRow]]) -> AsyncGenerator[list[SnapshotRow]]:
    """``pages`` with its first page already fetched (the query sent, its connection taken)."""
    first = await anext(pages, None)

    async def rest() -> AsyncGenerator[list[SnapshotRow]]:
        try:
            if first is None:
                return
            yield first
            async for page in pages:
                yield page
        finally:
            if isinstance(pages, AsyncGenerator):
                await pages.aclose()  # an abandoned walk gives its connection back now, not at GC

    return rest()


class _Turns:
    """A run's turns on the event loop (see ``Pacer``): held while it diffs, given up
    when its slice is used up and while it waits for a commit."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer
        self.held = False
        self.since = 0.0

    async def __aenter__(self) -> _Turns:
        self.since = await self.pacer.acquire()
        self.held = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._give_up()

    def _give_up(self) -> None:
        if self.held:
            self.held = False
            self.pacer.release()

    async def tick(self) -> None:
        """Between two steps of the diff: give the loop up if the slice is used up."""
        if self.pacer.due(self.since):
            self._give_up()
            await asyncio.sleep(0)
            self.since = await self.pacer.acquire()
            self.held = True

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        self._give_up()
        try:
            yield
        finally:
            self.since = await self.pacer.acquire()
            self.held = True


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, timeout: float | None) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _record_drift(dataset: str, counts: Counts) -> None:
    """What a reconcile changed is what the events missed (or what they had not applied yet)."""
    for change in metrics.CHANGES:
        if n := getattr(counts, change):
            metrics.RECONCILE_DRIFT.labels(dataset, change).inc(n)
    if counts.added or counts.modified or counts.removed or counts.renamed:
        log.info("reconcile found drift", **{c: getattr(counts, c) for c in metrics.CHANGES})


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _plan(p: _Pending, counts: Counts) -> Plan:
    return Plan(
        removals=len(p.removals),
        renames=counts.renamed,
        remove_keys=[o.key for o in p.removals[:PLAN_KEYS]],
        rename_keys=p.renames[:PLAN_KEYS],
    )


#: how many gaps a run's error message names (the run record's ``gaps`` has them all)
NAMED_GAPS = 5


def _describe_gaps(gaps: list[ListingGap]) -> str:
    named = "; ".join(g.error for g in gaps[:NAMED_GAPS])
    more = f"; and {len(gaps) - NAMED_GAPS} more" if len(gaps) > NAMED_GAPS else ""
    what = "part" if len(gaps) == 1 else "parts"
    return (
        f"{len(gaps)} {what} of the listing could not be read and kept their last known state "
        f"(nothing there was removed or changed): {named}{more}"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, BucketsyncError) else f"{type(exc).__name__}: {text}"
