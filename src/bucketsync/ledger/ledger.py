"""The ledger: datasets, items, runs, the outbox and the inbox, on SQLite or PostgreSQL.

Every rule of the ledger lives here, once; its SQL goes through a ``Db`` (ledger/db.py):
``ledger/sqlite.py`` (one file, the default) or ``ledger/postgres.py`` (a server shared by
agents and other readers). Item ids are stable (a rename updates the key of the same row).
The snapshot a run diffs against is one consistent view of the dataset while the same run
writes (``Db.stream``). Durability (invariant 8) is the backend's: one transaction per batch.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, cast

from bucketsync.core.model import (
    COUNTED_STATES,
    Counts,
    Indexed,
    Item,
    ItemState,
    ListingGap,
    ObjectInfo,
    Op,
    OpKind,
    OpState,
    RunRecord,
    RunStatus,
    SnapshotRow,
    indexed,
)
from bucketsync.ledger.db import Db, Row, Tx

SNAPSHOT_BATCH = 8192
#: one inbox entry: (key, kind, token, etag, size, at), as ``upstream.events.Event`` has them
InboxEvent = tuple[str, str, str | None, str | None, int | None, float | None]
#: the end of every key that starts with a prefix (for range scans on the (dataset_id, key) index)
_PREFIX_END = "\U0010ffff"


def is_postgres(where: Path | str) -> bool:
    """Whether ``agent.ledger`` names a PostgreSQL database rather than a SQLite file."""
    return str(where).startswith(("postgresql://", "postgres://"))


_ITEM_COLS = "id, key, size, modified, etag, version, state, content_type, meta, updated, ref, link"
#: the same on a ledger from before linked items (opened read-only, so not migrated)
_ITEM_COLS_V0 = "id, key, size, modified, etag, version, state, content_type, meta, updated, NULL, NULL"
_OP_COLS = (
    "o.id, d.name, o.kind, o.key, o.state, o.attempts, o.create_only, o.if_match, o.staged, o.sha256, "
    "o.content_type, o.error, o.error_code, o.created, o.updated, o.next_at"
)
_RUN_COLS = (
    "r.id, d.name, r.started, r.ended, r.status, r.listed, r.added, r.modified, r.removed, "
    "r.renamed, r.unchanged, r.errors, r.error, r.forced, r.gaps, r.kind"
)


#: a dict lookup: calling an Enum by value costs a microsecond, per row of every item page
_STATES = {str(s): s for s in ItemState}


def _item(row: Sequence[Any]) -> Item:
    return Item(
        id=row[0],
        key=row[1],
        size=row[2],
        modified=row[3],
        etag=row[4],
        version=row[5],
        state=_STATES[row[6]],
        content_type=row[7],
        meta=json.loads(row[8]) if row[8] else {},
        updated=row[9],
        ref=row[10],
        link=row[11],
    )


def _op(row: Sequence[Any]) -> Op:
    return Op(
        id=row[0],
        dataset=row[1],
        kind=OpKind(row[2]),
        key=row[3],
        state=OpState(row[4]),
        attempts=row[5],
        create_only=bool(row[6]),
        if_match=row[7],
        staged=row[8],
        sha256=row[9],
        content_type=row[10],
        error=row[11],
        error_code=row[12],
        created=row[13],
        updated=row[14],
        next_at=row[15],
    )


def _run(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        id=row[0],
        dataset=row[1],
        started=row[2],
        ended=row[3],
        status=RunStatus(row[4]),
        counts=Counts(*row[5:12]),
        error=row[12],
        forced=bool(row[13]),
        gaps=tuple(ListingGap(g["prefix"], g["error"], g.get("exact", False)) for g in json.loads(row[14]))
        if row[14]
        else (),
        kind=row[15],
    )


class Ledger:
    def __init__(self, db: Db, path: Path | None = None) -> None:
        #: the backend: its connections, transactions and schema
        self.db = db
        #: the SQLite file (None on PostgreSQL): what sits beside it (the hash memo) is found from it
        self.path = path
        #: dataset name -> id; a configured dataset's row is never deleted or renamed, and a runtime
        #: dataset's (drop_runtime) leaves this cache in the same transaction's wake
        self._ids: dict[str, int] = {}
        #: False on a ledger older than the counts table (opened read-only, so not migrated)
        self._counts_table = True
        #: the item columns this ledger has (``_ITEM_COLS_V0`` on an old one opened read-only)
        self._item_cols = _ITEM_COLS
        #: the last overview and the data version it was read at
        self._overview: tuple[int, dict[str, tuple[dict[str, int], RunRecord | None]]] | None = None
        #: the runtime datasets and the datasets' metadata, at a data version (``described``)
        self._described: tuple[int, dict[str, tuple[str, str | None]], dict[str, Any]] | None = None

    @classmethod
    async def open(cls, where: Path | str, *, readonly: bool = False, password: str | None = None) -> Ledger:
        """Open (and migrate) the ledger: a SQLite file, or a ``postgresql://`` URL (its password
        from ``password``, else the URL or libpq's environment). Any failure closes what was
        opened and is a ``LedgerError`` naming the ledger and the fix."""
        db: Db
        path: Path | None = None
        if is_postgres(where):
            from bucketsync.ledger.postgres import PostgresDb

            db = await PostgresDb.open(str(where), readonly=readonly, password=password)
        else:
            from bucketsync.ledger.sqlite import SqliteDb

            path = Path(where)
            db = await SqliteDb.open(path, readonly=readonly)
        ledger = cls(db, path)
        if readonly:
            try:
                ledger._counts_table = await db.has_table("item_counts")
                if not await db.has_column("items", "link"):
                    ledger._item_cols = _ITEM_COLS_V0
            except BaseException:
                await db.close()
                raise
        return ledger

    async def close(self) -> None:
        await self.db.close()

    @property
    def fault(self) -> str | None:
        """Why writes are failing (a full disk, ...); None once a write commits again."""
        return self.db.fault

    @property
    def rolled_back(self) -> tuple[int, int] | None:
        """(ledger seq, sidecar seq) when start-up found the ledger lost commits."""
        return self.db.rolled_back

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement in its own transaction; how many rows it changed."""
        async with self.db.transaction() as tx:
            return await tx.execute(sql, params)

    async def _insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One ``INSERT ... RETURNING id`` in its own transaction; the new row's id."""
        async with self.db.transaction() as tx:
            return int((await tx.fetch(sql, params))[0][0])

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """A read of what is committed, run whole (see ``Db.read``)."""
        return await self.db.read(sql, params)

    async def _read_primary(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self.db.read(sql, params, primary=True)

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """One write transaction, for the queues that keep their SQL beside their code (enrich/)."""
        return self.db.transaction()

    async def claim(self, shared: bool = False) -> None:
        """Make this process the ledger's one agent, or raise ``LedgerLocked`` (see ``Db.claim``)."""
        await self.db.claim(shared)

    async def probe_write(self) -> None:
        """An empty write transaction: the cheapest way to learn whether the ledger takes
        writes again after a fault."""
        await self.db.probe_write()

    # -- re-sync after lost commits -----------------------------------------------

    async def mark_resync(self, datasets: Iterable[str], reason: str) -> None:
        async with self.db.transaction() as tx:
            await tx.executemany(
                "INSERT INTO resync (dataset, reason, since) VALUES (?, ?, ?) ON CONFLICT (dataset) "
                "DO UPDATE SET reason = excluded.reason, since = excluded.since",
                [(name, reason, time.time()) for name in datasets],
            )

    async def resync_pending(self) -> set[str]:
        return {r[0] for r in await self._read_primary("SELECT dataset FROM resync")}

    async def resync_done(self, dataset: str) -> None:
        await self._write("DELETE FROM resync WHERE dataset = ?", (dataset,))

    # -- datasets ---------------------------------------------------------

    async def dataset_id(self, name: str) -> int:
        if (found := await self.find_dataset(name)) is not None:
            return found
        await self._write(
            "INSERT INTO datasets (name, created) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (name, time.time())
        )
        rows = await self._read_primary("SELECT id FROM datasets WHERE name = ?", (name,))
        self._ids[name] = int(rows[0][0])
        return self._ids[name]

    async def find_dataset(self, name: str) -> int | None:
        if (known := self._ids.get(name)) is not None:
            return known
        rows = await self._read("SELECT id FROM datasets WHERE name = ?", (name,))
        row = rows[0] if rows else None
        if row is None:
            return None
        self._ids[name] = int(row[0])
        return self._ids[name]

    async def create_clone(
        self, name: str, source_id: int, source: str, where: str, params: Sequence[Any], with_meta: bool
    ) -> tuple[int, int]:
        """A runtime dataset of pointer items to the source's live items that ``where`` matches
        (compiled by catalog/query.py), in one set-based statement: (its id, items cloned).
        User metadata is copied when asked and is the clone's own from then on."""
        now = time.time()
        meta = "meta" if with_meta else "NULL"
        # A source that is much of the table is read in table order: through the (dataset,
        # key) index every row is a random read (9 s of a 1,000,000-item clone's 19 s).
        scan = await self._mostly(source_id)
        ds = f"{self.db.dialect.no_index('dataset_id') if scan else 'dataset_id'} = ?"
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                "INSERT INTO datasets (name, created, kind, source) VALUES (?, ?, 'clone', ?) RETURNING id",
                (name, now, source),
            )
            new_id = int(rows[0][0])
            n = await tx.execute(
                "INSERT INTO items (dataset_id, key, size, modified, etag, version, state, content_type, meta, "
                f"updated, source_item) SELECT CAST(? AS BIGINT), key, size, modified, etag, version, 'live', "
                f"content_type, {meta}, CAST(? AS DOUBLE PRECISION), id FROM items "
                f"WHERE {ds} AND state = 'live' AND {where}",
                [new_id, now, source_id, *params],
            )
            await self._count_pointers(tx, new_id, n)
        self._ids[name] = new_id
        return new_id, n

    async def _mostly(self, dataset_id: int) -> bool:
        """Whether the dataset's live items are an eighth or more of the items table, where a
        sequential scan of the whole table beats a random read per item through an index."""
        total = await self._read("SELECT max(id) FROM items")
        return bool(total and total[0][0]) and await self.live_count(dataset_id) * 8 >= int(total[0][0])

    async def _count_pointers(self, tx: Tx, dataset_id: int, n: int) -> None:
        """Record the ``n`` live pointers a new runtime dataset was created with, which its
        bulk insert left uncounted (migration v12). Inside the creating transaction; a
        recount would read every new row back through the (dataset, key) index."""
        await tx.execute(
            "INSERT INTO item_counts (dataset_id, state, n) VALUES (?, 'live', ?) "
            "ON CONFLICT (dataset_id, state) DO UPDATE SET n = item_counts.n + excluded.n",
            (dataset_id, n),
        )

    async def create_merge(self, name: str, sources: Sequence[tuple[int, str]], on_conflict: str) -> tuple[int, int]:
        """A runtime dataset of pointer items to the live items of several datasets, in one
        transaction of set-based statements: (its id, items). Keys found in more than one
        source: ``folder`` puts each source under a folder of its name (no key can meet
        another), ``suffix`` keeps the first source's key and renames the later ones
        ``stem~SOURCE.ext``, ``merge`` keeps one item (the first source's binary) with the
        sources' metadata merged, later sources winning a name they share."""
        now = time.time()
        into = (
            "INSERT INTO items (dataset_id, key, size, modified, etag, version, state, content_type, meta, "
            "updated, source_item)"
        )
        rest = "size, modified, etag, version, 'live', content_type, meta, CAST(? AS DOUBLE PRECISION), id"
        live = "FROM items WHERE dataset_id = ? AND state = 'live'"
        taken = "key IN (SELECT key FROM items WHERE dataset_id = ?)"
        new = "CAST(? AS BIGINT)"
        patched = self.db.dialect.json_patch("items.meta", "excluded.meta")
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                "INSERT INTO datasets (name, created, kind, source) VALUES (?, ?, 'merge', ?) RETURNING id",
                (name, now, ",".join(n for _i, n in sources)),
            )
            new_id = int(rows[0][0])
            for n, (src_id, src_name) in enumerate(sources):
                if on_conflict == "folder":
                    await tx.execute(
                        f"{into} SELECT {new}, CAST(? AS TEXT) || key, {rest} {live}",
                        (new_id, src_name + "/", now, src_id),
                    )
                elif on_conflict == "merge" or n == 0:
                    await tx.execute(
                        f"{into} SELECT {new}, key, {rest} {live} ON CONFLICT (dataset_id, key) DO UPDATE SET "
                        "meta = CASE WHEN items.meta IS NULL THEN excluded.meta WHEN excluded.meta IS NULL "
                        f"THEN items.meta ELSE {patched} END",
                        (new_id, now, src_id),
                    )
                else:  # suffix: the keys an earlier source holds get this source's name
                    met = await tx.fetch(
                        f"SELECT key, size, modified, etag, version, 'live', content_type, meta, id {live} AND {taken}",
                        (src_id, new_id),
                    )
                    await tx.execute(
                        f"{into} SELECT {new}, key, {rest} {live} AND NOT {taken}", (new_id, now, src_id, new_id)
                    )
                    await tx.executemany(
                        f"{into} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dataset_id, key) DO NOTHING",
                        [(new_id, _suffixed(r[0], src_name), *r[1:8], now, r[8]) for r in met],
                    )
            rows = await tx.fetch("SELECT count(*) FROM items WHERE dataset_id = ?", (new_id,))
            await self._count_pointers(tx, new_id, int(rows[0][0]) if rows else 0)  # every pointer is made live
        self._ids[name] = new_id
        return new_id, int(rows[0][0]) if rows else 0

    async def drop_runtime(self, name: str) -> int:
        """Delete a runtime dataset's catalog (its pointers, folders, metadata, row); storage is
        not touched: a pointer's binary is its source's. How many items went."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch("SELECT id FROM datasets WHERE name = ? AND kind != 'synced'", (name,))
            if not rows:
                return -1
            ds_id = int(rows[0][0])
            n = await tx.execute("DELETE FROM items WHERE dataset_id = ?", (ds_id,))
            await tx.execute("DELETE FROM folders WHERE dataset_id = ?", (ds_id,))
            await tx.execute("DELETE FROM item_counts WHERE dataset_id = ?", (ds_id,))
            await tx.execute("DELETE FROM datasets WHERE id = ?", (ds_id,))
        self._ids.pop(name, None)
        self._overview = self._described = None
        return n

    async def runtime_datasets(self) -> dict[str, tuple[str, str | None]]:
        """name -> (kind, source) of the datasets created at run time (not in the config)."""
        if not await self.db.has_column("datasets", "kind"):
            return {}
        rows = await self._read("SELECT name, kind, source FROM datasets WHERE kind != 'synced' ORDER BY id")
        return {str(n): (str(k), s) for n, k, s in rows}

    async def pointed(self, item_id: int) -> tuple[str, str] | None:
        """(dataset name, current key) of the item a pointer item points at; None when it is
        no pointer, or its source item is gone."""
        rows = await self._read(
            "SELECT d.name, s.key FROM items p JOIN items s ON s.id = p.source_item "
            "JOIN datasets d ON d.id = s.dataset_id WHERE p.id = ?",
            (item_id,),
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def merge_dataset_meta(self, dataset_id: int, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge a dataset's user metadata (JSON merge-patch: ``None`` removes a name); the result."""
        return await self._merge_patch("datasets", dataset_id, patch, touch=False)

    async def datasets_meta(self) -> dict[str, dict[str, Any]]:
        """Every dataset's user metadata by name (empty on a ledger from before it existed)."""
        if not await self.db.has_column("datasets", "meta"):
            return {}
        rows = await self._read("SELECT name, meta FROM datasets")
        return {str(n): json.loads(m) if m else {} for n, m in rows}

    async def select_datasets(self, where: str, params: Sequence[Any], order: str) -> list[str]:
        """Names of the datasets a catalog query matches, in its order (catalog/datasets.py
        compiles ``where`` and ``order``; every value is one of ``params``)."""
        table = "datasets"
        if not await self.db.has_column("datasets", "meta"):  # an old read-only ledger: no metadata yet
            table = "(SELECT name, created, NULL AS meta FROM datasets) AS d"
        return [str(r[0]) for r in await self._read(f"SELECT name FROM {table} WHERE {where} ORDER BY {order}", params)]

    async def counts_by_state(self, dataset_id: int) -> dict[str, int]:
        """Items per state, from the trigger-kept counts table: one indexed lookup, however
        large the dataset (a ``count(*)`` per request saturated the agent under load)."""
        out = {str(s): 0 for s in COUNTED_STATES}
        sql = (
            "SELECT state, n FROM item_counts WHERE dataset_id = ?"
            if self._counts_table
            else "SELECT state, count(*) FROM items WHERE dataset_id = ? GROUP BY state"
        )
        for state, n in await self._read(sql, (dataset_id,)):
            out[state] = int(n)
        return out

    async def key_quantiles(self, dataset_id: int, count: int, total: int) -> list[str]:
        """About ``count`` of the dataset's keys at even steps in key order (``total``: about how many
        items it has): where a parallel listing is cut when no run of this process sampled them yet.
        One walk of the ``(dataset_id, key)`` index."""
        stride = max(1, total // (count + 1))
        sql = (
            "SELECT key FROM (SELECT key, row_number() OVER (ORDER BY key) AS n FROM items WHERE dataset_id = ?) "
            "AS q WHERE n % ? = 0 ORDER BY key"
        )
        return [str(r[0]) for r in await self._read(sql, (dataset_id, stride))]

    async def live_count(self, dataset_id: int) -> int:
        return (await self.counts_by_state(dataset_id))[ItemState.LIVE]

    async def overview(self) -> dict[str, tuple[dict[str, int], RunRecord | None]]:
        """Every dataset in the ledger: (items per state, its latest run), in two queries.

        What ``GET /datasets`` and ``status`` show; its cost does not grow with items or runs.
        Dashboards poll it, so it is read again only when some connection (of this process
        or another) has committed since: ``Db.version`` says so. Callers must not modify
        what it returns.
        """
        return await self._overview_at(await self.db.version())

    async def described(
        self,
    ) -> tuple[dict[str, tuple[dict[str, int], RunRecord | None]], dict[str, tuple[str, str | None]], dict[str, Any]]:
        """The overview, the runtime datasets and every dataset's user metadata: what
        ``GET /datasets`` shows. Like the overview, read again only when the data version
        moved, so a dashboard's poll costs one query, not four. Callers must not modify it."""
        version = await self.db.version()
        overview = await self._overview_at(version)
        if self._described is None or self._described[0] != version:
            # Read after the version: if a commit lands in between, the version moves and
            # the next call reads again; what is cached is never older than its version.
            self._described = (version, await self.runtime_datasets(), await self.datasets_meta())
        return overview, self._described[1], self._described[2]

    async def _overview_at(self, version: int) -> dict[str, tuple[dict[str, int], RunRecord | None]]:
        if self._overview is not None and self._overview[0] == version:
            return self._overview[1]
        out = await self._read_overview()
        self._overview = (version, out)
        return out

    async def _read_overview(self) -> dict[str, tuple[dict[str, int], RunRecord | None]]:
        counts: dict[int, dict[str, int]] = {}
        sql = (
            "SELECT dataset_id, state, n FROM item_counts"
            if self._counts_table
            else "SELECT dataset_id, state, count(*) FROM items GROUP BY dataset_id, state"
        )
        for ds_id, state, n in await self._read(sql):
            counts.setdefault(ds_id, {str(s): 0 for s in COUNTED_STATES})[state] = int(n)
        out: dict[str, tuple[dict[str, int], RunRecord | None]] = {}
        for row in await self._read(
            f"SELECT d.id, {_RUN_COLS} FROM datasets d "
            "LEFT JOIN runs r ON r.id = (SELECT max(id) FROM runs WHERE dataset_id = d.id)"
        ):
            last = _run(row[1:]) if row[1] is not None else None
            out[row[2]] = (counts.get(row[0], {str(s): 0 for s in COUNTED_STATES}), last)
        return out

    # -- the snapshot a run diffs against -----------------------------------

    async def snapshot(self, dataset_id: int) -> AsyncIterator[Indexed]:
        """Every item of the dataset (live and tombstoned), ascending by key, from one
        consistent view: the run's own writes (committed meanwhile) cannot shift it."""
        async for rows in self.snapshot_pages(dataset_id):
            for r in rows:
                yield indexed(r)

    async def snapshot_pages(self, dataset_id: int) -> AsyncIterator[list[SnapshotRow]]:
        """``snapshot`` as the rows the database hands over, ``SNAPSHOT_BATCH`` at a time:
        (id, key, size, modified, etag, version, state) tuples, for ``diff_pages``, which
        builds an object only for a row that changed."""
        stream = self.db.stream(
            # Linked items made through the API have no object in the bucket: no listing would
            # see them, so no run may count them as removed.
            "SELECT id, key, size, modified, etag, version, state FROM items WHERE dataset_id = ? "
            "AND link IS DISTINCT FROM 'api' ORDER BY key",
            (dataset_id,),
            SNAPSHOT_BATCH,
        )
        async with contextlib.aclosing(stream):  # closed with this one: its read transaction ends
            async for rows in stream:
                yield cast(list[SnapshotRow], rows)

    # -- runs ---------------------------------------------------------------

    async def begin_run(self, dataset_id: int, forced: bool, kind: str = "listing") -> int:
        return await self._insert(
            "INSERT INTO runs (dataset_id, started, status, forced, kind) VALUES (?, ?, 'running', ?, ?) RETURNING id",
            (dataset_id, time.time(), int(forced), kind),
        )

    async def finish_run(
        self,
        run_id: int,
        counts: Counts,
        status: RunStatus,
        error: str | None,
        gaps: Sequence[ListingGap] = (),
    ) -> None:
        await self._write(
            "UPDATE runs SET ended = ?, status = ?, listed = ?, added = ?, modified = ?, removed = ?, "
            "renamed = ?, unchanged = ?, errors = ?, error = ?, gaps = ? WHERE id = ?",
            (
                time.time(),
                str(status),
                counts.listed,
                counts.added,
                counts.modified,
                counts.removed,
                counts.renamed,
                counts.unchanged,
                counts.errors,
                error,
                json.dumps([g.as_json() for g in gaps], ensure_ascii=False) if gaps else None,
                run_id,
            ),
        )

    async def fail_stale_runs(self, dataset_id: int | None = None) -> int:
        """Runs left 'running' by a crash are failed on start-up; their batches stay committed.
        With ``dataset_id``, only that dataset's: an agent that claims a dataset's lease fails the
        runs its previous owner left (others' runs on a shared ledger are theirs)."""
        sql = (
            "UPDATE runs SET status = 'failed', ended = ?, error = 'the agent stopped during this run' "
            "WHERE status = 'running'"
        )
        if dataset_id is None:
            return await self._write(sql, (time.time(),))
        return await self._write(sql + " AND dataset_id = ?", (time.time(), dataset_id))

    async def runs(self, dataset_id: int, limit: int = 20) -> list[RunRecord]:
        rows = await self._read(
            f"SELECT {_RUN_COLS} FROM runs r JOIN datasets d ON d.id = r.dataset_id "
            "WHERE r.dataset_id = ? ORDER BY r.id DESC LIMIT ?",
            (dataset_id, limit),
        )
        return [_run(r) for r in rows]

    async def run(self, run_id: int) -> RunRecord | None:
        rows = await self._read(
            f"SELECT {_RUN_COLS} FROM runs r JOIN datasets d ON d.id = r.dataset_id WHERE r.id = ?", (run_id,)
        )
        return _run(rows[0]) if rows else None

    async def last_ok_run(self, dataset_id: int) -> RunRecord | None:
        """The last run whose listing completed: ``ok``, or ``partial`` (complete outside its gaps).
        Runs of kind ``events`` list nothing: they do not count."""
        rows = await self._read_primary(
            f"SELECT {_RUN_COLS} FROM runs r JOIN datasets d ON d.id = r.dataset_id "
            "WHERE r.dataset_id = ? AND r.status IN ('ok', 'partial') AND r.kind = 'listing' "
            "ORDER BY r.id DESC LIMIT 1",
            (dataset_id,),
        )
        return _run(rows[0]) if rows else None

    # -- retention (see retention.py) -------------------------------------------

    async def dataset_names(self) -> list[tuple[int, str]]:
        """(id, name) of every dataset the ledger knows, configured or not any more."""
        return [(int(r[0]), str(r[1])) for r in await self._read_primary("SELECT id, name FROM datasets ORDER BY id")]

    async def prune_runs(self, dataset_id: int, keep: int, before: float, limit: int = 500) -> int:
        """Delete up to ``limit`` of the dataset's runs past retention; how many went.

        Past retention: not among the newest ``keep``, or ended before ``before``. Never a
        running run, the newest run (what ``status`` shows), or the newest ok run (the
        rename matcher's starting point).
        """
        n = await self._write(
            "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE dataset_id = ?1 AND status != 'running' "
            "AND id NOT IN (SELECT max(id) FROM runs WHERE dataset_id = ?1 "
            "UNION ALL SELECT max(id) FROM runs WHERE dataset_id = ?1 AND status = 'ok' AND kind = 'listing') "
            "AND (ended < ?2 OR id < (SELECT id FROM runs WHERE dataset_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?3)) "
            "ORDER BY id LIMIT ?4)",
            (dataset_id, before, keep - 1, limit),
        )
        return max(n, 0)

    async def prune_ops(self, dataset_id: int, keep: int, before: float, limit: int = 500) -> int:
        """Delete up to ``limit`` of the dataset's finished ops past retention; how many went.

        Only finished ops go (done, failed, ...): never one still pending or running. Past
        retention: not among the newest ``keep`` finished ones, or last updated before ``before``.
        """
        finished = "dataset_id = ?1 AND state NOT IN ('pending', 'running')"
        n = await self._write(
            f"DELETE FROM ops WHERE id IN (SELECT id FROM ops WHERE {finished} "
            f"AND (updated < ?2 OR id < (SELECT id FROM ops WHERE {finished} ORDER BY id DESC LIMIT 1 OFFSET ?3)) "
            "ORDER BY id LIMIT ?4)",
            (dataset_id, before, keep - 1, limit),
        )
        return max(n, 0)

    # -- writes from a run (one transaction per batch) ------------------------

    async def write_batch(
        self,
        dataset_id: int,
        run_id: int,
        adds: Sequence[ObjectInfo],
        updates: Sequence[tuple[int, ObjectInfo]],
        counts: Counts,
    ) -> None:
        """Insert new items and update changed ones, with the run's progress, atomically."""
        now = time.time()
        async with self.db.transaction() as tx:
            if adds:
                await tx.executemany(
                    "INSERT INTO items (dataset_id, key, size, modified, etag, version, first_run, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dataset_id, key) DO UPDATE SET "
                    "size = excluded.size, modified = excluded.modified, etag = excluded.etag, "
                    "version = excluded.version, updated = excluded.updated, ref = NULL, link = NULL",
                    # A generator, consumed by SQLite's thread: 5,000 parameter tuples built on the
                    # event loop held it for 5-80 ms (measured with bench/loop_stalls.py).
                    ((dataset_id, o.key, o.size, o.modified, o.etag, o.version, run_id, now) for o in adds),
                )
            if updates:
                await tx.executemany(
                    "UPDATE items SET size = ?, modified = ?, etag = ?, version = ?, updated = ? WHERE id = ?",
                    ((o.size, o.modified, o.etag, o.version, now, item_id) for item_id, o in updates),
                )
            await self._progress(tx, run_id, counts)

    async def added_since(self, dataset_id: int, after_run: int) -> list[tuple[int, str, str | None, int, int]]:
        """(id, key, etag, size, first_run) of live items first seen after ``after_run``: rename
        targets, including those a failed run indexed before its listing broke off."""
        rows = await self._read_primary(
            "SELECT id, key, etag, size, first_run FROM items WHERE dataset_id = ? AND first_run > ? "
            "AND state = 'live'",
            (dataset_id, after_run),
        )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def rename(self, run_id: int, pairs: Iterable[tuple[int, int, str]], counts: Counts) -> None:
        """Each (old_id, new_id, new_key): the old row takes the new key and the fresh row's
        info, and the fresh row goes, so the item keeps its id and user metadata."""
        now = time.time()
        async with self.db.transaction() as tx:
            for old_id, new_id, _key in pairs:
                rows = await tx.fetch("SELECT key, size, modified, etag, version FROM items WHERE id = ?", (new_id,))
                if not rows:
                    continue
                await tx.execute("DELETE FROM items WHERE id = ?", (new_id,))
                await tx.execute(
                    "UPDATE items SET key = ?, size = ?, modified = ?, etag = ?, version = ?, updated = ? WHERE id = ?",
                    (*rows[0], now, old_id),
                )
            await self._progress(tx, run_id, counts)

    async def rows_for(self, dataset_id: int, keys: Iterable[str]) -> dict[str, Indexed]:
        """The ledger rows (live and tombstoned) of ``keys``: what an events batch compares with."""
        out: dict[str, Indexed] = {}
        todo = list(keys)
        for i in range(0, len(todo), 500):  # SQLite's host-parameter limit
            part = todo[i : i + 500]
            rows = await self._read_primary(
                "SELECT id, key, size, modified, etag, version, state FROM items WHERE dataset_id = ? "
                f"AND link IS DISTINCT FROM 'api' AND key IN ({','.join('?' * len(part))})",
                (dataset_id, *part),
            )
            for r in rows:
                out[r[1]] = Indexed(*r)
        return out

    async def live_under(self, dataset_id: int, prefix: str, limit: int) -> list[str]:
        """Keys of live items under ``prefix`` (a removed folder's items), at most ``limit``."""
        rows = await self._read_primary(
            "SELECT key FROM items WHERE dataset_id = ? AND key >= ? AND key < ? AND state = 'live' "
            "ORDER BY key LIMIT ?",
            (dataset_id, prefix, prefix + _PREFIX_END, limit),
        )
        return [r[0] for r in rows]

    # -- the webhook inbox (events accepted, not yet applied) ------------------------

    async def inbox_put(self, dataset_id: int, events: Sequence[InboxEvent], cap: int | None = None) -> bool:
        """Accept events durably: once this commits, a crash loses none of them. With ``cap``, a
        dataset's inbox holds at most that many entries: events that would pass it are all refused
        (False, nothing written), so an inbox nobody drains (a dataset that is not ready) stays bounded."""
        now = time.time()
        async with self.db.transaction() as tx:
            if cap is not None:
                # counted up to the cap only: the (dataset_id, id) index, never the whole table
                held = await tx.fetch(
                    "SELECT count(*) FROM (SELECT 1 FROM event_inbox WHERE dataset_id = ? LIMIT ?) AS held",
                    (dataset_id, cap),
                )
                if int(held[0][0]) + len(events) > cap:
                    return False
            await tx.executemany(
                "INSERT INTO event_inbox (dataset_id, key, kind, token, etag, size, at, received) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(dataset_id, *e, now) for e in events],
            )
        return True

    async def inbox_take(self, dataset_id: int, after: int, limit: int) -> list[tuple[int, InboxEvent]]:
        """Up to ``limit`` inbox entries after id ``after``, oldest first: (id, event)."""
        rows = await self._read_primary(
            "SELECT id, key, kind, token, etag, size, at FROM event_inbox WHERE dataset_id = ? AND id > ? "
            "ORDER BY id LIMIT ?",
            (dataset_id, after, limit),
        )
        return [(r[0], (r[1], r[2], r[3], r[4], r[5], r[6])) for r in rows]

    async def inbox_done(self, ids: Sequence[int]) -> None:
        """Forget entries whose effect is committed."""
        async with self.db.transaction() as tx:
            await tx.executemany("DELETE FROM event_inbox WHERE id = ?", [(i,) for i in ids])

    async def remove(self, run_id: int | None, ids: Sequence[int], counts: Counts | None = None) -> None:
        async with self.db.transaction() as tx:
            await tx.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in ids])
            if run_id is not None and counts is not None:
                await self._progress(tx, run_id, counts)

    async def _progress(self, tx: Tx, run_id: int, c: Counts) -> None:
        await tx.execute(
            "UPDATE runs SET listed = ?, added = ?, modified = ?, removed = ?, renamed = ?, unchanged = ?, "
            "errors = ? WHERE id = ?",
            (c.listed, c.added, c.modified, c.removed, c.renamed, c.unchanged, c.errors, run_id),
        )

    # -- reads for the CLI and API ------------------------------------------

    async def item(self, dataset_id: int, key: str) -> Item | None:
        rows = await self._read(
            f"SELECT {self._item_cols} FROM items WHERE dataset_id = ? AND key = ?", (dataset_id, key)
        )
        return _item(rows[0]) if rows else None

    async def set_state(self, item_id: int, state: ItemState) -> None:
        await self._write("UPDATE items SET state = ?, updated = ? WHERE id = ?", (str(state), time.time(), item_id))

    async def merge_meta(self, item_id: int, patch: dict[str, Any]) -> None:
        """Merge user metadata; a ``None`` value removes the key (JSON merge-patch)."""
        await self._merge_patch("items", item_id, patch, touch=True)

    async def _merge_patch(self, table: str, row_id: int, patch: dict[str, Any], *, touch: bool) -> dict[str, Any]:
        """JSON merge-patch of a row's ``meta`` in one transaction; the merged metadata.
        ``table`` is one of our own names, never input; ``touch`` also sets ``updated``."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch(f"SELECT meta FROM {table} WHERE id = ?", (row_id,))
            meta = json.loads(rows[0][0]) if rows and rows[0][0] else {}
            for k, v in patch.items():
                if v is None:
                    meta.pop(k, None)
                else:
                    meta[k] = v
            stored = json.dumps(meta, ensure_ascii=False) if meta else None
            if touch:
                await tx.execute(
                    f"UPDATE {table} SET meta = ?, updated = ? WHERE id = ?", (stored, time.time(), row_id)
                )
            else:
                await tx.execute(f"UPDATE {table} SET meta = ? WHERE id = ?", (stored, row_id))
        return dict(meta)

    # -- the outbox ---------------------------------------------------------------

    async def enqueue(
        self,
        dataset_id: int,
        kind: OpKind,
        key: str,
        *,
        create_only: bool = False,
        if_match: str | None = None,
        staged: str | None = None,
        sha256: str | None = None,
        content_type: str | None = None,
    ) -> int:
        now = time.time()
        return await self._insert(
            "INSERT INTO ops (dataset_id, kind, key, create_only, if_match, staged, sha256, content_type, "
            "created, updated, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (dataset_id, str(kind), key, int(create_only), if_match, staged, sha256, content_type, now, now, now),
        )

    async def op(self, op_id: int) -> Op | None:
        rows = await self._read_primary(
            f"SELECT {_OP_COLS} FROM ops o JOIN datasets d ON d.id = o.dataset_id WHERE o.id = ?", (op_id,)
        )
        return _op(rows[0]) if rows else None

    async def ops(self, *, state: OpState | None = None, dataset_id: int | None = None, limit: int = 100) -> list[Op]:
        sql = f"SELECT {_OP_COLS} FROM ops o JOIN datasets d ON d.id = o.dataset_id WHERE 1 = 1"
        args: list[Any] = []
        if state is not None:
            sql += " AND o.state = ?"
            args.append(str(state))
        if dataset_id is not None:
            sql += " AND o.dataset_id = ?"
            args.append(dataset_id)
        sql += " ORDER BY o.id LIMIT ?"
        args.append(limit)
        return [_op(r) for r in await self._read_primary(sql, args)]

    async def due_ops(self, now: float, limit: int = 16, datasets: Sequence[str] | None = None) -> list[Op]:
        """Pending ops due by ``now``, oldest first; only the oldest pending op of each
        (dataset, key): a later op on a key waits for the earlier one, even one backing off.
        ``datasets``: only theirs (the datasets whose leases this agent holds)."""
        if datasets is not None and not datasets:
            return []
        only = f" AND d.name IN ({', '.join('?' * len(datasets))})" if datasets is not None else ""
        rows = await self._read_primary(
            f"SELECT {_OP_COLS} FROM ops o JOIN datasets d ON d.id = o.dataset_id "
            f"WHERE o.state = 'pending' AND o.next_at <= ?{only} AND NOT EXISTS ("
            "SELECT 1 FROM ops e WHERE e.state = 'pending' AND e.dataset_id = o.dataset_id "
            "AND e.key = o.key AND e.id < o.id) ORDER BY o.id LIMIT ?",
            (now, *(datasets or ()), limit),
        )
        return [_op(r) for r in rows]

    async def backlog(self) -> int:
        rows = await self._read_primary("SELECT count(*) FROM ops WHERE state = 'pending'")
        return int(rows[0][0]) if rows else 0

    async def backlog_by_dataset(self) -> dict[str, int]:
        """Pending ops per dataset name (datasets with none are absent)."""
        rows = await self._read_primary(
            "SELECT d.name, count(*) FROM ops o JOIN datasets d ON d.id = o.dataset_id "
            "WHERE o.state = 'pending' GROUP BY d.name"
        )
        return {str(name): int(n) for name, n in rows}

    async def start_attempt(self, op_id: int) -> Op | None:
        """Claim one attempt of a pending op: the op as it now stands, or None if it is no
        longer pending (another execution settled it, or it was cancelled meanwhile).

        Counted *before* storage is touched: after a crash, attempts > 0 says the op may
        already have reached storage, and its retry checks for its own earlier write.
        """
        n = await self._write(
            "UPDATE ops SET attempts = attempts + 1, updated = ? WHERE id = ? AND state = 'pending'",
            (time.time(), op_id),
        )
        if n != 1:
            return None
        return await self.op(op_id)

    async def retry_later(self, op_id: int, error: str, next_at: float) -> None:
        await self._write(
            "UPDATE ops SET error = ?, updated = ?, next_at = ? WHERE id = ?",
            (error, time.time(), next_at, op_id),
        )

    async def fail_op(self, op_id: int, code: str, error: str) -> None:
        """The op failed for good; a put's staged body stays recorded for ``retry_op``."""
        await self._write(
            "UPDATE ops SET state = 'failed', error = ?, error_code = ?, updated = ? WHERE id = ?",
            (error, code, time.time(), op_id),
        )

    async def op_done(self, op_id: int) -> None:
        """Close an op that needed nothing from storage (a folder delete's linked item)."""
        await self._write("UPDATE ops SET state = 'done', error = NULL, updated = ? WHERE id = ?", (time.time(), op_id))

    async def retry_op(self, op_id: int) -> bool:
        """A failed op back to pending, due now; False if it was not failed (any more)."""
        now = time.time()
        n = await self._write(
            "UPDATE ops SET state = 'pending', error = NULL, error_code = NULL, updated = ?, next_at = ? "
            "WHERE id = ? AND state = 'failed'",
            (now, now, op_id),
        )
        return n == 1

    async def cancel_op(self, op_id: int) -> bool:
        """A pending or failed op to cancelled, forgetting its staged body (the caller
        removes the file); False if it was done or cancelled already."""
        n = await self._write(
            "UPDATE ops SET state = 'cancelled', error = 'cancelled by the user', error_code = 'cancelled', "
            "updated = ?, staged = NULL WHERE id = ? AND state IN ('pending', 'failed')",
            (time.time(), op_id),
        )
        return n == 1

    async def complete_put(self, op: Op, dataset_id: int, info: ObjectInfo) -> Item:
        """Index what the put wrote and close the op, atomically. An existing row (an
        overwrite, or a tombstone written over) keeps its id and user metadata and is live."""
        now = time.time()
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO items (dataset_id, key, size, modified, etag, version, content_type, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dataset_id, key) DO UPDATE SET "
                "size = excluded.size, modified = excluded.modified, etag = excluded.etag, "
                "version = excluded.version, content_type = excluded.content_type, state = 'live', "
                "updated = excluded.updated, ref = NULL, link = NULL",
                (dataset_id, op.key, info.size, info.modified, info.etag, info.version, op.content_type, now),
            )
            await tx.execute(
                "UPDATE ops SET state = 'done', error = NULL, updated = ?, staged = NULL WHERE id = ?",
                (now, op.id),
            )
        item = await self.item(dataset_id, op.key)
        assert item is not None
        return item

    async def complete_delete(self, op: Op, dataset_id: int) -> None:
        now = time.time()
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM items WHERE dataset_id = ? AND key = ?", (dataset_id, op.key))
            await tx.execute("UPDATE ops SET state = 'done', error = NULL, updated = ? WHERE id = ?", (now, op.id))

    async def items(
        self,
        dataset_id: int,
        *,
        prefix: str = "",
        after: str | None = None,
        limit: int | None = None,
        state: ItemState | None = ItemState.LIVE,
        meta: dict[str, str] | None = None,
    ) -> list[Item]:
        sql = f"SELECT {self._item_cols} FROM items WHERE dataset_id = ?"
        args: list[Any] = [dataset_id]
        for name, value in (meta or {}).items():
            # The member's name is a bound parameter: no injection.
            sql += f" AND {self.db.dialect.json_text('meta', '?')} = ?"
            args += [name, value]
        if state is not None:
            sql += " AND state = ?"
            args.append(str(state))
        if prefix:
            # A range scan on the (dataset_id, key) index; LIKE would not use it.
            sql += " AND key >= ? AND key < ?"
            args += [prefix, prefix + _PREFIX_END]
        if after is not None:
            sql += " AND key > ?"
            args.append(after)
        sql += " ORDER BY key"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [_item(r) for r in await self._read(sql, args)]

    async def select_items(
        self, dataset_id: int, where: str, params: Sequence[Any], order: str, limit: int, *, scan: bool = False
    ) -> list[Item]:
        """A page of the dataset's items by a catalog query (catalog/query.py compiles
        ``where`` and ``order`` from fixed column names and validated metadata names;
        every value is one of ``params``). ``scan`` reads the table in its own order
        (keeping the planner off the key index), for a sort no index serves."""
        # The id as a literal (an int, never user input): a dataset's partial indexes serve
        # only a query that names it so.
        column = self.db.dialect.no_index("dataset_id") if scan else "dataset_id"
        sql = (
            f"SELECT {self._item_cols} FROM items WHERE {column} = {int(dataset_id)} AND {where} "
            f"ORDER BY {order} LIMIT ?"
        )
        return [_item(r) for r in await self._read(sql, [*params, limit])]

    async def folder_counts(self, dataset_id: int, parent: str, state: str) -> list[tuple[str, int, int]]:
        """(name, items, bytes) of each sub-folder directly under ``parent`` ("" or ending in
        "/"), with everything beneath it; a name "" counts the items directly in ``parent``.
        One range scan of the (dataset, key) index; keys are derived into folders here."""
        n = len(parent)
        rest = "substr(key, CAST(?1 AS INTEGER) + 1)"
        slash = self.db.dialect.position("'/'", rest)
        rows = await self._read(
            f"SELECT CASE WHEN {slash} > 0 THEN substr({rest}, 1, {slash} - 1) ELSE '' END AS folder, "
            "count(*), sum(size) FROM items WHERE dataset_id = ?2 AND key >= ?3 AND key < ?4 AND state = ?5 "
            "GROUP BY folder ORDER BY folder",
            (n, dataset_id, parent, parent + _PREFIX_END, state),
        )
        return [(str(r[0]), int(r[1]), int(r[2] or 0)) for r in rows]

    async def direct_items(self, dataset_id: int, parent: str, state: str, after: str | None, limit: int) -> list[Item]:
        """Items directly in ``parent`` (no further '/'), by key, after ``after``."""
        slash = self.db.dialect.position("'/'", "substr(key, CAST(?5 AS INTEGER) + 1)")
        rows = await self._read(
            f"SELECT {self._item_cols} FROM items WHERE dataset_id = ?1 AND key > ?2 AND key < ?3 AND state = ?4 "
            f"AND {slash} = 0 ORDER BY key LIMIT ?6",
            (
                dataset_id,
                after if after is not None and after > parent else parent,
                parent + _PREFIX_END,
                state,
                len(parent),
                limit,
            ),
        )
        return [_item(r) for r in rows]

    async def adopt(self, old_id: int, dataset_id: int, new_key: str) -> None:
        """A moved item keeps its id and user metadata: its row takes the new key and what the
        copy indexed there (size, etag, ...), and the copy's own row goes, atomically."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                "SELECT id, size, modified, etag, version, content_type FROM items WHERE dataset_id = ? AND key = ?",
                (dataset_id, new_key),
            )
            if not rows or rows[0][0] == old_id:
                return
            row = rows[0]
            await tx.execute("DELETE FROM items WHERE id = ?", (row[0],))
            await tx.execute(
                "UPDATE items SET key = ?, size = ?, modified = ?, etag = ?, version = ?, content_type = ?, "
                "state = 'live', updated = ? WHERE id = ?",
                (new_key, *row[1:], time.time(), old_id),
            )

    async def add_folder(self, dataset_id: int, path: str) -> bool:
        """Persist an empty folder (``a/b/``) of a runtime dataset; False if it was there."""
        n = await self._write(
            "INSERT INTO folders (dataset_id, path) VALUES (?, ?) ON CONFLICT DO NOTHING", (dataset_id, path)
        )
        return n == 1

    async def empty_folders(self, dataset_id: int, parent: str) -> list[str]:
        """Persisted folders under ``parent`` (at any depth), by path."""
        if not await self.db.has_table("folders"):
            return []
        rows = await self._read(
            "SELECT path FROM folders WHERE dataset_id = ? AND path > ? AND path < ? ORDER BY path",
            (dataset_id, parent, parent + _PREFIX_END),
        )
        return [str(r[0]) for r in rows]

    async def drop_folders(self, dataset_id: int, prefix: str) -> None:
        await self._write(
            "DELETE FROM folders WHERE dataset_id = ? AND path >= ? AND path < ?",
            (dataset_id, prefix, prefix + _PREFIX_END),
        )

    async def rekey(self, dataset_id: int, moves: Sequence[tuple[int, str]]) -> None:
        """A runtime dataset's items take new keys (a catalog-only move), all or none."""
        now = time.time()
        async with self.db.transaction() as tx:
            await tx.executemany(
                "UPDATE items SET key = ?, updated = ? WHERE id = ? AND dataset_id = ?",
                [(key, now, item_id, dataset_id) for item_id, key in moves],
            )

    async def tombstone_many(self, ids: Sequence[int]) -> None:
        """Tombstone items in one transaction (a folder delete without allow_delete)."""
        now = time.time()
        async with self.db.transaction() as tx:
            await tx.executemany(
                "UPDATE items SET state = 'tombstone', updated = ? WHERE id = ?", [(now, i) for i in ids]
            )

    async def enqueue_deletes(self, dataset_id: int, targets: Sequence[tuple[str, str | None]]) -> list[int]:
        """One delete op per (key, etag), all in one transaction: a folder delete is queued
        whole or not at all."""
        now = time.time()
        out = []
        async with self.db.transaction() as tx:
            for key, etag in targets:
                rows = await tx.fetch(
                    "INSERT INTO ops (dataset_id, kind, key, if_match, created, updated, next_at) "
                    "VALUES (?, 'delete', ?, ?, ?, ?, ?) RETURNING id",
                    (dataset_id, key, etag, now, now, now),
                )
                out.append(int(rows[0][0]))
        return out

    async def create_index(self, name: str, sql: str) -> bool:
        """Run a ``CREATE INDEX IF NOT EXISTS`` (built by catalog/query.py); True when it was new."""
        return await self.db.create_index(name, sql)

    async def indexes(self, prefix: str) -> list[tuple[str, str]]:
        """(name, definition) of the indexes whose names start with ``prefix``."""
        return await self.db.indexes(prefix)

    # -- linked items (catalog/links.py) -----------------------------------------

    async def add_links(
        self, dataset_id: int, links: Sequence[tuple[str, str, str | None, dict[str, Any] | None]]
    ) -> set[str]:
        """Create linked items (key, ref, content type, user metadata) in one transaction; the
        keys that existed already (any state, linked or not) are left as they are and returned."""
        now = time.time()
        keys = [k for k, _r, _c, _m in links]
        async with self.db.transaction() as tx:
            existing: set[str] = set()
            for i in range(0, len(keys), 500):  # SQLite's host-parameter limit
                part = keys[i : i + 500]
                rows = await tx.fetch(
                    f"SELECT key FROM items WHERE dataset_id = ? AND key IN ({','.join('?' * len(part))})",
                    (dataset_id, *part),
                )
                existing.update(str(r[0]) for r in rows)
            await tx.executemany(
                "INSERT INTO items (dataset_id, key, size, modified, state, content_type, meta, updated, ref, link) "
                "VALUES (?, ?, 0, ?, 'live', ?, ?, ?, ?, 'api') ON CONFLICT (dataset_id, key) DO NOTHING",
                [
                    (dataset_id, key, now, ctype, json.dumps(meta, ensure_ascii=False) if meta else None, now, ref)
                    for key, ref, ctype, meta in links
                    if key not in existing
                ],
            )
        return existing

    async def link_files_due(self, limit: int) -> list[tuple[int, int, str, str | None]]:
        """(item id, dataset id, key, etag) of link files waiting to be read, oldest first."""
        rows = await self._read(
            "SELECT q.item_id, q.dataset_id, i.key, i.etag FROM link_files q JOIN items i ON i.id = q.item_id "
            "ORDER BY q.queued, q.item_id LIMIT ?",
            (limit,),
        )
        return [(int(r[0]), int(r[1]), str(r[2]), r[3]) for r in rows]

    async def set_link_file(
        self, item_id: int, etag: str | None, link: tuple[str, str | None, dict[str, Any]] | None
    ) -> bool:
        """Record what a link file says (ref, content type, user metadata merged in), or that it
        is no link (None), and take it off the queue; only if the row still has the ``etag`` that
        was read (a newer version is queued again by the trigger). Whether it was recorded."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch("SELECT etag, meta FROM items WHERE id = ?", (item_id,))
            row = rows[0] if rows else None
            if row is None or row[0] != etag:
                return False
            if link is None:
                await tx.execute("UPDATE items SET ref = NULL, link = NULL WHERE id = ?", (item_id,))
            else:
                ref, ctype, meta = link
                merged = {**(json.loads(row[1]) if row[1] else {}), **meta}
                await tx.execute(
                    "UPDATE items SET ref = ?, link = 'file', content_type = coalesce(?, content_type), meta = ?, "
                    "updated = ? WHERE id = ?",
                    (ref, ctype, json.dumps(merged, ensure_ascii=False) if merged else None, time.time(), item_id),
                )
            await tx.execute("DELETE FROM link_files WHERE item_id = ?", (item_id,))
        return True

    async def drop_link_file(self, item_id: int) -> None:
        """Take a link file that cannot be read off the queue (its row stays an ordinary item)."""
        await self._write("DELETE FROM link_files WHERE item_id = ?", (item_id,))

    async def pointed_ref(self, item_id: int) -> str | None:
        """The ref of the linked item a pointer item (clone, merge) points at; None otherwise."""
        rows = await self._read(
            "SELECT s.ref FROM items p JOIN items s ON s.id = p.source_item WHERE p.id = ?", (item_id,)
        )
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    async def iter_items(
        self, dataset_id: int, prefix: str = "", page: int = 5000, state: ItemState | None = ItemState.LIVE
    ) -> AsyncIterator[Item]:
        after: str | None = None
        while batch := await self.items(dataset_id, prefix=prefix, after=after, limit=page, state=state):
            for item in batch:
                yield item
            after = batch[-1].key


def _suffixed(key: str, source: str) -> str:
    """``a/b.jpg`` from ``ds2`` -> ``a/b~ds2.jpg``: the name keeps its extension."""
    folder, _, leaf = key.rpartition("/")
    stem, dot, ext = leaf.rpartition(".")
    leaf = f"{stem}~{source}.{ext}" if dot and stem else f"{leaf}~{source}"
    return f"{folder}/{leaf}" if folder else leaf
