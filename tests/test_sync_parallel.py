"""A sync over a listing in parallel parts (S3 on moto: flat, cut at the last run's keys).

- the second run's listing is cut where the first run's keys fell (StartAfter), and
  finds exactly what a sequential listing finds;
- a part that fails fails the run with no removals (invariant 1), whatever the other
  parts listed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from bucketsync.config import DatasetConfig
from bucketsync.core.errors import PermissionDenied
from bucketsync.core.model import RunStatus
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores.s3 import S3Store
from bucketsync.stores.s3_lean import Page
from bucketsync.upstream import sync
from bucketsync.upstream.sync import SyncLoop
from emulators.s3 import PREFIX, S3Emulator

DATASET = "parts"
KEYS = [f"{folder}/{i:02d}" for folder in ("a", "b", "c", "d") for i in range(6)]


@pytest.fixture
async def store(moto_s3: S3Emulator) -> AsyncIterator[S3Store]:
    bucket = moto_s3.new_bucket()
    client = moto_s3.client()
    for key in KEYS:
        client.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=key.encode())
    s = moto_s3.store(bucket, page_size=2, list_concurrency=3)
    try:
        yield s
    finally:
        await s.aclose()


def record_starts(store: S3Store, fail_after: str | None = None) -> list[str | None]:
    """Record every first page's ``StartAfter``; with ``fail_after``, the part starting past it is refused."""
    starts: list[str | None] = []
    page = store._page

    async def spy(prefix: str, token: str | None, delimiter: str | None = None, start_after: str | None = None) -> Page:
        if token is None and delimiter is None:
            starts.append(start_after)
            if fail_after is not None and start_after is not None and start_after >= fail_after:
                raise PermissionDenied(f"list s3://{store.bucket}/: AccessDenied after {start_after!r}")
        return await page(prefix, token, delimiter, start_after)

    store._page = spy  # type: ignore[method-assign]
    return starts


async def test_the_next_run_is_cut_at_the_last_runs_keys(store: S3Store, ledger: Ledger) -> None:
    loop = SyncLoop(DATASET, DatasetConfig(driver="d"), store, ledger)
    first = await loop.run_once()
    assert first.status is RunStatus.OK and first.counts.added == len(KEYS)
    assert loop.splits == KEYS  # a small listing: every key is a quantile

    starts = record_starts(store)
    again = await loop.run_once()
    assert again.status is RunStatus.OK
    assert (again.counts.listed, again.counts.unchanged, again.counts.added) == (len(KEYS), len(KEYS), 0)
    parts = [s for s in starts if s is not None]
    assert len(parts) >= 3 and all(s.startswith(PREFIX) for s in parts)  # cut at ledger keys


async def test_no_part_is_smaller_than_a_page(store: S3Store, ledger: Ledger) -> None:
    """24 keys in pages of 6 are cut in parts of 5 keys (9/10 of a page), a request each: 5
    requests, not a part per sampled key (12 parts: 12 requests for what 4 pages hold)."""
    store.page_size = 6
    loop = SyncLoop(DATASET, DatasetConfig(driver="d"), store, ledger)
    assert (await loop.run_once()).status is RunStatus.OK
    assert loop.splits == KEYS  # every key sampled; the cut is chosen from them
    requests = 0
    page = store._page

    async def counted(*args: Any, **kwargs: Any) -> Page:
        nonlocal requests
        requests += 1
        return await page(*args, **kwargs)

    store._page = counted  # type: ignore[method-assign]
    again = await loop.run_once()
    assert again.status is RunStatus.OK and again.counts.unchanged == len(KEYS)
    assert requests == 5


async def test_a_failing_part_fails_the_run_with_no_removals(
    store: S3Store, ledger: Ledger, moto_s3: S3Emulator
) -> None:
    loop = SyncLoop(DATASET, DatasetConfig(driver="d", max_delete_ratio=1.0), store, ledger)
    assert (await loop.run_once()).status is RunStatus.OK
    # Half the objects are gone; the part holding the last keys cannot be listed.
    client: Any = moto_s3.client()
    for key in KEYS[::2]:
        client.delete_object(Bucket=store.bucket, Key=f"{PREFIX}{key}")
    record_starts(store, fail_after=f"{PREFIX}c/")

    result = await loop.run_once()
    assert result.status is RunStatus.FAILED
    assert "AccessDenied" in (result.error or "")
    assert result.counts.removed == 0
    ds = await ledger.dataset_id(DATASET)
    assert sorted(i.key for i in await ledger.items(ds)) == KEYS  # nothing removed, listed or not


async def test_a_new_process_cuts_its_first_listing_at_the_ledgers_keys(
    store: S3Store, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No run of this process sampled the keys yet: the split points come from the ledger."""
    assert (await SyncLoop(DATASET, DatasetConfig(driver="d"), store, ledger).run_once()).status is RunStatus.OK
    monkeypatch.setattr(sync, "SPLITS_FROM_LEDGER", 0)  # the real threshold is a few pages
    fresh = SyncLoop(DATASET, DatasetConfig(driver="d"), store, ledger)  # as after a restart
    starts = record_starts(store)
    result = await fresh.run_once()
    assert result.status is RunStatus.OK and result.counts.unchanged == len(KEYS)
    parts = [s for s in starts if s is not None]
    # cut at ledger keys, not at folders found by a delimiter listing (``some/prefix/b/``)
    assert len(parts) >= 3 and all(s.removeprefix(PREFIX) in KEYS for s in parts)
    ds = await ledger.dataset_id(DATASET)
    assert await ledger.key_quantiles(ds, 4, len(KEYS)) == KEYS[3::4]  # every 4th key: 24 // (4 + 1)
