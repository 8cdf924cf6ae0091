"""Runs share the event loop (pacing.py): a run's diff gives the loop up slice by slice,
and runs take turns, so the API and the other datasets are never queued behind a
whole run. Counted in turns, not timed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bucketsync.config import DatasetConfig
from bucketsync.core.model import SnapshotRow
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores.memory import MemoryStore
from bucketsync.upstream.pacing import Pacer
from bucketsync.upstream.sync import CHECK_EVERY, SyncLoop

N = 20_000


@pytest.fixture
def stores() -> Iterator[list[MemoryStore]]:
    names = [f"pace-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    out = []
    for name in names:
        store = MemoryStore(name)
        store.load((f"k/{i:06d}", b"x", 1000.0) for i in range(N))
        out.append(store)
    yield out
    for name in names:
        MemoryStore.drop(name)


async def test_a_run_gives_the_loop_up_every_slice(stores: list[MemoryStore], tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.db")
    try:
        loop = SyncLoop("a", DatasetConfig(driver="d"), stores[0], ledger, Pacer(slice=0.0))
        await loop.run_once()  # the initial sync; the no-change run below is pure diff work
        # What an API request waiting for the loop sees: how many keys a run diffs
        # between two of its turns.
        run = asyncio.create_task(loop.run_once())
        seen, longest = 0, 0
        while not run.done():
            await asyncio.sleep(0)
            listed = loop.progress.listed if loop.progress is not None else seen
            longest, seen = max(longest, listed - seen), listed
        assert (await run).counts.unchanged == N
        # a turn every CHECK_EVERY keys; without pacing only the store's own awaits (every
        # 4,096 keys) and the snapshot's fetches (every 8,192) give the loop up
        assert longest <= 4 * CHECK_EVERY, f"{longest} keys diffed without giving the loop up"
    finally:
        await ledger.close()


async def test_runs_take_turns(stores: list[MemoryStore], tmp_path: Path) -> None:
    """With one turn at a time, two runs started together both progress before either ends."""
    ledger = await Ledger.open(tmp_path / "ledger.db")
    try:
        pacer = Pacer(concurrent=1, slice=0.0)
        loops = [SyncLoop(f"ds{i}", DatasetConfig(driver="d"), s, ledger, pacer) for i, s in enumerate(stores)]
        for lp in loops:
            await lp.run_once()
        # A run opens its snapshot before it asks for a turn (sync.py, _walk), in a thread that
        # a busy loop may keep waiting: "started together" means both snapshots are open.
        opened, both_open = 0, asyncio.Event()
        snapshot_pages = ledger.snapshot_pages

        async def open_together(ds_id: int) -> AsyncIterator[list[SnapshotRow]]:
            nonlocal opened
            pages = snapshot_pages(ds_id)
            first = await anext(pages)
            opened += 1
            if opened == len(loops):
                both_open.set()
            await both_open.wait()
            yield first
            async for page in pages:
                yield page

        ledger.snapshot_pages = open_together  # type: ignore[method-assign]
        runs = [asyncio.create_task(lp.run_once()) for lp in loops]
        both_midway = False
        while not all(r.done() for r in runs):
            await asyncio.sleep(0)
            listed = [lp.progress.listed if lp.progress else None for lp in loops]
            both_midway |= all(n is not None and 0 < n < N for n in listed)
        assert [(await r).counts.unchanged for r in runs] == [N, N]
        assert both_midway, "one run held the loop until it ended"
    finally:
        await ledger.close()


async def test_api_reads_issued_mid_sync_answer_before_it_ends(stores: list[MemoryStore], tmp_path: Path) -> None:
    """What ``GET /datasets`` and an item page read, asked for while an initial sync diffs and
    writes its batches, comes back while that sync is still running: neither the diff nor the
    ledger writes hold the loop or the reads for the length of the run."""
    ledger = await Ledger.open(tmp_path / "ledger.db")
    try:
        loop = SyncLoop("a", DatasetConfig(driver="d"), stores[0], ledger)
        ds = await ledger.dataset_id("a")
        run = asyncio.create_task(loop.run_once())  # N additions: several batches of writes
        while loop.progress is None or loop.progress.listed == 0:  # noqa: ASYNC110 (turns of the loop are the point)
            await asyncio.sleep(0)
        overview, _, _ = await ledger.described()
        page = await ledger.items(ds, limit=100)
        assert not run.done(), "the reads waited for the whole sync"
        assert "a" in overview and len(page) <= 100
        assert (await run).counts.added == N
    finally:
        await ledger.close()
