"""The ledger: datasets, items and runs in one SQLite file (aiosqlite).

Durability (invariant 8): WAL, ``synchronous=FULL``, one transaction per batch.
Item ids are stable (a rename updates the key of the same row). Reads that stream
a whole dataset use their own read-only connection, so the snapshot a run diffs
against is a consistent view while the same run writes through the main one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import aiosqlite

from bucketsync import metrics
from bucketsync.core.errors import LedgerError, LedgerLocked
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
from bucketsync.ledger import durability

SNAPSHOT_BATCH = 8192
#: one inbox entry: (key, kind, token, etag, size, at), as ``upstream.events.Event`` has them
InboxEvent = tuple[str, str, str | None, str | None, int | None, float | None]

# Append-only: each entry moves the schema one version forward (PRAGMA user_version).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE datasets (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created REAL NOT NULL
    );
    CREATE TABLE items (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id),
        key TEXT NOT NULL,
        size INTEGER NOT NULL,
        modified REAL NOT NULL,
        etag TEXT,
        version TEXT,
        state TEXT NOT NULL DEFAULT 'live',
        content_type TEXT,
        meta TEXT,
        first_run INTEGER,
        updated REAL NOT NULL,
        UNIQUE (dataset_id, key)
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id),
        started REAL NOT NULL,
        ended REAL,
        status TEXT NOT NULL,
        forced INTEGER NOT NULL DEFAULT 0,
        listed INTEGER NOT NULL DEFAULT 0,
        added INTEGER NOT NULL DEFAULT 0,
        modified INTEGER NOT NULL DEFAULT 0,
        removed INTEGER NOT NULL DEFAULT 0,
        renamed INTEGER NOT NULL DEFAULT 0,
        unchanged INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX runs_by_dataset ON runs (dataset_id, id);
    """,
    # v2: the downstream outbox.
    """
    CREATE TABLE ops (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id),
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        create_only INTEGER NOT NULL DEFAULT 0,
        if_match TEXT,
        staged TEXT,
        sha256 TEXT,
        content_type TEXT,
        error TEXT,
        error_code TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        next_at REAL NOT NULL
    );
    CREATE INDEX ops_pending ON ops (state, next_at);
    """,
    # v3: ops on one key run in order (due_ops asks "is an older op on this key pending?"
    # for every candidate); without this index that question scans the whole backlog.
    """
    CREATE INDEX ops_pending_by_key ON ops (dataset_id, key, id) WHERE state = 'pending';
    """,
    # v4: the commit sequence (mirrored in LEDGER.seq to detect a lost -wal) and the
    # datasets that must be re-synced in full because the ledger lost commits.
    """
    CREATE TABLE commit_seq (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
    INSERT INTO commit_seq (id, seq) VALUES (1, 0);
    CREATE TABLE resync (dataset TEXT PRIMARY KEY, reason TEXT NOT NULL, since REAL NOT NULL);
    """,
    # v5: per-dataset item counts, kept by triggers in the writing transaction itself, so
    # every write path (sync batches, renames, tombstones, puts, pruning) keeps them exact
    # and a status read is one indexed lookup instead of a scan of the dataset's items.
    """
    CREATE TABLE item_counts (
        dataset_id INTEGER NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (dataset_id, state)
    ) WITHOUT ROWID;
    INSERT INTO item_counts (dataset_id, state, n)
        SELECT dataset_id, state, count(*) FROM items GROUP BY dataset_id, state;
    CREATE TRIGGER item_counts_insert AFTER INSERT ON items BEGIN
        INSERT INTO item_counts (dataset_id, state, n) VALUES (NEW.dataset_id, NEW.state, 1)
            ON CONFLICT (dataset_id, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER item_counts_delete AFTER DELETE ON items BEGIN
        UPDATE item_counts SET n = n - 1 WHERE dataset_id = OLD.dataset_id AND state = OLD.state;
    END;
    CREATE TRIGGER item_counts_update AFTER UPDATE OF dataset_id, state ON items
    WHEN OLD.dataset_id IS NOT NEW.dataset_id OR OLD.state IS NOT NEW.state BEGIN
        UPDATE item_counts SET n = n - 1 WHERE dataset_id = OLD.dataset_id AND state = OLD.state;
        INSERT INTO item_counts (dataset_id, state, n) VALUES (NEW.dataset_id, NEW.state, 1)
            ON CONFLICT (dataset_id, state) DO UPDATE SET n = n + 1;
    END;
    """,
    # v6: the sub-trees a partial run could not list: a JSON list of {"prefix", "error"}.
    """
    ALTER TABLE runs ADD COLUMN gaps TEXT;
    """,
    # events mode: runs get a kind ('listing' or 'events'), and webhook events wait in a durable
    # inbox from the moment the API accepts them until the consumer has committed their effect.
    """
    ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'listing';
    CREATE TABLE event_inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the reader resumes after the last id it took
        dataset_id INTEGER NOT NULL REFERENCES datasets(id),
        key TEXT NOT NULL,
        kind TEXT NOT NULL,
        token TEXT,
        etag TEXT,
        size INTEGER,
        at REAL,
        received REAL NOT NULL
    );
    CREATE INDEX event_inbox_by_dataset ON event_inbox (dataset_id, id);
    """,
    # enrichment and triggers (enrich/). One queue row per item (its system metadata and
    # thumbnail too), item events for triggers, their deliveries, and thumbnails to delete.
    # SQL triggers on items fill them in the transaction that commits the item itself; they are
    # created by enrich/queue.py (``EnrichQueue.set_datasets``) only while some dataset uses them.
    """
    CREATE TABLE enrich_datasets (dataset_id INTEGER PRIMARY KEY) WITHOUT ROWID;
    CREATE TABLE trigger_datasets (dataset_id INTEGER PRIMARY KEY) WITHOUT ROWID;
    CREATE TABLE enrichment (
        item_id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL,
        etag TEXT,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        meta TEXT,
        thumbnail TEXT,
        thumbnail_local INTEGER NOT NULL DEFAULT 0,
        updated REAL NOT NULL
    );
    CREATE INDEX enrichment_pending ON enrichment (item_id) WHERE state = 'pending';
    CREATE INDEX enrichment_by_dataset ON enrichment (dataset_id, state);
    CREATE TABLE thumbnail_trash (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL,
        key TEXT NOT NULL,
        local INTEGER NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE item_events (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL,
        item_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        etag TEXT,
        size INTEGER,
        created REAL NOT NULL
    );
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL,
        trigger TEXT NOT NULL,
        event TEXT NOT NULL,
        key TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        next_at REAL NOT NULL
    );
    CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
    """,
    # catalog: a dataset's user metadata (a JSON object), merged by PATCH /datasets/{ds}.
    """
    ALTER TABLE datasets ADD COLUMN meta TEXT;
    """,
    # catalog: runtime datasets (clones) of pointer items. A pointer names its source item;
    # the source's sync removing or changing that item marks the pointer orphaned or stale,
    # in the same transaction (triggers), so no pointer dangles in silence.
    """
    ALTER TABLE datasets ADD COLUMN kind TEXT NOT NULL DEFAULT 'synced';
    ALTER TABLE datasets ADD COLUMN source TEXT;
    ALTER TABLE items ADD COLUMN source_item INTEGER;
    CREATE INDEX items_by_source_item ON items (source_item) WHERE source_item IS NOT NULL;
    CREATE TRIGGER pointers_orphaned AFTER DELETE ON items WHEN OLD.source_item IS NULL BEGIN
        UPDATE items SET state = 'orphaned' WHERE source_item = OLD.id AND state != 'orphaned';
    END;
    CREATE TRIGGER pointers_stale AFTER UPDATE OF size, etag, version ON items
    WHEN OLD.source_item IS NULL AND (OLD.size IS NOT NEW.size OR OLD.etag IS NOT NEW.etag
        OR OLD.version IS NOT NEW.version) BEGIN
        UPDATE items SET state = 'stale' WHERE source_item = OLD.id AND state = 'live';
    END;
    """,
    # catalog: empty folders of runtime datasets (a synced dataset's folders are its keys').
    """
    CREATE TABLE folders (
        dataset_id INTEGER NOT NULL REFERENCES datasets(id),
        path TEXT NOT NULL,
        PRIMARY KEY (dataset_id, path)
    ) WITHOUT ROWID;
    """,
    # catalog: pointer items are counted by the statement that creates them, in bulk (see
    # create_clone): a per-row upsert of item_counts was a fifth of a 1,000,000-item clone.
    # Updates and deletes of pointers still count through the v5 triggers.
    """
    DROP TRIGGER item_counts_insert;
    CREATE TRIGGER item_counts_insert AFTER INSERT ON items WHEN NEW.source_item IS NULL BEGIN
        INSERT INTO item_counts (dataset_id, state, n) VALUES (NEW.dataset_id, NEW.state, 1)
            ON CONFLICT (dataset_id, state) DO UPDATE SET n = n + 1;
    END;
    """,
]

_ITEM_COLS = "id, key, size, modified, etag, version, state, content_type, meta, updated"
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


class InstanceLock:
    """One agent per ledger (invariant 10): an exclusive ``flock`` on ``LEDGER.lock``.

    The kernel drops the lock when the process dies, even by ``kill -9``, so a
    crash never leaves a stale lock behind.
    """

    def __init__(self, ledger: Path) -> None:
        self.path = Path(f"{ledger}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise durability.ledger_error(self.path.with_suffix(""), exc, "create the lock file of") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LedgerLocked(
                f"another bucketsync agent (pid {holder}) is using the ledger {self.path.with_suffix('')}; "
                "stop it first, or talk to it through its HTTP API"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def held_by_other(self) -> bool:
        """True when another process holds the lock (used to route the CLI to the daemon)."""
        if not self.path.exists():
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise durability.ledger_error(self.path.with_suffix(""), exc, "read the lock file of") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


async def _connect_readonly(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        await db.execute("PRAGMA busy_timeout=10000")
    except BaseException:
        await db.close()
        raise
    return db


class Ledger:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        # Reads for the API and the CLI (status, counts, runs, item pages) go through their
        # own read-only connection, which has its own aiosqlite thread: under WAL they see
        # the last commit without waiting for the writers, and a page of items never queues
        # behind a 5,000-row batch on the writers' thread. A read-only ledger reads through
        # its one connection. Reads run in autocommit, so each sees every commit before it.
        self.reader = db
        #: dataset name -> id; a configured dataset's row is never deleted or renamed, and a runtime
        #: dataset's (drop_runtime) leaves this cache in the same transaction's wake
        self._ids: dict[str, int] = {}
        #: False on a ledger older than the counts table (opened read-only, so not migrated)
        self._counts_table = True
        #: (table, column) -> whether this ledger has it (a read-only ledger is not migrated)
        self._columns: dict[tuple[str, str], bool] = {}
        #: the last overview and the reader's ``PRAGMA data_version`` it was read at
        self._overview: tuple[int, dict[str, tuple[dict[str, int], RunRecord | None]]] | None = None
        #: the runtime datasets and the datasets' metadata, at a ``data_version`` (``described``)
        self._described: tuple[int, dict[str, tuple[str, str | None]], dict[str, Any]] | None = None
        # One connection serves every dataset's run and the outbox: a transaction must
        # not interleave with another coroutine's, and a lone write must not join (and
        # be rolled back with) someone else's. Every write holds this lock.
        self.write_lock = asyncio.Lock()
        #: the last committed commit-sequence number (every write transaction bumps it)
        self.seq = 0
        self.mirror = durability.SeqMirror(path)
        #: why writes are failing (a full disk, ...); None once a write commits again
        self.fault: str | None = None
        #: (ledger seq, sidecar seq) when start-up found the ledger behind its sidecar
        self.rolled_back: tuple[int, int] | None = None

    async def _write(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Cursor:
        async with self._transaction():
            return await self.db.execute(sql, params)

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One read on the reader connection, run to its end in one step of its thread.

        A statement left open across an ``await`` (a cursor being iterated, or fetched
        after a separate execute) keeps the connection's read transaction, and with it
        an old snapshot, for every other coroutine's read in between: a put that had
        just committed then read its own item back as missing. Run whole, each read
        sees every commit before it.
        """
        return list(await self.reader.execute_fetchall(sql, params))

    @classmethod
    async def open(cls, path: Path, *, readonly: bool = False) -> Ledger:
        """Open (and migrate) the ledger. Any failure closes what was opened, so a damaged
        or unwritable file is an error naming the file and the fix, never a hung process
        (aiosqlite's thread keeps the interpreter alive until its connection closes)."""
        doing = "read" if readonly else "open"
        db: aiosqlite.Connection | None = None
        try:
            if readonly:
                if not path.exists():
                    raise FileNotFoundError(f"ledger {path} does not exist yet (run a sync first)")
                db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                db = await aiosqlite.connect(path, isolation_level=None)
                await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=10000")
            ledger = cls(db, path)
            if readonly:
                # The first read is where a damaged header or an unreadable file shows.
                await (await db.execute("SELECT count(*) FROM sqlite_master")).close()
                ledger._counts_table = await ledger._has_table("item_counts")
            else:
                await ledger._migrate()
                await ledger._check_seq()
                ledger.reader = await _connect_readonly(path)
            return ledger
        except BaseException as exc:
            if db is not None:
                with contextlib.suppress(Exception):
                    await db.close()
            if isinstance(exc, sqlite3.Error) or (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)):
                raise durability.ledger_error(path, exc, doing) from None
            raise

    async def close(self) -> None:
        try:
            await self.mirror.close()
        finally:
            try:
                if self.reader is not self.db:
                    await self.reader.close()
            finally:
                await self.db.close()

    async def _has_table(self, name: str) -> bool:
        async with self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) as cur:
            return await cur.fetchone() is not None

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise LedgerError(
                f"ledger {self.path} has schema version {version}, newer than this bucketsync "
                f"({len(MIGRATIONS)}); upgrade bucketsync"
            )
        for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript commits first; the version bump is part of the script's transaction.
            await self.db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={n}; COMMIT;")

    async def _check_seq(self) -> None:
        """Compare the commit sequence with its sidecar: a ledger *behind* its sidecar lost
        commits it had made durable (its -wal was deleted after a crash, or an older copy
        was put in its place). That is loud, counted, and every dataset is re-synced."""
        async with self.db.execute("SELECT seq FROM commit_seq WHERE id = 1") as cur:
            row = await cur.fetchone()
        self.seq = int(row[0]) if row else 0
        mirrored = await asyncio.to_thread(self.mirror.read)
        if mirrored is not None and mirrored > self.seq:
            self.rolled_back = (self.seq, mirrored)
            metrics.LEDGER_ROLLBACKS.inc()
            durability.log.error(
                "the ledger lost committed transactions: it is older than its commit-sequence sidecar "
                "(its -wal was deleted after a crash, or an older copy replaced it); every dataset is re-synced "
                "in full, and user metadata or ops written in the lost transactions are gone",
                ledger=str(self.path),
                ledger_seq=self.seq,
                sidecar_seq=mirrored,
                sidecar=str(self.mirror.path),
            )
        try:
            await asyncio.to_thread(self.mirror.write_now, self.seq)
        except OSError as exc:
            raise durability.ledger_error(self.mirror.path, exc, "write the commit-sequence sidecar of") from None

    async def probe_write(self) -> None:
        """An empty write transaction (it only bumps the commit sequence): the cheapest
        way to learn whether the ledger takes writes again after a fault."""
        async with self._transaction():
            pass

    # -- re-sync after lost commits -----------------------------------------------

    async def mark_resync(self, datasets: Iterable[str], reason: str) -> None:
        async with self._transaction():
            await self.db.executemany(
                "INSERT OR REPLACE INTO resync (dataset, reason, since) VALUES (?, ?, ?)",
                [(name, reason, time.time()) for name in datasets],
            )

    async def resync_pending(self) -> set[str]:
        async with self.db.execute("SELECT dataset FROM resync") as cur:
            return {r[0] for r in await cur.fetchall()}

    async def resync_done(self, dataset: str) -> None:
        await self._write("DELETE FROM resync WHERE dataset = ?", (dataset,))

    # -- datasets ---------------------------------------------------------

    async def dataset_id(self, name: str) -> int:
        if (found := await self.find_dataset(name)) is not None:
            return found
        await self._write("INSERT OR IGNORE INTO datasets (name, created) VALUES (?, ?)", (name, time.time()))
        async with self.db.execute("SELECT id FROM datasets WHERE name = ?", (name,)) as cur:
            row = await cur.fetchone()
        assert row is not None
        self._ids[name] = int(row[0])
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
        ds = f"{'+' if scan else ''}dataset_id = ?"
        async with self._transaction():
            cur = await self.db.execute(
                "INSERT INTO datasets (name, created, kind, source) VALUES (?, ?, 'clone', ?)", (name, now, source)
            )
            assert cur.lastrowid is not None
            new_id = cur.lastrowid
            cur = await self.db.execute(
                "INSERT INTO items (dataset_id, key, size, modified, etag, version, state, content_type, meta, "
                f"updated, source_item) SELECT ?, key, size, modified, etag, version, 'live', content_type, {meta}, "
                f"?, id FROM items WHERE {ds} AND state = 'live' AND {where}",
                [new_id, now, source_id, *params],
            )
            n = cur.rowcount
            await self._count_pointers(new_id, n)
        self._ids[name] = new_id
        return new_id, n

    async def _mostly(self, dataset_id: int) -> bool:
        """Whether the dataset's live items are an eighth or more of the items table, where a
        sequential scan of the whole table beats a random read per item through an index."""
        total = await self._read("SELECT max(id) FROM items")
        return bool(total and total[0][0]) and await self.live_count(dataset_id) * 8 >= int(total[0][0])

    async def _count_pointers(self, dataset_id: int, n: int) -> None:
        """Record the ``n`` live pointers a new runtime dataset was created with, which its
        bulk insert left uncounted (migration v12). Inside the creating transaction; a
        recount would read every new row back through the (dataset, key) index."""
        await self.db.execute(
            "INSERT INTO item_counts (dataset_id, state, n) VALUES (?, 'live', ?) "
            "ON CONFLICT (dataset_id, state) DO UPDATE SET n = n + excluded.n",
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
        rest = "size, modified, etag, version, 'live', content_type, meta, ?, id"
        live = "FROM items WHERE dataset_id = ? AND state = 'live'"
        taken = "key IN (SELECT key FROM items WHERE dataset_id = ?)"
        async with self._transaction():
            cur = await self.db.execute(
                "INSERT INTO datasets (name, created, kind, source) VALUES (?, ?, 'merge', ?)",
                (name, now, ",".join(n for _i, n in sources)),
            )
            assert cur.lastrowid is not None
            new_id = cur.lastrowid
            for n, (src_id, src_name) in enumerate(sources):
                if on_conflict == "folder":
                    await self.db.execute(
                        f"{into} SELECT ?, ? || key, {rest} {live}", (new_id, src_name + "/", now, src_id)
                    )
                elif on_conflict == "merge" or n == 0:
                    await self.db.execute(
                        f"{into} SELECT ?, key, {rest} {live} ON CONFLICT (dataset_id, key) DO UPDATE SET "
                        "meta = CASE WHEN items.meta IS NULL THEN excluded.meta WHEN excluded.meta IS NULL "
                        "THEN items.meta ELSE json_patch(items.meta, excluded.meta) END",
                        (new_id, now, src_id),
                    )
                else:  # suffix: the keys an earlier source holds get this source's name
                    async with self.db.execute(
                        f"SELECT key, size, modified, etag, version, 'live', content_type, meta, id {live} AND {taken}",
                        (src_id, new_id),
                    ) as c:
                        met = await c.fetchall()
                    await self.db.execute(
                        f"{into} SELECT ?, key, {rest} {live} AND NOT {taken}", (new_id, now, src_id, new_id)
                    )
                    await self.db.executemany(
                        f"{into} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dataset_id, key) DO NOTHING",
                        [(new_id, _suffixed(r[0], src_name), *r[1:8], now, r[8]) for r in met],
                    )
            async with self.db.execute("SELECT count(*) FROM items WHERE dataset_id = ?", (new_id,)) as c:
                row = await c.fetchone()
            await self._count_pointers(new_id, int(row[0]) if row else 0)  # every pointer is made live
        self._ids[name] = new_id
        return new_id, int(row[0]) if row else 0

    async def drop_runtime(self, name: str) -> int:
        """Delete a runtime dataset's catalog (its pointers, folders, metadata, row); storage is
        not touched: a pointer's binary is its source's. How many items went."""
        async with self._transaction():
            async with self.db.execute("SELECT id FROM datasets WHERE name = ? AND kind != 'synced'", (name,)) as cur:
                row = await cur.fetchone()
            if row is None:
                return -1
            ds_id = int(row[0])
            cur = await self.db.execute("DELETE FROM items WHERE dataset_id = ?", (ds_id,))
            n = cur.rowcount
            await self.db.execute("DELETE FROM folders WHERE dataset_id = ?", (ds_id,))
            await self.db.execute("DELETE FROM item_counts WHERE dataset_id = ?", (ds_id,))
            await self.db.execute("DELETE FROM datasets WHERE id = ?", (ds_id,))
        self._ids.pop(name, None)
        self._overview = self._described = None
        return n

    async def runtime_datasets(self) -> dict[str, tuple[str, str | None]]:
        """name -> (kind, source) of the datasets created at run time (not in the config)."""
        if not await self._has_column("datasets", "kind"):
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
        if not await self._has_column("datasets", "meta"):
            return {}
        rows = await self._read("SELECT name, meta FROM datasets")
        return {str(n): json.loads(m) if m else {} for n, m in rows}

    async def select_datasets(self, where: str, params: Sequence[Any], order: str) -> list[str]:
        """Names of the datasets a catalog query matches, in its order (catalog/datasets.py
        compiles ``where`` and ``order``; every value is one of ``params``)."""
        table = "datasets"
        if not await self._has_column("datasets", "meta"):  # an old read-only ledger: no metadata yet
            table = "(SELECT name, created, NULL AS meta FROM datasets)"
        return [str(r[0]) for r in await self._read(f"SELECT name FROM {table} WHERE {where} ORDER BY {order}", params)]

    async def _has_column(self, table: str, column: str) -> bool:
        if (known := self._columns.get((table, column))) is not None:
            return known
        rows = await self._read(f"SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?", (column,))
        self._columns[(table, column)] = found = bool(rows)
        return found

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
            out[state] = n
        return out

    async def key_quantiles(self, dataset_id: int, count: int, total: int) -> list[str]:
        """About ``count`` of the dataset's keys at even steps in key order (``total``: about how many
        items it has): where a parallel listing is cut when no run of this process sampled them yet.
        One walk of the ``(dataset_id, key)`` index, on the reader's thread."""
        stride = max(1, total // (count + 1))
        sql = (
            "SELECT key FROM (SELECT key, row_number() OVER (ORDER BY key) AS n FROM items WHERE dataset_id = ?) "
            "WHERE n % ? = 0 ORDER BY key"
        )
        return [str(r[0]) for r in await self._read(sql, (dataset_id, stride))]

    async def live_count(self, dataset_id: int) -> int:
        return (await self.counts_by_state(dataset_id))[ItemState.LIVE]

    async def overview(self) -> dict[str, tuple[dict[str, int], RunRecord | None]]:
        """Every dataset in the ledger: (items per state, its latest run), in two queries.

        What ``GET /datasets`` and ``status`` show; its cost does not grow with items or runs.
        Dashboards poll it, so it is read again only when some connection (of this process
        or another) has committed since: SQLite's ``data_version`` says so. Callers must not
        modify what it returns.
        """
        return await self._overview_at(await self._data_version())

    async def described(
        self,
    ) -> tuple[dict[str, tuple[dict[str, int], RunRecord | None]], dict[str, tuple[str, str | None]], dict[str, Any]]:
        """The overview, the runtime datasets and every dataset's user metadata: what
        ``GET /datasets`` shows. Like the overview, read again only when ``data_version``
        moved, so a dashboard's poll costs one query, not four. Callers must not modify it."""
        version = await self._data_version()
        overview = await self._overview_at(version)
        if self._described is None or self._described[0] != version:
            # Read after the version: if a commit lands in between, the version moves and
            # the next call reads again; what is cached is never older than its version.
            self._described = (version, await self.runtime_datasets(), await self.datasets_meta())
        return overview, self._described[1], self._described[2]

    async def _data_version(self) -> int:
        rows = await self._read("PRAGMA data_version")
        return int(rows[0][0]) if rows else -1

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
            counts.setdefault(ds_id, {str(s): 0 for s in COUNTED_STATES})[state] = n
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
        """Every item of the dataset (live and tombstoned), ascending by key."""
        async for rows in self.snapshot_pages(dataset_id):
            for r in rows:
                yield indexed(r)

    async def snapshot_pages(self, dataset_id: int) -> AsyncIterator[list[SnapshotRow]]:
        """``snapshot`` as the rows SQLite hands over, ``SNAPSHOT_BATCH`` at a time: (id, key,
        size, modified, etag, version, state) tuples, for ``diff_pages``, which builds an
        object only for a row that changed.

        A separate read-only connection holds one read transaction for the whole
        walk: the run's own writes (committed meanwhile) cannot shift the cursor.
        """
        reader = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            await reader.execute("BEGIN")
            async with reader.execute(
                "SELECT id, key, size, modified, etag, version, state FROM items WHERE dataset_id = ? ORDER BY key",
                (dataset_id,),
            ) as cur:
                while rows := await cur.fetchmany(SNAPSHOT_BATCH):
                    yield cast(list[SnapshotRow], rows)
        finally:
            await reader.close()

    # -- runs ---------------------------------------------------------------

    async def begin_run(self, dataset_id: int, forced: bool, kind: str = "listing") -> int:
        cur = await self._write(
            "INSERT INTO runs (dataset_id, started, status, forced, kind) VALUES (?, ?, 'running', ?, ?)",
            (dataset_id, time.time(), int(forced), kind),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

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

    async def fail_stale_runs(self) -> int:
        """Runs left 'running' by a crash are failed on start-up; their batches stay committed."""
        cur = await self._write(
            "UPDATE runs SET status = 'failed', ended = ?, error = 'the agent stopped during this run' "
            "WHERE status = 'running'",
            (time.time(),),
        )
        return cur.rowcount

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
        async with self.db.execute(
            f"SELECT {_RUN_COLS} FROM runs r JOIN datasets d ON d.id = r.dataset_id "
            "WHERE r.dataset_id = ? AND r.status IN ('ok', 'partial') AND r.kind = 'listing' "
            "ORDER BY r.id DESC LIMIT 1",
            (dataset_id,),
        ) as cur:
            row = await cur.fetchone()
        return _run(row) if row else None

    # -- retention (see retention.py) -------------------------------------------

    async def dataset_ids(self) -> list[int]:
        """Every dataset the ledger knows, configured or not any more."""
        async with self.db.execute("SELECT id FROM datasets ORDER BY id") as cur:
            return [int(r[0]) for r in await cur.fetchall()]

    async def prune_runs(self, dataset_id: int, keep: int, before: float, limit: int = 500) -> int:
        """Delete up to ``limit`` of the dataset's runs past retention; how many went.

        Past retention: not among the newest ``keep``, or ended before ``before``. Never a
        running run, the newest run (what ``status`` shows), or the newest ok run (the
        rename matcher's starting point).
        """
        cur = await self._write(
            "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE dataset_id = ?1 AND status != 'running' "
            "AND id NOT IN (SELECT max(id) FROM runs WHERE dataset_id = ?1 "
            "UNION ALL SELECT max(id) FROM runs WHERE dataset_id = ?1 AND status = 'ok' AND kind = 'listing') "
            "AND (ended < ?2 OR id < (SELECT id FROM runs WHERE dataset_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?3)) "
            "ORDER BY id LIMIT ?4)",
            (dataset_id, before, keep - 1, limit),
        )
        return max(cur.rowcount, 0)

    async def prune_ops(self, dataset_id: int, keep: int, before: float, limit: int = 500) -> int:
        """Delete up to ``limit`` of the dataset's finished ops past retention; how many went.

        Only finished ops go (done, failed, ...): never one still pending or running. Past
        retention: not among the newest ``keep`` finished ones, or last updated before ``before``.
        """
        finished = "dataset_id = ?1 AND state NOT IN ('pending', 'running')"
        cur = await self._write(
            f"DELETE FROM ops WHERE id IN (SELECT id FROM ops WHERE {finished} "
            f"AND (updated < ?2 OR id < (SELECT id FROM ops WHERE {finished} ORDER BY id DESC LIMIT 1 OFFSET ?3)) "
            "ORDER BY id LIMIT ?4)",
            (dataset_id, before, keep - 1, limit),
        )
        return max(cur.rowcount, 0)

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
        async with self._transaction():
            if adds:
                await self.db.executemany(
                    "INSERT INTO items (dataset_id, key, size, modified, etag, version, first_run, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dataset_id, key) DO UPDATE SET "
                    "size = excluded.size, modified = excluded.modified, etag = excluded.etag, "
                    "version = excluded.version, updated = excluded.updated",
                    # A generator, consumed by the SQLite thread: 5,000 parameter tuples built on the
                    # event loop held it for 5-80 ms (measured with bench/loop_stalls.py).
                    ((dataset_id, o.key, o.size, o.modified, o.etag, o.version, run_id, now) for o in adds),
                )
            if updates:
                await self.db.executemany(
                    "UPDATE items SET size = ?, modified = ?, etag = ?, version = ?, updated = ? WHERE id = ?",
                    ((o.size, o.modified, o.etag, o.version, now, item_id) for item_id, o in updates),
                )
            await self._progress(run_id, counts)

    async def added_since(self, dataset_id: int, after_run: int) -> list[tuple[int, str, str | None, int, int]]:
        """(id, key, etag, size, first_run) of live items first seen after ``after_run``: rename
        targets, including those a failed run indexed before its listing broke off."""
        async with self.db.execute(
            "SELECT id, key, etag, size, first_run FROM items WHERE dataset_id = ? AND first_run > ? "
            "AND state = 'live'",
            (dataset_id, after_run),
        ) as cur:
            return [(r[0], r[1], r[2], r[3], r[4]) for r in await cur.fetchall()]

    async def rename(self, run_id: int, pairs: Iterable[tuple[int, int, str]], counts: Counts) -> None:
        """Each (old_id, new_id, new_key): the old row takes the new key and the fresh row's
        info, and the fresh row goes, so the item keeps its id and user metadata."""
        now = time.time()
        async with self._transaction():
            for old_id, new_id, _key in pairs:
                async with self.db.execute(
                    "SELECT key, size, modified, etag, version FROM items WHERE id = ?", (new_id,)
                ) as cur:
                    row = await cur.fetchone()
                if row is None:
                    continue
                await self.db.execute("DELETE FROM items WHERE id = ?", (new_id,))
                await self.db.execute(
                    "UPDATE items SET key = ?, size = ?, modified = ?, etag = ?, version = ?, updated = ? WHERE id = ?",
                    (*row, now, old_id),
                )
            await self._progress(run_id, counts)

    async def rows_for(self, dataset_id: int, keys: Iterable[str]) -> dict[str, Indexed]:
        """The ledger rows (live and tombstoned) of ``keys``: what an events batch compares with."""
        out: dict[str, Indexed] = {}
        todo = list(keys)
        for i in range(0, len(todo), 500):  # SQLite's host-parameter limit
            part = todo[i : i + 500]
            rows = await self.db.execute_fetchall(  # whole in one step (see ``_read``)
                "SELECT id, key, size, modified, etag, version, state FROM items WHERE dataset_id = ? "
                f"AND key IN ({','.join('?' * len(part))})",
                (dataset_id, *part),
            )
            for r in rows:
                out[r[1]] = Indexed(*r)
        return out

    async def live_under(self, dataset_id: int, prefix: str, limit: int) -> list[str]:
        """Keys of live items under ``prefix`` (a removed folder's items), at most ``limit``."""
        rows = await self.db.execute_fetchall(
            "SELECT key FROM items WHERE dataset_id = ? AND key >= ? AND key < ? AND state = 'live' "
            "ORDER BY key LIMIT ?",
            (dataset_id, prefix, prefix + "\U0010ffff", limit),
        )
        return [r[0] for r in rows]

    # -- the webhook inbox (events accepted, not yet applied) ------------------------

    async def inbox_put(self, dataset_id: int, events: Sequence[InboxEvent]) -> None:
        """Accept events durably: once this commits, a crash loses none of them."""
        now = time.time()
        async with self._transaction():
            await self.db.executemany(
                "INSERT INTO event_inbox (dataset_id, key, kind, token, etag, size, at, received) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(dataset_id, *e, now) for e in events],
            )

    async def inbox_take(self, dataset_id: int, after: int, limit: int) -> list[tuple[int, InboxEvent]]:
        """Up to ``limit`` inbox entries after id ``after``, oldest first: (id, event)."""
        rows = await self.db.execute_fetchall(
            "SELECT id, key, kind, token, etag, size, at FROM event_inbox WHERE dataset_id = ? AND id > ? "
            "ORDER BY id LIMIT ?",
            (dataset_id, after, limit),
        )
        return [(r[0], (r[1], r[2], r[3], r[4], r[5], r[6])) for r in rows]

    async def inbox_done(self, ids: Sequence[int]) -> None:
        """Forget entries whose effect is committed."""
        async with self._transaction():
            await self.db.executemany("DELETE FROM event_inbox WHERE id = ?", [(i,) for i in ids])

    async def remove(self, run_id: int | None, ids: Sequence[int], counts: Counts | None = None) -> None:
        async with self._transaction():
            await self.db.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in ids])
            if run_id is not None and counts is not None:
                await self._progress(run_id, counts)

    async def _progress(self, run_id: int, c: Counts) -> None:
        await self.db.execute(
            "UPDATE runs SET listed = ?, added = ?, modified = ?, removed = ?, renamed = ?, unchanged = ?, "
            "errors = ? WHERE id = ?",
            (c.listed, c.added, c.modified, c.removed, c.renamed, c.unchanged, c.errors, run_id),
        )

    def _transaction(self) -> _Tx:
        return _Tx(self)

    def transaction(self) -> _Tx:
        """One write transaction, for the queues that keep their SQL beside their code (enrich/)."""
        return _Tx(self)

    # -- reads for the CLI and API ------------------------------------------

    async def item(self, dataset_id: int, key: str) -> Item | None:
        rows = await self._read(f"SELECT {_ITEM_COLS} FROM items WHERE dataset_id = ? AND key = ?", (dataset_id, key))
        return _item(rows[0]) if rows else None

    async def set_state(self, item_id: int, state: ItemState) -> None:
        await self._write("UPDATE items SET state = ?, updated = ? WHERE id = ?", (str(state), time.time(), item_id))

    async def merge_meta(self, item_id: int, patch: dict[str, Any]) -> None:
        """Merge user metadata; a ``None`` value removes the key (JSON merge-patch)."""
        await self._merge_patch("items", item_id, patch, touch=True)

    async def _merge_patch(self, table: str, row_id: int, patch: dict[str, Any], *, touch: bool) -> dict[str, Any]:
        """JSON merge-patch of a row's ``meta`` in one transaction; the merged metadata.
        ``table`` is one of our own names, never input; ``touch`` also sets ``updated``."""
        async with self._transaction():
            async with self.db.execute(f"SELECT meta FROM {table} WHERE id = ?", (row_id,)) as cur:
                row = await cur.fetchone()
            meta = json.loads(row[0]) if row and row[0] else {}
            for k, v in patch.items():
                if v is None:
                    meta.pop(k, None)
                else:
                    meta[k] = v
            stored = json.dumps(meta, ensure_ascii=False) if meta else None
            if touch:
                await self.db.execute(
                    f"UPDATE {table} SET meta = ?, updated = ? WHERE id = ?", (stored, time.time(), row_id)
                )
            else:
                await self.db.execute(f"UPDATE {table} SET meta = ? WHERE id = ?", (stored, row_id))
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
        cur = await self._write(
            "INSERT INTO ops (dataset_id, kind, key, create_only, if_match, staged, sha256, content_type, "
            "created, updated, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (dataset_id, str(kind), key, int(create_only), if_match, staged, sha256, content_type, now, now, now),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    async def op(self, op_id: int) -> Op | None:
        async with self.db.execute(
            f"SELECT {_OP_COLS} FROM ops o JOIN datasets d ON d.id = o.dataset_id WHERE o.id = ?", (op_id,)
        ) as cur:
            row = await cur.fetchone()
        return _op(row) if row else None

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
        async with self.db.execute(sql, args) as cur:
            return [_op(r) for r in await cur.fetchall()]

    async def due_ops(self, now: float, limit: int = 16) -> list[Op]:
        """Pending ops due by ``now``, oldest first; only the oldest pending op of each
        (dataset, key): a later op on a key waits for the earlier one, even one backing off."""
        async with self.db.execute(
            f"SELECT {_OP_COLS} FROM ops o JOIN datasets d ON d.id = o.dataset_id "
            "WHERE o.state = 'pending' AND o.next_at <= ? AND NOT EXISTS ("
            "SELECT 1 FROM ops e WHERE e.state = 'pending' AND e.dataset_id = o.dataset_id "
            "AND e.key = o.key AND e.id < o.id) ORDER BY o.id LIMIT ?",
            (now, limit),
        ) as cur:
            return [_op(r) for r in await cur.fetchall()]

    async def backlog(self) -> int:
        async with self.db.execute("SELECT count(*) FROM ops WHERE state = 'pending'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def backlog_by_dataset(self) -> dict[str, int]:
        """Pending ops per dataset name (datasets with none are absent)."""
        async with self.db.execute(
            "SELECT d.name, count(*) FROM ops o JOIN datasets d ON d.id = o.dataset_id "
            "WHERE o.state = 'pending' GROUP BY d.name"
        ) as cur:
            return {str(name): int(n) for name, n in await cur.fetchall()}

    async def start_attempt(self, op_id: int) -> Op | None:
        """Claim one attempt of a pending op: the op as it now stands, or None if it is no
        longer pending (another execution settled it, or it was cancelled meanwhile).

        Counted *before* storage is touched: after a crash, attempts > 0 says the op may
        already have reached storage, and its retry checks for its own earlier write.
        """
        cur = await self._write(
            "UPDATE ops SET attempts = attempts + 1, updated = ? WHERE id = ? AND state = 'pending'",
            (time.time(), op_id),
        )
        if cur.rowcount != 1:
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

    async def retry_op(self, op_id: int) -> bool:
        """A failed op back to pending, due now; False if it was not failed (any more)."""
        now = time.time()
        cur = await self._write(
            "UPDATE ops SET state = 'pending', error = NULL, error_code = NULL, updated = ?, next_at = ? "
            "WHERE id = ? AND state = 'failed'",
            (now, now, op_id),
        )
        return cur.rowcount == 1

    async def cancel_op(self, op_id: int) -> bool:
        """A pending or failed op to cancelled, forgetting its staged body (the caller
        removes the file); False if it was done or cancelled already."""
        cur = await self._write(
            "UPDATE ops SET state = 'cancelled', error = 'cancelled by the user', error_code = 'cancelled', "
            "updated = ?, staged = NULL WHERE id = ? AND state IN ('pending', 'failed')",
            (time.time(), op_id),
        )
        return cur.rowcount == 1

    async def complete_put(self, op: Op, dataset_id: int, info: ObjectInfo) -> Item:
        """Index what the put wrote and close the op, atomically. An existing row (an
        overwrite, or a tombstone written over) keeps its id and user metadata and is live."""
        now = time.time()
        async with self._transaction():
            await self.db.execute(
                "INSERT INTO items (dataset_id, key, size, modified, etag, version, content_type, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dataset_id, key) DO UPDATE SET "
                "size = excluded.size, modified = excluded.modified, etag = excluded.etag, "
                "version = excluded.version, content_type = excluded.content_type, state = 'live', "
                "updated = excluded.updated",
                (dataset_id, op.key, info.size, info.modified, info.etag, info.version, op.content_type, now),
            )
            await self.db.execute(
                "UPDATE ops SET state = 'done', error = NULL, updated = ?, staged = NULL WHERE id = ?",
                (now, op.id),
            )
        item = await self.item(dataset_id, op.key)
        assert item is not None
        return item

    async def complete_delete(self, op: Op, dataset_id: int) -> None:
        now = time.time()
        async with self._transaction():
            await self.db.execute("DELETE FROM items WHERE dataset_id = ? AND key = ?", (dataset_id, op.key))
            await self.db.execute(
                "UPDATE ops SET state = 'done', error = NULL, updated = ? WHERE id = ?",
                (now, op.id),
            )

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
        sql = f"SELECT {_ITEM_COLS} FROM items WHERE dataset_id = ?"
        args: list[Any] = [dataset_id]
        for name, value in (meta or {}).items():
            # The JSON path is a bound parameter with the name quoted: no injection.
            sql += " AND CAST(json_extract(meta, ?) AS TEXT) = ?"
            args += ['$."' + name.replace('"', '""') + '"', value]
        if state is not None:
            sql += " AND state = ?"
            args.append(str(state))
        if prefix:
            # A range scan on the (dataset_id, key) index; LIKE would not use it.
            sql += " AND key >= ? AND key < ?"
            args += [prefix, prefix + "\U0010ffff"]
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
        (``+dataset_id`` keeps SQLite off the key index), for a sort no index serves."""
        # The id as a literal (an int, never user input): a dataset's partial indexes serve
        # only a query that names it so.
        ds = f"{'+' if scan else ''}dataset_id = {int(dataset_id)}"
        sql = f"SELECT {_ITEM_COLS} FROM items WHERE {ds} AND {where} ORDER BY {order} LIMIT ?"
        return [_item(r) for r in await self._read(sql, [*params, limit])]

    async def folder_counts(self, dataset_id: int, parent: str, state: str) -> list[tuple[str, int, int]]:
        """(name, items, bytes) of each sub-folder directly under ``parent`` ("" or ending in
        "/"), with everything beneath it; a name "" counts the items directly in ``parent``.
        One range scan of the (dataset, key) index; keys are derived into folders here."""
        n = len(parent)
        rows = await self._read(
            "SELECT CASE WHEN instr(substr(key, ?1 + 1), '/') > 0 "
            "THEN substr(key, ?1 + 1, instr(substr(key, ?1 + 1), '/') - 1) ELSE '' END AS folder, count(*), sum(size) "
            "FROM items WHERE dataset_id = ?2 AND key >= ?3 AND key < ?4 AND state = ?5 "
            "GROUP BY folder ORDER BY folder",
            (n, dataset_id, parent, parent + "\U0010ffff", state),
        )
        return [(str(r[0]), int(r[1]), int(r[2] or 0)) for r in rows]

    async def direct_items(self, dataset_id: int, parent: str, state: str, after: str | None, limit: int) -> list[Item]:
        """Items directly in ``parent`` (no further '/'), by key, after ``after``."""
        rows = await self._read(
            f"SELECT {_ITEM_COLS} FROM items WHERE dataset_id = ?1 AND key > ?2 AND key < ?3 AND state = ?4 "
            "AND instr(substr(key, ?5 + 1), '/') = 0 ORDER BY key LIMIT ?6",
            (
                dataset_id,
                after if after is not None and after > parent else parent,
                parent + "\U0010ffff",
                state,
                len(parent),
                limit,
            ),
        )
        return [_item(r) for r in rows]

    async def adopt(self, old_id: int, dataset_id: int, new_key: str) -> None:
        """A moved item keeps its id and user metadata: its row takes the new key and what the
        copy indexed there (size, etag, ...), and the copy's own row goes, atomically."""
        async with self._transaction():
            async with self.db.execute(
                "SELECT id, size, modified, etag, version, content_type FROM items WHERE dataset_id = ? AND key = ?",
                (dataset_id, new_key),
            ) as cur:
                row = await cur.fetchone()
            if row is None or row[0] == old_id:
                return
            await self.db.execute("DELETE FROM items WHERE id = ?", (row[0],))
            await self.db.execute(
                "UPDATE items SET key = ?, size = ?, modified = ?, etag = ?, version = ?, content_type = ?, "
                "state = 'live', updated = ? WHERE id = ?",
                (new_key, *row[1:], time.time(), old_id),
            )

    async def add_folder(self, dataset_id: int, path: str) -> bool:
        """Persist an empty folder (``a/b/``) of a runtime dataset; False if it was there."""
        cur = await self._write("INSERT OR IGNORE INTO folders (dataset_id, path) VALUES (?, ?)", (dataset_id, path))
        return cur.rowcount == 1

    async def empty_folders(self, dataset_id: int, parent: str) -> list[str]:
        """Persisted folders under ``parent`` (at any depth), by path."""
        if not await self._has_table_reader("folders"):
            return []
        rows = await self._read(
            "SELECT path FROM folders WHERE dataset_id = ? AND path > ? AND path < ? ORDER BY path",
            (dataset_id, parent, parent + "\U0010ffff"),
        )
        return [str(r[0]) for r in rows]

    async def drop_folders(self, dataset_id: int, prefix: str) -> None:
        await self._write(
            "DELETE FROM folders WHERE dataset_id = ? AND path >= ? AND path < ?",
            (dataset_id, prefix, prefix + "\U0010ffff"),
        )

    async def rekey(self, dataset_id: int, moves: Sequence[tuple[int, str]]) -> None:
        """A runtime dataset's items take new keys (a catalog-only move), all or none."""
        now = time.time()
        async with self._transaction():
            await self.db.executemany(
                "UPDATE items SET key = ?, updated = ? WHERE id = ? AND dataset_id = ?",
                [(key, now, item_id, dataset_id) for item_id, key in moves],
            )

    async def _has_table_reader(self, name: str) -> bool:
        if (known := self._columns.get((name, ""))) is not None:
            return known
        rows = await self._read("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        self._columns[(name, "")] = bool(rows)
        return bool(rows)

    async def tombstone_many(self, ids: Sequence[int]) -> None:
        """Tombstone items in one transaction (a folder delete without allow_delete)."""
        now = time.time()
        async with self._transaction():
            await self.db.executemany(
                "UPDATE items SET state = 'tombstone', updated = ? WHERE id = ?", [(now, i) for i in ids]
            )

    async def enqueue_deletes(self, dataset_id: int, targets: Sequence[tuple[str, str | None]]) -> list[int]:
        """One delete op per (key, etag), all in one transaction: a folder delete is queued
        whole or not at all."""
        now = time.time()
        out = []
        async with self._transaction():
            for key, etag in targets:
                cur = await self.db.execute(
                    "INSERT INTO ops (dataset_id, kind, key, if_match, created, updated, next_at) "
                    "VALUES (?, 'delete', ?, ?, ?, ?, ?)",
                    (dataset_id, key, etag, now, now, now),
                )
                assert cur.lastrowid is not None
                out.append(cur.lastrowid)
        return out

    async def create_index(self, name: str, sql: str) -> bool:
        """Run a ``CREATE INDEX IF NOT EXISTS`` (built by catalog/query.py); True when it was new."""
        async with self._transaction():
            async with self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)) as c:
                known = await c.fetchone() is not None
            if not known:
                await self.db.execute(sql)
        return not known

    async def indexes(self, prefix: str) -> list[tuple[str, str]]:
        """(name, sql) of the indexes whose names start with ``prefix``."""
        rows = await self._read(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name >= ? AND name < ? ORDER BY name",
            (prefix, prefix + "\U0010ffff"),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

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


def _operational(exc: BaseException) -> bool:
    """A fault of the file or the disk (full, read-only, damaged, I/O), not a bug such as
    a constraint violation: only those become a ``LedgerError`` and mark the ledger's fault."""
    return isinstance(exc, sqlite3.Error) and durability.kind_of(exc) != "other"


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any error (cancellation included).

    Each commit bumps the commit sequence in the same transaction (one single-row
    UPDATE) and hands the new value to the sidecar mirror. A SQLite failure becomes a
    ``LedgerError`` (``DiskFull`` for a full disk) naming the file and the fix, and
    marks the ledger's ``fault`` until a later write commits.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.db = ledger.db
        self.lock = ledger.write_lock

    async def __aenter__(self) -> None:
        await self.lock.acquire()
        try:
            await self.db.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            # Cancelled while waiting, the BEGIN still runs on the connection's thread: a
            # ROLLBACK queued behind it (the thread takes requests in order) ends that
            # transaction before the next writer's BEGIN, and fails harmlessly when none began.
            try:
                with contextlib.suppress(sqlite3.Error):
                    await self.db.execute("ROLLBACK")
            finally:
                self.lock.release()
            if _operational(exc):
                raise self._failed(exc) from exc
            raise

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            if exc is None:
                await self._commit()
            else:
                with contextlib.suppress(sqlite3.Error):
                    await self.db.execute("ROLLBACK")
                if _operational(exc):
                    raise self._failed(exc) from exc
        finally:
            self.lock.release()

    async def _commit(self) -> None:
        seq = self.ledger.seq + 1
        try:
            await self.db.execute("UPDATE commit_seq SET seq = ? WHERE id = 1", (seq,))
            await self.db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                await self.db.execute("ROLLBACK")
            if _operational(exc):
                raise self._failed(exc) from exc
            raise
        self.ledger.seq = seq
        self.ledger.mirror.committed(seq)
        if self.ledger.fault is not None:
            self.ledger.fault = None
            metrics.LEDGER_WRITABLE.set(1)
            durability.log.info("ledger writes work again", ledger=str(self.ledger.path))

    def _failed(self, exc: BaseException) -> LedgerError:
        err = durability.ledger_error(self.ledger.path, exc, "write")
        first = self.ledger.fault is None  # logged once per fault, counted every time
        self.ledger.fault = str(err)
        durability.record_write_failure(err, exc, log_it=first)
        return err
