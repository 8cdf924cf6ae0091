"""The enrichment queue in the ledger: one ``enrichment`` row per item (see MIGRATIONS v7).

SQL triggers on ``items`` queue an item (state ``pending``, with its etag) in the same
transaction that commits it, for the datasets in ``enrich_datasets``. A result is recorded
only while the row still holds the etag the worker read: a row re-queued for a newer version
meanwhile is left pending, so nothing is recorded for a version that is gone, and one version
is enriched once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bucketsync.ledger.db import Tx
from bucketsync.ledger.ledger import Ledger

STATES = ("pending", "done", "failed")

# SQL triggers on ``items``: they queue enrichment and record item events in the transaction that
# commits the item, so every write path (sync batches, renames, puts, removals) queues its work
# atomically. They exist only while some dataset uses them (``set_datasets`` creates and drops
# them), so a ledger without enrichment or triggers pays nothing on its writes. A link made through
# the API (``link = 'api'``) has no object in the bucket to read: it is never queued.
#: an item added or changed: its old thumbnail goes to the trash, and it is queued (again)
_REQUEUE = """
        INSERT INTO thumbnail_trash (dataset_id, key, local, created)
            SELECT dataset_id, thumbnail, thumbnail_local, NEW.updated FROM enrichment
            WHERE item_id = NEW.id AND thumbnail IS NOT NULL;
        INSERT OR REPLACE INTO enrichment (item_id, dataset_id, etag, state, updated)
            VALUES (NEW.id, NEW.dataset_id, NEW.etag, 'pending', NEW.updated);
"""
_SQL_TRIGGERS = {
    "enrich_item_insert": f"""
    CREATE TRIGGER enrich_item_insert AFTER INSERT ON items
    WHEN NEW.state = 'live' AND NEW.link IS NOT 'api'
    AND EXISTS (SELECT 1 FROM enrich_datasets WHERE dataset_id = NEW.dataset_id) BEGIN
{_REQUEUE}    END;
    """,
    "enrich_item_update": f"""
    CREATE TRIGGER enrich_item_update AFTER UPDATE OF key, etag, size, modified, state ON items
    WHEN NEW.state = 'live' AND NEW.link IS NOT 'api'
    AND (OLD.key IS NOT NEW.key OR OLD.etag IS NOT NEW.etag OR OLD.size IS NOT NEW.size
        OR (NEW.etag IS NULL AND OLD.modified IS NOT NEW.modified)
        OR NOT EXISTS (SELECT 1 FROM enrichment WHERE item_id = NEW.id))
    AND EXISTS (SELECT 1 FROM enrich_datasets WHERE dataset_id = NEW.dataset_id) BEGIN
{_REQUEUE}    END;
    """,
    "enrich_item_delete": """
    CREATE TRIGGER enrich_item_delete AFTER DELETE ON items BEGIN
        INSERT INTO thumbnail_trash (dataset_id, key, local, created)
            SELECT dataset_id, thumbnail, thumbnail_local, OLD.updated FROM enrichment
            WHERE item_id = OLD.id AND thumbnail IS NOT NULL;
        DELETE FROM enrichment WHERE item_id = OLD.id;
    END;
    """,
    "events_item_insert": """
    CREATE TRIGGER events_item_insert AFTER INSERT ON items
    WHEN NEW.state = 'live' AND EXISTS (SELECT 1 FROM trigger_datasets WHERE dataset_id = NEW.dataset_id) BEGIN
        INSERT INTO item_events (dataset_id, item_id, kind, key, etag, size, created)
            VALUES (NEW.dataset_id, NEW.id, 'created', NEW.key, NEW.etag, NEW.size, NEW.updated);
    END;
    """,
    "events_item_update": """
    CREATE TRIGGER events_item_update AFTER UPDATE OF etag, size, state ON items
    WHEN (OLD.etag IS NOT NEW.etag OR OLD.size IS NOT NEW.size OR OLD.state IS NOT NEW.state)
    AND EXISTS (SELECT 1 FROM trigger_datasets WHERE dataset_id = NEW.dataset_id) BEGIN
        INSERT INTO item_events (dataset_id, item_id, kind, key, etag, size, created)
            SELECT NEW.dataset_id, NEW.id,
                CASE WHEN NEW.state != 'live' THEN 'removed' WHEN OLD.state != 'live' THEN 'created'
                ELSE 'updated' END,
                NEW.key, NEW.etag, NEW.size, NEW.updated;
    END;
    """,
    "events_item_delete": """
    CREATE TRIGGER events_item_delete AFTER DELETE ON items
    WHEN OLD.state = 'live' AND EXISTS (SELECT 1 FROM trigger_datasets WHERE dataset_id = OLD.dataset_id) BEGIN
        INSERT INTO item_events (dataset_id, item_id, kind, key, etag, size, created)
            VALUES (OLD.dataset_id, OLD.id, 'removed', OLD.key, OLD.etag, OLD.size, OLD.updated);
    END;
    """,
}
#: which SQL triggers each feature needs; the delete trigger stays while enrichment rows exist
#: (their thumbnails must go with their items even after enrichment is switched off)
_ENRICH = ("enrich_item_insert", "enrich_item_update")
_CLEANUP = ("enrich_item_delete",)


def _sql_triggers(dialect: str) -> tuple[dict[str, str], str]:
    """The SQL triggers in the ledger's dialect, and how to drop one (``{name}``)."""
    if dialect == "postgresql":
        from bucketsync.ledger.postgres import ENRICH_TRIGGERS

        return ENRICH_TRIGGERS, "DROP TRIGGER IF EXISTS {name} ON items"
    return _SQL_TRIGGERS, "DROP TRIGGER IF EXISTS {name}"


_EVENTS = ("events_item_insert", "events_item_update", "events_item_delete")


@dataclass(frozen=True, slots=True)
class Job:
    """One pending item: what the worker needs to read it."""

    item_id: int
    dataset: str
    key: str
    size: int
    modified: float
    etag: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class Result:
    """What enriching one item found, waiting to be recorded."""

    job: Job
    state: str
    meta: dict[str, Any]
    error: str | None
    thumbnail: str | None
    local: bool


@dataclass(frozen=True, slots=True)
class Enrichment:
    """An item's enrichment as recorded: the ``system`` block of the item in the API."""

    state: str
    error: str | None
    meta: dict[str, Any]
    thumbnail: str | None
    local: bool
    updated: float

    def as_json(self) -> dict[str, Any]:
        return {**self.meta, "enrichment": self.state, "enrichment_error": self.error, "thumbnail": self.thumbnail}


@dataclass(frozen=True, slots=True)
class Trash:
    id: int
    dataset_id: int
    key: str
    local: bool


class EnrichQueue:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """A read of what is committed, run whole (see ``Db.read``): a cursor left open
        across an await would pin an old snapshot for every other read."""
        return list(await self.ledger.db.read(sql, params))

    async def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        async with self.ledger.db.transaction() as tx:
            return await tx.execute(sql, params)

    async def set_datasets(self, enrich: Iterable[int], triggers: Iterable[int]) -> None:
        """Which datasets queue enrichment and trigger events (the SQL triggers read these), and
        the SQL triggers themselves: created as this code defines them, or dropped when unused."""
        enrich, triggers = list(enrich), list(triggers)
        sql_triggers, drop = _sql_triggers(self.ledger.db.dialect.name)
        async with self.ledger.db.transaction() as tx:
            await tx.execute("DELETE FROM enrich_datasets")
            await tx.executemany("INSERT INTO enrich_datasets (dataset_id) VALUES (?)", [(i,) for i in enrich])
            await tx.execute("DELETE FROM trigger_datasets")
            await tx.executemany("INSERT INTO trigger_datasets (dataset_id) VALUES (?)", [(i,) for i in triggers])
            (row,) = await tx.fetch("SELECT EXISTS (SELECT 1 FROM enrichment)")
            wanted = {
                *(_ENRICH if enrich else ()),
                *(_CLEANUP if enrich or (row and row[0]) else ()),
                *(_EVENTS if triggers else ()),
            }
            for name, sql in sql_triggers.items():
                await tx.execute(drop.format(name=name))
                if name in wanted:
                    await tx.execute(sql)

    async def due(self, limit: int, skip: Iterable[int] = (), datasets: Sequence[str] | None = None) -> list[Job]:
        """Pending items, oldest id first, of the datasets that enrich; ``skip``: those running now;
        ``datasets``: only these (agents sharing a ledger: the ones whose leases this agent holds)."""
        skip = list(skip)
        if datasets is not None and not datasets:
            return []
        not_running = f"AND e.item_id NOT IN ({','.join('?' * len(skip))}) " if skip else ""
        owned = f"AND d.name IN ({','.join('?' * len(datasets))}) " if datasets is not None else ""
        rows = await self._read(
            "SELECT e.item_id, d.name, i.key, i.size, i.modified, e.etag, e.attempts FROM enrichment e "
            "JOIN items i ON i.id = e.item_id JOIN datasets d ON d.id = e.dataset_id "
            "WHERE e.state = 'pending' AND e.dataset_id IN (SELECT dataset_id FROM enrich_datasets) "
            f"{not_running}{owned}ORDER BY e.item_id LIMIT ?",
            (*skip, *(datasets or ()), limit),
        )
        return [Job(*row) for row in rows]

    async def claim(self, jobs: list[Job]) -> list[Job]:
        """Count an attempt of each before the work starts (a crash mid-item then counts), in one
        transaction; the jobs whose row still waits for their version."""
        if not jobs:
            return []
        async with self.ledger.db.transaction() as tx:
            await tx.executemany(
                "UPDATE enrichment SET attempts = attempts + 1 "
                "WHERE item_id = ? AND state = 'pending' AND etag IS NOT DISTINCT FROM ?",
                [(job.item_id, job.etag) for job in jobs],
            )
            waiting = await self._rows(tx, jobs)
        return [job for job in jobs if waiting.get(job.item_id) == ("pending", job.etag)]

    async def finish(self, results: list[Result]) -> list[str]:
        """Record results in one transaction, each only if its row still waits for its version;
        returns the keys of the others (a newer version was queued meanwhile: their fresh
        thumbnails are trashed). An ``enriched`` event for triggers goes with each recorded one.

        Three statements for the whole batch, not two per item: every statement is a round trip to
        the database's thread, and this runs for every item enriched."""
        if not results:
            return []
        now = time.time()
        async with self.ledger.db.transaction() as tx:
            await tx.executemany(
                "UPDATE enrichment SET state = ?, meta = ?, error = ?, thumbnail = ?, thumbnail_local = ?, "
                "updated = ? WHERE item_id = ? AND state = 'pending' AND etag IS NOT DISTINCT FROM ?",
                [
                    (
                        r.state,
                        json.dumps(r.meta, ensure_ascii=False),
                        r.error,
                        r.thumbnail,
                        int(r.local),
                        now,
                        r.job.item_id,
                        r.job.etag,
                    )
                    for r in results
                ],
            )
            # Recorded: the row now holds the result for the job's version. (Results are done or
            # failed, never pending; a row requeued for a newer version is pending, a removed
            # item's row is gone: both are stale.)
            rows = await self._rows(tx, [r.job for r in results])
            recorded = [r for r in results if rows.get(r.job.item_id) == (r.state, r.job.etag)]
            done = {id(r) for r in recorded}
            stale = [r for r in results if id(r) not in done]
            if recorded:
                await tx.executemany(
                    "INSERT INTO item_events (dataset_id, item_id, kind, key, etag, size, created) "
                    "SELECT i.dataset_id, i.id, 'enriched', i.key, i.etag, i.size, CAST(? AS DOUBLE PRECISION) "
                    "FROM items i "
                    "WHERE i.id = ? AND i.dataset_id IN (SELECT dataset_id FROM trigger_datasets)",
                    [(now, r.job.item_id) for r in recorded],
                )
            if trash := [(r.thumbnail, int(r.local), now, r.job.dataset) for r in stale if r.thumbnail is not None]:
                await tx.executemany(
                    "INSERT INTO thumbnail_trash (dataset_id, key, local, created) "
                    "SELECT id, CAST(? AS TEXT), CAST(? AS BIGINT), CAST(? AS DOUBLE PRECISION) "
                    "FROM datasets WHERE name = ?",
                    trash,
                )
        return [r.job.key for r in stale]

    async def _rows(self, tx: Tx, jobs: list[Job]) -> dict[int, tuple[str, str | None]]:
        """item id -> (state, etag) of the jobs' enrichment rows, as this transaction sees them."""
        ids = [job.item_id for job in jobs]
        out: dict[int, tuple[str, str | None]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            for row in await tx.fetch(
                f"SELECT item_id, state, etag FROM enrichment WHERE item_id IN ({','.join('?' * len(part))})",
                tuple(part),
            ):
                out[row[0]] = (row[1], row[2])
        return out

    async def retry_later(self, job: Job, error: str) -> None:
        await self._write(
            "UPDATE enrichment SET error = ?, updated = ? WHERE item_id = ? AND etag IS NOT DISTINCT FROM ?",
            (error, time.time(), job.item_id, job.etag),
        )

    async def requeue(self, dataset_id: int, mode: str) -> int:
        """Backfill or re-run: ``missing`` queues live items never enriched, ``failed`` the
        failed ones, ``all`` every live item. Returns how many were queued."""
        now = time.time()
        async with self.ledger.db.transaction() as tx:
            if mode in ("failed", "all"):
                where = "state = 'failed'" if mode == "failed" else "state != 'pending'"
                changed = await tx.execute(
                    f"UPDATE enrichment SET state = 'pending', attempts = 0, error = NULL, updated = ? "
                    f"WHERE dataset_id = ? AND {where}",
                    (now, dataset_id),
                )
            else:
                changed = 0
            added = await tx.execute(
                "INSERT INTO enrichment (item_id, dataset_id, etag, state, updated) "
                "SELECT id, dataset_id, etag, 'pending', CAST(? AS DOUBLE PRECISION) FROM items "
                "WHERE dataset_id = ? AND state = 'live' "
                "AND id NOT IN (SELECT item_id FROM enrichment)",
                (now, dataset_id),
            )
            return max(changed, 0) + max(added, 0)

    async def counts(self, dataset_id: int) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for state, n in await self._read(
            "SELECT state, count(*) FROM enrichment WHERE dataset_id = ? GROUP BY state", (dataset_id,)
        ):
            out[state] = n
        return out

    async def pending_by_dataset(self) -> dict[str, int]:
        rows = await self._read(
            "SELECT d.name, count(*) FROM enrichment e JOIN datasets d ON d.id = e.dataset_id "
            "WHERE e.state = 'pending' GROUP BY d.name"
        )
        return {str(name): int(n) for name, n in rows}

    async def of_items(self, item_ids: list[int]) -> dict[int, Enrichment]:
        """The enrichment of each item that has one (the API's ``system`` block)."""
        if not item_ids:
            return {}
        out: dict[int, Enrichment] = {}
        for i in range(0, len(item_ids), 500):
            part = item_ids[i : i + 500]
            for row in await self._read(
                "SELECT item_id, state, error, meta, thumbnail, thumbnail_local, updated FROM enrichment "
                f"WHERE item_id IN ({','.join('?' * len(part))})",
                tuple(part),
            ):
                meta = json.loads(row[3]) if row[3] else {}
                out[row[0]] = Enrichment(row[1], row[2], meta, row[4], bool(row[5]), row[6])
        return out

    async def trash(self, limit: int = 100) -> list[Trash]:
        rows = await self._read("SELECT id, dataset_id, key, local FROM thumbnail_trash ORDER BY id LIMIT ?", (limit,))
        return [Trash(r[0], r[1], r[2], bool(r[3])) for r in rows]

    async def trashed(self, ids: list[int]) -> None:
        async with self.ledger.db.transaction() as tx:
            await tx.executemany("DELETE FROM thumbnail_trash WHERE id = ?", [(i,) for i in ids])
