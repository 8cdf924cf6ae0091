"""The agent: the single-instance lock, the ledger, one store per driver, one loop per dataset.

The daemon (``bucketsync run``) and the CLI's in-process commands share it, so a
one-off ``bucketsync sync`` does exactly what the daemon's loop does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog

from bucketsync import metrics
from bucketsync.catalog import items as catalog_items
from bucketsync.catalog.links import LinkFiles
from bucketsync.config import DatasetConfig, Settings
from bucketsync.core.errors import ConfigError
from bucketsync.core.model import COUNTED_STATES, RunRecord, RunStatus, iso
from bucketsync.downstream.outbox import Outbox
from bucketsync.enrich import Enricher, Triggers
from bucketsync.ledger.ledger import Ledger
from bucketsync.ledger.sqlite import InstanceLock
from bucketsync.stores import Store, open_store, store_spec
from bucketsync.upstream.pacing import Pacer
from bucketsync.upstream.probe import ProbeResult
from bucketsync.upstream.sync import SyncLoop
from bucketsync.upstream.workers import SyncWorkers, WorkerDiff

if TYPE_CHECKING:
    from bucketsync.daemon.leases import LeaseKeeper

log = structlog.get_logger("bucketsync.agent")


class Agent:
    def __init__(self, settings: Settings, *, shared: bool = False, sync_workers: int = 0) -> None:
        self.settings = settings
        #: worker processes for the runs' listing and diff (the daemon's ``agent.sync_workers``;
        #: the CLI's one-off commands run in process)
        self.sync_workers = sync_workers
        self.workers: SyncWorkers | None = None
        self._generations = itertools.count(1)
        #: one of several daemons dividing a PostgreSQL ledger's datasets by leases (``leases``)
        self.shared = shared
        #: the lease loop when ``shared``: which datasets this agent syncs, and their fences
        self.leases: LeaseKeeper | None = None
        #: closed before the ledger when the agent closes (the lease loop's connections)
        self.closing: list[Callable[[], Awaitable[None]]] = []
        #: one agent per SQLite file (invariant 10); a PostgreSQL ledger's is a lock in the database
        self.lock = InstanceLock(file) if (file := settings.agent.ledger_file) is not None else None
        self.ledger: Ledger | None = None
        self.stores: dict[str, Store] = {}
        self.loops: dict[str, SyncLoop] = {}
        #: dataset -> why it is not ready (failed permission probe, ...); absent when ready
        self.not_ready: dict[str, str] = {}
        #: dataset -> the probe that found storage refusing its writes; absent when writes work
        #: (or are not needed). Such a dataset still syncs; the gate refuses writes up front.
        self.downstream_unavailable: dict[str, ProbeResult] = {}
        #: the start-up quick_check's finding when the ledger is damaged (not ready until fixed)
        self.ledger_problem: str | None = None
        self.outbox = Outbox(self)
        #: enrichment and trigger deliveries: tasks of their own that follow the ledger's queues
        self.enricher = Enricher(self)
        self.triggers = Triggers(self)
        #: synced *.link.json objects, read in the background into linked items (catalog/links.py)
        self.link_files = LinkFiles(self)
        self.pacer = Pacer()  # every dataset's runs take turns on the one event loop
        #: events-mode dataset -> its event source's state: (source, None when it delivers else why it failed)
        self.event_sources: dict[str, tuple[str, str | None]] = {}
        #: events-mode dataset -> set when events land in its durable inbox (the webhook routes)
        self.inboxes: dict[str, asyncio.Event] = {}
        #: webhook datasets whose inbox is at events.inbox_max (posted events are deferred to a reconcile)
        self.inbox_full: set[str] = set()
        #: set when a start fails: a ledger this agent created is removed when it closes
        self.discard_new_ledger = False
        self._created_ledger = self._created_folder = False

    async def __aenter__(self) -> Agent:
        conf = self.settings.agent
        if conf.ledger_file is not None and self.lock is not None:
            created_folder = not conf.ledger_file.parent.exists()
            self.lock.acquire()
            self._created_ledger = not conf.ledger_file.exists()
            self._created_folder = created_folder
        try:
            self.ledger = await Ledger.open(conf.ledger, password=conf.ledger_password())
            await self.ledger.claim(shared=self.shared)
            if self.ledger.rolled_back is not None:
                seq, mirrored = self.ledger.rolled_back
                await self.ledger.mark_resync(
                    self.settings.datasets, f"the ledger lost committed transactions (seq {seq} < sidecar {mirrored})"
                )
            # Shared: another agent's runs are its own; a dataset's claimer fails its stale runs.
            if not self.shared and (n := await self.ledger.fail_stale_runs()):
                log.warning("marked runs left running by a previous agent as failed", runs=n)
            resync = await self.ledger.resync_pending()
            for name in self.settings.datasets:
                await self.ledger.dataset_id(name)  # a row from the start: metadata and filters find it
            await self.ensure_indexes()
            for name, driver in self.settings.drivers.items():
                self.stores[name] = open_store(driver, self.settings)
            if self.sync_workers:
                self.workers = SyncWorkers(self.sync_workers, conf.log_level, conf.log_format, conf.sync_workers_nice)
                await self.workers.start(wait=False)  # they start while the agent does
            for name, ds in self.settings.datasets.items():
                loop = self.loops[name] = self.make_loop(name, ds, self.stores[ds.driver])
                loop.resync = name in resync
            # Before any run commits: the ledger queues enrichment and events only for these.
            await self.enricher.sync_datasets()
        except BaseException:
            self.discard_new_ledger = True
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self.triggers.aclose()
        if self.workers is not None:
            await self.workers.aclose()
        for close in self.closing:
            with contextlib.suppress(Exception):
                await close()
        for store in self.stores.values():
            try:
                await store.aclose()
            except Exception:
                log.exception("closing a store failed", store=store.url)
        try:
            if self.ledger is not None:
                await self.ledger.close()
        finally:
            file = self.settings.agent.ledger_file
            if self.discard_new_ledger and self._created_ledger and file is not None:
                remove_ledger_files(file, folder=self._created_folder)
            if self.lock is not None:
                self.lock.release()

    async def ensure_indexes(self) -> None:
        """Each dataset's configured ``indexes`` (a partial index per dataset; built once)."""
        assert self.ledger is not None
        for dataset, ds in self.settings.datasets.items():
            for name in ds.indexes:
                if await catalog_items.ensure_index(self.ledger, await self.ledger.dataset_id(dataset), name):
                    log.info("indexed a catalog field", dataset=dataset, field=name)

    def unready(self) -> dict[str, Any] | None:
        """The ``/readyz`` body when the agent is not ready: the datasets that are not, and
        ``ledger`` while ledger writes fail (a full disk); None when all is ready."""
        fault = self.ledger.fault if self.ledger is not None else None
        fault = fault or self.ledger_problem
        if not self.not_ready and fault is None:
            return None
        out: dict[str, Any] = {"status": "not ready", "datasets": dict(self.not_ready)}
        if fault is not None:
            out["ledger"] = fault
        return out

    def make_loop(self, name: str, ds: DatasetConfig, store: Store) -> SyncLoop:
        """A dataset's loop, the same whether built at start or by a reload: the shared pacer and log level."""
        assert self.ledger is not None
        return SyncLoop(
            name,
            ds,
            store,
            self.ledger,
            self.pacer,
            no_change_log_level=self.settings.agent.no_change_log_level,
            remote=self._remote(name, ds),
        )

    def _remote(self, name: str, ds: DatasetConfig) -> WorkerDiff | None:
        """With sync workers, where the dataset's runs list and diff: a new generation per loop
        (a reload builds a new store here, so the worker opens a new one too)."""
        if self.workers is None:
            return None
        conf = self.settings.agent
        return WorkerDiff(
            self.workers,
            name,
            next(self._generations),
            store_spec(self.settings.drivers[ds.driver], self.settings),
            tuple(ds.include),
            tuple(ds.exclude),
            str(conf.ledger),
            conf.ledger_password(),
        )

    def loop(self, dataset: str) -> SyncLoop:
        try:
            return self.loops[dataset]
        except KeyError:
            self.settings.dataset(dataset)  # raises ConfigError naming the known datasets
            raise ConfigError(f"no dataset named {dataset!r}") from None

    def storage_denies(self, dataset: str) -> str | None:
        """Why storage refuses writes for ``dataset`` (put, and delete with ``allow_delete``), as the
        probe found; None when it takes them. Downstream is all or nothing: with put denied, a
        delete could not even be tested, and half a downstream is not one a user can rely on."""
        found = self.downstream_unavailable.get(dataset)
        return None if found is None else found.downstream_summary()

    def set_ready(self, dataset: str, reason: str | None) -> None:
        """Record the dataset's readiness (None: ready) and its gauge."""
        if reason is None:
            self.not_ready.pop(dataset, None)
        else:
            self.not_ready[dataset] = reason
        metrics.DATASET_READY.labels(dataset).set(reason is None)

    def set_downstream(self, dataset: str, found: ProbeResult | None) -> None:
        """Record whether writes through the dataset reach storage (None: they do) and its gauge."""
        if found is None or found.downstream_ok:
            self.downstream_unavailable.pop(dataset, None)
        else:
            self.downstream_unavailable[dataset] = found
        metrics.DOWNSTREAM_AVAILABLE.labels(dataset).set(dataset not in self.downstream_unavailable)

    def health(self, dataset: str) -> dict[str, Any]:
        """What a running agent knows of the dataset beyond the ledger (``/readyz`` detail)."""
        loop = self.loops.get(dataset)
        down = self.downstream_unavailable.get(dataset)
        return {
            "ready": dataset not in self.not_ready,
            "reason": self.not_ready.get(dataset),
            "downstream": "available" if down is None else "unavailable",
            "downstream_reason": down.downstream_summary() if down is not None else None,
            "guard_blocked": bool(loop and loop.guard_blocked),
            "events": self._events_health(dataset),
        }

    def _events_health(self, dataset: str) -> dict[str, Any] | None:
        """Events mode: which source, and whether it delivers (``up``) or failed (``degraded``:
        the dataset polls at its interval meanwhile); None for other modes."""
        ds = self.settings.datasets.get(dataset)
        if ds is None or ds.sync != "events":
            return None
        source, failure = self.event_sources.get(dataset, (self.settings.drivers[ds.driver].event_source(), None))
        started = dataset in self.event_sources
        state = "degraded" if failure is not None else ("up" if started else "starting")
        return {"source": source, "state": state, "reason": failure}

    def inbox(self, dataset: str) -> asyncio.Event:
        """The wake-up of the dataset's inbox reader (created on first use by either side)."""
        return self.inboxes.setdefault(dataset, asyncio.Event())

    def live_status(self, dataset: str) -> dict[str, Any]:
        """The fields of ``datasets_status`` only a running agent can fill in."""
        h = self.health(dataset)
        return {
            "ready": h["ready"],
            "not_ready_reason": h["reason"],
            "downstream": h["downstream"],
            "downstream_reason": h["downstream_reason"],
        }

    async def refresh_item_gauges(self, dataset: str) -> None:
        assert self.ledger is not None
        ds_id = await self.ledger.dataset_id(dataset)
        metrics.set_dataset_items(dataset, await self.ledger.counts_by_state(ds_id))


def remove_ledger_files(ledger: Path, *, folder: bool) -> None:
    """Remove a ledger this process created (and its companions) after a failed start,
    and its folder too when this process created that (and it is empty)."""
    for suffix in ("", "-wal", "-shm", "-journal", ".seq", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{ledger}{suffix}").unlink()
    for path in (ledger.parent / "staging", ledger.parent) if folder else ():
        with contextlib.suppress(OSError):  # only when empty: never anything of the user's
            path.rmdir()


async def datasets_status(
    settings: Settings,
    ledger: Ledger | None,
    loops: dict[str, SyncLoop],
    names: list[str] | None = None,
    described: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The status of ``names`` (default: every configured dataset) from one ledger overview.

    A few queries whatever the number of datasets, items or runs, and one while nothing
    changed: ``GET /datasets`` is polled by dashboards, and recounting every dataset per
    request saturated the agent.
    """
    if described is None:
        described = await ledger.described() if ledger is not None else ({}, {}, {})
    overview, _, meta = described  # a caller that already read it passes it: one read per request
    return [
        _status_row(settings, name, overview.get(name), loops.get(name)) | {"metadata": meta.get(name, {})}
        for name in (names if names is not None else settings.datasets)
    ]


def _status_row(
    settings: Settings, name: str, known: tuple[dict[str, int], RunRecord | None] | None, loop: SyncLoop | None
) -> dict[str, Any]:
    ds = settings.datasets[name]
    driver = settings.drivers[ds.driver]
    items, last = known if known is not None else ({str(s): 0 for s in COUNTED_STATES}, None)
    items = dict(items)  # the overview is shared between requests
    out: dict[str, Any] = {
        "dataset": name,
        "kind": "synced",
        "source": None,
        "driver": ds.driver,
        "url": driver.url,
        "sync": ds.sync,
        "interval": ds.interval,
        "read_only": ds.read_only,
        "allow_delete": driver.allow_delete,
        "items": items,
        "last_run": last.as_json() if last is not None else None,
        "next_run": None,
        "running": None,
        "ready": None,  # known only to a running agent (its permission probe)
        "not_ready_reason": None,
        "downstream": None,  # "available" | "unavailable": known only to a running agent
        "downstream_reason": None,
        # the last run was stopped by the mass-delete guard: nothing is removed until a forced run
        "guard_blocked": last is not None and last.status is RunStatus.ABORTED,
    }
    if loop is not None:
        out["next_run"] = iso(loop.next_run_at) if loop.next_run_at and loop.next_run_at > time.time() else None
        if loop.progress is not None:
            out["running"] = {"run": loop.current_run, **loop.progress.as_dict()}
    return out
