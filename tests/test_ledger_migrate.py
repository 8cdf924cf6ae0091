"""``bucketsync ledger migrate --to postgresql://…`` on a real SQLite ledger and a real PostgreSQL: everything
arrives with its ids, verified; the source is untouched; a running agent, a used target and a copy that does
not match are refused, leaving the target as it was."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import asyncpg
import pytest

from bucketsync.catalog.items import ensure_index
from bucketsync.core.model import Counts, ItemState, ObjectInfo, OpKind, OpState, RunStatus
from bucketsync.ledger.ledger import Ledger
from bucketsync.ledger.migrate import BadMigration, MigrationError, migrate
from bucketsync.ledger.sqlite import InstanceLock
from e2e import cli, parallel, write_config
from emulators.postgres import PostgresServer


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def make_source(path: Path) -> dict[str, int]:
    """A SQLite ledger with something in every part: items (tombstones, metadata), runs, ops in every
    state, a clone of pointers, folders, the inbox, re-sync marks, dataset metadata, a catalog index."""
    led = await Ledger.open(path)
    try:
        photos = await led.dataset_id("photos")
        docs = await led.dataset_id("docs")
        run = await led.begin_run(photos, False)
        keys = [f"img/{i:04d}.jpg" for i in range(1200)] + ["é/ü", "Z", "_"]
        await led.write_batch(
            photos, run, [ObjectInfo(k, i, 1000.5 + i, f"e{i}", None) for i, k in enumerate(keys)], [], Counts()
        )
        await led.finish_run(run, Counts(listed=len(keys), added=len(keys)), RunStatus.OK, None)
        await led.begin_run(docs, True)  # left running: the copy keeps it as it is
        first = await led.item(photos, keys[0])
        assert first is not None
        await led.merge_meta(first.id, {"tag": "cat", "n": 3})
        await led.set_state((await led.item(photos, "Z")).id, ItemState.TOMBSTONE)  # type: ignore[union-attr]
        await led.merge_dataset_meta(photos, {"owner": "ml"})
        done = await led.enqueue(docs, OpKind.PUT, "a.txt", staged="/s/a", content_type="text/plain")
        started = await led.start_attempt(done)
        assert started is not None
        await led.complete_put(started, docs, ObjectInfo("a.txt", 3, 5.0, "ea", "v1"))
        await led.enqueue(docs, OpKind.DELETE, "b.txt", if_match="eb")
        failed = await led.enqueue(docs, OpKind.PUT, "c.txt", staged="/s/c")
        await led.fail_op(failed, "conflict", "exists")
        await led.create_clone("cats", photos, "photos", "key < ?", ["img/0100"], True)
        cats = await led.find_dataset("cats")
        assert cats is not None
        await led.add_folder(cats, "empty/")
        await led.inbox_put(docs, [("x", "created", "t", "ex", 1, 2.0), ("y", "removed", None, None, None, None)])
        await led.inbox_done([max(i for i, _ in await led.inbox_take(docs, 0, 10))])  # its id is never reused
        await led.mark_resync(["docs"], "lost commits")
        assert await ensure_index(led, photos, "size")
        return {"photos": photos, "docs": docs, "cats": cats, "pending_op": done + 1}
    finally:
        await led.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """One source ledger for the module (every test copies it, none writes it)."""
    import asyncio

    path = tmp_path_factory.mktemp("migrate") / "var" / "ledger.db"
    ids = asyncio.run(make_source(path))
    return path, ids


def test_migrate_copies_everything_verified_and_leaves_the_source_untouched(
    tmp_path: Path, source: tuple[Path, dict[str, int]], postgres_server: PostgresServer
) -> None:
    path, ids = source
    before = digest(path), sorted(p.name for p in path.parent.iterdir())
    config = write_config(tmp_path, {}, {}, agent={"ledger": str(path)})
    url = postgres_server.new_database()

    done = cli(config, "ledger", "migrate", "--to", url)
    assert done.returncode == 0, done.stderr
    assert "copying items: 1,305 rows" in done.stdout and "copying runs: 2 rows" in done.stdout, done.stdout
    assert "verified photos: items 1,203, runs 1" in done.stdout, done.stdout
    assert "counts and checksums verified per dataset" in done.stdout, done.stdout
    after = digest(path), sorted(p.name for p in path.parent.iterdir() if p.name != "ledger.db.lock")
    assert after == before, "the SQLite ledger is untouched (its lock file aside)"

    import asyncio

    asyncio.run(_check_copy(path, url, ids))
    used = r"already holds a ledger \(datasets: 4 rows.*migrate into an empty database"
    with pytest.raises(BadMigration, match=used):
        asyncio.run(migrate(path, url))


async def _check_copy(path: Path, url: str, ids: dict[str, int]) -> None:
    src = await Ledger.open(path, readonly=True)
    dst = await Ledger.open(url)
    try:
        for name in ("photos", "docs", "cats"):
            ds = ids[name]
            assert await dst.find_dataset(name) == ds, "datasets keep their ids"
            want = [(i.id, i.key, i.size, i.modified, i.etag, i.state, i.meta) for i in await src.items(ds, state=None)]
            got = [(i.id, i.key, i.size, i.modified, i.etag, i.state, i.meta) for i in await dst.items(ds, state=None)]
            assert got == want, f"{name}: the same items, ids, values and key order"
            assert await dst.counts_by_state(ds) == await src.counts_by_state(ds), "the kept counts"
            assert await dst.runs(ds) == await src.runs(ds)
            assert await dst.ops(dataset_id=ds) == await src.ops(dataset_id=ds)
        assert await dst.datasets_meta() == await src.datasets_meta()
        assert await dst.runtime_datasets() == {"cats": ("clone", "photos")}
        [pointer, *_] = await dst.items(ids["cats"])
        assert await dst.pointed(pointer.id) == ("photos", pointer.key), "pointers still point"
        assert await dst.empty_folders(ids["cats"], "") == ["empty/"]
        assert [e for _, e in await dst.inbox_take(ids["docs"], 0, 10)] == [("x", "created", "t", "ex", 1, 2.0)]
        await dst.inbox_put(ids["docs"], [("z", "created", None, None, None, None)])
        taken = [i for i, _ in await dst.inbox_take(ids["docs"], 0, 10)]
        assert taken[-1] > taken[0] + 1, f"the inbox does not reuse the id of an entry done before the copy: {taken}"
        assert await dst.resync_pending() == {"docs"}
        [(name, sql)] = await src.indexes("items_by_size")
        assert await dst.indexes("items_by_size") == [(name, sql)], "the catalog's field indexes too"
        states = {o.state for o in await dst.ops(dataset_id=ids["docs"])}
        assert states == {OpState.DONE, OpState.PENDING, OpState.FAILED}, states
        # New rows continue after the copied ids, as they would have on SQLite.
        assert await dst.enqueue(ids["docs"], OpKind.DELETE, "new") > ids["pending_op"] + 1
        assert await dst.dataset_id("fresh") > ids["cats"]
        run = await dst.begin_run(ids["photos"], False)
        assert run > max(r.id for r in await src.runs(ids["docs"]))
    finally:
        await src.close()
        await dst.close()


def test_the_cli_refuses_while_an_agent_holds_the_ledger_and_names_bad_input(
    tmp_path: Path, source: tuple[Path, dict[str, int]], postgres_server: PostgresServer
) -> None:
    path, _ = source
    config = write_config(tmp_path, {}, {}, agent={"ledger": str(path)})
    url = postgres_server.new_database()
    lock = InstanceLock(path)
    lock.acquire()  # this process stands in for a running agent
    try:
        locked, bad = parallel(
            lambda: cli(config, "ledger", "migrate", "--to", url),
            lambda: cli(config, "ledger", "migrate", "--to", "sqlite:///other.db"),
        )
    finally:
        lock.release()
    assert locked.returncode == 1, locked.stderr
    assert f"another bucketsync agent (pid {os.getpid()})" in locked.stderr and "stop it first" in locked.stderr
    db = url.rsplit("/", 1)[1]
    assert postgres_server.psql("SELECT to_regclass('items') IS NULL", db) == "t", "nothing was written to the target"
    assert bad.returncode == 2, bad.stderr
    assert "--to must be a postgresql:// URL, not 'sqlite:///other.db'" in bad.stderr


async def test_a_copy_that_does_not_match_is_rolled_back(
    source: tuple[Path, dict[str, int]], postgres_server: PostgresServer
) -> None:
    """A target that alters what it is given (here a trigger on runs) fails verification: nothing stays."""
    path, _ = source
    url = postgres_server.new_database()
    await (await Ledger.open(url)).close()  # the schema, empty
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE FUNCTION tamper() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN NEW.error := 'x'; RETURN NEW; END $$;"
            "CREATE TRIGGER tamper BEFORE INSERT ON runs FOR EACH ROW EXECUTE FUNCTION tamper()"
        )
        lines: list[str] = []
        with pytest.raises(MigrationError, match=r"runs of dataset photos: the same 1 rows, different values") as exc:
            await migrate(path, url, progress=lines.append)
        assert "rolled back" in str(exc.value)
        assert any(line.startswith("copying items") for line in lines), "progress came while it copied"
        for table in ("datasets", "items", "runs", "ops", "item_counts"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, f"{table} is empty again"
    finally:
        await conn.close()


async def test_bad_sources_and_targets_are_named(tmp_path: Path, postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    with pytest.raises(BadMigration, match=r"must be a postgresql:// URL, not 'sqlite:///x\.db'"):
        await migrate(tmp_path / "ledger.db", "sqlite:///x.db")
    with pytest.raises(BadMigration, match=r"no SQLite ledger at .*absent\.db"):
        await migrate(tmp_path / "absent.db", url)
    with pytest.raises(BadMigration, match=r"must be a SQLite file; agent\.ledger is postgresql://u:\*\*\*@h/db"):
        await migrate("postgresql://u:secret@h/db", url)
    old = tmp_path / "old.db"
    await (await Ledger.open(old)).close()
    import sqlite3

    con = sqlite3.connect(old)
    con.execute("PRAGMA user_version = 3")
    con.close()
    with pytest.raises(MigrationError, match=r"schema version 3, older than this bucketsync .* start this bucketsync"):
        await migrate(old, url)
