"""What one ledger transaction costs: a 5,000-item batch and a lone metadata write.

Run it against two checkouts to see what a change to the write path costs, e.g.

    PYTHONPATH=src .venv/bin/python bench/ledger_commit.py
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python bench/ledger_commit.py

It uses only the ledger's public methods, on a real SQLite file (WAL, synchronous=FULL)
in a temporary directory, and prints the median of each measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bucketsync.core.model import Counts, ObjectInfo
from bucketsync.ledger.ledger import Ledger


async def main(batches: int, lone: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = await Ledger.open(Path(tmp) / "ledger.db")
        try:
            ds = await ledger.dataset_id("bench")
            run = await ledger.begin_run(ds, False)
            per_batch = []
            for b in range(batches):
                objs = [ObjectInfo(f"k/{b:04d}/{i:05d}.jpg", i, 1.0, f"e{b}-{i}", None) for i in range(5000)]
                t0 = time.perf_counter()
                await ledger.write_batch(ds, run, objs, [], Counts(added=(b + 1) * 5000))
                per_batch.append(time.perf_counter() - t0)
            item = await ledger.item(ds, "k/0000/00000.jpg")
            assert item is not None
            per_write = []
            for i in range(lone):
                t0 = time.perf_counter()
                await ledger.merge_meta(item.id, {"n": i})
                per_write.append(time.perf_counter() - t0)
        finally:
            await ledger.close()
    print(f"5,000-item batch: median {statistics.median(per_batch) * 1000:.1f} ms over {batches}")
    print(f"lone metadata write: median {statistics.median(per_write) * 1000:.2f} ms over {lone}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--lone", type=int, default=1000)
    a = p.parse_args()
    asyncio.run(main(a.batches, a.lone))
