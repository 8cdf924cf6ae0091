"""The lease loop of an agent sharing a PostgreSQL ledger with others (see ledger/leases.py).

Every third of the lease period: a heartbeat (the live agents divide the datasets), then a
renewal of every held lease. A lease that did not renew is lost: its dataset's task is
cancelled at once (its writes would be refused anyway: fencing). Then the fair share: the
surplus above it is released (its task stopped first, so no write of it is left in flight),
and free or expired datasets are claimed up to it. A claimed dataset's task runs under the
lease's ``Fence``; a fenced write that finds the lease gone raises ``LeaseLost`` and the
task reports it here (``lost``).

On a clean stop every held lease is released and the agent leaves the agents table: the
others take its datasets over on their next turn instead of after the lease period.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from bucketsync import metrics
from bucketsync.core.leases import Fence, fair_share, plan
from bucketsync.ledger.leases import Leases

log = structlog.get_logger("bucketsync.leases")


class LeaseKeeper:
    """Holds this agent's leases and starts/stops the datasets' tasks as they come and go.

    ``start(name, fence)`` starts a dataset's work under its fence; ``stop(name, at_once)``
    stops it (gracefully for a release, cancelled for a loss) and returns once it ended."""

    def __init__(
        self,
        leases: Leases,
        datasets: Callable[[], list[str]],
        start: Callable[[str, Fence], None],
        stop: Callable[[str, bool], Awaitable[None]],
        max_datasets: int = 0,
    ) -> None:
        self.leases = leases
        self.datasets = datasets
        self._start = start
        self._stop = stop
        self.max_datasets = max_datasets
        #: dataset -> the epoch of its lease, for every lease this agent holds
        self.held: dict[str, int] = {}
        self.wake = asyncio.Event()
        self._lost: set[str] = set()

    @property
    def agent(self) -> str:
        return self.leases.agent

    def fence(self, dataset: str) -> Fence | None:
        epoch = self.held.get(dataset)
        return None if epoch is None else Fence(dataset, self.agent, epoch)

    def lost(self, dataset: str, epoch: int) -> None:
        """A fenced write of the dataset found the lease gone: drop it on the next turn, now."""
        if self.held.get(dataset) == epoch:
            self._lost.add(dataset)
            self.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        period = self.leases.seconds / 3
        renewed_at = time.monotonic()
        try:
            while not stop.is_set():
                self.wake.clear()
                try:
                    await self._bounded_turn(period * 2)  # a stuck turn must not outlive the leases
                    renewed_at = time.monotonic()
                except Exception as exc:  # the database unreachable, a lost connection, a server error
                    log.warning("lease turn failed", error=f"{type(exc).__name__}: {exc}", agent=self.agent)
                    if time.monotonic() - renewed_at >= self.leases.seconds - period:
                        # Unrenewed so long that the leases may expire before the next turn:
                        # stop the loops now (their writes would be refused by then anyway).
                        for name in list(self.held):
                            await self._drop(name, "lost", at_once=True)
                await _wait_any(stop, self.wake, period)
        finally:
            if not stop.is_set():
                log.error("the lease loop ended before the agent stopped", agent=self.agent)
            await self._leave()

    async def _bounded_turn(self, limit: float) -> None:
        """One turn in a task of its own, cancelled after ``limit`` seconds. Not a timeout on
        this task: that works by cancelling it, and a cancellation swallowed below (Python
        3.11's ``wait_for``, which asyncpg uses, can lose one) surfaced at a later await and
        ended the lease loop in silence, its datasets left to fail on fenced writes."""
        task = asyncio.create_task(self.turn(), name="lease-turn")
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=limit)  # a turn that ignores it is left behind, not awaited
            raise TimeoutError(f"a lease turn took over {limit:.1f} s")
        if task.cancelled():  # by no one here: the loop goes on, the turn counts as failed
            raise RuntimeError("the lease turn was cancelled")
        task.result()

    async def turn(self) -> None:
        """One heartbeat, renewal, release and claim."""
        configured = self.datasets()
        await self.leases.register(configured)
        live = await self.leases.heartbeat()
        renewed = await self.leases.renew(self.held)
        for name in sorted(set(self.held) - renewed | self._lost):
            await self._drop(name, "lost", at_once=True)
        self._lost.clear()
        for name in sorted(set(self.held) - set(configured)):  # a reload removed it
            await self._release(name)
        decided = plan(set(self.held), fair_share(len(configured), live, self.max_datasets))
        for name in decided.release:
            await self._release(name)
        got = await self.leases.claim([n for n in configured if n not in self.held], decided.claim)
        for name, epoch in sorted(got.items()):
            self.held[name] = epoch
            metrics.LEASE_CHANGES.labels(name, "claimed").inc()
            log.info("lease claimed", dataset=name, epoch=epoch, agent=self.agent)
            self._start(name, Fence(name, self.agent, epoch))
        metrics.LEASES_OWNED.set(len(self.held))

    async def _drop(self, name: str, change: str, *, at_once: bool) -> None:
        epoch = self.held.pop(name, None)
        if epoch is None:
            return
        await self._stop(name, at_once)
        metrics.LEASE_CHANGES.labels(name, change).inc()
        metrics.LEASES_OWNED.set(len(self.held))
        log.warning("lease lost: the dataset's loop stopped", dataset=name, epoch=epoch, agent=self.agent)

    async def _release(self, name: str) -> None:
        """Stop the dataset's work first (its last batch commits), then free the lease."""
        epoch = self.held[name]
        await self._stop(name, False)
        del self.held[name]
        await self.leases.release(name, epoch)
        metrics.LEASE_CHANGES.labels(name, "released").inc()
        metrics.LEASES_OWNED.set(len(self.held))
        log.info("lease released", dataset=name, epoch=epoch, agent=self.agent)

    async def _leave(self) -> None:
        """On stopping: release what is held (the caller stopped the tasks) and leave the fair share."""
        for name in sorted(self.held):
            with contextlib.suppress(Exception):
                await self._release(name)
        with contextlib.suppress(Exception):
            await self.leases.leave()


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> None:
    waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
