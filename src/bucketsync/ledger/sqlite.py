"""The SQLite backend of the ledger: one file (aiosqlite), the default.

What is SQLite's own lives here; the ledger's logic is ``Ledger`` (ledger/ledger.py).
Durability (invariant 8): WAL, ``synchronous=FULL``, one transaction per batch. One writer
connection, serialised by a lock (SQLite has one writer anyway); reads for the API and the
CLI use their own read-only connection, and a snapshot its own read transaction, so the
snapshot a run diffs against is a consistent view while the same run writes. The instance
lock keeps one agent per file (invariant 10), and the commit sequence with its sidecar
detects a lost ``-wal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import AsyncGenerator, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from bucketsync import metrics
from bucketsync.core.errors import LedgerError, LedgerLocked
from bucketsync.ledger import durability
from bucketsync.ledger.db import Row

#: rows a stream reads in one call on the event loop (``SqliteDb.stream``): 1-3 ms of it here
LOOP_ROWS = 1024

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
    # catalog: linked items (catalog/links.py). ``ref`` is where the binary is (https://...,
    # s3://...); ``link`` says how the item came: 'api' (POST .../links, a CSV import: no object
    # in the bucket, so a listing never sees it and never removes it) or 'file' (a synced
    # ``*.link.json`` object, tracked by the listing like any). A link file that is added or
    # changed is queued for reading in the transaction that indexes it (as enrichment is).
    """
    ALTER TABLE items ADD COLUMN ref TEXT;
    ALTER TABLE items ADD COLUMN link TEXT;
    CREATE TABLE link_files (
        item_id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL,
        queued REAL NOT NULL
    );
    CREATE TRIGGER link_files_added AFTER INSERT ON items
    WHEN substr(NEW.key, -10) = '.link.json' AND NEW.source_item IS NULL AND NEW.link IS NOT 'api' BEGIN
        INSERT OR REPLACE INTO link_files (item_id, dataset_id, queued) VALUES (NEW.id, NEW.dataset_id, NEW.updated);
    END;
    CREATE TRIGGER link_files_changed AFTER UPDATE OF size, etag, version ON items
    WHEN substr(NEW.key, -10) = '.link.json' AND NEW.source_item IS NULL AND NEW.link IS NOT 'api'
        AND (OLD.size IS NOT NEW.size OR OLD.etag IS NOT NEW.etag OR OLD.version IS NOT NEW.version) BEGIN
        INSERT OR REPLACE INTO link_files (item_id, dataset_id, queued) VALUES (NEW.id, NEW.dataset_id, NEW.updated);
    END;
    CREATE TRIGGER link_files_removed AFTER DELETE ON items WHEN substr(OLD.key, -10) = '.link.json' BEGIN
        DELETE FROM link_files WHERE item_id = OLD.id;
    END;
    """,
]


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


class SqliteDialect:
    name = "sqlite"

    def json_text(self, column: str, param: str) -> str:
        return f"CAST(json_extract({column}, '$.\"' || replace({param}, '\"', '\"\"') || '\"') AS TEXT)"

    def json_patch(self, target: str, patch: str) -> str:
        return f"json_patch({target}, {patch})"

    def position(self, needle: str, haystack: str) -> str:
        return f"instr({haystack}, {needle})"

    def no_index(self, column: str) -> str:
        return f"+{column}"  # SQLite's unary plus: the same value, no longer the indexed column

    def index_term(self, expr: str, nullable: bool) -> str:
        return expr  # an index keeps NULLs first, and CREATE INDEX takes no NULLS clause


DIALECT = SqliteDialect()


async def _connect_readonly(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        await db.execute("PRAGMA busy_timeout=10000")
    except BaseException:
        await db.close()
        raise
    return db


class SqliteDb:
    """The ledger's SQLite file: a writer connection and a reader connection."""

    dialect = DIALECT

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        #: the writers' connection (every transaction)
        self.conn = conn
        self.path = path
        self.where = str(path)
        # Reads for the API and the CLI (status, counts, runs, item pages) go through their
        # own read-only connection, which has its own aiosqlite thread: under WAL they see
        # the last commit without waiting for the writers, and a page of items never queues
        # behind a 5,000-row batch on the writers' thread. A read-only ledger reads through
        # its one connection. Reads run in autocommit, so each sees every commit before it.
        self.reader = conn
        # One connection serves every dataset's run and the outbox: a transaction must
        # not interleave with another coroutine's, and a lone write must not join (and
        # be rolled back with) someone else's. Every write holds this lock.
        self.write_lock = asyncio.Lock()
        #: (table, column) -> whether this ledger has it (a read-only ledger is not migrated)
        self._columns: dict[tuple[str, str], bool] = {}
        #: the last committed commit-sequence number (every write transaction bumps it)
        self.seq = 0
        self.mirror = durability.SeqMirror(path)
        self.fault: str | None = None
        self.rolled_back: tuple[int, int] | None = None

    @classmethod
    async def open(cls, path: Path, *, readonly: bool = False) -> SqliteDb:
        """Open (and migrate) the file. Any failure closes what was opened, so a damaged
        or unwritable file is an error naming the file and the fix, never a hung process
        (aiosqlite's thread keeps the interpreter alive until its connection closes)."""
        doing = "read" if readonly else "open"
        conn: aiosqlite.Connection | None = None
        try:
            if readonly:
                if not path.exists():
                    raise FileNotFoundError(f"ledger {path} does not exist yet (run a sync first)")
                conn = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = await aiosqlite.connect(path, isolation_level=None)
                await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=10000")
            db = cls(conn, path)
            if readonly:
                # The first read is where a damaged header or an unreadable file shows.
                await (await conn.execute("SELECT count(*) FROM sqlite_master")).close()
            else:
                await db._migrate()
                await db._check_seq()
                db.reader = await _connect_readonly(path)
            return db
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            if isinstance(exc, sqlite3.Error) or (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)):
                raise durability.ledger_error(path, exc, doing) from None
            raise

    async def close(self) -> None:
        try:
            await self.mirror.close()
        finally:
            try:
                if self.reader is not self.conn:
                    await self.reader.close()
            finally:
                await self.conn.close()

    async def _migrate(self) -> None:
        async with self.conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise LedgerError(
                f"ledger {self.path} has schema version {version}, newer than this bucketsync "
                f"({len(MIGRATIONS)}); upgrade bucketsync"
            )
        for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # executescript commits first; the version bump is part of the script's transaction.
            await self.conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={n}; COMMIT;")

    async def _check_seq(self) -> None:
        """Compare the commit sequence with its sidecar: a ledger *behind* its sidecar lost
        commits it had made durable (its -wal was deleted after a crash, or an older copy
        was put in its place). That is loud, counted, and every dataset is re-synced."""
        async with self.conn.execute("SELECT seq FROM commit_seq WHERE id = 1") as cur:
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

    def transaction(self) -> _Tx:
        return _Tx(self)

    async def claim(self, shared: bool = False) -> None:
        """Nothing more: the agent holds the file's ``InstanceLock`` before it opens the ledger."""

    async def probe_write(self) -> None:
        async with self.transaction():
            pass

    async def read(self, sql: str, params: Sequence[Any] = (), *, primary: bool = False) -> list[Row]:
        """One read, run to its end in one step of its connection's thread.

        A statement left open across an ``await`` (a cursor being iterated, or fetched
        after a separate execute) keeps the connection's read transaction, and with it
        an old snapshot, for every other coroutine's read in between: a put that had
        just committed then read its own item back as missing. Run whole, each read
        sees every commit before it.
        """
        conn = self.conn if primary else self.reader
        return list(await conn.execute_fetchall(sql, params))

    async def stream(self, sql: str, params: Sequence[Any], batch: int) -> AsyncGenerator[list[Row], None]:
        """A separate read-only connection holds one read transaction for the whole walk.

        Opening it and reading the first page run on a thread: that is where SQLite may wait
        (for a lock, with its busy timeout, or for the disk). Once the transaction holds its
        snapshot, the next pages are read on the loop, at most ``LOOP_ROWS`` at a time: each one
        is CPU work like a step of the diff that consumes it, about 2 µs a row.

        Why: read on aiosqlite's thread, a 1M-row walk cost about 0.9 s more (a no-change run of
        bench/sync_memory.py: 6.3 s against 5.4 s, medians of 10, alternated). The loop and that
        thread took turns on the GIL page by page, and their work did not overlap.
        """
        batch = min(batch, LOOP_ROWS)
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_stream, sql, params, batch))
        try:
            conn, cur, rows = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the thread goes on: close what it opens
            opening.add_done_callback(_close_opened)
            raise
        try:
            while rows:
                yield rows
                rows = cur.fetchmany(batch)
        finally:
            conn.close()

    def _open_stream(
        self, sql: str, params: Sequence[Any], batch: int
    ) -> tuple[sqlite3.Connection, sqlite3.Cursor, list[Row]]:
        conn = sqlite3.connect(
            f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        try:
            conn.execute("BEGIN")
            cur = conn.execute(sql, params)
            return conn, cur, cur.fetchmany(batch)
        except BaseException:
            conn.close()
            raise

    async def version(self) -> int:
        """SQLite's ``data_version``: it moves when another connection (of this process or
        another) commits."""
        rows = await self.read("PRAGMA data_version")
        return int(rows[0][0]) if rows else -1

    async def has_table(self, name: str) -> bool:
        if (known := self._columns.get((name, ""))) is not None:
            return known
        rows = await self.read("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        self._columns[(name, "")] = bool(rows)
        return bool(rows)

    async def has_column(self, table: str, column: str) -> bool:
        if (known := self._columns.get((table, column))) is not None:
            return known
        rows = await self.read(f"SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?", (column,))
        self._columns[(table, column)] = found = bool(rows)
        return found

    async def indexes(self, prefix: str) -> list[tuple[str, str]]:
        rows = await self.read(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name >= ? AND name < ? ORDER BY name",
            (prefix, prefix + "\U0010ffff"),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def create_index(self, name: str, sql: str) -> bool:
        async with self.transaction() as tx:
            known = bool(await tx.fetch("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)))
            if not known:
                await tx.execute(sql)
        return not known


def _close_opened(done: asyncio.Future[tuple[sqlite3.Connection, sqlite3.Cursor, list[Row]]]) -> None:
    """A stream's connection, opened after its walk was cancelled."""
    if not done.cancelled() and done.exception() is None:
        done.result()[0].close()


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

    def __init__(self, ledger: SqliteDb) -> None:
        self.ledger = ledger
        self.db = ledger.conn
        self.lock = ledger.write_lock

    async def __aenter__(self) -> _Tx:
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
        return self

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = await self.db.execute(sql, params)
        return cur.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self.db.executemany(sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(await self.db.execute_fetchall(sql, params))

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
