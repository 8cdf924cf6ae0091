"""What keeps the API fast under load (issue 13.14), proved without timing anything.

- Per-dataset item counts are kept by the ledger in the writing transactions, and stay
  equal to a recount of the items through every write path: sync adds, modifications,
  renames and removals, tombstones, restores, puts (new, over a tombstone, overwrite),
  deletes, and tombstones purged when their object goes.
- Reads for the API go through their own read-only connection: they see only what is
  committed, and they answer while the writers' connection waits for a lock.
- ``/healthz``, ``/metrics``, ``GET /datasets`` and item pages of a real daemon answer
  while another process holds the ledger's write lock and the daemon's writer waits.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bucketsync.agent import Agent, datasets_status
from bucketsync.config import Settings
from bucketsync.core.model import Counts, ObjectInfo
from bucketsync.downstream.ops import Downstream
from bucketsync.ledger.sqlite import MIGRATIONS, Ledger
from e2e import Daemon, Response, local_driver, many_files, write_config, write_files


def kept_counts(path: Path) -> dict[int, dict[str, int]]:
    """The counts the ledger keeps (its ``item_counts`` table), zero rows left out."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out: dict[int, dict[str, int]] = {}
        for ds, state, n in con.execute("SELECT dataset_id, state, n FROM item_counts WHERE n != 0"):
            out.setdefault(ds, {"live": 0, "tombstone": 0})[state] = n
        return out
    finally:
        con.close()


def recount(path: Path) -> dict[int, dict[str, int]]:
    """Items per dataset and state, counted from the items themselves on a plain connection."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out: dict[int, dict[str, int]] = {}
        for ds, state, n in con.execute("SELECT dataset_id, state, count(*) FROM items GROUP BY 1, 2"):
            out.setdefault(ds, {"live": 0, "tombstone": 0})[state] = n
        return out
    finally:
        con.close()


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    for name in ("keep", "del"):
        (tmp_path / name).mkdir()
    settings = Settings(
        agent={"ledger": str(tmp_path / "var" / "ledger.db")},
        drivers={
            "keep": {"url": (tmp_path / "keep").as_uri()},
            "del": {"url": (tmp_path / "del").as_uri(), "allow_delete": True},
        },
        datasets={n: {"driver": n, "sync": "manual", "max_delete_ratio": 1.0} for n in ("keep", "del")},
    )
    async with Agent(settings) as a:
        yield a


async def assert_counts(agent: Agent, expected: dict[str, dict[str, int]]) -> None:
    ledger = agent.ledger
    assert ledger is not None
    truth = recount(ledger.path)
    assert kept_counts(ledger.path) == truth, "the kept counts equal a recount of the items"
    for name, want in expected.items():
        ds_id = await ledger.dataset_id(name)
        assert truth.get(ds_id, {"live": 0, "tombstone": 0}) == want, f"the test's own expectation for {name}"
        assert await ledger.counts_by_state(ds_id) == want, name
        assert await ledger.live_count(ds_id) == want["live"], name
    rows = {r["dataset"]: r["items"] for r in await datasets_status(agent.settings, ledger, {})}
    assert rows == expected


async def test_counts_stay_exact_through_every_write_path(agent: Agent, tmp_path: Path) -> None:
    keep, dele = tmp_path / "keep", tmp_path / "del"
    down = Downstream(agent, agent.outbox, in_process=True)
    write_files(keep, {f"k{i}.txt": f"keep {i}" for i in range(6)})
    write_files(dele, {f"d{i}.txt": f"del {i}" for i in range(4)})
    await assert_counts(agent, {"keep": {"live": 0, "tombstone": 0}, "del": {"live": 0, "tombstone": 0}})

    # sync: additions
    assert (await agent.loop("keep").run_once()).counts.added == 6
    assert (await agent.loop("del").run_once()).counts.added == 4
    await assert_counts(agent, {"keep": {"live": 6, "tombstone": 0}, "del": {"live": 4, "tombstone": 0}})

    # sync: a modification, a removal and a rename (the moved file keeps its inode, so its etag)
    (keep / "k0.txt").write_text("keep 0, longer now")
    (keep / "k1.txt").unlink()
    os.rename(keep / "k2.txt", keep / "k2-moved.txt")
    r = (await agent.loop("keep").run_once()).counts
    assert (r.modified, r.removed, r.renamed) == (1, 1, 1)
    await assert_counts(agent, {"keep": {"live": 5, "tombstone": 0}, "del": {"live": 4, "tombstone": 0}})

    # tombstone (allow_delete off), then restore, then tombstone again
    assert (await down.delete("keep", "k3.txt")).result == "tombstoned"
    await assert_counts(agent, {"keep": {"live": 4, "tombstone": 1}, "del": {"live": 4, "tombstone": 0}})
    assert (await down.restore("keep", "k3.txt")).result == "restored"
    await assert_counts(agent, {"keep": {"live": 5, "tombstone": 0}, "del": {"live": 4, "tombstone": 0}})
    await down.delete("keep", "k3.txt")
    await down.delete("keep", "k4.txt")
    await assert_counts(agent, {"keep": {"live": 3, "tombstone": 2}, "del": {"live": 4, "tombstone": 0}})

    # a re-sync keeps tombstones (no change), metadata changes nothing
    await agent.loop("keep").run_once()
    await down.patch_meta("keep", "k5.txt", {"label": "cat"})
    await assert_counts(agent, {"keep": {"live": 3, "tombstone": 2}, "del": {"live": 4, "tombstone": 0}})

    # puts: a new key, an overwrite of a live item, a write over a tombstone
    assert (await down.put("keep", "new.txt", body(b"new"))).result == "created"
    assert (await down.put("keep", "k5.txt", body(b"again"), overwrite=True)).result == "overwritten"
    assert (await down.put("keep", "k4.txt", body(b"back"), overwrite=True)).result == "overwritten"
    await assert_counts(agent, {"keep": {"live": 5, "tombstone": 1}, "del": {"live": 4, "tombstone": 0}})

    # the tombstoned object goes from storage: the next run forgets the tombstone
    (keep / "k3.txt").unlink()
    await agent.loop("keep").run_once()
    await assert_counts(agent, {"keep": {"live": 5, "tombstone": 0}, "del": {"live": 4, "tombstone": 0}})

    # deletes that reach storage (allow_delete on), and upstream removals
    assert (await down.delete("del", "d0.txt")).result == "deleted"
    (dele / "d1.txt").unlink()
    (dele / "d2.txt").unlink()
    assert (await agent.loop("del").run_once()).counts.removed == 2
    await assert_counts(agent, {"keep": {"live": 5, "tombstone": 0}, "del": {"live": 1, "tombstone": 0}})


async def test_counts_stay_exact_through_clones_merges_and_their_pointers(agent: Agent, tmp_path: Path) -> None:
    """Pointer items are counted in bulk by the statement that creates them, not per row
    (migration v12); orphaning, staleness and dropping a runtime dataset keep them exact."""
    from bucketsync.catalog import runtime

    ledger = agent.ledger
    assert ledger is not None
    write_files(tmp_path / "keep", {"same.txt": "k", **{f"k{i}.txt": f"keep {i}" for i in range(5)}})
    write_files(tmp_path / "del", {"same.txt": "d", **{f"d{i}.txt": f"del {i}" for i in range(3)}})
    await agent.loop("keep").run_once()
    await agent.loop("del").run_once()

    made = {
        "all": await runtime.clone(agent, "keep", "all", False, None),
        "some": await runtime.clone(agent, "keep", "some", True, {"key": {"$prefix": "k1"}}),
        **{m: await runtime.merge(agent, m, ["keep", "del"], m) for m in runtime.ON_CONFLICT},
    }
    assert {n: r["items"] for n, r in made.items()} == {"all": 6, "some": 1, "folder": 10, "suffix": 10, "merge": 9}
    assert kept_counts(ledger.path) == recount(ledger.path)
    for name, r in made.items():
        assert await ledger.live_count(await ledger.dataset_id(name)) == r["items"], name

    (tmp_path / "keep" / "k0.txt").unlink()  # its pointers become orphaned
    (tmp_path / "keep" / "k1.txt").write_text("keep 1, changed")  # its pointers become stale
    await agent.loop("keep").run_once()
    truth = recount(ledger.path)
    assert kept_counts(ledger.path) == truth
    assert truth[await ledger.dataset_id("all")] == {"live": 4, "tombstone": 0, "orphaned": 1, "stale": 1}

    assert await ledger.drop_runtime("all") == 6
    assert kept_counts(ledger.path) == recount(ledger.path)


async def test_counts_of_a_ledger_written_before_the_counts_table(tmp_path: Path) -> None:
    """Upgrading an existing ledger fills the counts from its items."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path, isolation_level=None)
    before = next(i for i, m in enumerate(MIGRATIONS) if "CREATE TABLE item_counts" in m)
    for n, script in enumerate(MIGRATIONS[:before], start=1):
        con.executescript(f"BEGIN; {script}; PRAGMA user_version={n}; COMMIT;")
    con.execute("INSERT INTO datasets (id, name, created) VALUES (1, 'a', 0), (2, 'b', 0)")
    con.executemany(
        "INSERT INTO items (dataset_id, key, size, modified, state, updated) VALUES (?, ?, 1, 0, ?, 0)",
        [(1, "x", "live"), (1, "y", "live"), (1, "z", "tombstone"), (2, "w", "live")],
    )
    con.close()
    # Read-only (no migration yet): counted from the items.
    ro = await Ledger.open(path, readonly=True)
    try:
        assert await ro.counts_by_state(1) == {"live": 2, "tombstone": 1}
    finally:
        await ro.close()
    ledger = await Ledger.open(path)
    try:
        assert await ledger.counts_by_state(1) == {"live": 2, "tombstone": 1}
        assert await ledger.counts_by_state(2) == {"live": 1, "tombstone": 0}
        assert (await ledger.overview())["a"][0] == {"live": 2, "tombstone": 1}
    finally:
        await ledger.close()


async def test_reads_use_their_own_connection(tmp_path: Path) -> None:
    """Inside an open write transaction, the API's reads see the last commit, not the
    transaction's own rows: they are not on the writers' connection."""
    ledger = await Ledger.open(tmp_path / "ledger.db")
    try:
        assert ledger.reader is not ledger.db
        ds = await ledger.dataset_id("photos")
        run = await ledger.begin_run(ds, False)
        await ledger.write_batch(ds, run, [ObjectInfo("a", 1, 1.0, "e1")], [], Counts(listed=1, added=1))
        async with ledger._transaction():
            await ledger.db.execute(
                "INSERT INTO items (dataset_id, key, size, modified, updated) VALUES (?, 'b', 1, 1, 1)", (ds,)
            )
            assert await ledger.counts_by_state(ds) == {"live": 1, "tombstone": 0}
            assert [i.key for i in await ledger.items(ds)] == ["a"]
            assert await ledger.item(ds, "b") is None
            assert (await ledger.overview())["photos"][0]["live"] == 1
            assert [r.id for r in await ledger.runs(ds)] == [run]
        # committed: every read sees it at once
        assert await ledger.counts_by_state(ds) == {"live": 2, "tombstone": 0}
        assert [i.key for i in await ledger.items(ds)] == ["a", "b"]
        assert await ledger.item(ds, "b") is not None
    finally:
        await ledger.close()


async def test_a_read_after_a_commit_sees_it_while_other_reads_run(tmp_path: Path) -> None:
    """Reads of other coroutines interleave on the reader connection. None may hold its
    statement (and so an old snapshot) open across an await: a writer that reads its own
    commit back must see it, however busy the reader is (a put once read its own item
    back as missing and crashed)."""
    ledger = await Ledger.open(tmp_path / "ledger.db")
    try:
        ds = await ledger.dataset_id("photos")
        run = await ledger.begin_run(ds, False)
        seed = [ObjectInfo(f"seed-{i:04d}", 1, 1.0, "e") for i in range(300)]
        await ledger.write_batch(ds, run, seed, [], Counts(listed=300, added=300))
        stop = asyncio.Event()

        async def busy_reader() -> None:
            while not stop.is_set():
                await ledger.items(ds, limit=300)
                await ledger.counts_by_state(ds)
                await ledger.overview()

        async def write_then_read(i: int) -> bool:
            key = f"new-{i:03d}"
            await ledger.write_batch(ds, run, [ObjectInfo(key, 1, 1.0, "e")], [], Counts(listed=1, added=1))
            return await ledger.item(ds, key) is not None

        readers = [asyncio.create_task(busy_reader()) for _ in range(4)]
        try:
            seen = await asyncio.gather(*(write_then_read(i) for i in range(100)))
        finally:
            stop.set()
            await asyncio.gather(*readers)
        assert seen.count(False) == 0, f"{seen.count(False)} of 100 commits were not seen by the next read"
    finally:
        await ledger.close()


async def test_reads_answer_while_the_writer_waits_for_the_lock(tmp_path: Path) -> None:
    """Another process holds the SQLite write lock: the ledger's writer waits in its busy
    handler, and the reads still answer (before the writer gets through)."""
    path = tmp_path / "ledger.db"
    ledger = await Ledger.open(path)
    try:
        ds = await ledger.dataset_id("photos")
        run = await ledger.begin_run(ds, False)
        await ledger.write_batch(ds, run, [ObjectInfo("a", 1, 1.0, "e1")], [], Counts(listed=1, added=1))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            writer = asyncio.create_task(ledger.begin_run(ds, False))
            await asyncio.sleep(0.3)  # let it reach SQLite's busy handler
            assert not writer.done()
            assert await ledger.counts_by_state(ds) == {"live": 1, "tombstone": 0}
            assert [i.key for i in await ledger.items(ds, limit=100)] == ["a"]
            assert set(await ledger.overview()) == {"photos"}
            assert not writer.done(), "the reads did not wait for the writer"
        finally:
            other.execute("COMMIT")
            other.close()
        assert await writer > run
    finally:
        await ledger.close()


# ---------------------------------------------------------------------- a real daemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    folder = tmp_path / "data"
    many_files(folder, 3, 100, links=True)
    cfg = write_config(tmp_path, {"d": local_driver(folder)}, {"photos": {"driver": "d", "sync": "manual"}})
    with Daemon(cfg) as d:
        d.wait_ready()
        assert d.api("POST", "/datasets/photos/sync", params={"wait": "true"}).body["status"] == "ok"
        yield d


def test_daemon_answers_probes_and_reads_while_another_process_holds_the_write_lock(
    daemon: Daemon, tmp_path: Path
) -> None:
    ledger = tmp_path / "var" / "ledger.db"
    other = sqlite3.connect(ledger, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the daemon's writers now wait (busy timeout)
    sync_result: dict[str, Any] = {}

    def start_sync() -> None:
        sync_result["response"] = daemon.api("POST", "/datasets/photos/sync", timeout=60)

    writer = threading.Thread(target=start_sync)
    try:
        writer.start()
        writer.join(0.5)  # the sync's first write (its run record) now waits for the lock
        assert writer.is_alive(), "the sync should be waiting for the write lock"
        answers: list[Response] = [
            daemon.get("/healthz"),
            daemon.get("/metrics"),
            daemon.get("/readyz"),
            daemon.api("GET", "/datasets"),
            daemon.api("GET", "/datasets/photos/items", params={"limit": "100"}),
            daemon.api("GET", "/datasets/photos/runs"),
        ]
        assert writer.is_alive(), "every read answered while the writer was still waiting"
    finally:
        other.execute("COMMIT")
        other.close()
        writer.join(60)
    assert [a.status for a in answers] == [200] * len(answers)
    datasets = answers[3].body["datasets"]
    assert datasets[0]["items"] == {"live": 300, "tombstone": 0}
    assert len(answers[4].body["items"]) == 100 and answers[4].body["next_cursor"]
    assert sync_result["response"].status == 202, "the waiting sync got through once the lock was released"
