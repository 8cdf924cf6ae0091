"""Prometheus metrics, on one registry served at ``/metrics``."""

from __future__ import annotations

import contextlib
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.exposition import generate_latest

from bucketsync.model import Counts

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the scrape for no use here
REGISTRY = CollectorRegistry()
# process_start_time_seconds (restart alerts), memory, CPU, open fds.
ProcessCollector(registry=REGISTRY)

RUNS = Counter(
    "bucketsync_runs_total", "Upstream sync runs, by dataset and status.", ["dataset", "status"], registry=REGISTRY
)
ITEMS = Counter(
    "bucketsync_items_total",
    "Items seen by upstream runs, by dataset and what happened (listed, added, modified, removed, renamed).",
    ["dataset", "change"],
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
OUTBOX_BACKLOG = Gauge("bucketsync_outbox_backlog", "Pending downstream operations in the outbox.", registry=REGISTRY)
DATASET_INTERVAL = Gauge(
    "bucketsync_dataset_interval_seconds",
    "The configured poll interval of each running poll dataset (alerts count missed runs in intervals).",
    ["dataset"],
    registry=REGISTRY,
)


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
    for gauge in (DATASET_INTERVAL, LAST_SUCCESS):
        forget(gauge, dataset)


def forget(gauge: Gauge, dataset: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(dataset)


def record_run(dataset: str, status: str, counts: Counts, seconds: float) -> None:
    RUNS.labels(dataset, status).inc()
    RUN_SECONDS.labels(dataset).observe(seconds)
    for change in ("listed", "added", "modified", "removed", "renamed"):
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
