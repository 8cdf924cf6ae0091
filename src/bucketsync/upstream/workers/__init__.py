"""Sync workers: the listing and the diff of sync runs, in processes of their own.

Listing a dataset and merging every key against the ledger's snapshot is CPU work. In the
agent's process it holds the GIL the API, ``/healthz`` and every other run need: with 50
polled datasets and a 100k-key dataset syncing, requests waited behind it (bench/api_load.py).
With ``agent.sync_workers = N`` the agent starts N worker processes (child.py), and each run
hands them exactly that part: the worker lists the store (filtered), reads the ledger's
snapshot on a read-only connection of its own, runs ``listing_steps`` (the same code as in
process) and streams back per step only what the run needs: the changes, the listed and
unchanged counts, the listed keys as one joined string, the gaps; at the end the split-point
sample. A run that changed nothing sends counts and keys, no objects.

Everything else stays in the agent, unchanged (upstream/sync.py): batching and the writes,
rename matching, the guard, removals, run records, metrics, the keys downstream owns.
Hence invariant 1 holds as before: a worker that fails, or dies (``WorkerDied``), fails the
run like a failed listing, and nothing is removed. A dead worker is replaced at once.

Back-pressure: a job sends at most ``child.WINDOW`` steps beyond what its run has taken.
A run that stops (shutdown, reload, a lost lease, an error) cancels its job in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from bucketsync import metrics
from bucketsync.core.diff import Step
from bucketsync.core.errors import ConfigError, WorkerDied
from bucketsync.core.model import ListingGap
from bucketsync.stores import StoreSpec
from bucketsync.stores.parallel import Quantiles
from bucketsync.upstream.workers import child
from bucketsync.upstream.workers.wire import Job, JoinedKeys, WireError, frame, read_frame, unpack

log = structlog.get_logger("bucketsync.workers")

#: keys per step in a worker: big enough that a no-change run is a few hundred small messages,
#: small enough that the agent's share of a step (taking its changes) fits a pacing slice
STEP = 512
#: a run tops its job's credit up by this many steps at a time (of ``child.WINDOW``)
CREDIT = child.WINDOW // 2
#: the running interpreter's binary (Linux): a worker runs this very file, even when its path is
#: not reachable for the agent's user (an interpreter under a private home, exec'd by root for it)
#: or the file on disk was replaced by an upgrade since the agent started
_SELF = "/proc/self/exe"
#: seconds a new worker may take to import and say it is ready
START_TIMEOUT = 60.0
#: seconds a worker may take to end once its stdin is closed, before it is killed
STOP_TIMEOUT = 5.0
#: ``sync_workers = "auto"``: this many workers at most, and none below AUTO_MIN_CPUS usable cores
AUTO_MAX = 2
AUTO_MIN_CPUS = 2


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), sysfs: Path = Path("/sys/fs/cgroup")) -> float:
    """The cores this process may use: its CPU affinity, capped by the tightest cgroup v2 quota
    (``cpu.max``) on its cgroup's path, which the affinity does not show: a container's ``--cpus``
    (its cgroup is the root it sees) or a systemd unit's ``CPUQuota=`` (its own, or its slice's)."""
    cpus: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError):
        own = next((line[3:] for line in proc_cgroup.read_text().splitlines() if line.startswith("0::")), None)
        if own is None:  # no cgroup v2 hierarchy
            return cpus
        folder = sysfs / own.strip().strip("/")
        for at in (folder, *folder.parents):
            with contextlib.suppress(OSError, ValueError):
                quota, period = (at / "cpu.max").read_text().split()[:2]
                if quota != "max":
                    cpus = min(cpus, int(quota) / int(period))
            if at == sysfs:
                break
    return cpus


def workers_for(setting: int | str, cpus: float | None = None) -> int:
    """How many sync workers ``agent.sync_workers`` asks for. ``auto``: as many as there are usable
    cores, at most AUTO_MAX, and none on fewer than AUTO_MIN_CPUS (one core gains nothing from a
    second process, and each worker is an interpreter: about 55 MB resident)."""
    if setting != "auto":
        return int(setting)
    cpus = usable_cpus() if cpus is None else cpus
    return 0 if cpus < AUTO_MIN_CPUS else min(AUTO_MAX, int(cpus))


class _Worker:
    """One worker process, its pipe, and the runs it is serving."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        #: job id -> the messages for that run, as they arrive
        self.jobs: dict[int, asyncio.Queue[tuple[Any, ...]]] = {}
        #: the keys its running jobs are expected to list, together
        self.load = 0
        self.alive = True
        self.stopping = False
        self.reader: asyncio.Task[None] | None = None

    @classmethod
    async def spawn(cls, level: str, fmt: str, nice: int) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,  # argv[0]: what the worker's interpreter finds its venv and packages from
            "-m",
            "bucketsync.upstream.workers",
            level,
            fmt,
            str(nice),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            executable=_SELF if os.path.exists(_SELF) else None,
        )
        worker = cls(proc)
        assert proc.stdout is not None
        try:
            hello = await asyncio.wait_for(read_frame(proc.stdout), START_TIMEOUT)
        except BaseException as exc:  # a timeout, a broken pipe, a frame that is no hello; or the agent stops
            await worker._kill()
            if not isinstance(exc, Exception):
                raise
            raise WorkerDied(f"a sync worker process did not start: {type(exc).__name__}: {exc}") from None
        if hello is None or hello[0] != "ready":
            code = await worker._kill()
            raise WorkerDied(f"a sync worker process did not start ({_exit(code)}); see the log above")
        return worker

    def start_reading(self, on_death: Any) -> None:
        self.reader = asyncio.create_task(self._read(on_death), name=f"sync-worker:{self.pid}")

    async def _read(self, on_death: Any) -> None:
        assert self.proc.stdout is not None
        why = ""
        try:
            while (message := await read_frame(self.proc.stdout)) is not None:
                queue = self.jobs.get(message[1])
                if queue is not None:
                    queue.put_nowait(message)
        except Exception as exc:  # a broken frame: the pipe cannot be trusted any more
            why = f"; its pipe broke: {type(exc).__name__}: {exc}"
        finally:
            self.alive = False
            code = await self._kill()
            what = f"the sync worker process (pid {self.pid}) ended ({_exit(code)}){why}"
            for queue in self.jobs.values():
                queue.put_nowait(("died", 0, what))
            if not self.stopping:
                metrics.SYNC_WORKER_DEATHS.inc()
                log.error("sync worker died; starting another", pid=self.pid, exit=_exit(code), runs=len(self.jobs))
                on_death(self)

    async def _kill(self) -> int:
        """Wait a moment for the process to end, then kill it; its exit code."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            return await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            return await self.proc.wait()

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue a message for the worker; small ones, so no waiting (a dead worker drops them)."""
        if self.alive and self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(frame(message))

    async def stop(self) -> None:
        self.stopping = True
        await self._kill()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


def _exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class SyncWorkers:
    """``agent.sync_workers`` worker processes; a run's job goes to the one expecting the fewest keys."""

    def __init__(self, count: int, log_level: str = "info", log_format: str = "auto", nice: int = 0) -> None:
        self.count = count
        self.log_level, self.log_format = log_level, log_format
        #: how much lower than the agent's the workers' CPU priority is (``agent.sync_workers_nice``)
        self.nice = nice
        self.workers: list[_Worker | None] = [None] * count
        self._ids = itertools.count(1)
        self._spawning = asyncio.Lock()
        self._respawns: set[asyncio.Task[None]] = set()
        self._starting: asyncio.Task[None] | None = None
        self.closed = False

    async def start(self, *, wait: bool = True) -> None:
        """Start the workers. ``wait=False`` (the agent): in the background, so importing them
        does not hold up the agent's start; the first runs wait for them instead, and a worker
        that cannot start fails those runs (and is logged) rather than the start."""
        if not wait:
            self._starting = asyncio.create_task(self._start_quietly(), name="sync-workers-start")
            return
        try:
            await self._start_all()
        except WorkerDied as exc:
            await self.aclose()
            raise ConfigError(f"agent.sync_workers: {exc}") from None

    async def _start_all(self) -> None:
        async with self._spawning:
            await asyncio.gather(*(self._ensure(i) for i in range(self.count)))
        log.info("sync workers started", pids=self.pids())

    async def _start_quietly(self) -> None:
        try:
            await self._start_all()
        except WorkerDied as exc:  # the next run tries again, and fails with this if it must
            log.error("could not start the sync workers", error=str(exc))

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w is not None and w.alive]

    async def _ensure(self, slot: int) -> _Worker:
        worker = self.workers[slot]
        if worker is not None and worker.alive:
            return worker
        if self.closed:
            raise WorkerDied("the agent is stopping: no sync worker takes new runs")
        worker = await _Worker.spawn(self.log_level, self.log_format, self.nice)
        if self.closed:  # stopped while it started
            await worker.stop()
            raise WorkerDied("the agent is stopping: no sync worker takes new runs")
        worker.start_reading(self._died)
        self.workers[slot] = worker
        metrics.SYNC_WORKERS.set(len(self.pids()))
        return worker

    def _died(self, worker: _Worker) -> None:
        metrics.SYNC_WORKERS.set(len(self.pids()))
        if self.closed or worker not in self.workers:
            return
        task = asyncio.create_task(self._replace(self.workers.index(worker)), name="sync-worker-respawn")
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _replace(self, slot: int) -> None:
        try:
            async with self._spawning:
                await self._ensure(slot)
        except WorkerDied as exc:  # the next run tries again
            log.error("could not replace a sync worker", error=str(exc))

    async def _pick(self) -> _Worker:
        if self._starting is not None:
            await asyncio.shield(self._starting)
        live = [w for w in self.workers if w is not None and w.alive]
        if len(live) < self.count:
            async with self._spawning:
                for slot in range(self.count):
                    await self._ensure(slot)
            live = [w for w in self.workers if w is not None and w.alive]
        # By keys, not runs: a large dataset's run then has a worker to itself while the small ones
        # share the other, instead of its diff taking turns with half of them in one process.
        return min(live, key=lambda w: w.load)

    @contextlib.asynccontextmanager
    async def job(self, job: Job) -> AsyncIterator[tuple[_Worker, int, asyncio.Queue[tuple[Any, ...]]]]:
        """Start ``job`` on a worker; its messages come on the queue. Leaving early cancels it there."""
        worker = await self._pick()
        jid = next(self._ids)
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        worker.jobs[jid] = queue
        weight = max(1, job.sample.expected)  # an initial sync expects 0: it counts as a run
        worker.load += weight
        worker.send(("job", jid, job))
        done = False
        try:
            yield worker, jid, queue
            done = True
        finally:
            del worker.jobs[jid]
            worker.load -= weight
            if not done:
                worker.send(("cancel", jid))

    async def aclose(self) -> None:
        """Stop every worker: stdin closed (their jobs are cancelled and they end), killed if slow."""
        self.closed = True
        pending = [*self._respawns, *([self._starting] if self._starting is not None else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self.workers if w is not None))
        metrics.SYNC_WORKERS.set(0)


@dataclass
class WorkerDiff:
    """A dataset's ``RemoteDiff`` (upstream/sync.py): its runs list and diff in the sync workers."""

    pool: SyncWorkers
    dataset: str
    #: new for every store the agent builds for the dataset (a reload): the worker opens a new one too
    generation: int
    store: StoreSpec
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    ledger: str
    ledger_password: str | None

    async def steps(
        self, ds_id: int, splits: Sequence[str], gaps: list[ListingGap], sample: Quantiles
    ) -> AsyncGenerator[Step, None]:
        job = Job(
            self.dataset,
            self.generation,
            self.store,
            self.include,
            self.exclude,
            self.ledger,
            self.ledger_password,
            ds_id,
            tuple(splits),
            sample,
            STEP,
        )
        async with self.pool.job(job) as (worker, jid, queue):
            taken = 0
            while True:
                message = await queue.get()
                kind = message[0]
                if kind == "step":
                    _, _, joined, n, changes, unchanged, fresh = message
                    gaps.extend(fresh)
                    yield Step((), JoinedKeys(joined, n), unpack(changes), unchanged)
                    taken += 1
                    if taken % CREDIT == 0:
                        worker.send(("credit", jid, CREDIT))
                elif kind == "end":
                    sample.keys = message[2]
                    gaps.extend(message[3])
                    return
                elif kind == "error":
                    gaps.extend(message[3])
                    error: WireError = message[2]
                    raise error.rebuild()
                else:  # "died"
                    raise WorkerDied(f"{message[2]} during the listing; nothing was removed")
