"""``bucketsync ledger migrate --to postgresql://…``: copy a SQLite ledger into an empty PostgreSQL database.

The agent is stopped: the copy holds the SQLite ledger's instance lock from start to end, so it refuses to
start while an agent runs and no agent starts while it copies. The source is opened read-only and never
written. The copy is one PostgreSQL transaction: table by table, parents first, every row with its own id
(pointers, ops and runs refer to ids), then the identity sequences moved past the copied ids. Before that
transaction commits, every table is read back and compared with the source per dataset: the count of rows
and a checksum of their values (an order-independent sum of per-row hashes, so neither side has to sort).
Any difference, or any failure, rolls the whole copy back: the target is left as empty as it was found.

``item_counts`` is not copied: it is made from the copied items (what the counts must say), and verified
against the source's items like any table. The catalog's field indexes are created on the target
after the commit, through the target ledger's own ``create_index``.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

from bucketsync.core.errors import BucketsyncError, LedgerError
from bucketsync.ledger.ledger import Ledger, is_postgres
from bucketsync.ledger.postgres import redact
from bucketsync.ledger.sqlite import MIGRATIONS, InstanceLock

#: the tables copied, parents before children (items, runs and ops name their dataset)
TABLES = (
    "datasets",
    "items",
    "runs",
    "ops",
    "resync",
    "event_inbox",
    "folders",
    "enrich_datasets",
    "trigger_datasets",
    "enrichment",
    "thumbnail_trash",
    "item_events",
    "deliveries",
    "link_files",
)
#: made from the copied items, then verified against the source's items; not copied
DERIVED = ("item_counts",)
#: the commit sequence: the target continues from the source's number
SEQUENCE = "commit_seq"
#: the catalog's field indexes (catalog/items.py INDEX_PREFIX); the schema's own share the prefix
CATALOG_INDEX_PREFIX = "items_by_"
SCHEMA_INDEXES = ("items_by_source_item",)
BATCH = 5000
#: how often a long table reports progress
PROGRESS_EVERY = 100_000
_MOD = 1 << 128


class MigrationError(BucketsyncError):
    """The copy could not be made or did not verify; the target was left as it was."""


class BadMigration(MigrationError):
    """The command asks for a copy that cannot be: a source that is no SQLite ledger, a target that is no
    PostgreSQL URL or already holds a ledger's data (bad input: exit 2)."""


@dataclass
class Tally:
    """Rows of one table for one dataset (None: the table is not per dataset) and their checksum."""

    rows: int = 0
    checksum: int = 0

    def add(self, row: Sequence[Any]) -> None:
        self.rows += 1
        digest = hashlib.blake2b(repr(tuple(row)).encode(), digest_size=16).digest()
        self.checksum = (self.checksum + int.from_bytes(digest)) % _MOD


@dataclass
class Report:
    """What was copied: rows per table and dataset, all verified."""

    source: str
    target: str
    #: (table, dataset id or None) -> rows
    rows: dict[tuple[str, int | None], int] = field(default_factory=dict)
    #: dataset id -> name
    datasets: dict[int, str] = field(default_factory=dict)
    indexes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def per_dataset(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {name: {} for name in self.datasets.values()}
        for (table, ds), n in sorted(self.rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            if ds is not None and ds in self.datasets and table != "datasets":
                out[self.datasets[ds]][table] = n
        return out

    def as_json(self) -> dict[str, Any]:
        tables: dict[str, int] = {}
        for (table, _ds), n in self.rows.items():
            tables[table] = tables.get(table, 0) + n
        return {
            "source": self.source,
            "target": self.target,
            "verified": True,
            "tables": tables,
            "datasets": self.per_dataset(),
            "indexes": self.indexes,
            "seconds": round(self.seconds, 3),
        }


Progress = Callable[[str], None]


def _canon(value: Any, pg_type: str) -> Any:
    """A value as the target column holds it: SQLite's dynamic types made exact, the same on both sides
    of the checksum. A value that does not fit its column is a ``ValueError`` (the caller names the row)."""
    if value is None:
        return None
    if pg_type == "double precision":
        return float(value)
    if pg_type in ("bigint", "integer", "smallint"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(value)
    if isinstance(value, bytes):
        raise ValueError(f"a blob ({len(value)} bytes) in a text column")
    return str(value)


def _grouping(columns: Sequence[str], table: str) -> int | None:
    """Where a row's dataset id is, or None when the table is not per dataset."""
    if table == "datasets":
        return columns.index("id")
    return columns.index("dataset_id") if "dataset_id" in columns else None


async def migrate(
    ledger: Path | str, target: str, *, password: str | None = None, progress: Progress = lambda _line: None
) -> Report:
    """Copy the SQLite ledger at ``ledger`` into the empty PostgreSQL database at ``target``, verified."""
    if is_postgres(ledger):
        raise BadMigration(f"the ledger to copy must be a SQLite file; agent.ledger is {redact(str(ledger))}")
    if not is_postgres(target):
        raise BadMigration(f"--to must be a postgresql:// URL, not {target!r}")
    source = Path(ledger)
    if not source.is_file():
        raise BadMigration(f"there is no SQLite ledger at {source} (check agent.ledger in the config)")
    started = time.monotonic()
    where = redact(target)
    lock = InstanceLock(source)
    lock.acquire()  # LedgerLocked (the agent is running) before anything is read
    # A read-only reader of a WAL file still makes SQLite's -wal and -shm beside it when they are absent
    # (a stopped agent removed them); empty ones are removed again, so the folder is left as it was found.
    sidecars = [Path(f"{source}-wal"), Path(f"{source}-shm")]
    absent = not any(p.exists() for p in sidecars)
    try:
        reader = await _open_source(source)
        try:
            await _prepare_target(target, where, password)
            report = Report(str(source), where)
            conn = await asyncpg.connect(target, password=password)
            try:
                async with conn.transaction():
                    copied = await _copy_all(reader, conn, report, progress)
                    await _verify(reader, conn, copied, report, progress)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                raise MigrationError(
                    f"the copy into {where} failed and was rolled back ({type(exc).__name__}: {exc})"
                ) from None
            finally:
                await conn.close()
            report.indexes = await _copy_catalog_indexes(reader, target, password, progress)
        finally:
            await reader.close()
            if absent and sidecars[0].exists() and sidecars[0].stat().st_size == 0:
                for p in sidecars:
                    p.unlink(missing_ok=True)
    finally:
        lock.release()
    report.seconds = time.monotonic() - started
    return report


async def _open_source(source: Path) -> aiosqlite.Connection:
    """The source, read-only (``mode=ro``: SQLite itself refuses every write), at this code's schema, in
    one read transaction: every table is read from the same snapshot."""
    try:
        db = await aiosqlite.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise MigrationError(f"cannot read the ledger {source}: {exc}") from None
    try:
        version = int((await _rows(db, "PRAGMA user_version"))[0][0])
        if version > len(MIGRATIONS):
            raise MigrationError(
                f"the ledger {source} has schema version {version}, newer than this bucketsync "
                f"({len(MIGRATIONS)}); upgrade bucketsync"
            )
        if version < len(MIGRATIONS):
            raise MigrationError(
                f"the ledger {source} has schema version {version}, older than this bucketsync "
                f"({len(MIGRATIONS)}); start this bucketsync on it once (it upgrades the file), stop it, then migrate"
            )
        unknown = await _tables(db) - {*TABLES, *DERIVED, SEQUENCE, "sqlite_sequence", "sqlite_stat1"}
        if unknown:
            raise MigrationError(f"the ledger {source} has tables this bucketsync does not know: {sorted(unknown)}")
        await db.execute("BEGIN")
    except sqlite3.Error as exc:
        await db.close()
        raise MigrationError(f"cannot read the ledger {source}: {exc}") from None
    except BaseException:
        await db.close()
        raise
    return db


async def _rows(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    return list(await db.execute_fetchall(sql, params))


async def _tables(db: aiosqlite.Connection) -> set[str]:
    return {str(r[0]) for r in await _rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}


async def _prepare_target(target: str, where: str, password: str | None) -> None:
    """Create the schema on an empty database (the PostgreSQL ledger's own open does that, and refuses a
    newer one), then make sure it holds no data: the copy never merges into a ledger in use."""
    ledger = await Ledger.open(target, password=password)
    try:
        busy = []
        for table in (*TABLES, *DERIVED):
            rows = await ledger.db.read(f"SELECT count(*) FROM {table}")
            if rows and int(rows[0][0]):
                busy.append(f"{table}: {int(rows[0][0])} rows")
        if busy:
            raise BadMigration(f"{where} already holds a ledger ({', '.join(busy)}); migrate into an empty database")
    finally:
        await ledger.close()


async def _target_columns(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1",
        table,
    )
    return {str(r[0]): str(r[1]) for r in rows}


async def _source_columns(reader: aiosqlite.Connection, table: str) -> list[str]:
    return [str(r[1]) for r in await _rows(reader, f"PRAGMA table_info({table})")]


async def _columns(reader: aiosqlite.Connection, conn: asyncpg.Connection, table: str) -> tuple[list[str], list[str]]:
    """The source's columns of ``table`` and the target's type of each; a column the target lacks is an error."""
    theirs = await _target_columns(conn, table)
    ours = await _source_columns(reader, table)
    missing = [c for c in ours if c not in theirs]
    if missing:
        raise MigrationError(f"the target's {table} has no column {', '.join(missing)} (a schema mismatch)")
    return ours, [theirs[c] for c in ours]


#: (table -> dataset id or None -> tally) of what was read from the source
Tallies = dict[str, dict[int | None, Tally]]


async def _copy_all(
    reader: aiosqlite.Connection, conn: asyncpg.Connection, report: Report, progress: Progress
) -> Tallies:
    """Copy every table; the source's tallies, taken from the very rows copied."""
    tallies: Tallies = {}
    present = await _tables(reader)
    for table in TABLES:
        if table == "link_files":
            # the items' insert trigger queued every copied link file; the source's queue is the truth
            await conn.execute("DELETE FROM link_files")
        if table in present:
            tallies[table] = await _copy_table(reader, conn, table, progress)
    # The target's triggers count the items as they arrive, but not all of them (pointers are counted by
    # the statement that clones them): the counts are what the items are, so they are made from them.
    await conn.execute("DELETE FROM item_counts")
    await conn.execute(
        "INSERT INTO item_counts (dataset_id, state, n) SELECT dataset_id, state, count(*) FROM items "
        "GROUP BY dataset_id, state"
    )
    for r in await _rows(reader, "SELECT id, name FROM datasets"):
        report.datasets[int(r[0])] = str(r[1])
    seq = await _rows(reader, f"SELECT seq FROM {SEQUENCE} WHERE id = 1")
    if seq:
        await conn.execute(f"UPDATE {SEQUENCE} SET seq = $1 WHERE id = 1", int(seq[0][0]))
    # The copied rows carry their ids: new rows must start after them.
    identities = await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND is_identity = 'YES'"
    )
    # SQLite's AUTOINCREMENT (the inbox) never hands out an id again, even a deleted row's: its counter
    # may stand past max(id), and the target's must too.
    counters = {}
    if "sqlite_sequence" in present:
        counters = {str(r[0]): int(r[1]) for r in await _rows(reader, "SELECT name, seq FROM sqlite_sequence")}
    for table, column in identities:
        last = max(int(await conn.fetchval(f"SELECT coalesce(max({column}), 0) FROM {table}")), counters.get(table, 0))
        if last > 0:
            await conn.execute("SELECT setval(pg_get_serial_sequence($1, $2), $3)", table, column, last)
    return tallies


async def _copy_table(
    reader: aiosqlite.Connection, conn: asyncpg.Connection, table: str, progress: Progress
) -> dict[int | None, Tally]:
    columns, types = await _columns(reader, conn, table)
    group = _grouping(columns, table)
    tallies: dict[int | None, Tally] = {}
    total = int((await _rows(reader, f"SELECT count(*) FROM {table}"))[0][0])
    progress(f"copying {table}: {total:,} rows")
    done = 0
    cursor = await reader.execute(f"SELECT {', '.join(columns)} FROM {table}")
    try:
        while rows := await cursor.fetchmany(BATCH):
            records = [_record(table, columns, types, row) for row in rows]
            await conn.copy_records_to_table(table, records=records, columns=columns)
            for record in records:
                tallies.setdefault(record[group] if group is not None else None, Tally()).add(record)
            if done // PROGRESS_EVERY != (done + len(records)) // PROGRESS_EVERY:
                progress(f"  {table}: {done + len(records):,} of {total:,}")
            done += len(records)
    finally:
        await cursor.close()
    return tallies


def _record(table: str, columns: Sequence[str], types: Sequence[str], row: Iterable[Any]) -> tuple[Any, ...]:
    values = tuple(row)
    try:
        return tuple(_canon(v, t) for v, t in zip(values, types, strict=True))
    except ValueError as exc:
        ident = dict(zip(columns, values, strict=True)).get("id", values[0])
        raise MigrationError(f"{table} row {ident!r} does not fit the PostgreSQL schema: {exc}") from None


async def _tally_source(
    reader: aiosqlite.Connection, table: str, columns: list[str], types: list[str], sql: str | None = None
) -> dict[int | None, Tally]:
    group = _grouping(columns, table)
    out: dict[int | None, Tally] = {}
    cursor = await reader.execute(sql or f"SELECT {', '.join(columns)} FROM {table}")
    try:
        while rows := await cursor.fetchmany(BATCH):
            for row in rows:
                record = _record(table, columns, types, row)
                out.setdefault(record[group] if group is not None else None, Tally()).add(record)
    finally:
        await cursor.close()
    return out


async def _tally_target(
    conn: asyncpg.Connection, table: str, columns: list[str], types: list[str], sql: str | None = None
) -> dict[int | None, Tally]:
    group = _grouping(columns, table)
    out: dict[int | None, Tally] = {}
    cursor = await conn.cursor(sql or f"SELECT {', '.join(columns)} FROM {table}")
    while rows := await cursor.fetch(BATCH):
        for row in rows:
            record = tuple(_canon(v, t) for v, t in zip(row, types, strict=True))
            out.setdefault(record[group] if group is not None else None, Tally()).add(record)
    return out


async def _verify(
    reader: aiosqlite.Connection, conn: asyncpg.Connection, copied: Tallies, report: Report, progress: Progress
) -> None:
    """Read every copied table back inside the copy's transaction and compare it with the source,
    per dataset: the same rows, the same values; and the target's item counts must equal the source's items."""
    bad: list[str] = []
    for table, source in copied.items():
        columns, types = await _columns(reader, conn, table)
        _compare(table, source, await _tally_target(conn, table, columns, types), report, bad)
    counts_cols, counts_types = ["dataset_id", "state", "n"], ["bigint", "text", "bigint"]
    expected = await _tally_source(
        reader,
        "item_counts",
        counts_cols,
        counts_types,
        "SELECT dataset_id, state, count(*) FROM items GROUP BY dataset_id, state",
    )
    kept = await _tally_target(
        conn, "item_counts", counts_cols, counts_types, "SELECT dataset_id, state, n FROM item_counts WHERE n != 0"
    )
    _compare("item_counts", expected, kept, report, bad, record=False)
    if bad:
        raise MigrationError("the copy does not match the source, so it was rolled back: " + "; ".join(bad))
    for name, tables in report.per_dataset().items():
        summary = ", ".join(f"{t} {n:,}" for t, n in tables.items()) or "no rows"
        progress(f"verified {name}: {summary}")


def _compare(
    table: str,
    source: dict[int | None, Tally],
    target: dict[int | None, Tally],
    report: Report,
    bad: list[str],
    *,
    record: bool = True,
) -> None:
    for ds in sorted({*source, *target}, key=lambda d: -1 if d is None else d):
        want, got = source.get(ds, Tally()), target.get(ds, Tally())
        what = f"{table}" + ("" if ds is None else f" of dataset {report.datasets.get(ds, ds)}")
        if want.rows != got.rows:
            bad.append(f"{what}: {want.rows} rows in the source, {got.rows} in the copy")
        elif want.checksum != got.checksum:
            bad.append(f"{what}: the same {want.rows} rows, different values")
        if record:
            report.rows[(table, ds)] = want.rows


async def _copy_catalog_indexes(
    reader: aiosqlite.Connection, target: str, password: str | None, progress: Progress
) -> list[str]:
    """The catalog's field indexes the source had, created on the target by its own ledger code."""
    rows = await _rows(
        reader,
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name >= ? AND name < ? ORDER BY name",
        (CATALOG_INDEX_PREFIX, CATALOG_INDEX_PREFIX + "\U0010ffff"),
    )
    wanted = [(str(n), str(s)) for n, s in rows if n not in SCHEMA_INDEXES and s is not None]
    if not wanted:
        return []
    ledger = await Ledger.open(target, password=password)
    try:
        for name, sql in wanted:
            progress(f"creating index {name}")
            try:
                await ledger.create_index(name, sql)
            except (LedgerError, asyncpg.PostgresError) as exc:
                raise MigrationError(
                    f"the ledger was copied and verified, but its catalog index {name} could not be created "
                    f"({exc}); create it again through the API (POST the field to the dataset's indexes)"
                ) from None
    finally:
        await ledger.close()
    return [name for name, _sql in wanted]
