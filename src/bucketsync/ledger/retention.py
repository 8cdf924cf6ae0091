"""Retention: the daemon prunes old runs and finished ops in the background.

A 2 s poll writes 43,200 runs a day; without pruning the ledger grows without
bound. Per dataset, the newest ``agent.keep_runs`` runs younger than
``agent.keep_runs_for`` stay (likewise ``keep_ops`` / ``keep_ops_for`` for finished
ops); running runs, pending ops, the newest run and the newest ok run always stay.
Deletes go in small batches, each its own short transaction, so a sync run's
batches are never held up for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from bucketsync import metrics
from bucketsync.config import AgentConfig
from bucketsync.ledger.ledger import Ledger

log = structlog.get_logger("bucketsync.retention")

BATCH = 500
#: the first prune waits a little, so start-up (probes, first syncs) goes first
FIRST_DELAY = 5.0


async def prune_once(ledger: Ledger, conf: AgentConfig, *, now: float | None = None) -> tuple[int, int]:
    """One pass over every dataset in the ledger: (runs, ops) deleted."""
    now = time.time() if now is None else now
    runs = ops = 0
    for ds_id in await ledger.dataset_ids():
        while n := await ledger.prune_runs(ds_id, conf.keep_runs, now - conf.keep_runs_for, BATCH):
            runs += n
            await asyncio.sleep(0)  # let a run's batch in between
        while n := await ledger.prune_ops(ds_id, conf.keep_ops, now - conf.keep_ops_for, BATCH):
            ops += n
            await asyncio.sleep(0)
    metrics.PRUNED.labels("runs").inc(runs)
    metrics.PRUNED.labels("ops").inc(ops)
    if runs or ops:
        log.info("pruned history past retention", runs=runs, ops=ops)
    return runs, ops


async def run(ledger: Ledger, conf: AgentConfig, stop: asyncio.Event) -> None:
    """Prune shortly after start, then every ``agent.prune_interval`` until ``stop``.
    A failed pass is logged and retried at the next interval: pruning is never urgent."""
    delay = min(FIRST_DELAY, conf.prune_interval)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            return
        try:
            await prune_once(ledger, conf)
        except Exception:
            log.exception("pruning failed; retrying at the next interval")
        delay = conf.prune_interval
