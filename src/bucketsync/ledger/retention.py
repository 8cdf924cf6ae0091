"""Retention: the daemon prunes old runs and finished ops in the background.

A 2 s poll writes 43,200 runs a day; without pruning the ledger grows without
bound. Per dataset, the newest ``agent.keep_runs`` runs younger than
``agent.keep_runs_for`` stay (likewise ``keep_ops`` / ``keep_ops_for`` for finished
ops); running runs, pending ops, the newest run and the newest ok run always stay.
Deletes go in small batches, each its own short transaction, so a sync run's
batches are never held up for long.

Agents sharing a PostgreSQL ledger divide it by leases: each prunes the datasets it
holds, under their fences (a write of one dataset, which waits for no other agent's
batches), and every agent the datasets no configuration names any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from bucketsync import metrics
from bucketsync.config import AgentConfig
from bucketsync.core.errors import LeaseLost
from bucketsync.core.leases import Fence
from bucketsync.ledger.leases import FENCE
from bucketsync.ledger.ledger import Ledger

log = structlog.get_logger("bucketsync.retention")

BATCH = 500
#: the first prune waits a little, so start-up (probes, first syncs) goes first
FIRST_DELAY = 5.0


class Shares(Protocol):
    """What retention asks of the agent's lease keeper (daemon/leases.py)."""

    datasets: Callable[[], list[str]]

    def fence(self, dataset: str) -> Fence | None: ...


async def prune_once(
    ledger: Ledger, conf: AgentConfig, *, now: float | None = None, shares: Shares | None = None
) -> tuple[int, int]:
    """One pass over the datasets in the ledger: (runs, ops) deleted. ``shares``: the agent's
    leases on a shared ledger (a configured dataset it does not hold is its owner's to prune)."""
    now = time.time() if now is None else now
    runs = ops = 0
    configured = set(shares.datasets()) if shares is not None else set()
    for ds_id, name in await ledger.dataset_names():
        fence = shares.fence(name) if shares is not None else None
        if fence is None and name in configured:
            continue
        token = FENCE.set(fence)
        try:
            while n := await ledger.prune_runs(ds_id, conf.keep_runs, now - conf.keep_runs_for, BATCH):
                runs += n
                await asyncio.sleep(0)  # let a run's batch in between
            while n := await ledger.prune_ops(ds_id, conf.keep_ops, now - conf.keep_ops_for, BATCH):
                ops += n
                await asyncio.sleep(0)
        except LeaseLost:
            continue  # the lease moved on meanwhile: the new owner prunes it
        finally:
            FENCE.reset(token)
    metrics.PRUNED.labels("runs").inc(runs)
    metrics.PRUNED.labels("ops").inc(ops)
    if runs or ops:
        log.info("pruned history past retention", runs=runs, ops=ops)
    return runs, ops


async def run(ledger: Ledger, conf: AgentConfig, stop: asyncio.Event, shares: Shares | None = None) -> None:
    """Prune shortly after start, then every ``agent.prune_interval`` until ``stop``.
    A failed pass is logged and retried at the next interval: pruning is never urgent."""
    delay = min(FIRST_DELAY, conf.prune_interval)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            return
        try:
            await prune_once(ledger, conf, shares=shares)
        except Exception:
            log.exception("pruning failed; retrying at the next interval")
        delay = conf.prune_interval
