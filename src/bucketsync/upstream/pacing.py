"""Sharing the event loop between sync runs and everything else on it.

A run's diff is CPU work on the event loop, and so is every API request, ``/healthz``
and ``/metrics``. asyncio runs ready tasks in turn, so a request waits behind one
slice of *every* run that is ready: with 50 datasets syncing at once that was seconds
(measured: ``/healthz`` p50 23 s). The ``Pacer`` bounds the queue: a run works in
slices of about ``slice`` seconds, and at most ``concurrent`` runs hold a slice at
once; the others wait on a semaphore, off the ready queue. A request then waits
behind at most ``concurrent`` short slices however many datasets are syncing. The
semaphore is FIFO, so runs take turns slice by slice and a big run cannot starve the
small ones (or the reverse).
"""

from __future__ import annotations

import asyncio
import time

#: runs holding a slice at once: two, so one run's I/O waits overlap another's CPU work
CONCURRENT = 2
#: seconds of CPU a run may take before it lets the loop (and the next run) have a turn
SLICE = 0.002


class Pacer:
    def __init__(self, concurrent: int = CONCURRENT, slice: float = SLICE) -> None:
        self._turns = asyncio.Semaphore(concurrent)
        self.slice = slice

    async def acquire(self) -> float:
        """Wait for a turn; returns when it started (pass it to ``due``)."""
        await self._turns.acquire()
        return time.perf_counter()

    def release(self) -> None:
        self._turns.release()

    def due(self, since: float) -> bool:
        """True when the slice that started at ``since`` is used up."""
        return time.perf_counter() - since >= self.slice
