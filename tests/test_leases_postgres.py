"""Leases and fencing on the suite's real PostgreSQL: claim, renew, expiry, epochs, concurrent
claims, surplus release, and a write under a lost lease refused in its own transaction.

An expiry is made by moving the lease's ``expires`` into the past (what the server's clock
would do after the lease period), so no test waits for a clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import asyncpg
import pytest

from bucketsync.config import AgentConfig
from bucketsync.core.errors import LeaseLost, LedgerLocked
from bucketsync.core.leases import Fence
from bucketsync.core.model import Counts, ItemState, ObjectInfo, OpKind, RunStatus
from bucketsync.daemon.leases import LeaseKeeper
from bucketsync.ledger.leases import FENCE, Leases
from bucketsync.ledger.ledger import Ledger
from bucketsync.ledger.postgres import PostgresDb
from bucketsync.ledger.retention import prune_once
from emulators.postgres import PostgresServer

NAMES = [f"ds{i:02}" for i in range(12)]
T = TypeVar("T")


@pytest.fixture
async def ledger(postgres_server: PostgresServer) -> AsyncIterator[Ledger]:
    led = await Ledger.open(postgres_server.new_database())
    try:
        yield led
    finally:
        await led.close()


def leases(ledger: Ledger, agent: str, seconds: float = 30.0) -> Leases:
    assert isinstance(ledger.db, PostgresDb)
    return Leases(ledger.db.pool, agent, seconds)


async def expire(ledger: Ledger, dataset: str) -> None:
    """The lease period passed on the server's clock."""
    assert isinstance(ledger.db, PostgresDb)
    async with ledger.db.pool.acquire() as conn:
        await conn.execute(
            "UPDATE leases SET expires = clock_timestamp() - interval '1 second' WHERE dataset = $1", dataset
        )


async def test_claim_renew_expiry_and_the_epoch_moving_on_every_claim(ledger: Ledger) -> None:
    a, b = leases(ledger, "a"), leases(ledger, "b")
    await a.register(NAMES[:3])
    await b.register(NAMES[:3])  # every agent registers the same config: no duplicate rows
    got = await a.claim(NAMES[:3], 2)
    assert got == {"ds00": 1, "ds01": 1}
    assert await b.claim(NAMES[:3], 5) == {"ds02": 1}, "a held lease is not claimed"
    assert await a.renew(got) == {"ds00", "ds01"}
    assert await a.renew({"ds00": 0}) == set(), "a renewal under an old epoch fails"
    assert await b.renew({"ds00": 1}) == set(), "only the owner renews"

    await expire(ledger, "ds01")
    assert await a.renew(got) == {"ds00"}, "an expired lease is not renewed: only a new claim revives it"
    assert await b.claim(["ds01"], 1) == {"ds01": 2}
    owners = await a.owners()
    assert owners["ds01"] == ("b", 2, True)

    assert await b.release("ds01", 2)
    assert not await a.release("ds00", 7), "a release names the epoch it gives up"
    assert await a.claim(["ds01"], 1) == {"ds01": 3}, "a released lease is free at once; its epoch moves on"


async def test_concurrent_claims_never_give_a_dataset_two_owners(ledger: Ledger) -> None:
    agents = [leases(ledger, f"agent{i}") for i in range(6)]
    await agents[0].register(NAMES)
    for _ in range(3):  # every round, all datasets free up and six agents race for them
        won = await asyncio.gather(*(x.claim(NAMES, len(NAMES)) for x in agents))
        claimed = [name for got in won for name in got]
        assert sorted(claimed) == NAMES, "each dataset went to exactly one agent"
        for x, got in zip(agents, won, strict=True):
            for name in got:
                await expire(ledger, name)
            assert await x.renew(got) == set()
    epochs = {name: epoch for name, (_, epoch, _) in (await agents[0].owners()).items()}
    assert epochs == dict.fromkeys(NAMES, 3), "one claim per dataset per round, each bumping the epoch once"


async def test_heartbeats_count_live_agents_and_a_leaver_stops_counting(ledger: Ledger) -> None:
    a, b, c = (leases(ledger, n) for n in "abc")
    assert await a.heartbeat() == 1
    await b.heartbeat()
    assert await c.heartbeat() == 3
    await b.leave()
    assert await a.heartbeat() == 2
    assert isinstance(ledger.db, PostgresDb)
    async with ledger.db.pool.acquire() as conn:  # c's last heartbeat is older than a lease period
        await conn.execute("UPDATE agents SET heartbeat = clock_timestamp() - interval '1 hour' WHERE id = 'c'")
    assert await a.heartbeat() == 1, "an agent that stopped beating ages out of the fair share"


async def test_a_write_under_a_lost_lease_is_refused_and_writes_nothing(ledger: Ledger) -> None:
    a, b = leases(ledger, "a"), leases(ledger, "b")
    await a.register(["photos"])
    ds = await ledger.dataset_id("photos")
    epoch = (await a.claim(["photos"], 1))["photos"]
    token = FENCE.set(Fence("photos", "a", epoch))
    try:
        run = await ledger.begin_run(ds, forced=False)
        await ledger.write_batch(ds, run, [ObjectInfo("k1", 1, 1.0, "e1", None)], [], Counts(listed=1, added=1))
        await expire(ledger, "photos")  # agent A paused past its lease ...
        assert await b.claim(["photos"], 1) == {"photos": epoch + 1}  # ... and B took the dataset over
        with pytest.raises(LeaseLost, match="no longer holds the lease of dataset 'photos'"):
            await ledger.write_batch(ds, run, [ObjectInfo("k2", 1, 1.0, "e2", None)], [], Counts(listed=2, added=2))
        with pytest.raises(LeaseLost):
            await ledger.finish_run(run, Counts(listed=2, added=2), RunStatus.OK, None)
    finally:
        FENCE.reset(token)
    assert [i.key for i in await ledger.items(ds)] == ["k1"], "A's late batch wrote nothing"
    assert (await ledger.run(run)).status == "running"  # type: ignore[union-attr]
    # B, holding the new epoch, writes.
    token = FENCE.set(Fence("photos", "b", epoch + 1))
    try:
        await ledger.write_batch(ds, run, [ObjectInfo("k3", 1, 1.0, "e3", None)], [], Counts())
    finally:
        FENCE.reset(token)
    assert [i.key for i in await ledger.items(ds)] == ["k1", "k3"]


async def test_a_claim_never_waits_for_a_fenced_write_and_the_old_owners_commit_comes_first(ledger: Ledger) -> None:
    """Renewals and claims take no turn behind a sync's batch (the fence holds no row lock);
    the write lock still orders the old owner's open transaction before the new owner's first
    write, and the old owner's next transaction is refused."""
    a, b = leases(ledger, "a", seconds=0.5), leases(ledger, "b")
    await a.register(["photos"])
    epoch = (await a.claim(["photos"], 1))["photos"]
    order: list[str] = []

    async def write_as(owner: str, at: int, name: str) -> None:
        FENCE.set(Fence("photos", owner, at))  # this task's own context
        async with ledger.transaction() as tx:
            await tx.execute("UPDATE datasets SET meta = NULL WHERE name = 'none'")
            order.append(name)

    token = FENCE.set(Fence("photos", "a", epoch))
    try:
        async with ledger.transaction() as tx:
            await asyncio.sleep(0.6)  # past the 0.5 s lease, on the server's clock too
            assert (await a.owners())["photos"][2] is False
            claimed = await asyncio.wait_for(b.claim(["photos"], 1), 5)  # does not wait for A's commit
            assert claimed == {"photos": epoch + 1}
            later = asyncio.create_task(write_as("b", epoch + 1, "b's first write"))
            await asyncio.sleep(0.2)
            assert not later.done(), "B's write waits for the write lock A's transaction holds"
            await tx.execute("UPDATE datasets SET meta = NULL WHERE name = 'none'")
            order.append("a's last write")
        await later
        with pytest.raises(LeaseLost):
            async with ledger.transaction():
                pass
    finally:
        FENCE.reset(token)
    assert order == ["a's last write", "b's first write"]


class Tasks:
    """What the supervisor does for the keeper: the datasets' tasks started (with their fence)
    and stopped, in order."""

    def __init__(self) -> None:
        self.running: dict[str, Fence] = {}
        self.stopped: list[tuple[str, bool]] = []
        self.stopping = asyncio.Event()

    def start(self, name: str, fence: Fence) -> None:
        assert name not in self.running
        self.running[name] = fence

    async def stop(self, name: str, at_once: bool) -> None:
        self.running.pop(name, None)
        self.stopped.append((name, at_once))
        self.stopping.set()


def keeper(ledger: Ledger, agent: str, names: list[str], cap: int = 0) -> tuple[LeaseKeeper, Tasks]:
    tasks = Tasks()
    return LeaseKeeper(leases(ledger, agent), lambda: names, tasks.start, tasks.stop, max_datasets=cap), tasks


async def test_keepers_divide_the_datasets_and_rebalance_as_agents_join_and_die(ledger: Ledger) -> None:
    names = NAMES[:6]
    a, at = keeper(ledger, "a", names)
    await a.turn()
    assert sorted(at.running) == names, "alone, an agent takes every dataset"
    b, bt = keeper(ledger, "b", names)
    await b.turn()  # b joins: nothing is free yet
    assert bt.running == {}
    await a.turn()  # a sees two live agents: it stops, then releases, its surplus
    assert sorted(at.running) == names[:3]
    assert at.stopped == [(n, False) for n in names[3:]], "a release stops the loop gracefully first"
    await b.turn()
    assert sorted(bt.running) == names[3:]
    assert {f.epoch for f in bt.running.values()} == {2}

    # b dies (no leave): once its leases expired and its heartbeat aged out, a takes all back.
    assert isinstance(ledger.db, PostgresDb)
    async with ledger.db.pool.acquire() as conn:
        await conn.execute("UPDATE agents SET heartbeat = clock_timestamp() - interval '1 hour' WHERE id = 'b'")
    for name in names[3:]:
        await expire(ledger, name)
    await a.turn()
    assert sorted(at.running) == names
    assert {at.running[n].epoch for n in names[3:]} == {3}


async def test_a_keeper_stops_a_lost_dataset_at_once_and_max_datasets_caps_it(ledger: Ledger) -> None:
    a, at = keeper(ledger, "a", NAMES[:4], cap=2)
    await a.turn()
    assert sorted(at.running) == NAMES[:2], "max_datasets caps the fair share"
    await expire(ledger, "ds00")
    b = leases(ledger, "b")
    assert await b.claim(["ds00"], 1) == {"ds00": 2}
    await a.turn()
    assert ("ds00", True) in at.stopped, "a failed renewal cancels the dataset's loop at once"
    assert "ds00" not in a.held
    # a fenced write that found its lease gone reports it; the next turn stops that loop at once
    # (the lease row still renews here: the report alone stops the loop)
    fence = at.running["ds01"]
    a.lost("ds01", fence.epoch - 1)
    assert not a.wake.is_set(), "a report about an older epoch of the lease is stale"
    a.lost("ds01", fence.epoch)
    assert a.wake.is_set()
    await a.turn()
    assert ("ds01", True) in at.stopped


async def test_an_owner_takes_only_its_datasets_ops_and_starts_an_attempt_only_under_its_lease(
    ledger: Ledger,
) -> None:
    a, b = leases(ledger, "a"), leases(ledger, "b")
    await a.register(["mine", "theirs"])
    ids = {name: await ledger.dataset_id(name) for name in ("mine", "theirs")}
    ops = {name: await ledger.enqueue(ds, OpKind.DELETE, "k") for name, ds in ids.items()}
    epoch = (await a.claim(["mine"], 1))["mine"]
    await b.claim(["theirs"], 1)
    due = await ledger.due_ops(time.time() + 1, datasets=["mine"])
    assert [op.id for op in due] == [ops["mine"]]
    assert await ledger.due_ops(time.time() + 1, datasets=[]) == []
    token = FENCE.set(Fence("theirs", "a", epoch))  # a's fence is for "mine", not "theirs"
    try:
        with pytest.raises(LeaseLost):
            await ledger.start_attempt(ops["theirs"])
    finally:
        FENCE.reset(token)
    assert (await ledger.op(ops["theirs"])).attempts == 0  # type: ignore[union-attr]


async def test_daemons_share_the_agent_lock_and_keep_an_exclusive_agent_out(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    first, second, cli = [await Ledger.open(url) for _ in range(3)]
    try:
        await first.claim(shared=True)
        await second.claim(shared=True)  # daemons dividing the datasets by leases: side by side
        with pytest.raises(LedgerLocked, match="another bucketsync agent"):
            await cli.claim()  # the CLI's own agent would write every dataset unfenced
    finally:
        for led in (first, second, cli):
            await led.close()


async def test_a_keeper_that_cannot_reach_the_database_stops_its_loops_before_its_leases_expire(
    ledger: Ledger, postgres_server: PostgresServer
) -> None:
    assert isinstance(ledger.db, PostgresDb)
    pool = await asyncpg.create_pool(ledger.db.where, min_size=1, max_size=2)
    tasks = Tasks()
    a = LeaseKeeper(Leases(pool, "a", 1.5), lambda: NAMES[:2], tasks.start, tasks.stop)
    await a.turn()
    assert sorted(tasks.running) == NAMES[:2]
    pool.terminate()  # the database is out of reach from here on
    stop = asyncio.Event()
    keeper = asyncio.create_task(a.run(stop))
    await asyncio.wait_for(tasks.stopping.wait(), timeout=30)
    stop.set()
    await keeper
    assert sorted(tasks.stopped) == [(n, True) for n in NAMES[:2]], "cancelled at once: unrenewed, maybe another's"
    assert a.held == {}


async def _fenced(fence: Fence | None, work: Awaitable[T]) -> T:
    """``work`` in a task of its own whose writes are fenced by ``fence`` (None: unfenced)."""

    async def run() -> T:
        FENCE.set(fence)
        return await work

    return await asyncio.create_task(run())


async def _held_open(ledger: Ledger, fence: Fence, key: str, opened: asyncio.Event, done: asyncio.Event) -> None:
    """A fenced write transaction of ``fence.dataset`` that stays open until ``done``."""
    ds = await ledger.dataset_id(fence.dataset)
    async with ledger.transaction() as tx:
        await tx.execute(
            "INSERT INTO items (dataset_id, key, size, modified, updated) VALUES (?, ?, 1, 1.0, 1.0)", (ds, key)
        )
        opened.set()
        await done.wait()


@pytest.fixture
async def two(postgres_server: PostgresServer) -> AsyncIterator[tuple[Ledger, Ledger]]:
    """Two ledgers on one database: two agents' writer connections."""
    url = postgres_server.new_database()
    first = await Ledger.open(url)
    second = await Ledger.open(url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_writers_of_different_datasets_commit_side_by_side_and_a_catalog_wide_write_waits(
    two: tuple[Ledger, Ledger],
) -> None:
    """A fenced write takes the write lock shared and its dataset's lock: agent B commits its
    batches of dataset "b" while agent A's transaction of "a" is open (under one database-wide
    lock, B waited for it). An unfenced write (the API's: it may touch any dataset) still
    takes the write lock whole and waits for A's transaction. Every commit of either moves the
    data version, and no write is lost."""
    one, other = two
    la, lb = leases(one, "A"), leases(other, "B")
    await la.register(["a", "b"])
    fa = Fence("a", "A", (await la.claim(["a"], 1))["a"])
    fb = Fence("b", "B", (await lb.claim(["b"], 1))["b"])
    ids = {n: await one.dataset_id(n) for n in ("a", "b")}
    opened, done = asyncio.Event(), asyncio.Event()
    held = asyncio.create_task(_fenced(fa, _held_open(one, fa, "held", opened, done)))
    await opened.wait()
    try:
        before = await other.db.version()

        async def b_writes() -> None:
            run = await other.begin_run(ids["b"], forced=False)
            for i in range(3):
                await other.write_batch(ids["b"], run, [ObjectInfo(f"k{i}", 1, 1.0, f"e{i}", None)], [], Counts())

        # bounded only so that a lock wait fails the test instead of hanging it
        await asyncio.wait_for(_fenced(fb, b_writes()), 30)
        assert await other.db.version() == before + 4, "each of B's commits moved the data version"
        assert not held.done()
        wide = asyncio.create_task(_fenced(None, other.merge_dataset_meta(ids["a"], {"team": "x"})))
        await asyncio.sleep(0.3)
        assert not wide.done(), "a catalog-wide write waits for every open dataset write"
    finally:
        done.set()
    await held
    assert await wide == {"team": "x"}
    assert [i.key for i in await other.items(ids["a"])] == ["held"]
    assert [i.key for i in await other.items(ids["b"])] == ["k0", "k1", "k2"]
    assert (await one.counts_by_state(ids["b"]))["live"] == 3


async def test_one_datasets_writers_on_two_connections_take_turns_and_the_old_owner_is_fenced(
    two: tuple[Ledger, Ledger],
) -> None:
    """Across agents (two writer connections, no process lock between them): the old owner's
    open transaction of a dataset, which passed its check, commits before the new owner's
    first write of it begins; the old owner's next transaction is refused."""
    one, other = two
    la, lb = leases(one, "A", seconds=0.5), leases(other, "B")
    await la.register(["a"])
    old = Fence("a", "A", (await la.claim(["a"], 1))["a"])
    ds = await other.dataset_id("a")
    opened, done = asyncio.Event(), asyncio.Event()
    held = asyncio.create_task(_fenced(old, _held_open(one, old, "old", opened, done)))
    await opened.wait()
    await expire(one, "a")
    new = Fence("a", "B", (await lb.claim(["a"], 1))["a"])
    later = asyncio.create_task(_fenced(new, other.begin_run(ds, forced=False)))
    await asyncio.sleep(0.3)
    assert not later.done(), "the new owner's write waits for the dataset's lock the old owner's transaction holds"
    done.set()
    await held
    run = await later
    with pytest.raises(LeaseLost):
        await _fenced(old, one.set_state((await one.items(ds))[0].id, ItemState.LIVE))
    assert [i.key for i in await other.items(ds)] == ["old"]
    assert (await other.run(run)).status == "running"  # type: ignore[union-attr]


async def test_with_pointer_items_fenced_writes_of_different_datasets_take_turns(two: tuple[Ledger, Ledger]) -> None:
    """A merge points into "a" and "b": a batch of either also updates the merge's pointers and
    counts, rows the other's batch may update too. Then fenced writes take turns (one more lock),
    and concurrent batches that change both sources leave the merge's counts right."""
    one, other = two
    la, lb = leases(one, "A"), leases(other, "B")
    await la.register(["a", "b"])
    fa = Fence("a", "A", (await la.claim(["a"], 1))["a"])
    fb = Fence("b", "B", (await lb.claim(["b"], 1))["b"])
    ids = {n: await one.dataset_id(n) for n in ("a", "b")}
    runs = {}
    for name, led, fence in (("a", one, fa), ("b", other, fb)):
        runs[name] = await _fenced(fence, led.begin_run(ids[name], forced=False))
        rows = [ObjectInfo(f"{name}{i}", 1, 1.0, "e0", None) for i in range(20)]
        await _fenced(fence, led.write_batch(ids[name], runs[name], rows, [], Counts()))
    merged, n = await one.create_merge("both", [(ids["a"], "a"), (ids["b"], "b")], "folder")
    assert n == 40

    opened, done = asyncio.Event(), asyncio.Event()
    held = asyncio.create_task(_fenced(fa, _held_open(one, fa, "held", opened, done)))
    await opened.wait()
    batch = [ObjectInfo("x", 1, 1.0, "e", None)]
    later = asyncio.create_task(_fenced(fb, other.write_batch(ids["b"], runs["b"], batch, [], Counts())))
    await asyncio.sleep(0.3)
    assert not later.done(), "with pointer items, a write of b waits for the open write of a"
    done.set()
    await held
    await later

    async def change(led: Ledger, fence: Fence, name: str) -> None:
        rows = {i.key: i.id for i in await led.items(ids[name], limit=100)}
        for round_ in range(1, 6):
            updates = [(rows[f"{name}{i}"], ObjectInfo(f"{name}{i}", 2, 2.0, f"e{round_}", None)) for i in range(20)]
            await led.write_batch(ids[name], runs[name], [], updates, Counts())

    await asyncio.wait_for(asyncio.gather(_fenced(fa, change(one, fa, "a")), _fenced(fb, change(other, fb, "b"))), 60)
    counts = await one.counts_by_state(merged)
    assert (counts["live"], counts["stale"]) == (0, 40), counts


async def test_retention_prunes_the_datasets_an_agent_holds_under_their_fences(ledger: Ledger) -> None:
    """Each agent prunes the datasets it holds (a write of one dataset, fenced), never another
    agent's, and every agent the datasets no configuration names any more; a lease lost
    meanwhile leaves that dataset's history to its new owner."""
    a, _ = keeper(ledger, "a", ["mine", "theirs"])
    b = leases(ledger, "b")
    await a.leases.register(["mine", "theirs"])
    await b.claim(["theirs"], 1)
    await a.turn()
    assert sorted(a.held) == ["mine"]
    ids = {name: await ledger.dataset_id(name) for name in ("mine", "theirs", "gone")}
    for ds in ids.values():
        for _ in range(4):
            run = await ledger.begin_run(ds, forced=False)
            await ledger.finish_run(run, Counts(), RunStatus.OK, None)

    async def kept() -> dict[str, int]:
        return {name: len(await ledger.runs(ds)) for name, ds in ids.items()}

    await prune_once(ledger, AgentConfig.model_validate({"keep_runs": 2}), shares=a)
    assert await kept() == {"mine": 2, "theirs": 4, "gone": 2}

    await expire(ledger, "mine")
    await b.claim(["mine"], 1)  # a has not noticed yet: its fence of "mine" is stale
    await prune_once(ledger, AgentConfig.model_validate({"keep_runs": 1}), shares=a)
    assert await kept() == {"mine": 2, "theirs": 4, "gone": 1}
