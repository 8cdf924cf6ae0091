"""A sync worker process: lists storage and diffs it against the ledger, for the agent's runs.

Started by the agent as ``python -m bucketsync.upstream.workers LEVEL FORMAT NICE`` with its
stdin and stdout as the pipes (wire.py); it logs to the agent's stderr. One asyncio loop
serves many jobs at once, each a task: ``listing_steps`` (the same code the agent runs in
process) over the dataset's store and a read-only snapshot of the ledger, each step sent
as it is made. A job sends at most the credit the agent gave it (``WINDOW`` steps ahead),
so a slow agent holds the listing back instead of filling memory.

A worker lowers its CPU priority by NICE (``agent.sync_workers_nice``): when the cores are
busy, the agent's API and writes go first and the listing takes what is left.

The agent owns the worker's life: SIGINT and SIGTERM are ignored (a shutdown lets the
runs' batches commit, then cancels the jobs and closes the pipe), and the end of stdin
(the agent closed it, or died) ends the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import structlog

from bucketsync import logs
from bucketsync.core.keys import KeyFilter
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores import Store
from bucketsync.upstream.sync import listing_steps
from bucketsync.upstream.workers.wire import SEP, Job, WireError, frame, pack, read_frame

log = structlog.get_logger("bucketsync.worker")

#: steps a job may send before the agent has taken them (the agent tops the credit up as it goes)
WINDOW = 8


@dataclass
class _Held:
    """A dataset's store in this worker: kept between runs (its connections, its credentials)."""

    generation: int
    store: Store
    users: int = 0


@dataclass
class _Running:
    credits: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(WINDOW))
    task: asyncio.Task[None] | None = None


class Worker:
    def __init__(self, out: asyncio.StreamWriter) -> None:
        self.out = out
        self.jobs: dict[int, _Running] = {}
        self.stores: dict[str, _Held] = {}
        self.ledgers: dict[str, Ledger] = {}
        self._opening = asyncio.Lock()

    async def send(self, message: tuple[Any, ...]) -> None:
        self.out.write(frame(message))
        await self.out.drain()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        await self.send(("ready", os.getpid()))
        try:
            while (message := await read_frame(reader)) is not None:
                kind, jid = message[0], message[1]
                if kind == "job":
                    running = self.jobs[jid] = _Running()
                    running.task = asyncio.create_task(self._job(jid, message[2], running), name=f"job:{jid}")
                elif (running_ := self.jobs.get(jid)) is None:
                    continue  # a credit or cancel for a job that has ended
                elif kind == "credit":
                    for _ in range(message[2]):
                        running_.credits.release()
                elif kind == "cancel" and running_.task is not None:
                    running_.task.cancel()
        finally:
            tasks = [r.task for r in self.jobs.values() if r.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close()

    async def _job(self, jid: int, job: Job, running: _Running) -> None:
        gaps: list[Any] = []
        sent = 0
        try:
            ledger = await self._ledger(job)
            async with self._store(job) as store:
                steps = listing_steps(
                    store,
                    KeyFilter(job.include, job.exclude),
                    ledger.snapshot_pages(job.dataset_id),
                    job.splits,
                    gaps,
                    job.sample,
                    job.step,
                )
                async with contextlib.aclosing(steps):
                    async for step in steps:
                        await running.credits.acquire()
                        fresh, sent = gaps[sent:], len(gaps)
                        keys = SEP.join(step.keys)
                        changes = pack(step.changes)
                        await self.send(("step", jid, keys, len(step.keys), changes, step.unchanged, fresh))
            await self.send(("end", jid, job.sample.keys, gaps[sent:]))
        except asyncio.CancelledError:
            raise  # the agent asked (its run stopped) or the worker is ending: nobody waits for an answer
        except Exception as exc:  # the run fails as if the listing had failed in the agent
            await self.send(("error", jid, WireError.of(exc), gaps[sent:]))
        finally:
            self.jobs.pop(jid, None)

    async def _ledger(self, job: Job) -> Ledger:
        """The ledger, opened read-only once: each job's snapshot is a read transaction of its own."""
        async with self._opening:
            if (ledger := self.ledgers.get(job.ledger)) is None:
                ledger = await Ledger.open(job.ledger, readonly=True, password=job.ledger_password)
                self.ledgers[job.ledger] = ledger
            return ledger

    @contextlib.asynccontextmanager
    async def _store(self, job: Job) -> AsyncIterator[Store]:
        """The dataset's store, opened at its first job and kept; a new generation (the agent
        rebuilt the store: a reload) opens a new one, and the old one closes once unused."""
        held = self.stores.get(job.dataset)
        if held is None or held.generation != job.generation:
            old, held = held, _Held(job.generation, job.store.open())
            self.stores[job.dataset] = held
            if old is not None:
                await self._release(job.dataset, old, 0)
        held.users += 1
        try:
            yield held.store
        finally:
            await self._release(job.dataset, held, 1)

    async def _release(self, dataset: str, held: _Held, users: int) -> None:
        held.users -= users
        if held.users == 0 and self.stores.get(dataset) is not held:
            await _aclose(held.store)

    async def _close(self) -> None:
        for held in self.stores.values():
            await _aclose(held.store)
        for ledger in self.ledgers.values():
            with contextlib.suppress(Exception):
                await ledger.close()


async def _aclose(store: Store) -> None:
    try:
        await store.aclose()
    except Exception:
        log.exception("closing a store failed", store=store.url)


async def _pipes() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """stdin and stdout as asyncio streams. fd 1 then points at stderr: a stray print
    must not land inside a frame."""
    loop = asyncio.get_running_loop()
    inp, out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(inp, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, writer


async def _main() -> None:
    reader, writer = await _pipes()
    await Worker(writer).serve(reader)
    with contextlib.suppress(Exception):
        writer.close()


def main(argv: list[str]) -> int:
    level = argv[0] if argv else "info"
    fmt = argv[1] if len(argv) > 1 else "auto"
    logs.configure(level, cast(Literal["auto", "json", "console"], fmt))
    structlog.contextvars.bind_contextvars(worker=os.getpid())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if nice := int(argv[2]) if len(argv) > 2 else 0:
        try:
            os.nice(nice)
        except OSError as exc:  # a sandbox that forbids it (systemd's SystemCallFilter=~@resources)
            log.warning("sync worker runs at the agent's CPU priority: lowering it was refused", error=str(exc))
    asyncio.run(_main())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
