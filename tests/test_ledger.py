"""The SQLite ledger's own concerns: schema versions, durability settings, read-only opening, the instance
lock, and surviving ``kill -9`` in the middle of a run (invariants 8 and 10). What every backend must do
(items, runs, the outbox, ...) is the conformance suite's (tests/ledger_conformance.py)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bucketsync.config import DatasetConfig
from bucketsync.core.errors import LedgerError, LedgerLocked
from bucketsync.core.model import Counts, ObjectInfo, RunStatus
from bucketsync.ledger.ledger import Ledger
from bucketsync.ledger.sqlite import MIGRATIONS, InstanceLock
from bucketsync.stores.local import LocalStore
from bucketsync.upstream.sync import BATCH, SyncLoop


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.db"


@pytest.fixture
async def ledger(db_path: Path) -> AsyncIterator[Ledger]:
    led = await Ledger.open(db_path)
    try:
        yield led
    finally:
        await led.close()


def objs(*keys: str, size: int = 1) -> list[ObjectInfo]:
    return [ObjectInfo(k, size, 1000.0 + i, f"etag-{k}", None) for i, k in enumerate(keys)]


async def fill(ledger: Ledger, name: str, keys: list[str]) -> tuple[int, int]:
    ds = await ledger.dataset_id(name)
    run = await ledger.begin_run(ds, False)
    await ledger.write_batch(ds, run, objs(*keys), [], Counts(listed=len(keys), added=len(keys)))
    return ds, run


def sql(path: Path, query: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """A query through a separate, plain sqlite3 connection: what is really on disk."""
    con = sqlite3.connect(path, timeout=10, isolation_level=None)  # autocommit
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


# ------------------------------------------------------------------ schema and settings


async def test_migrations_are_idempotent(db_path: Path) -> None:
    first = await Ledger.open(db_path)
    await fill(first, "photos", ["a", "b"])
    await first.close()

    second = await Ledger.open(db_path)  # migrating again must be a no-op
    try:
        ds = await second.find_dataset("photos")
        assert ds is not None
        assert [i.key for i in await second.items(ds)] == ["a", "b"]
        async with second.db.conn.execute("PRAGMA user_version") as cur:
            assert await cur.fetchone() == (len(MIGRATIONS),)
    finally:
        await second.close()
    tables = {r[0] for r in sql(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"datasets", "items", "runs"} <= tables


async def test_newer_schema_is_refused(db_path: Path) -> None:
    await (await Ledger.open(db_path)).close()
    sql(db_path, f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(LedgerError, match="newer than this bucketsync") as exc:
            await Ledger.open(db_path)
        del exc  # its traceback holds the connection Ledger.open made
        gc.collect()
        await asyncio.sleep(0.05)  # let aiosqlite's worker thread finish
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked, "a refused ledger's connection is closed, not left to the garbage collector"


async def test_wal_and_synchronous_full(ledger: Ledger, db_path: Path) -> None:
    async with ledger.db.conn.execute("PRAGMA journal_mode") as cur:
        assert await cur.fetchone() == ("wal",)
    async with ledger.db.conn.execute("PRAGMA synchronous") as cur:
        assert await cur.fetchone() == (2,)  # FULL
    async with ledger.db.conn.execute("PRAGMA foreign_keys") as cur:
        assert await cur.fetchone() == (1,)
    # WAL is a property of the file: any other connection sees it too.
    assert sql(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_readonly_open(ledger: Ledger, db_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist yet"):
        await Ledger.open(tmp_path / "absent.db", readonly=True)
    assert not (tmp_path / "absent.db").exists(), "a read-only open never creates a ledger"

    ds, _ = await fill(ledger, "photos", ["a", "b"])
    ro = await Ledger.open(db_path, readonly=True)
    try:
        assert [i.key for i in await ro.items(ds)] == ["a", "b"]
        async with ro.db.conn.execute("PRAGMA synchronous") as cur:
            assert await cur.fetchone() == (2,)
        # A write through it is a LedgerError naming the file and the fix, not a raw sqlite3 error.
        with pytest.raises(LedgerError, match=r"readonly.*writable"):
            await ro.remove(None, [1])
        with pytest.raises(LedgerError, match=r"readonly.*writable"):
            await ro.begin_run(ds, False)
    finally:
        await ro.close()
    assert len(await ledger.items(ds)) == 2


# ------------------------------------------------------------------ one agent per ledger

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bucketsync.ledger.sqlite import InstanceLock
    InstanceLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def lock_holder(db_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "locked", proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_second_agent_refused_while_another_process_holds_the_lock(
    db_path: Path, lock_holder: subprocess.Popen[str]
) -> None:
    lock = InstanceLock(db_path)
    assert lock.held_by_other()
    with pytest.raises(LedgerLocked) as exc:
        lock.acquire()
    msg = str(exc.value)
    assert f"pid {lock_holder.pid}" in msg
    assert str(db_path) in msg
    assert "another bucketsync agent" in msg


def test_lock_released_when_the_holder_is_killed(db_path: Path, lock_holder: subprocess.Popen[str]) -> None:
    with pytest.raises(LedgerLocked):
        InstanceLock(db_path).acquire()
    os.kill(lock_holder.pid, signal.SIGKILL)
    lock_holder.wait(timeout=10)
    lock = InstanceLock(db_path)
    assert not lock.held_by_other(), "the kernel dropped the dead holder's lock"
    lock.acquire()
    try:
        assert lock.path.read_text() == str(os.getpid()), "the new holder's pid replaces the old one"
        # and now this process holds it against others
        proc = subprocess.run(
            [sys.executable, "-c", HOLD_LOCK, str(db_path)], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode != 0
        assert f"pid {os.getpid()}" in proc.stderr and "LedgerLocked" in proc.stderr
    finally:
        lock.release()
    again = InstanceLock(db_path)
    again.acquire()
    again.release()


# ------------------------------------------------------------------ kill -9 mid-run

N_FILES = 12_000  # more than two batches

SYNC_IN_SUBPROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from bucketsync.config import DatasetConfig
    from bucketsync.ledger.ledger import Ledger
    from bucketsync.stores.local import LocalStore
    from bucketsync.upstream.sync import BATCH, SyncLoop

    class Throttled:
        '''After the first batch, list slowly, so that the kill lands in the middle of the run.'''

        def __init__(self, inner):
            self.inner, self.url, self.conditional_writes = inner, inner.url, True

        async def list(self, prefix=""):
            n = 0
            async for info in self.inner.list(prefix):
                n += 1
                if n > BATCH:
                    await asyncio.sleep(0.002)
                yield info

    async def main():
        ledger = await Ledger.open(Path(sys.argv[1]))
        loop = SyncLoop("big", DatasetConfig(driver="d"), Throttled(LocalStore(sys.argv[2])), ledger)
        await loop.run_once()
        print("finished", flush=True)

    asyncio.run(main())
    """
)


def make_files(root: Path, n: int) -> set[str]:
    """``n`` one-byte files in 12 folders. Hard links to one file: creating an inode costs
    ~0.4 ms on the CI disk, a link ~15 us, and the sync sees real, separate directory entries."""
    source = root.parent / "source"
    source.write_bytes(b"x")
    keys = set()
    for d in range(12):
        (root / f"d{d:02d}").mkdir(parents=True)
    for i in range(n):
        key = f"d{i % 12:02d}/f{i:06d}.txt"
        os.link(source, root / key)
        keys.add(key)
    return keys


def progress(db: Path) -> tuple[str, int] | None:
    if not db.exists():
        return None
    try:
        rows = sql(db, "SELECT status, listed FROM runs ORDER BY id DESC LIMIT 1")
    except sqlite3.OperationalError:  # schema not created yet
        return None
    return (str(rows[0][0]), int(str(rows[0][1]))) if rows else None


async def test_kill_9_mid_run_then_resume(tmp_path: Path, db_path: Path) -> None:
    root = tmp_path / "data"
    keys = make_files(root, N_FILES)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SYNC_IN_SUBPROCESS,
        str(db_path),
        str(root),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while (p := progress(db_path)) is None or p[1] == 0:  # until the first batch is committed
            if proc.returncode is not None:
                _, err = await proc.communicate()
                pytest.fail(f"the sync ended before the kill: {err.decode(errors='replace')}")
            assert time.monotonic() < deadline, "the run never made progress"
            await asyncio.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
        out, _ = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert b"finished" not in out, "killed mid-run, not after it"

    # What the killed run left behind: whole batches only, one transaction each.
    status, listed = progress(db_path) or ("", -1)
    assert status == "running"
    committed = int(str(sql(db_path, "SELECT count(*) FROM items")[0][0]))
    assert committed % BATCH == 0 and BATCH <= committed < N_FILES
    assert committed == listed

    ledger = await Ledger.open(db_path)
    try:
        assert await ledger.fail_stale_runs() == 1
        ds = await ledger.dataset_id("big")
        [killed] = await ledger.runs(ds)
        assert killed.status is RunStatus.FAILED and killed.error == "the agent stopped during this run"

        result = await SyncLoop("big", DatasetConfig(driver="d"), LocalStore(str(root)), ledger).run_once()
        assert result.status is RunStatus.OK, result.error
        assert result.counts.listed == N_FILES
        assert result.counts.added == N_FILES - committed
        assert result.counts.unchanged == committed
        assert result.counts.removed == 0

        rows = sql(db_path, "SELECT count(*), count(DISTINCT key) FROM items WHERE dataset_id = ?", (ds,))
        assert rows == [(N_FILES, N_FILES)], "no duplicates, nothing lost"
        assert {i.key async for i in ledger.iter_items(ds)} == keys
        assert [r.status for r in await ledger.runs(ds)] == [RunStatus.OK, RunStatus.FAILED]
    finally:
        await ledger.close()


async def test_a_writer_cancelled_while_it_begins_leaves_no_transaction_open(ledger: Ledger) -> None:
    """The BEGIN a cancelled writer was waiting for still runs on the connection's thread;
    without the ROLLBACK queued behind it, the next writer's BEGIN fails ("cannot start a
    transaction within a transaction") and its writes would join a stale transaction."""
    import threading

    ds = await ledger.dataset_id("photos")
    release = threading.Event()
    await ledger.db.conn.create_function("hold", 0, lambda: release.wait(10))
    busy = asyncio.ensure_future(ledger.db.conn.execute("SELECT hold()"))  # holds the connection's thread
    entered = asyncio.Event()

    async def writer() -> None:
        entered.set()
        async with ledger.transaction():
            raise AssertionError("the BEGIN queued behind the held query cannot have run yet")

    task = asyncio.ensure_future(writer())
    await entered.wait()
    await asyncio.sleep(0)  # the writer is now waiting for its BEGIN, behind the held query
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await busy
    run = await ledger.begin_run(ds, forced=False)
    await ledger.write_batch(ds, run, [ObjectInfo("after.txt", 1, 1.0, "e")], [], Counts())
    assert not ledger.db.conn.in_transaction
    assert await ledger.item(ds, "after.txt") is not None


# ------------------------------------------------------------------ the snapshot's read connection


def _checkpoint_blocked(path: Path) -> bool:
    """Whether a reader still holds an old snapshot: a checkpoint cannot copy the frames
    written after it began (a passive one, which does not wait for the reader)."""
    _, log, copied = sql(path, "PRAGMA wal_checkpoint(PASSIVE)")[0]
    return copied != log


async def test_a_snapshot_walk_holds_its_read_transaction_until_closed(ledger: Ledger, db_path: Path) -> None:
    """The walk's pages after the first are read on the loop from the same transaction; closing
    the walk early (a run that stops) ends it, so the WAL can be checkpointed again."""
    ds, run = await fill(ledger, "photos", [f"k{i:05d}" for i in range(3000)])
    pages = ledger.snapshot_pages(ds)
    first = await anext(pages)
    await ledger.write_batch(ds, run, objs("zzz"), [], Counts())  # after the walk began
    assert _checkpoint_blocked(db_path), "the walk's snapshot pins the frames before the write"
    second = await anext(pages)
    assert first[-1][1] < second[0][1], "the second page follows the first"
    await pages.aclose()
    assert not _checkpoint_blocked(db_path), "closed: no reader is left"


async def test_a_snapshot_walk_cancelled_while_opening_closes_its_connection(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection is opened on a thread, which a cancellation does not stop: what it opens
    after the walk was cancelled is closed, not left to the garbage collector."""
    import threading

    from bucketsync.ledger.sqlite import SqliteDb

    ds, _ = await fill(ledger, "photos", ["a", "b"])
    release = threading.Event()
    opened: list[sqlite3.Connection] = []
    real = SqliteDb._open_stream

    def slow_open(self: SqliteDb, *args: object) -> tuple[sqlite3.Connection, sqlite3.Cursor, list[object]]:
        release.wait(10)
        out = real(self, *args)  # type: ignore[arg-type]
        opened.append(out[0])
        return out  # type: ignore[return-value]

    monkeypatch.setattr(SqliteDb, "_open_stream", slow_open)
    task = asyncio.ensure_future(anext(ledger.snapshot_pages(ds)))
    await asyncio.sleep(0.05)  # the thread is waiting in slow_open
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    for _ in range(200):
        if opened:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the done-callback runs on the loop
    assert opened, "the thread opened its connection"
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[0].execute("SELECT 1")
