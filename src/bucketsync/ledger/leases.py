"""The leases of a PostgreSQL ledger shared by several agents (the SQL; the decisions are core/leases.py).

- ``leases``: a row per configured dataset: its owner (an agent id), when the lease expires,
  and an epoch that every claim increments and nothing ever decrements.
- ``agents``: each agent's last heartbeat; the live ones divide the datasets (the fair share).

Every time is the database server's (``clock_timestamp()``): agents' clocks never decide who
owns what. A claim takes rows with ``FOR UPDATE SKIP LOCKED`` and re-checks them once locked,
so two agents claiming at once never both win a dataset. A renewal matches owner, epoch and
an unexpired lease: once a lease expired, only a new claim (and a new epoch) revives it.

Fencing: a task that writes for a dataset (its sync loop, an outbox op) runs with ``FENCE``
set; the PostgreSQL backend's write transaction takes the locks of ``lock`` (the dataset's
own, and the database's write lock shared) and then runs ``check``: a write whose lease moved
on is refused with ``LeaseLost`` before it writes anything. The check takes no lock on the
lease row: a row lock held to the commit made every renewal wait behind a sync's batch, and a
renewal that waited past its lock timeout lost every lease of the agent. None is needed: every
write of a dataset holds its lock, so a transaction that passed its check commits before the
next owner's first write of that dataset begins.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from bucketsync.core.errors import LeaseLost
from bucketsync.core.leases import Fence

if TYPE_CHECKING:  # the outbox imports FENCE on every ledger; a SQLite one never loads asyncpg
    import asyncpg

C = 'COLLATE "C"'

SCHEMA = f"""
CREATE TABLE leases (
    dataset TEXT {C} PRIMARY KEY,
    owner TEXT,
    expires TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    epoch BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE agents (id TEXT PRIMARY KEY, heartbeat TIMESTAMPTZ NOT NULL);
"""

#: the lease the current task writes under; None: an unfenced write (SQLite, the API's enqueues)
FENCE: contextvars.ContextVar[Fence | None] = contextvars.ContextVar("bucketsync_fence", default=None)

_SECONDS = "make_interval(secs => $%d::float8)"


async def lock(conn: asyncpg.Connection, fence: Fence, write_lock: int) -> None:
    """Begin a fenced write transaction: the locks that order it, then ``check``.

    A fenced write touches one dataset, so it takes the database's write lock *shared* and
    the dataset's own lock (``write_lock`` and the name's hash, a key space of its own):
    writers of different datasets run side by side, writers of one dataset take turns, and
    a write that may touch any dataset (unfenced: the API's, enrichment's) takes
    the write lock exclusive and waits for all of them, and they for it.

    The exception is pointer items (clones and merges): a dataset's batch then also updates
    the pointers into it (their state, their dataset's counts), rows that another dataset's
    batch may be updating too. While the ledger has any, fenced writes also take one more
    lock, exclusive, and take turns as they all did before (a deadlock between two batches
    over a merge's count rows is otherwise possible). A clone made meanwhile is made under
    the exclusive write lock, so the look below, after the shared lock, sees it.
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock_shared($1::int8), pg_advisory_xact_lock($1::int4, hashtext($2))",
        write_lock,
        fence.dataset,
    )
    if await check(conn, fence):
        await conn.execute("SELECT pg_advisory_xact_lock($1::int4, 0)", write_lock)


async def check(conn: asyncpg.Connection, fence: Fence) -> bool:
    """Inside a write transaction, under the dataset's lock (a statement of its own, so its
    snapshot is taken after the lock was granted): ``LeaseLost`` unless the lease is still
    ours. Returns whether the ledger holds pointer items (see ``lock``)."""
    row = await conn.fetchrow(
        "SELECT EXISTS (SELECT 1 FROM leases WHERE dataset = $1 AND owner = $2 AND epoch = $3 "
        "AND expires > clock_timestamp()), EXISTS (SELECT 1 FROM items WHERE source_item IS NOT NULL)",
        fence.dataset,
        fence.owner,
        fence.epoch,
    )
    if not row[0]:
        raise LeaseLost(
            f"agent {fence.owner} no longer holds the lease of dataset {fence.dataset!r} (epoch {fence.epoch}); "
            "nothing was written"
        )
    return bool(row[1])


class Leases:
    """The lease table through a connection pool (short autocommit statements, no write lock:
    a renewal never waits behind a sync's batch)."""

    def __init__(self, pool: asyncpg.Pool, agent: str, seconds: float) -> None:
        self.pool = pool
        self.agent = agent
        self.seconds = seconds

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """One statement, waiting for row locks at most a third of the lease: a turn stuck
        longer would let the leases expire unnoticed; failing, it is retried on the next turn."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {max(1, int(self.seconds * 1000 / 3))}")
            return list(await conn.fetch(sql, *args))

    async def register(self, datasets: Iterable[str]) -> None:
        """A row for each configured dataset (free until claimed); rows of others stay."""
        await self._fetch(
            "INSERT INTO leases (dataset) SELECT unnest($1::text[]) ON CONFLICT (dataset) DO NOTHING",
            sorted(datasets),
        )

    async def heartbeat(self) -> int:
        """Say this agent is alive; how many agents are (a heartbeat within one lease period)."""
        rows = await self._fetch(
            "WITH beat AS (INSERT INTO agents (id, heartbeat) VALUES ($1, clock_timestamp()) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat RETURNING id) "
            f"SELECT count(*) + 1 FROM agents WHERE id <> $1 AND heartbeat > clock_timestamp() - {_SECONDS % 2}",
            self.agent,
            self.seconds,
        )
        return int(rows[0][0])

    async def leave(self) -> None:
        """Stop counting in the fair share (a clean stop; a dead agent ages out instead)."""
        await self._fetch("DELETE FROM agents WHERE id = $1", self.agent)

    async def renew(self, held: dict[str, int]) -> set[str]:
        """Extend the held leases (dataset -> epoch) that are still this agent's and unexpired;
        the datasets renewed. One missing from the answer is lost: stop its loop at once."""
        if not held:
            return set()
        names = sorted(held)
        rows = await self._fetch(
            f"UPDATE leases l SET expires = clock_timestamp() + {_SECONDS % 4} "
            "FROM unnest($2::text[], $3::int8[]) AS h(dataset, epoch) "
            "WHERE l.dataset = h.dataset AND l.epoch = h.epoch AND l.owner = $1 AND l.expires > clock_timestamp() "
            "RETURNING l.dataset",
            self.agent,
            names,
            [held[n] for n in names],
            self.seconds,
        )
        return {str(r[0]) for r in rows}

    async def claim(self, datasets: Iterable[str], n: int) -> dict[str, int]:
        """Take up to ``n`` of ``datasets`` that are free or expired: dataset -> its new epoch.

        ``SKIP LOCKED`` passes over rows another claimer (or a fenced write) holds; a row that
        changed between the snapshot and the lock is re-checked by PostgreSQL once locked, so
        a lease another agent just took is not taken twice."""
        if n <= 0:
            return {}
        rows = await self._fetch(
            "WITH free AS (SELECT dataset FROM leases WHERE dataset = ANY($2::text[]) "
            "AND (owner IS NULL OR expires <= clock_timestamp()) ORDER BY dataset LIMIT $3 FOR UPDATE SKIP LOCKED) "
            f"UPDATE leases l SET owner = $1, epoch = l.epoch + 1, expires = clock_timestamp() + {_SECONDS % 4} "
            "FROM free WHERE l.dataset = free.dataset RETURNING l.dataset, l.epoch",
            self.agent,
            sorted(datasets),
            n,
            self.seconds,
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def release(self, dataset: str, epoch: int) -> bool:
        """Give a lease up (its loop already stopped): free at once for another agent. The epoch
        stays; the next claim moves it on."""
        rows = await self._fetch(
            "UPDATE leases SET owner = NULL, expires = '-infinity' WHERE dataset = $1 AND owner = $2 AND epoch = $3 "
            "RETURNING dataset",
            dataset,
            self.agent,
            epoch,
        )
        return bool(rows)

    async def owners(self) -> dict[str, tuple[str | None, int, bool]]:
        """dataset -> (owner, epoch, unexpired): what every agent can show."""
        rows = await self._fetch(
            "SELECT dataset, owner, epoch, expires > clock_timestamp() FROM leases ORDER BY dataset"
        )
        return {str(r[0]): (r[1], int(r[2]), bool(r[3])) for r in rows}
