"""Catalog queries on a large dataset: a filtered, sorted page of 100 items, indexed and not.

Builds a ledger (a real SQLite file, WAL, synchronous=FULL, the project's schema) with N items
of one dataset, each with user metadata ``camera`` (100 values), ``iso`` (numbers) and ``lens``
(text), then times ``catalog.items.page()`` (what ``GET .../items?filter=&sort=`` runs) for:

- indexed: a filter and a sort on ``metadata.camera`` after ``[datasets.X] indexes`` built its index;
- unindexed: the same shapes on ``metadata.lens`` / ``metadata.iso``, which have no index.

Then it clones the whole dataset twice (without and with metadata), as ``POST .../clone`` does: one
set-based statement in one transaction.

Targets (issue 9): indexed ≤ 50 ms, unindexed ≤ 3 s, a clone ≤ 10 s, at 1,000,000 items.
The queries and clones run on a copy, so a kept --ledger stays as built.

    .venv/bin/python bench/catalog_query.py                  # 1M items, 5 runs per query, a markdown table
    .venv/bin/python bench/catalog_query.py --items 100000   # a quick run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bucketsync.catalog import items as catalog_items
from bucketsync.catalog import query
from bucketsync.ledger.sqlite import Ledger

CAMERAS = [f"cam-{i:02d}" for i in range(100)]
LENSES = [f"lens-{i:03d}" for i in range(1000)]


def build(path: Path, n: int) -> None:
    """N items in one dataset, in one transaction (raw sqlite3 on the migrated schema)."""

    async def migrate() -> None:
        ledger = await Ledger.open(path)
        await ledger.dataset_id("photos")
        await ledger.close()

    asyncio.run(migrate())
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    ds = db.execute("SELECT id FROM datasets WHERE name = 'photos'").fetchone()[0]
    now = time.time()

    def rows() -> Any:
        for i in range(n):
            meta = {"camera": CAMERAS[i * 7 % 100], "iso": 100 * (i * 13 % 64), "lens": LENSES[i * 31 % 1000]}
            key = f"images/{2015 + i % 10}/{i % 12 + 1:02d}/IMG_{i:07d}.jpg"
            yield (ds, key, 1000 + i % 5_000_000, now - i, f"etag{i}", json.dumps(meta), now)

    with db:
        db.executemany(
            "INSERT INTO items (dataset_id, key, size, modified, etag, meta, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows(),
        )
    db.close()


CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("indexed", "camera = X, sort by camera", {"metadata.camera": "cam-42"}, "metadata.camera"),
    ("indexed", "camera = X, sort by key", {"metadata.camera": "cam-42"}, "key"),
    (
        "indexed",
        "camera in [3 values], sort by -camera",
        {"metadata.camera": {"$in": CAMERAS[10:13]}},
        "-metadata.camera",
    ),
    ("indexed", "camera >= X, sort by camera, page 50", {"metadata.camera": {"$gte": "cam-50"}}, "metadata.camera"),
    ("indexed", "camera >= X, sort by -camera, page 50", {"metadata.camera": {"$gte": "cam-50"}}, "-metadata.camera"),
    ("unindexed", "lens = X, sort by key", {"metadata.lens": "lens-123"}, "key"),
    ("unindexed", "lens = (no match), sort by key", {"metadata.lens": "none"}, "key"),
    ("unindexed", "lens = X, sort by -iso", {"metadata.lens": "lens-123"}, "-metadata.iso"),
    ("unindexed", "iso > 3000, sort by -iso", {"metadata.iso": {"$gt": 3000}}, "-metadata.iso"),
]


async def measure(path: Path, repeat: int) -> list[tuple[str, str, float, float, int]]:
    ledger = await Ledger.open(path)
    try:
        ds = await ledger.dataset_id("photos")
        t = time.perf_counter()
        await catalog_items.ensure_index(ledger, ds, "metadata.camera")
        print(f"index on metadata.camera built in {time.perf_counter() - t:.1f} s")
        out = []
        for kind, what, flt, sort in CASES:
            times = []
            got = 0
            for _ in range(repeat):
                q = catalog_items.Query(filter=flt, sort=query.parse_sort(sort), limit=100)
                pages = 50 if "page 50" in what else 1
                for _ in range(pages - 1):  # walk to the page, untimed
                    _items, q.cursor = await catalog_items.page(ledger, ds, q)
                t = time.perf_counter()
                items, _ = await catalog_items.page(ledger, ds, q)
                times.append(time.perf_counter() - t)
                got = len(items)
            out.append((kind, what, statistics.median(times), max(times), got))
        # A clone of the whole dataset: one INSERT ... SELECT (target: 10 s at 1,000,000 items).
        for with_meta in (False, True):
            name = f"clone-{'meta' if with_meta else 'bare'}-{time.time_ns()}"
            t, cpu = time.perf_counter(), time.process_time()
            _id, n = await ledger.create_clone(name, ds, "photos", "1", [], with_meta)
            took, cpu = time.perf_counter() - t, time.process_time() - cpu
            # CPU time beside the wall clock: on a loaded machine the wall clock measures the load
            what = f"clone every item, with_metadata={str(with_meta).lower()} (CPU {cpu:.1f} s)"
            out.append(("clone", what, took, took, n))
        return out
    finally:
        await ledger.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--ledger", type=Path, help="keep the ledger here and reuse it when it exists (same --items)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.ledger or Path(tmp) / "ledger.db"
        if not path.exists():
            t = time.perf_counter()
            build(path, args.items)
            print(f"built {args.items:,} items in {time.perf_counter() - t:.1f} s")
        work = Path(tmp) / "work.db"  # the clones go into a copy: a kept ledger stays as built
        shutil.copyfile(path, work)
        rows = asyncio.run(measure(work, args.repeat))
    print(f"\n| field | query (page of 100, {args.items:,} items) | median | max | items |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind, what, med, worst, got in rows:
        print(f"| {kind} | {what} | {med * 1000:.1f} ms | {worst * 1000:.1f} ms | {got} |")


if __name__ == "__main__":
    main()
