#!/usr/bin/env python
"""Benchmark: where a sync's time goes, per key, and every stall of the event loop it causes.

    .venv/bin/python bench/loop_stalls.py                              # memory store, 100,000 keys
    .venv/bin/python bench/loop_stalls.py --store local --objects 100000
    .venv/bin/python bench/loop_stalls.py --profile 15                 # and the top 15 of cProfile

One process syncs a store into a real ledger file twice: the initial sync, then a
no-change re-sync. For each it prints the wall time, the CPU time of the whole process
and of the main thread (the event loop: what the API waits behind), per key, and every
*stall*: a stretch during which the loop ran no other task for longer than
``--threshold-ms``. A ticker task on the loop wakes every 2 ms; a watchdog thread notes
when it is late and takes the main thread's stack then, so each stall comes with what
the loop was busy with (or, when the stack is in the selector, that the loop was
waiting for the GIL held by another thread: SQLite's or a worker's). A profiler
(``--profile``) runs around the no-change sync only, since it slows everything down.

The local store's files are hard links to one inode per folder (as ``bench/api_load.py``
makes them), 1,000 to a folder. Public tools only: Python's own.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bucketsync.config import DatasetConfig
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores import Store
from bucketsync.stores.local import LocalStore
from bucketsync.stores.memory import MemoryStore
from bucketsync.upstream.sync import SyncLoop

TICK = 0.002


@dataclass
class Stall:
    ms: float
    stack: str


@dataclass
class Watch:
    """The loop's ticks, and a watchdog thread that samples the main thread's stack when they stop."""

    threshold: float
    last: float = field(default_factory=time.perf_counter)
    stalls: list[Stall] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    _sampled: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            gap = now - self.last
            self.gaps.append(gap)
            if gap > self.threshold:
                self.stalls.append(Stall(gap * 1000, self._sampled or "(not sampled)"))
            self._sampled = None
            self.last = now

    def watchdog(self, main: int) -> None:
        while not self._stop.wait(TICK / 2):
            if self._sampled is None and time.perf_counter() - self.last > self.threshold:
                frame = sys._current_frames().get(main)
                if frame is not None:
                    self._sampled = _where(frame)

    def stop(self) -> None:
        self._stop.set()


def _where(frame: object) -> str:
    """The innermost frames of the stack, bucketsync's and the standard library's, innermost last."""
    frames = traceback.extract_stack(frame)  # type: ignore[arg-type]
    picked = [f for f in frames if "bucketsync" in f.filename or "asyncio" in f.filename or "sqlite" in f.filename]
    return " > ".join(f"{Path(f.filename).stem}.{f.name}:{f.lineno}" for f in picked[-4:])


def make_store(kind: str, n: int, root: Path) -> Store:
    if kind == "memory":
        store = MemoryStore(uuid.uuid4().hex)
        store.load((f"d{i // 1000:04d}/f{i % 1000:04d}.bin", b"x", 1000.0) for i in range(n))
        return store
    for i in range(n):
        folder = root / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
            (root / f".{folder.name}").write_bytes(b"x")
        os.link(root / f".{folder.name}", folder / f"f{i % 1000:04d}.bin")
    return LocalStore(str(root))


async def measure(loop: SyncLoop, n: int, what: str, threshold: float, profile: int) -> None:
    watch = Watch(threshold)
    ticker = asyncio.create_task(watch.ticker())
    dog = threading.Thread(target=watch.watchdog, args=(threading.get_ident(),), daemon=True)
    dog.start()
    prof = cProfile.Profile() if profile else None
    await asyncio.sleep(TICK * 2)
    w0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
    if prof is not None:
        prof.enable()
    result = await loop.run_once()
    if prof is not None:
        prof.disable()
    wall, cpu, main = time.perf_counter() - w0, time.process_time() - c0, time.thread_time() - m0
    watch.stop()
    ticker.cancel()
    gaps = sorted(watch.gaps)
    p99 = gaps[int(len(gaps) * 0.99)] * 1000 if gaps else 0.0
    c = result.counts
    print(
        f"\n## {what}{' (profiled)' if prof else ''}: "
        f"{c.listed:,} listed, {c.added:,} added, {c.unchanged:,} unchanged\n"
        f"wall {wall:.2f} s, CPU {cpu:.2f} s (all threads), main thread {main:.2f} s = {main / n * 1e6:.1f} us/key; "
        f"loop ticks: {len(gaps)}, p99 gap {p99:.1f} ms, max {gaps[-1] * 1000 if gaps else 0:.1f} ms; "
        f"stalls > {threshold * 1000:.0f} ms: {len(watch.stalls)}"
        + (f", {sum(s.ms for s in watch.stalls):.0f} ms in all" if watch.stalls else "")
    )
    by_stack = Counter(s.stack for s in watch.stalls)
    longest = {s.stack: max(x.ms for x in watch.stalls if x.stack == s.stack) for s in watch.stalls}
    for stack, count in by_stack.most_common(8):
        print(f"- {count} x (max {longest[stack]:.0f} ms): {stack}")
    if prof is not None:
        print()
        pstats.Stats(prof).sort_stats("tottime").print_stats(profile)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=("memory", "local"), default="memory")
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--threshold-ms", type=float, default=20.0)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile the no-change sync, print its top N")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bucketsync-stalls-") as tmp:
        t0 = time.perf_counter()
        store = make_store(args.store, args.objects, Path(tmp) / "folder")
        print(
            f"# {args.objects:,} objects, {args.store} store; fixture {time.perf_counter() - t0:.1f} s; "
            f"load average (1 min) {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        ledger = await Ledger.open(Path(tmp) / "ledger.db")
        try:
            loop = SyncLoop("ds", DatasetConfig(driver="d"), store, ledger)
            threshold = args.threshold_ms / 1000
            await measure(loop, args.objects, "initial sync", threshold, 0)
            await measure(loop, args.objects, "no-change re-sync", threshold, 0)
            if args.profile:
                await measure(loop, args.objects, "no-change re-sync", threshold, args.profile)
        finally:
            await ledger.close()
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
