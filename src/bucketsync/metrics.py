"""Prometheus metrics, on one registry served at ``/metrics``.

Every labelled counter is created at 0 for each label value known at start
(``init``): a series that appears only with its first increment makes ``rate()``
and ``increase()`` miss that increment, and alerts on absence cannot be written.
The README lists every metric; a test compares that list with a running agent.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from bucketsync import __version__
from bucketsync.core.errors import FetchRefused
from bucketsync.core.model import COUNTED_STATES, Counts, OpKind, RunStatus

if TYPE_CHECKING:
    from bucketsync.config import DatasetConfig, Settings

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the scrape for no use here
REGISTRY = CollectorRegistry()
# process_* (CPU, memory, fds, start time) and python_info, on our registry rather than the global one.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

BUILD_INFO = Gauge(
    "bucketsync_build_info",
    "Always 1; the labels say which bucketsync and which Python are running.",
    ["version", "python"],
    registry=REGISTRY,
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)

RUNS = Counter(
    "bucketsync_runs_total", "Upstream sync runs, by dataset and status.", ["dataset", "status"], registry=REGISTRY
)
#: the change kinds of ``bucketsync_items_total`` (listing is not a change: it has its own counter)
CHANGES = ("added", "modified", "removed", "renamed")
ITEMS = Counter(
    "bucketsync_items_total",
    "Items changed by upstream runs, by dataset and change (added, modified, removed, renamed).",
    ["dataset", "change"],
    registry=REGISTRY,
)
LISTED = Counter(
    "bucketsync_listed_objects_total",
    "Objects listed in storage by upstream runs (changed or not), by dataset.",
    ["dataset"],
    registry=REGISTRY,
)
RUN_SECONDS = Histogram(
    "bucketsync_run_duration_seconds",
    "Wall time of upstream sync runs.",
    ["dataset"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "bucketsync_last_success_timestamp_seconds",
    "When the dataset's last successful run ended (POSIX seconds).",
    ["dataset"],
    registry=REGISTRY,
)
DATASET_ITEMS = Gauge(
    "bucketsync_dataset_items", "Items in the ledger, by dataset and state.", ["dataset", "state"], registry=REGISTRY
)
GUARD_ABORTS = Counter(
    "bucketsync_guard_aborts_total",
    "Runs stopped by the mass-delete guard, by dataset and reason.",
    ["dataset", "reason"],
    registry=REGISTRY,
)
RUN_ERRORS = Counter(
    "bucketsync_run_errors_total", "Errors met by upstream runs (failed listings).", ["dataset"], registry=REGISTRY
)
LOOP_ERRORS = Counter(
    "bucketsync_loop_errors_total", "Unexpected errors in a dataset's sync loop.", ["dataset"], registry=REGISTRY
)
LISTING_GAPS = Gauge(
    "bucketsync_listing_gaps",
    "Parts of the dataset's storage (sub-folders, prefixes) its last completed listing could not read; "
    "their items kept their last known state. Non-zero means the run ended partial.",
    ["dataset"],
    registry=REGISTRY,
)


LOOP_RESTARTS = Counter(
    "bucketsync_loop_restarts_total",
    "Dataset loops that died (an exception escaped them) and were restarted with backoff.",
    ["dataset"],
    registry=REGISTRY,
)
#: what happened to a lease held by this agent (a PostgreSQL ledger shared by several agents)
LEASE_CHANGES_KINDS = ("claimed", "released", "lost")
LEASE_CHANGES = Counter(
    "bucketsync_lease_changes_total",
    "This agent's lease changes per dataset: claimed (it took the dataset), released (it gave it up to "
    "rebalance or on stopping), lost (a renewal or a fenced write found another owner or the lease expired).",
    ["dataset", "change"],
    registry=REGISTRY,
)
LEASES_OWNED = Gauge(
    "bucketsync_leases_owned",
    "Datasets whose lease this agent holds now (a PostgreSQL ledger shared by agents; 0 on SQLite).",
    registry=REGISTRY,
)
LEDGER_WRITE_ERRORS = Counter(
    "bucketsync_ledger_write_errors_total",
    "Ledger writes that failed, by reason (disk_full, permission, damaged, io, busy, other).",
    ["reason"],
    registry=REGISTRY,
)
LEDGER_WRITABLE = Gauge(
    "bucketsync_ledger_writable",
    "1 while ledger writes succeed, 0 since the last one failed (a full disk, for example).",
    registry=REGISTRY,
)
LEDGER_CHECK = Gauge(
    "bucketsync_ledger_quick_check",
    "Result of the start-up PRAGMA quick_check: 1 for the result it had (ok, damaged, incomplete).",
    ["result"],
    registry=REGISTRY,
)
LEDGER_ROLLBACKS = Counter(
    "bucketsync_ledger_rollbacks_detected_total",
    "Start-ups that found the ledger older than its commit-sequence sidecar (a lost -wal or a restored copy).",
    registry=REGISTRY,
)
SYNC_WORKER_DEATHS = Counter(
    "bucketsync_sync_worker_deaths_total",
    "Sync worker processes (agent.sync_workers) that ended unasked; each is replaced, and its runs fail.",
    registry=REGISTRY,
)
SYNC_WORKERS = Gauge(
    "bucketsync_sync_workers",
    "Sync worker processes running now (agent.sync_workers; 0: runs list and diff in the agent's process).",
    registry=REGISTRY,
)
for _reason in ("disk_full", "permission", "damaged", "io", "busy", "other"):
    LEDGER_WRITE_ERRORS.labels(_reason)
LEDGER_WRITABLE.set(1)

QUOTA_SKIPPED = Counter(
    "bucketsync_quota_skipped_total",
    "New objects an upstream run did not add because the dataset was at its quota.",
    ["dataset"],
    registry=REGISTRY,
)
DOWNSTREAM_OPS = Counter(
    "bucketsync_downstream_ops_total",
    "Downstream operations (put, delete) by result (ok, retry, or the error code).",
    ["op", "result"],
    registry=REGISTRY,
)
TOMBSTONES = Counter(
    "bucketsync_tombstones_total",
    "Items tombstoned because the driver does not allow deletes.",
    ["dataset"],
    registry=REGISTRY,
)
GATE_REFUSALS = Counter(
    "bucketsync_gate_refusals_total",
    "Downstream operations the gate refused, by reason.",
    ["reason"],
    registry=REGISTRY,
)
LINK_FETCHES = Counter(
    "bucketsync_link_fetches_total",
    "Server-side fetches of URLs (linked items' content, CSV upload rows), by result: ok, or the reason "
    "the SSRF policy refused one (loopback, private, metadata, ...) or it failed (too_large, too_slow, ...).",
    ["result"],
    registry=REGISTRY,
)
OUTBOX_BACKLOG = Gauge(
    "bucketsync_outbox_backlog",
    "Pending downstream operations in the outbox, by dataset.",
    ["dataset"],
    registry=REGISTRY,
)
DATASET_READY = Gauge(
    "bucketsync_dataset_ready",
    "1 when the dataset can be synced (its permission probe passed list and get), else 0.",
    ["dataset"],
    registry=REGISTRY,
)
DOWNSTREAM_AVAILABLE = Gauge(
    "bucketsync_downstream_available",
    "0 when storage refuses the dataset's writes (the probe's put, or delete with allow_delete, failed), else 1.",
    ["dataset"],
    registry=REGISTRY,
)
GUARD_BLOCKED = Gauge(
    "bucketsync_guard_blocked",
    "1 when the dataset's last run was stopped by the mass-delete guard (nothing removed until a forced run), else 0.",
    ["dataset"],
    registry=REGISTRY,
)
PRUNED = Counter(
    "bucketsync_pruned_total",
    "Runs and finished ops deleted from the ledger by retention, by kind (runs, ops).",
    ["kind"],
    registry=REGISTRY,
)

DATASET_INTERVAL = Gauge(
    "bucketsync_dataset_interval_seconds",
    "The configured poll interval of each running poll dataset (alerts count missed runs in intervals).",
    ["dataset"],
    registry=REGISTRY,
)

# -- events mode (upstream/events/) ---------------------------------------------------
EVENTS_RECEIVED = Counter(
    "bucketsync_events_received_total",
    "Change events an event source delivered, by dataset (each is a hint; a HEAD decides).",
    ["dataset"],
    registry=REGISTRY,
)
EVENTS_APPLIED = Counter(
    "bucketsync_events_applied_total",
    "Events whose key was HEADed and applied to the catalog (changed or found unchanged), by dataset.",
    ["dataset"],
    registry=REGISTRY,
)
EVENTS_DROPPED = Counter(
    "bucketsync_events_dropped_total",
    "Events not applied, by dataset and reason: stale (an older ordering token), filtered (hidden folder, "
    "folder marker, include/exclude), in_flight (an outbox write owns the key), quota, guard (a burst of "
    "removals held for a reconcile), head_error (left to a reconcile), inbox_full (a webhook dataset's inbox "
    "was at events.inbox_max: left to the reconcile listing requested then).",
    ["dataset", "reason"],
    registry=REGISTRY,
)
EVENT_LATENCY = Histogram(
    "bucketsync_event_latency_seconds",
    "From the change in storage (as the event says) to its commit in the catalog.",
    ["dataset"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    registry=REGISTRY,
)
EVENT_SOURCE_UP = Gauge(
    "bucketsync_event_source_up",
    "1 while the events-mode dataset's event source delivers; 0 while it failed and the dataset polls at "
    "its interval (degraded).",
    ["dataset"],
    registry=REGISTRY,
)
RECONCILE_DRIFT = Counter(
    "bucketsync_reconcile_drift_total",
    "Changes a reconcile (the periodic full listing of an events-mode dataset) found that events had missed, "
    "by dataset and change (added, modified, removed, renamed).",
    ["dataset", "change"],
    registry=REGISTRY,
)
EVENT_DROP_REASONS = ("stale", "filtered", "in_flight", "quota", "guard", "head_error", "inbox_full")
ENRICH_TOTAL = Counter(
    "bucketsync_enrich_total",
    "Items enriched, by dataset and result (done, failed, retry).",
    ["dataset", "result"],
    registry=REGISTRY,
)
ENRICH_QUEUE = Gauge(
    "bucketsync_enrich_queue",
    "Items waiting for enrichment (state pending), by dataset.",
    ["dataset"],
    registry=REGISTRY,
)
ENRICH_SECONDS = Histogram(
    "bucketsync_enrich_seconds",
    "Time to enrich one item (reads, sniff, thumbnail, write), by dataset.",
    ["dataset"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
ENRICH_BYTES_READ = Counter(
    "bucketsync_enrich_read_bytes_total",
    "Bytes read from storage for enrichment (ranged header reads and whole objects for thumbnails), by dataset.",
    ["dataset"],
    registry=REGISTRY,
)
TRIGGER_DELIVERIES = Counter(
    "bucketsync_trigger_deliveries_total",
    "Trigger delivery attempts, by dataset, trigger and result (ok, retry, dead).",
    ["dataset", "trigger", "result"],
    registry=REGISTRY,
)
TRIGGER_BACKLOG = Gauge(
    "bucketsync_trigger_backlog",
    "Trigger deliveries waiting (pending), by dataset.",
    ["dataset"],
    registry=REGISTRY,
)
TRIGGER_DEAD = Gauge(
    "bucketsync_trigger_dead",
    "Trigger deliveries dead-lettered after their last attempt, by dataset.",
    ["dataset"],
    registry=REGISTRY,
)

ENRICH_RESULTS = ("done", "failed", "retry")
DELIVERY_RESULTS = ("ok", "retry", "dead")

#: label values known up front (see ``init``)
GUARD_REASONS = ("listing_incomplete", "max_delete_count", "max_delete_ratio")
REFUSAL_REASONS = ("read_only", "quota", "allow_delete_off", "storage_denied_writes")
OP_RESULTS = (
    "ok",
    "retry",
    "already_exists",
    "precondition_failed",
    "not_found",
    "key_not_storable",
    "file_folder_conflict",
    "storage_error",
)


#: every result of a link fetch: ok, and each reason a fetch is refused or fails for
FETCH_RESULTS = ("ok", *FetchRefused.REASONS)


def init(datasets: Mapping[str, DatasetConfig], *, shared: bool = False) -> None:
    """Create every series a dataset can have at 0 (and the gauges at their start values), so that
    ``rate()`` works from the first scrape. The event series only for a dataset in events mode, the
    lease series only for agents sharing a ledger: a series that can never move would only make
    every scrape longer (an agent of 50 polled datasets rendered 1,500 such lines each time)."""
    for kind in ("runs", "ops"):
        PRUNED.labels(kind)
    for reason in REFUSAL_REASONS:
        GATE_REFUSALS.labels(reason)
    for result in FETCH_RESULTS:
        LINK_FETCHES.labels(result)
    for op in OpKind:
        for result in OP_RESULTS:
            DOWNSTREAM_OPS.labels(str(op), result)
    for ds in datasets:
        for status in (RunStatus.OK, RunStatus.PARTIAL, RunStatus.FAILED, RunStatus.ABORTED):
            RUNS.labels(ds, str(status))
        for change in CHANGES:
            ITEMS.labels(ds, change)
        for reason in GUARD_REASONS:
            GUARD_ABORTS.labels(ds, reason)
        for state in COUNTED_STATES:
            DATASET_ITEMS.labels(ds, str(state))
        for counter in (LISTED, RUN_ERRORS, LOOP_ERRORS, LOOP_RESTARTS, QUOTA_SKIPPED, TOMBSTONES):
            counter.labels(ds)
        for change in LEASE_CHANGES_KINDS if shared else ():
            LEASE_CHANGES.labels(ds, change)
        RUN_SECONDS.labels(ds)
        OUTBOX_BACKLOG.labels(ds).set(0)
        DATASET_READY.labels(ds).set(0)  # until its probe passes
        DOWNSTREAM_AVAILABLE.labels(ds).set(1)
        GUARD_BLOCKED.labels(ds).set(0)
    init_events(ds for ds, conf in datasets.items() if conf.sync == "events")


def init_events(datasets: Iterable[str]) -> None:
    """The event series at 0 for datasets in events mode (at start, or when a reload puts one there)."""
    for ds in datasets:
        for counter in (EVENTS_RECEIVED, EVENTS_APPLIED):
            counter.labels(ds)
        for reason in EVENT_DROP_REASONS:
            EVENTS_DROPPED.labels(ds, reason)
        for change in CHANGES:
            RECONCILE_DRIFT.labels(ds, change)
        EVENT_LATENCY.labels(ds)


def init_hooks(settings: Settings) -> None:
    """Enrichment and trigger series at 0 for the datasets that have them."""
    for ds, conf in settings.datasets.items():
        if settings.enriches(ds):
            for result in ENRICH_RESULTS:
                ENRICH_TOTAL.labels(ds, result)
            ENRICH_QUEUE.labels(ds).set(0)
            ENRICH_SECONDS.labels(ds)
            ENRICH_BYTES_READ.labels(ds)
        if conf.triggers:
            for name in conf.trigger_names():
                for result in DELIVERY_RESULTS:
                    TRIGGER_DELIVERIES.labels(ds, name, result)
            TRIGGER_BACKLOG.labels(ds).set(0)
            TRIGGER_DEAD.labels(ds).set(0)


def set_per_dataset(gauge: Gauge, by_dataset: dict[str, int]) -> None:
    """A per-dataset gauge from counts; a dataset it had that is absent from ``by_dataset`` is 0."""
    for family in gauge.collect():
        for sample in family.samples:
            if (name := sample.labels["dataset"]) not in by_dataset:
                gauge.labels(name).set(0)
    for name, n in by_dataset.items():
        gauge.labels(name).set(n)


def set_backlog(by_dataset: dict[str, int]) -> None:
    """Pending ops per dataset; a dataset absent from ``by_dataset`` has none."""
    for family in OUTBOX_BACKLOG.collect():
        for sample in family.samples:
            if (name := sample.labels["dataset"]) not in by_dataset:
                OUTBOX_BACKLOG.labels(name).set(0)
    for name, n in by_dataset.items():
        OUTBOX_BACKLOG.labels(name).set(n)


def publish_dataset(dataset: str, interval: float | None, last_success: float | None) -> None:
    """A dataset (re)starts: its interval, and its last success as the ledger knows it (so a restart
    does not hide how long ago that was)."""
    if interval is not None:
        DATASET_INTERVAL.labels(dataset).set(interval)
    else:
        forget(DATASET_INTERVAL, dataset)
    if last_success is not None:
        LAST_SUCCESS.labels(dataset).set(last_success)


def forget_dataset(dataset: str) -> None:
    """A dataset left the config: its gauges go, so no alert fires for what no longer runs."""
    for gauge in (
        DATASET_INTERVAL,
        LAST_SUCCESS,
        OUTBOX_BACKLOG,
        DATASET_READY,
        DOWNSTREAM_AVAILABLE,
        GUARD_BLOCKED,
        EVENT_SOURCE_UP,
    ):
        forget(gauge, dataset)


def forget(gauge: Gauge, dataset: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(dataset)


def record_run(dataset: str, status: str, counts: Counts, seconds: float) -> None:
    RUNS.labels(dataset, status).inc()
    RUN_SECONDS.labels(dataset).observe(seconds)
    if counts.listed:
        LISTED.labels(dataset).inc(counts.listed)
    for change in CHANGES:
        if n := getattr(counts, change):
            ITEMS.labels(dataset, change).inc(n)

    if counts.errors:
        RUN_ERRORS.labels(dataset).inc(counts.errors)
    if status == "ok":
        LAST_SUCCESS.labels(dataset).set(time.time())


def set_dataset_items(dataset: str, by_state: dict[str, int]) -> None:
    for state, n in by_state.items():
        DATASET_ITEMS.labels(dataset, state).set(n)


def render() -> bytes:
    return generate_latest(REGISTRY)
