"""What is the PostgreSQL backend's own, on the suite's real server: the schema version (a newer
database refused), the one-agent lock, the password never shown, errors as LedgerError, the
enrichment and item-event triggers, and batches in array form (a later duplicate wins, as row by
row). What every backend does is in the ledger conformance suite."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bucketsync.config import AgentConfig, DatasetConfig
from bucketsync.core.errors import LedgerError, LedgerLocked
from bucketsync.core.model import Counts, ObjectInfo
from bucketsync.enrich.queue import EnrichQueue
from bucketsync.enrich.triggers import Deliveries
from bucketsync.ledger import postgres
from bucketsync.ledger.ledger import Ledger
from bucketsync.ledger.postgres import SCHEMA_VERSION, bulk, redact, translate
from bucketsync.ledger.sqlite import MIGRATIONS
from bucketsync.stores.memory import MemoryStore
from bucketsync.upstream.pacing import Pacer
from bucketsync.upstream.sync import SyncLoop
from conformance import Delegating
from emulators.postgres import PostgresServer


def test_the_schema_versions_of_both_backends_move_together() -> None:
    assert len(MIGRATIONS) == SCHEMA_VERSION, (
        "a SQLite migration was appended: give the PostgreSQL schema (ledger/postgres.py) the same change "
        "and its SCHEMA_VERSION the same number"
    )


async def test_a_newer_database_is_refused_and_an_equal_one_reopens(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    ledger = await Ledger.open(url)
    await ledger.close()
    again = await Ledger.open(url)  # the schema is there: opened, not created twice
    await again.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE schema_version SET version = $1", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    for readonly in (False, True):
        with pytest.raises(LedgerError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this bucketsync"):
            await Ledger.open(url, readonly=readonly)


async def test_a_readonly_open_of_an_empty_database_says_so(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    with pytest.raises(LedgerError, match="no bucketsync schema yet"):
        await Ledger.open(url, readonly=True)
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT to_regclass('items')") is None, "a read-only open creates nothing"
    finally:
        await conn.close()


async def test_one_agent_per_database(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    first = await Ledger.open(url)
    second = await Ledger.open(url)
    try:
        await first.claim()
        with pytest.raises(LedgerLocked, match="another bucketsync agent"):
            await second.claim()
        # Reads and writes of another process still work beside the agent (the CLI's).
        ds = await second.dataset_id("photos")
        assert await first.find_dataset("photos") == ds
    finally:
        await first.close()
    try:
        await second.claim()  # the server dropped the lock with the first agent's connection
    finally:
        await second.close()


async def test_a_write_cancelled_mid_query_frees_the_write_lock_for_every_agent(
    postgres_server: PostgresServer,
) -> None:
    """A lost lease cancels a dataset's task mid-batch: the transaction must end on the server,
    or its advisory write lock would hold every agent's writers. (asyncpg cancels the running
    query and the ROLLBACK goes through; a ROLLBACK that fails or is interrupted closes the
    connection instead, which this test does not reach.)"""
    url = postgres_server.new_database()
    first, second = await Ledger.open(url), await Ledger.open(url)
    try:
        started = asyncio.Event()

        async def long_write() -> None:
            async with first.transaction() as tx:
                started.set()
                await tx.execute("SELECT pg_sleep(30)")

        task = asyncio.create_task(long_write())
        await started.wait()
        await asyncio.sleep(0.2)  # the sleep is running on the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Another agent's write gets the lock (a deadlock would wait the full 30 s and more).
        await asyncio.wait_for(second.dataset_id("after"), 20)
        assert await asyncio.wait_for(first.dataset_id("again"), 20) > 0  # the first writer reconnected
    finally:
        await first.close()
        await second.close()


def test_the_password_is_never_in_the_url() -> None:
    with pytest.raises(ValueError, match="leave the password out of the URL") as err:
        AgentConfig(ledger="postgresql://bucketsync:hunter2@db.example:5432/ledger")
    assert "hunter2" not in str(err.value)
    conf = AgentConfig(ledger="postgresql://bucketsync@db.example:5432/ledger")
    assert conf.ledger_file is None and conf.ledger_present()
    assert str(conf.local_state) == "var"
    assert redact("postgresql://u:hunter2@h:5/d") == "postgresql://u:***@h:5/d"
    assert redact("postgresql://u@h/d") == "postgresql://u@h/d"


async def test_the_password_comes_from_its_file_or_env_and_is_never_shown(
    postgres_server: PostgresServer, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    secret = Path(str(tmp_path)) / "pw"
    secret.write_text("s3cret-from-file\n")
    conf = AgentConfig(ledger="postgresql://u@127.0.0.1:1/d", ledger_password_file=secret)
    assert conf.ledger_password() == "s3cret-from-file"
    monkeypatch.setenv("BUCKETSYNC_LEDGER_PASSWORD", "s3cret-from-env")
    assert AgentConfig(ledger="postgresql://u@127.0.0.1:1/d").ledger_password() == "s3cret-from-env"
    # An unreachable server: a LedgerError naming the ledger, never the password.
    with pytest.raises(LedgerError, match=r"postgresql://u@127\.0\.0\.1:1/d.*unreachable") as err:
        await Ledger.open(str(conf.ledger), password="s3cret-from-env")
    assert "s3cret" not in str(err.value)


def test_statements_translate_once_to_numbered_parameters() -> None:
    assert translate("SELECT '?', ? , ?2 FROM t WHERE a = ?") == "SELECT '?', $1 , $2 FROM t WHERE a = $2"
    types = {("items", c): t for c, t in (("id", "int8"), ("key", "text"), ("size", "int8"))}
    insert = bulk("INSERT INTO items (key, size) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET size = 1", types)
    assert insert is not None and "unnest($1::text[], $2::int8[])" in insert.sql
    assert insert.args([("a", 1), ("b", 2), ("a", 3)]) == [["a", "b"], [3, 2]], "the later duplicate wins"
    update = bulk("UPDATE items SET size = ? WHERE id = ?", types)
    assert update is not None and update.sql.startswith("UPDATE items SET size = u.c0 FROM unnest(")
    assert bulk("UPDATE items SET size = ?, key = 'x' WHERE id = ?", types) is None, "not a simple form: row by row"


async def test_a_batch_with_a_key_twice_keeps_the_later(postgres_server: PostgresServer) -> None:
    ledger = await Ledger.open(postgres_server.new_database())
    try:
        ds = await ledger.dataset_id("d")
        run = await ledger.begin_run(ds, False)
        adds = [ObjectInfo("a", 1, 1.0, "e1"), ObjectInfo("b", 2, 1.0, "e2"), ObjectInfo("a", 3, 1.0, "e3")]
        await ledger.write_batch(ds, run, adds, [], Counts())
        item = await ledger.item(ds, "a")
        assert item is not None and (item.size, item.etag) == (3, "e3")
        assert await ledger.counts_by_state(ds) == {"live": 2, "tombstone": 0}
    finally:
        await ledger.close()


async def test_enrichment_and_item_events_are_queued_by_triggers(postgres_server: PostgresServer) -> None:
    ledger = await Ledger.open(postgres_server.new_database())
    try:
        ds = await ledger.dataset_id("d")
        queue = EnrichQueue(ledger)
        await queue.set_datasets([ds], [ds])
        run = await ledger.begin_run(ds, False)
        await ledger.write_batch(ds, run, [ObjectInfo(k, 1, 1.0, f"e-{k}") for k in ("a", "b")], [], Counts())
        jobs = await queue.due(10)
        assert [(j.key, j.etag) for j in jobs] == [("a", "e-a"), ("b", "e-b")]
        assert await queue.claim(jobs) == jobs
        events = await Deliveries(ledger).events()
        assert [(e[3], e[4]) for e in events] == [("created", "a"), ("created", "b")]
        # A new version re-queues its item (and the update is an event); a removal drops the queue row.
        a = await ledger.item(ds, "a")
        b = await ledger.item(ds, "b")
        assert a is not None and b is not None
        await ledger.write_batch(ds, run, [], [(a.id, ObjectInfo("a", 2, 2.0, "e-a2"))], Counts())
        await ledger.remove(run, [b.id], Counts())
        assert [(j.key, j.etag, j.attempts) for j in await queue.due(10)] == [("a", "e-a2", 0)]
        kinds = [(e[3], e[4]) for e in await Deliveries(ledger).events()]
        assert kinds[2:] == [("updated", "a"), ("removed", "b")]
        # Switched off: no more queueing, and writes pay for no trigger.
        await queue.set_datasets([], [])
        await ledger.write_batch(ds, run, [ObjectInfo("c", 1, 1.0, "e-c")], [], Counts())
        assert await queue.counts(ds) == {"pending": 1, "done": 0, "failed": 0}, "c was not queued"
    finally:
        await ledger.close()


async def test_a_lost_writer_connection_fails_one_write_then_heals(postgres_server: PostgresServer) -> None:
    """The server ends the writer's connection (a restart, a network cut): writes work again
    without a restart (a new connection), and the agent holds the one-agent lock again."""
    from bucketsync.ledger.postgres import PostgresDb

    url = postgres_server.new_database()
    ledger = await Ledger.open(url)
    other = await Ledger.open(url)
    try:
        await ledger.claim()
        ds = await ledger.dataset_id("d")
        assert isinstance(ledger.db, PostgresDb)
        admin = await asyncpg.connect(url)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", ledger.db.conn.get_server_pid())
        finally:
            await admin.close()
        # The client learns of the loss either on this write (a LedgerError, the ledger's fault)
        # or before it (then it reconnects at once): both are fine, neither needs a restart.
        try:
            await ledger.begin_run(ds, False)
        except LedgerError as err:
            assert "unreachable" in str(err) and ledger.fault == str(err)
        run = await ledger.begin_run(ds, False)
        assert ledger.fault is None and (await ledger.run(run)) is not None
        with pytest.raises(LedgerLocked):
            await other.claim()
    finally:
        await other.close()
        await ledger.close()


class _Gated(Delegating):
    """A store whose listing starts once ``gate`` is set."""

    def __init__(self, inner: MemoryStore, gate: asyncio.Event) -> None:
        super().__init__(inner)
        self.gate = gate

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        await self.gate.wait()
        async for obj in self.inner.list(prefix):
            yield obj


def _open_gate() -> asyncio.Event:
    gate = asyncio.Event()
    gate.set()
    return gate


async def test_more_datasets_syncing_at_once_than_read_connections(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run's snapshot holds one of the pool's read connections for its whole diff. A run
    that took its turn on the event loop (the agent's ``Pacer``) and then waited for a
    connection, while the run holding it waited for a turn, was a deadlock: an agent syncing
    more datasets at once than ``POOL_SIZE`` hung on its first no-change round.

    Made certain here: one read connection, one turn given up at every step of a diff, and A's
    listing held back until B's run began, so B waits for the turn A holds with its snapshot open."""
    monkeypatch.setattr(postgres, "POOL_SIZE", 1)
    ledger = await Ledger.open(postgres_server.new_database())
    names = [f"pool-{uuid.uuid4().hex}" for _ in range(2)]
    pacer = Pacer(concurrent=1, slice=0.0)
    b_started = asyncio.Event()
    try:
        loops = []
        for i, name in enumerate(names):
            store = MemoryStore(name)
            store.load((f"k{n:03}", b"x", 1.0) for n in range(300))  # three steps of the diff each
            gate = b_started if i == 0 else _open_gate()
            loops.append(SyncLoop(name, DatasetConfig(driver="d"), _Gated(store, gate), ledger, pacer))
        b_started.set()
        for loop in loops:  # the initial syncs, one after the other
            assert (await loop.run_once()).counts.added == 300
        b_started.clear()
        started: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        started.add_done_callback(lambda _: b_started.set())
        runs = [asyncio.ensure_future(loops[0].run_once()), asyncio.ensure_future(loops[1].run_once(started=started))]
        # A deadlock never ends: the bound only turns it into a failure instead of a hung suite.
        again = await asyncio.wait_for(asyncio.gather(*runs), 60)
        assert [r.counts.unchanged for r in again] == [300, 300]
    finally:
        await ledger.close()
        for name in names:
            MemoryStore.drop(name)
