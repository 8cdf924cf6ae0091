"""The ledger on a real SQLite file: schema, durability settings, reads and writes, the instance lock,
and surviving ``kill -9`` in the middle of a run (invariants 8 and 10)."""

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
from bucketsync.core.model import Counts, ItemState, ObjectInfo, RunStatus
from bucketsync.ledger.sqlite import MIGRATIONS, SNAPSHOT_BATCH, InstanceLock, Ledger
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
        async with second.db.execute("PRAGMA user_version") as cur:
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
    async with ledger.db.execute("PRAGMA journal_mode") as cur:
        assert await cur.fetchone() == ("wal",)
    async with ledger.db.execute("PRAGMA synchronous") as cur:
        assert await cur.fetchone() == (2,)  # FULL
    async with ledger.db.execute("PRAGMA foreign_keys") as cur:
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
        async with ro.db.execute("PRAGMA synchronous") as cur:
            assert await cur.fetchone() == (2,)
        # A write through it is a LedgerError naming the file and the fix, not a raw sqlite3 error.
        with pytest.raises(LedgerError, match=r"readonly.*writable"):
            await ro.remove(None, [1])
        with pytest.raises(LedgerError, match=r"readonly.*writable"):
            await ro.begin_run(ds, False)
    finally:
        await ro.close()
    assert len(await ledger.items(ds)) == 2


# ------------------------------------------------------------------ datasets and items


async def test_datasets(ledger: Ledger) -> None:
    assert await ledger.find_dataset("photos") is None
    a = await ledger.dataset_id("photos")
    assert await ledger.dataset_id("photos") == a
    b = await ledger.dataset_id("docs")
    assert a != b
    assert await ledger.find_dataset("docs") == b


async def test_write_batch_and_reads(ledger: Ledger, db_path: Path) -> None:
    keys = ["a", "a/b", "a/c", "a0", "a-x", "b/c/d", "é"]
    ds, run = await fill(ledger, "photos", keys)
    other, _ = await fill(ledger, "other", ["a/zzz"])

    items = await ledger.items(ds)
    assert [i.key for i in items] == sorted(keys), "ascending code-point order"
    assert len({i.id for i in items}) == len(keys)
    first = items[0]
    assert (first.size, first.modified, first.etag, first.state) == (1, 1000.0, "etag-a", ItemState.LIVE)
    assert first.updated is not None and first.meta == {}

    assert [i.key for i in await ledger.items(ds, prefix="a/")] == ["a/b", "a/c"]
    assert [i.key for i in await ledger.items(ds, after="a/b")] == ["a/c", "a0", "b/c/d", "é"]
    assert [i.key for i in await ledger.items(ds, after="a", limit=2)] == ["a-x", "a/b"]
    assert [i.key for i in await ledger.items(ds, prefix="a/", after="a/b")] == ["a/c"]
    assert [i.key for i in await ledger.items(other)] == ["a/zzz"], "datasets do not mix"

    paged = [i.key async for i in ledger.iter_items(ds, page=2)]
    assert paged == sorted(keys)
    assert [i.key async for i in ledger.iter_items(ds, prefix="a", page=1)] == ["a", "a-x", "a/b", "a/c", "a0"]

    assert await ledger.live_count(ds) == len(keys)
    assert await ledger.counts_by_state(ds) == {"live": len(keys), "tombstone": 0}
    assert sorted(k for _, k, _, _, first in await ledger.added_since(ds, 0) if first == run) == sorted(keys)
    # The batch's progress went into the run row in the same transaction.
    assert sql(db_path, "SELECT listed, added FROM runs WHERE id = ?", (run,)) == [(len(keys), len(keys))]


async def test_updates_keep_the_id(ledger: Ledger) -> None:
    ds, run = await fill(ledger, "photos", ["a", "b"])
    a = (await ledger.items(ds))[0]
    new = ObjectInfo("a", 42, 2000.0, "etag-new", "v2")
    await ledger.write_batch(ds, run, [], [(a.id, new)], Counts(modified=1))
    got = (await ledger.items(ds))[0]
    assert (got.id, got.key, got.size, got.modified, got.etag, got.version) == (a.id, "a", 42, 2000.0, "etag-new", "v2")


async def test_adding_an_existing_key_updates_it(ledger: Ledger) -> None:
    """An add racing another writer of the same key (the outbox) updates that row: never a duplicate."""
    ds, run = await fill(ledger, "photos", ["a"])
    before = (await ledger.items(ds))[0]
    await ledger.write_batch(ds, run, [ObjectInfo("a", 7, 5.0, "etag-2")], [], Counts())
    [after] = await ledger.items(ds)
    assert (after.id, after.size, after.etag) == (before.id, 7, "etag-2")


async def test_a_failed_batch_commits_nothing(ledger: Ledger, db_path: Path) -> None:
    ds, run = await fill(ledger, "photos", ["a"])
    a = (await ledger.items(ds))[0]
    broken = ObjectInfo("a", None, 1.0)  # type: ignore[arg-type]  # size is NOT NULL in the schema
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        await ledger.write_batch(ds, run, objs("b", "c"), [(a.id, broken)], Counts(listed=99, added=99))
    assert [i.key for i in await ledger.items(ds)] == ["a"], "the adds of the failed batch were rolled back"
    assert sql(db_path, "SELECT listed FROM runs WHERE id = ?", (run,)) == [(1,)], "and so was its progress"
    await ledger.write_batch(ds, run, objs("b"), [], Counts(listed=2, added=2))  # the connection is usable
    assert [i.key for i in await ledger.items(ds)] == ["a", "b"]


async def test_state_filter(ledger: Ledger, db_path: Path) -> None:
    ds, _ = await fill(ledger, "photos", ["a", "b", "c"])
    sql(db_path, "UPDATE items SET state = 'tombstone' WHERE key = 'b'")
    assert [i.key for i in await ledger.items(ds)] == ["a", "c"], "live items by default"
    assert [i.key for i in await ledger.items(ds, state=ItemState.TOMBSTONE)] == ["b"]
    assert [i.key for i in await ledger.items(ds, state=None)] == ["a", "b", "c"]
    assert await ledger.live_count(ds) == 2
    assert await ledger.counts_by_state(ds) == {"live": 2, "tombstone": 1}
    assert [(i.key, i.state) for i in [x async for x in ledger.snapshot(ds)]] == [
        ("a", ItemState.LIVE),
        ("b", ItemState.TOMBSTONE),
        ("c", ItemState.LIVE),
    ], "the snapshot holds tombstones too"


async def test_rename_keeps_id_and_metadata(ledger: Ledger, db_path: Path) -> None:
    ds, _ = await fill(ledger, "photos", ["old/name.jpg", "other"])
    old = (await ledger.items(ds, prefix="old/"))[0]
    sql(db_path, "UPDATE items SET meta = ?, content_type = 'image/jpeg' WHERE id = ?", ('{"tag": "cat"}', old.id))

    run2 = await ledger.begin_run(ds, False)
    moved = ObjectInfo("new/name.jpg", 1, 3000.0, old.etag, "v9")
    await ledger.write_batch(ds, run2, [moved], [], Counts(added=1))
    [(fresh_id, fresh_key, _, _)] = [r[:4] for r in await ledger.added_since(ds, 0) if r[4] == run2]
    assert fresh_key == "new/name.jpg" and fresh_id != old.id

    await ledger.rename(run2, [(old.id, fresh_id, fresh_key)], Counts(renamed=1))
    items = {i.key: i for i in await ledger.items(ds)}
    assert set(items) == {"new/name.jpg", "other"}
    got = items["new/name.jpg"]
    assert got.id == old.id, "the item keeps its id"
    assert got.meta == {"tag": "cat"} and got.content_type == "image/jpeg", "and its metadata"
    assert (got.modified, got.version) == (3000.0, "v9"), "with the new object's info"
    assert sql(db_path, "SELECT count(*) FROM items WHERE id = ?", (fresh_id,)) == [(0,)]
    assert sql(db_path, "SELECT renamed FROM runs WHERE id = ?", (run2,)) == [(1,)]


async def test_remove(ledger: Ledger, db_path: Path) -> None:
    ds, run = await fill(ledger, "photos", ["a", "b", "c"])
    by_key = {i.key: i.id for i in await ledger.items(ds)}
    await ledger.remove(run, [by_key["a"], by_key["c"]], Counts(listed=1, removed=2))
    assert [i.key for i in await ledger.items(ds)] == ["b"]
    assert sql(db_path, "SELECT removed FROM runs WHERE id = ?", (run,)) == [(2,)]
    await ledger.remove(None, [by_key["b"]])
    assert await ledger.items(ds) == []


async def test_snapshot_is_a_consistent_view(ledger: Ledger) -> None:
    """A run writes while it walks its snapshot: the walk must not see those writes."""
    n = SNAPSHOT_BATCH + 1000  # more than one fetch
    keys = [f"k{i:06d}" for i in range(n)]
    ds, run = await fill(ledger, "photos", keys)
    ids = {i.key: i.id for i in await ledger.items(ds)}
    snap = ledger.snapshot(ds)
    first = await anext(snap)
    assert first.key == keys[0]
    await ledger.write_batch(ds, run, objs("k000000x", "zzz"), [], Counts())
    await ledger.remove(None, [ids[keys[-1]], ids[keys[SNAPSHOT_BATCH + 10]]])
    rest = [i.key async for i in snap]
    assert [first.key, *rest] == keys


# ------------------------------------------------------------------ runs


async def test_runs_history(ledger: Ledger) -> None:
    ds = await ledger.dataset_id("photos")
    other = await ledger.dataset_id("other")
    r1 = await ledger.begin_run(ds, False)
    await ledger.finish_run(r1, Counts(listed=3, added=3), RunStatus.OK, None)
    r2 = await ledger.begin_run(ds, True)
    await ledger.finish_run(r2, Counts(listed=1, errors=1), RunStatus.FAILED, "listing failed: boom")
    r3 = await ledger.begin_run(ds, False)
    await ledger.begin_run(other, False)

    runs = await ledger.runs(ds)
    assert [r.id for r in runs] == [r3, r2, r1], "newest first, this dataset only"
    assert [r.id for r in await ledger.runs(ds, limit=2)] == [r3, r2]
    assert runs[2].status is RunStatus.OK and runs[2].counts == Counts(listed=3, added=3)
    assert runs[2].ended is not None and runs[2].ended >= runs[2].started
    assert runs[1].status is RunStatus.FAILED and runs[1].error == "listing failed: boom" and runs[1].forced
    assert runs[0].status is RunStatus.RUNNING and runs[0].ended is None
    assert (await ledger.last_ok_run(ds)) == runs[2]
    assert await ledger.last_ok_run(other) is None
    assert await ledger.run(r2) == runs[1]
    assert await ledger.run(9999) is None
    as_json = runs[2].as_json()
    assert as_json["status"] == "ok" and as_json["dataset"] == "photos" and as_json["added"] == 3
    assert str(as_json["started"]).endswith("Z")


async def test_fail_stale_runs(ledger: Ledger) -> None:
    ds = await ledger.dataset_id("photos")
    done = await ledger.begin_run(ds, False)
    await ledger.finish_run(done, Counts(), RunStatus.OK, None)
    stale = [await ledger.begin_run(ds, False), await ledger.begin_run(ds, False)]
    assert await ledger.fail_stale_runs() == 2
    for run_id in stale:
        run = await ledger.run(run_id)
        assert run is not None and run.status is RunStatus.FAILED
        assert run.error == "the agent stopped during this run" and run.ended is not None
    ok = await ledger.run(done)
    assert ok is not None and ok.status is RunStatus.OK and ok.error is None
    assert await ledger.fail_stale_runs() == 0


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
    from bucketsync.ledger.sqlite import Ledger
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
    await ledger.db.create_function("hold", 0, lambda: release.wait(10))
    busy = asyncio.ensure_future(ledger.db.execute("SELECT hold()"))  # holds the connection's thread
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
    assert not ledger.db.in_transaction
    assert await ledger.item(ds, "after.txt") is not None
