"""Sync workers (``agent.sync_workers``): the listing and the diff in a process of their own.

The key sync scenarios run through one real worker process (the module's pool), on a
local folder and on SeaweedFS: changes, a failing listing, downstream-owned keys, a worker
killed with SIGKILL mid-run, a shutdown and a cancellation while a job runs. A real daemon
with two workers: test_e2e_workers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import shutil
import signal
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bucketsync import metrics
from bucketsync.config import AgentConfig, AwsIntegration, DatasetConfig, DriverConfig, Settings
from bucketsync.core.diff import Step
from bucketsync.core.errors import ListingFailed, NotFound, Refused, StorageError
from bucketsync.core.model import Change, ChangeKind, Indexed, ItemState, ListingGap, ObjectInfo, RunStatus
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores import StoreSpec, store_spec
from bucketsync.stores.parallel import Quantiles
from bucketsync.upstream.pacing import Pacer
from bucketsync.upstream.sync import SyncLoop
from bucketsync.upstream.workers import SyncWorkers, WorkerDiff
from bucketsync.upstream.workers.wire import JoinedKeys, WireError, pack, unpack
from e2e import many_files, write_files
from emulators.postgres import PostgresServer
from emulators.s3 import REGION, S3Emulator
from test_sync import Bucket, fill, table

pytestmark = pytest.mark.asyncio(loop_scope="module")

DATASET = "photos"
KEYS = ["a.jpg", "b/c.jpg", "b/d e.png", "x/y/z.txt", "ü/日本.jpg"]
_generations = itertools.count(1)
NICE = 5


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[SyncWorkers]:
    workers = SyncWorkers(1, "warning", "json", nice=NICE)
    await workers.start()
    try:
        yield workers
    finally:
        await workers.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    led = await Ledger.open(tmp_path / "ledger.db")
    try:
        yield led
    finally:
        await led.close()


@dataclass
class Target:
    """A store under test: the agent's own instance (to change it, and for in-process runs),
    and the spec a worker opens the same store from."""

    bucket: Bucket
    spec: StoreSpec
    #: a SQLite file or a PostgreSQL URL
    ledger: str


@pytest.fixture(params=["local", "seaweedfs"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    led = tmp_path / "ledger.db"
    if request.param == "local":
        root = tmp_path / "root"
        root.mkdir()
        spec = store_spec(DriverConfig(url=root.as_uri()), Settings(agent=AgentConfig(ledger=led)))
        return Target(Bucket("local", spec.open()), spec, str(led))
    emu: S3Emulator = request.getfixturevalue("seaweedfs")
    driver = DriverConfig(
        url=f"s3://{emu.new_bucket()}/some/prefix/", endpoint_url=emu.endpoint_url, region=REGION, integration="aws"
    )
    aws = AwsIntegration(kind="aws", access_key_id=emu.access_key_id, secret_access_key=emu.secret_access_key)
    spec = store_spec(driver, Settings(agent=AgentConfig(ledger=led), integrations={"aws": aws}))
    return Target(Bucket("s3", spec.open()), spec, str(led))


@pytest.fixture
def local(tmp_path: Path) -> Target:
    root = tmp_path / "root"
    root.mkdir()
    led = tmp_path / "ledger.db"
    spec = store_spec(DriverConfig(url=root.as_uri()), Settings(agent=AgentConfig(ledger=led)))
    return Target(Bucket("local", spec.open()), spec, str(led))


def worker_loop(pool: SyncWorkers, t: Target, ledger: Ledger, **config: Any) -> SyncLoop:
    ds = DatasetConfig(driver="d", **config)
    remote = WorkerDiff(pool, DATASET, next(_generations), t.spec, tuple(ds.include), tuple(ds.exclude), t.ledger, None)
    return SyncLoop(DATASET, ds, t.bucket.store, ledger, remote=remote)


def in_process_loop(t: Target, ledger: Ledger, **config: Any) -> SyncLoop:
    return SyncLoop(DATASET, DatasetConfig(driver="d", **config), t.bucket.store, ledger)


def counts(result: Any) -> dict[str, int]:
    return {k: v for k, v in result.counts.as_dict().items() if v}


async def keys(ledger: Ledger) -> dict[str, int]:
    return {i.key: i.id for i in await ledger.items(await ledger.dataset_id(DATASET))}


# ---------------------------------------------------------------------- what a run sees


async def test_changes_come_through_a_worker(pool: SyncWorkers, target: Target, ledger: Ledger) -> None:
    b = target.bucket
    await fill(b, KEYS)
    loop = worker_loop(pool, target, ledger)
    first = await loop.run_once()
    assert (first.status, counts(first)) == (RunStatus.OK, {"listed": 5, "added": 5}), first.error
    before = await keys(ledger)

    await b.put("a.jpg", b"a new body, longer")
    await b.delete("b/c.jpg")
    await b.rename("x/y/z.txt", "x/moved.txt")
    await b.put("new.txt", b"new")
    second = await loop.run_once()
    assert second.status is RunStatus.OK, second.error
    expect = {"listed": 5, "added": 1, "modified": 1, "removed": 1, "renamed": 1, "unchanged": 2}
    assert counts(second) == expect
    after = await keys(ledger)
    assert set(after) == {"a.jpg", "b/d e.png", "new.txt", "x/moved.txt", "ü/日本.jpg"}
    assert after["x/moved.txt"] == before["x/y/z.txt"], "a rename keeps the item's id"

    third = await loop.run_once()
    assert counts(third) == {"listed": 5, "unchanged": 5}
    assert loop.splits == sorted(after), "the worker sampled the listed keys for the next run's split points"


async def test_a_postgresql_ledger(pool: SyncWorkers, local: Target, postgres_server: PostgresServer) -> None:
    """The worker reads the snapshot of a PostgreSQL ledger read-only, on connections of its own."""
    url = postgres_server.new_database()
    led = await Ledger.open(url)
    try:
        await fill(local.bucket, KEYS)
        loop = worker_loop(pool, Target(local.bucket, local.spec, url), led)
        assert counts(await loop.run_once()) == {"listed": 5, "added": 5}
        await local.bucket.delete("a.jpg")
        assert counts(await loop.run_once()) == {"listed": 4, "removed": 1, "unchanged": 4}
        assert set(await keys(led)) == set(KEYS) - {"a.jpg"}
    finally:
        await led.close()


async def test_filters_apply_in_the_worker(pool: SyncWorkers, local: Target, ledger: Ledger) -> None:
    await fill(local.bucket, KEYS)
    result = await worker_loop(pool, local, ledger, include=["**/*.jpg", "*.jpg"], exclude=["b/**"]).run_once()
    assert counts(result) == {"listed": 2, "added": 2}
    assert set(await keys(ledger)) == {"a.jpg", "ü/日本.jpg"}


async def test_a_failing_listing_removes_nothing_and_reads_as_in_process(
    pool: SyncWorkers, local: Target, ledger: Ledger, tmp_path: Path
) -> None:
    await fill(local.bucket, KEYS)
    await worker_loop(pool, local, ledger).run_once()
    before = table(tmp_path / "ledger.db")
    shutil.rmtree(tmp_path / "root")  # the driver root is gone: NotFound, not an empty listing

    remote = await worker_loop(pool, local, ledger).run_once()
    here = await in_process_loop(local, ledger).run_once()
    assert remote.status is RunStatus.FAILED and counts(remote) == {"errors": 1}
    assert remote.error == here.error and remote.error, "the same error class and message as in process"
    assert table(tmp_path / "ledger.db") == before, "nothing removed, nothing written"


async def test_keys_downstream_owns_are_left_alone_exactly(pool: SyncWorkers, local: Target, ledger: Ledger) -> None:
    await fill(local.bucket, KEYS)
    await worker_loop(pool, local, ledger).run_once()
    await local.bucket.put("b/c.jpg", b"being rewritten by an upload")  # owned: not reported as modified
    remote, here = worker_loop(pool, local, ledger), in_process_loop(local, ledger)
    for loop in (remote, here):
        loop.in_flight = {"b/c.jpg", "not/listed.txt"}
        loop.touched = {"a.jpg": float("inf")}
    got, expected = await remote.run_once(), await here.run_once()
    assert counts(got) == counts(expected) == {"listed": 5, "unchanged": 3}


# ---------------------------------------------------------------------- a worker that dies, a run that stops


def _pinned(ledger: Path) -> bool:
    """Whether some connection holds a read transaction on the ledger: a truncating
    checkpoint cannot reset the WAL under a reader (a job's snapshot in a worker)."""
    con = sqlite3.connect(ledger, timeout=0, isolation_level=None)
    try:
        return bool(con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
    finally:
        con.close()


async def _until(check: Any, what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


class AfterFirstStep:
    """A ``RemoteDiff`` that calls ``then`` once its first step has been taken (and awaits what
    ``then`` returns, if anything, before it takes the next: a worker that is slow to answer)."""

    def __init__(self, inner: WorkerDiff, then: Any) -> None:
        self.inner, self.then = inner, then

    async def steps(
        self, ds_id: int, splits: Sequence[str], gaps: list[ListingGap], sample: Quantiles
    ) -> AsyncGenerator[Step, None]:
        steps = self.inner.steps(ds_id, splits, gaps, sample)
        async with contextlib.aclosing(steps):
            first = True
            async for step in steps:
                yield step
                if first:
                    first = False
                    if (wait := self.then()) is not None:
                        await wait


def _deaths() -> float:
    return metrics.REGISTRY.get_sample_value("bucketsync_sync_worker_deaths_total") or 0.0


def big_folder(t: Target, extra: dict[str, str]) -> None:
    """6,000 files: more than a worker may send ahead of its run (8 steps of 512 keys)."""
    root = Path(str(t.bucket.root))
    many_files(root / "data", 6, 1000, links=True)
    write_files(root, extra)


async def test_a_worker_killed_mid_run_fails_the_run_and_removes_nothing(
    pool: SyncWorkers, local: Target, ledger: Ledger, tmp_path: Path
) -> None:
    big_folder(local, {f"zz/{i}.txt": f"doomed {i}" for i in range(3)})
    first = await worker_loop(pool, local, ledger).run_once()
    assert first.status is RunStatus.OK
    shutil.rmtree(Path(str(local.bucket.root)) / "zz")
    before = table(tmp_path / "ledger.db")
    (victim,) = pool.pids()
    deaths = _deaths()

    loop = worker_loop(pool, local, ledger)
    assert isinstance(loop.remote, WorkerDiff)
    loop.remote = AfterFirstStep(loop.remote, lambda: os.kill(victim, signal.SIGKILL))
    killed = await loop.run_once()
    assert killed.status is RunStatus.FAILED, killed
    assert killed.error is not None and f"pid {victim}" in killed.error and "SIGKILL" in killed.error
    assert "nothing was removed" in killed.error
    assert table(tmp_path / "ledger.db") == before, "the three removals wait for a complete listing"
    assert _deaths() == deaths + 1

    again = await worker_loop(pool, local, ledger).run_once()  # a new worker takes it
    assert (again.status, again.counts.removed, again.counts.unchanged) == (RunStatus.OK, 3, first.counts.added - 3), (
        again.error
    )
    assert pool.pids() and pool.pids() != [victim]


async def test_shutdown_mid_run_cancels_the_job_in_the_worker(
    pool: SyncWorkers, local: Target, ledger: Ledger, tmp_path: Path
) -> None:
    big_folder(local, {})
    (pid,) = pool.pids()
    db = tmp_path / "ledger.db"
    stop = asyncio.Event()
    stop.set()  # the run notices after its first batch commits
    interrupted = await worker_loop(pool, local, ledger).run_once(stop=stop)
    assert interrupted.status is RunStatus.FAILED and "interrupted by shutdown" in str(interrupted.error)
    assert interrupted.counts.added == 5000
    # The worker dropped the job: its snapshot connection (a read transaction) is closed.
    await _until(lambda: not _pinned(db), "the worker closed the job's snapshot")

    loop = worker_loop(pool, local, ledger)
    assert isinstance(loop.remote, WorkerDiff)
    started = asyncio.Event()
    loop.remote = AfterFirstStep(loop.remote, started.set)
    run = asyncio.create_task(loop.run_once())
    await started.wait()
    assert _pinned(db), "the job holds its snapshot while it runs"
    run.cancel()  # the grace period is over, or the lease is lost
    with pytest.raises(asyncio.CancelledError):
        await run
    await _until(lambda: not _pinned(db), "the worker cancelled the job")

    done = await worker_loop(pool, local, ledger).run_once()
    assert (done.status, done.counts.unchanged) == (RunStatus.OK, 5000), done.error
    assert done.counts.added == done.counts.listed - 5000 > 1000
    assert pool.pids() == [pid], "the same worker throughout: nothing died"


async def test_a_run_waiting_on_its_worker_holds_no_turn(pool: SyncWorkers, local: Target, tmp_path: Path) -> None:
    """Waiting for a worker's next step is no CPU work of the agent: other runs take the turns
    (pacing.py) meanwhile. One turn in all here: a run holding it while it waits would stall the other."""
    big_folder(local, {})
    other_root = tmp_path / "other"
    write_files(other_root, {"x.txt": "x"})
    other_spec = store_spec(DriverConfig(url=other_root.as_uri()), Settings(agent=AgentConfig(ledger=local.ledger)))
    pacer = Pacer(concurrent=1)
    led = await Ledger.open(local.ledger)
    try:
        slow = worker_loop(pool, local, led)
        slow.pacer = pacer
        assert isinstance(slow.remote, WorkerDiff)
        release = asyncio.Event()
        slow.remote = AfterFirstStep(slow.remote, release.wait)
        waiting = asyncio.create_task(slow.run_once())
        other = SyncLoop(
            "other",
            DatasetConfig(driver="o"),
            other_spec.open(),
            led,
            pacer,
            remote=WorkerDiff(pool, "other", next(_generations), other_spec, (), (), local.ledger, None),
        )
        # A guard against a hang, not a measure: the run takes well under a second.
        quick = await asyncio.wait_for(other.run_once(), 60)
        assert (quick.status, quick.counts.added) == (RunStatus.OK, 1)
        assert not waiting.done()
        release.set()
        assert (await waiting).status is RunStatus.OK
    finally:
        await led.close()


async def test_a_stop_ends_a_run_waiting_on_its_worker_and_keeps_what_it_listed(
    pool: SyncWorkers, local: Target, ledger: Ledger
) -> None:
    """The agent's grace period is for batches being committed: a run waiting on a worker (still
    starting, or listing on a busy machine) ends when told to stop, and writes what it had."""
    big_folder(local, {})
    loop = worker_loop(pool, local, ledger)
    assert isinstance(loop.remote, WorkerDiff)
    took_first, never = asyncio.Event(), asyncio.Event()

    def stall() -> Any:
        took_first.set()
        return never.wait()  # the worker's next step never comes

    loop.remote = AfterFirstStep(loop.remote, stall)
    stop = asyncio.Event()
    run = asyncio.create_task(loop.run_once(stop=stop))
    await asyncio.wait_for(took_first.wait(), 60)
    stop.set()
    # A guard against a hang, not a measure: without the stop, the run would wait forever.
    result = await asyncio.wait_for(run, 30)
    assert result.status is RunStatus.FAILED and "interrupted" in str(result.error)
    assert result.counts.added == 512 and result.counts.removed == 0  # the first step, written
    assert len(await keys(ledger)) == 512


async def test_a_large_dataset_gets_a_worker_and_the_small_ones_share_the_other(local: Target, ledger: Ledger) -> None:
    """Jobs go by the keys their run expects (the last run's), not by count: a 100k-key run keeps
    its worker to itself, so its diff does not take turns with a dozen small runs in one process."""
    from bucketsync.upstream.workers.wire import Job

    ds_id = await ledger.dataset_id(DATASET)

    def job(expected: int) -> Job:
        return Job(DATASET, 1, local.spec, (), (), local.ledger, None, ds_id, (), Quantiles(expected), 512)

    two = SyncWorkers(2, "warning", "json")
    await two.start()
    try:
        async with contextlib.AsyncExitStack() as jobs:
            big, _, _ = await jobs.enter_async_context(two.job(job(100_000)))
            small = [(await jobs.enter_async_context(two.job(job(n))))[0] for n in (1_000, 0, 5_000, 1_000)]
            assert all(w is not big for w in small), "every small run went to the other worker"
            assert big.load == 100_000 and small[0].load == 1_000 + 1 + 5_000 + 1_000
        assert big.load == 0 and small[0].load == 0, "a job's keys leave its worker's load when it ends"
        async with two.job(job(10)) as (first, _, _), two.job(job(10)) as (second, _, _):
            assert first is not second, "with nothing known, runs are spread by count"
    finally:
        await two.aclose()


async def test_a_worker_that_cannot_start_fails_the_runs_not_the_agent(local: Target, ledger: Ledger) -> None:
    broken = SyncWorkers(1, "no-such-level", "json")  # the worker exits before it says it is ready
    await broken.start(wait=False)  # as the agent starts them: nothing to wait for, nothing raised
    try:
        await fill(local.bucket, KEYS)
        result = await worker_loop(broken, local, ledger).run_once()
        assert result.status is RunStatus.FAILED and counts(result) == {"errors": 1}
        assert result.error is not None and "a sync worker process did not start (exit code 1)" in result.error
        assert await keys(ledger) == {}
    finally:
        await broken.aclose()


async def test_a_worker_runs_at_a_lower_cpu_priority(pool: SyncWorkers) -> None:
    (pid,) = pool.pids()
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE)


# ---------------------------------------------------------------------- the wire


async def test_errors_cross_as_their_own_class() -> None:
    refused = WireError.of(Refused("quota", "the dataset is at its quota")).rebuild()
    assert isinstance(refused, Refused) and refused.reason == "quota" and str(refused) == "the dataset is at its quota"
    gone = WireError.of(NotFound("bucket b does not exist", key="k")).rebuild()
    assert type(gone) is NotFound and isinstance(gone, StorageError) and gone.key == "k"
    other = WireError.of(OSError(5, "Input/output error")).rebuild()
    assert type(other) is ListingFailed and str(other) == "OSError: [Errno 5] Input/output error"


async def test_changes_cross_as_tuples_and_come_back_equal() -> None:
    new = ObjectInfo("k", 3, 1.5, "e", "v1")
    old = Indexed(7, "k", 2, 1.0, None, None, ItemState.TOMBSTONE)
    changes = [
        Change(ChangeKind.ADDED, "k", new, None),
        Change(ChangeKind.MODIFIED, "k", new, old),
        Change(ChangeKind.REMOVED, "k", None, old),
        Change(ChangeKind.UNCHANGED, "k", new, Indexed(8, "k", 3, 1.5, "e", "v1", ItemState.LIVE)),
    ]
    back = unpack(pickle.loads(pickle.dumps(pack(changes))))
    assert back == changes
    assert all(type(c.kind) is ChangeKind and (c.old is None or type(c.old.state) is ItemState) for c in back)


async def test_joined_keys() -> None:
    assert list(JoinedKeys("", 0)) == [] and len(JoinedKeys("", 0)) == 0
    k = JoinedKeys("a\x00b/c\x00ü", 3)
    assert len(k) == 3 and list(k) == ["a", "b/c", "ü"] and k[1] == "b/c" and "ü" in k
