"""Upstream sync semantics: ``SyncLoop.run_once`` against a real ledger file, on every kind of store.

Storage is changed behind bucketsync's back, the way another program would: on a local
folder with plain file-system calls (``os.rename`` for a rename), elsewhere through the
store's own ``put`` and ``delete``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from bucketsync.config import DatasetConfig
from bucketsync.core.errors import StorageError
from bucketsync.core.model import Item, ItemState, ObjectInfo, RunStatus
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores import Store, one_chunk, read_all
from bucketsync.stores.contenthash import HashMemo
from bucketsync.stores.local import LocalStore
from bucketsync.stores.memory import MemoryStore
from bucketsync.upstream.sync import BATCH, RunResult, SyncLoop
from conformance import Delegating as Wrapper

#: Every store the sync is proven on; each name has a fixture ``<name>_store`` yielding a fresh, empty
#: store (the cloud ones come from tests/emulators/*.py). Tests whose outcome depends on what a store
#: reports (etags and modified times that are stable across listings and change on a rewrite, renames,
#: folder markers, the hidden folder) run on all of them.
STORES = ["memory", "local", "local_hash", "s3", "gcs", "azure"]
#: The engine's own logic (the guard, failed listings, dry runs, tombstones, quota, run records, logs)
#: sees a store only through its listing, so it runs on the two fast stores; adding a name here is all
#: it takes to run it on another.
FAST_STORES = ["memory", "local"]
fast_stores = pytest.mark.parametrize("bucket", FAST_STORES, indirect=True)

DATASET = "photos"


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def memory_store() -> Iterator[MemoryStore]:
    name = f"sync-{uuid.uuid4().hex}"
    yield MemoryStore(name)
    MemoryStore.drop(name)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    root = tmp_path / "root"
    root.mkdir()
    return LocalStore(str(root))


@pytest.fixture
def local_hash_store(tmp_path: Path) -> LocalStore:
    """A local folder with ``verify = "hash"``: content-hash etags, kept in a memo between runs."""
    root = tmp_path / "root"
    root.mkdir()
    return LocalStore(str(root), "hash", HashMemo(tmp_path / "memo" / "root.sqlite"))


class Bucket:
    """One store under test, plus the means to change it as another program would."""

    def __init__(self, kind: str, store: Store) -> None:
        self.kind = kind
        self.store = store
        self.root = Path(store.root) if isinstance(store, LocalStore) else None
        #: Renames are matched by (etag, size). Local etags keep the inode and mtime across
        #: os.rename; S3 (single-part) and GCS etags are the content's MD5, so a copy matches
        #: its original. Memory etags are a counter and Azure ETags an opaque version id that
        #: every write changes: there a copy never matches, and a rename is indistinguishable
        #: from a removal plus an addition.
        self.renames_detected = kind in ("local", "local_hash", "s3", "gcs")

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root.joinpath(*key.split("/"))

    async def put(self, key: str, data: bytes) -> None:
        if self.root is None:
            await self.store.put(key, one_chunk(data))
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        old = path.stat() if existed else None
        path.write_bytes(data)
        if old is not None:
            # A rewrite in the same clock tick could keep the mtime: move it on, as time would.
            os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))

    async def delete(self, key: str) -> None:
        if self.root is None:
            await self.store.delete(key)
        else:
            self._path(key).unlink()

    async def rename(self, old: str, new: str) -> None:
        if self.root is None:
            # No rename in object stores: a copy under the new key, then a delete.
            data = await read_all(self.store, old)
            await self.store.put(new, one_chunk(data))
            await self.store.delete(old)
        else:
            dest = self._path(new)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self._path(old), dest)

    async def folder(self, key: str) -> None:
        """A folder: an empty directory locally, a zero-byte marker object ``key/`` elsewhere."""
        if self.root is None:
            await self.store.put(key.rstrip("/") + "/", one_chunk(b""))
        else:
            self._path(key.rstrip("/")).mkdir(parents=True, exist_ok=True)


@pytest.fixture(params=STORES)
def bucket(request: pytest.FixtureRequest) -> Bucket:
    store: Store = request.getfixturevalue(f"{request.param}_store")
    return Bucket(request.param, store)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
async def ledger(db_path: Path) -> AsyncIterator[Ledger]:
    led = await Ledger.open(db_path)
    try:
        yield led
    finally:
        await led.close()


def loop_for(store: Store, ledger: Ledger, **config: Any) -> SyncLoop:
    return SyncLoop(DATASET, DatasetConfig(driver="d", **config), store, ledger)


async def sync(bucket: Bucket, ledger: Ledger, **kwargs: Any) -> RunResult:
    """One run with the default dataset settings; ``force`` and ``dry_run`` go to ``run_once``."""
    run_args = {k: kwargs.pop(k) for k in ("force", "dry_run") if k in kwargs}
    return await loop_for(bucket.store, ledger, **kwargs).run_once(**run_args)


async def items(ledger: Ledger, state: ItemState | None = ItemState.LIVE) -> dict[str, Item]:
    ds = await ledger.dataset_id(DATASET)
    return {i.key: i for i in await ledger.items(ds, state=state)}


def sql(db: Path, query: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Straight to the file, as an operator (or another process) would."""
    con = sqlite3.connect(db, timeout=10, isolation_level=None)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def table(db: Path) -> list[tuple[Any, ...]]:
    """The whole items table, to prove a run wrote nothing."""
    return sql(db, "SELECT * FROM items ORDER BY id")


def counts(result: RunResult) -> dict[str, int]:
    return {k: v for k, v in result.counts.as_dict().items() if v}


async def fill(bucket: Bucket, keys: list[str]) -> None:
    for i, key in enumerate(keys):
        await bucket.put(key, f"content of {key} #{i}".encode())


KEYS = ["a.jpg", "b/c.jpg", "b/d e.png", "x/y/z.txt", "ü/日本.jpg"]


# ---------------------------------------------------------------------- the basics


async def test_initial_sync(bucket: Bucket, ledger: Ledger) -> None:
    await fill(bucket, KEYS)
    result = await sync(bucket, ledger)
    assert result.status is RunStatus.OK, result.error
    assert result.error is None
    assert counts(result) == {"listed": 5, "added": 5}
    got = await items(ledger)
    assert sorted(got) == sorted(KEYS)
    for i, key in enumerate(KEYS):
        assert got[key].size == len(f"content of {key} #{i}".encode())
        assert got[key].state is ItemState.LIVE
    assert len({i.id for i in got.values()}) == 5


async def test_resync_without_changes_writes_nothing(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    before = table(db_path)
    result = await sync(bucket, ledger)
    assert result.status is RunStatus.OK
    assert counts(result) == {"listed": 5, "unchanged": 5}
    assert table(db_path) == before, "no item row changed, not even its `updated` time"


async def test_modified_size_change(bucket: Bucket, ledger: Ledger) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    before = await items(ledger)
    await bucket.put("b/c.jpg", b"a different, longer content")
    result = await sync(bucket, ledger)
    assert counts(result) == {"listed": 5, "modified": 1, "unchanged": 4}
    after = await items(ledger)
    assert after["b/c.jpg"].id == before["b/c.jpg"].id
    assert after["b/c.jpg"].size == len(b"a different, longer content")
    assert after["b/c.jpg"].etag != before["b/c.jpg"].etag
    assert after["a.jpg"] == before["a.jpg"]


async def test_modified_same_size(bucket: Bucket, ledger: Ledger) -> None:
    await bucket.put("doc.txt", b"version-1")
    await bucket.put("other.txt", b"other")
    await sync(bucket, ledger)
    before = (await items(ledger))["doc.txt"]
    await bucket.put("doc.txt", b"version-2")  # same size, new content (and mtime, locally)
    result = await sync(bucket, ledger)
    assert counts(result) == {"listed": 2, "modified": 1, "unchanged": 1}
    after = (await items(ledger))["doc.txt"]
    assert after.id == before.id and after.size == before.size
    assert (after.etag, after.modified) != (before.etag, before.modified)


async def test_deletion_detected_and_applied(bucket: Bucket, ledger: Ledger) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    await bucket.delete("x/y/z.txt")
    result = await sync(bucket, ledger)
    assert result.status is RunStatus.OK
    assert counts(result) == {"listed": 4, "removed": 1, "unchanged": 4}
    assert sorted(await items(ledger, state=None)) == sorted(k for k in KEYS if k != "x/y/z.txt")


@fast_stores
async def test_added_later(bucket: Bucket, ledger: Ledger) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    ids = {k: i.id for k, i in (await items(ledger)).items()}
    await bucket.put("b/new.jpg", b"new")
    result = await sync(bucket, ledger)
    assert counts(result) == {"listed": 6, "added": 1, "unchanged": 5}
    after = await items(ledger)
    assert {k: after[k].id for k in ids} == ids, "existing items keep their ids"


# ---------------------------------------------------------------------- renames


async def test_rename_keeps_the_item(bucket: Bucket, ledger: Ledger) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    before = await items(ledger)
    await bucket.rename("b/c.jpg", "moved/elsewhere/c.jpg")
    result = await sync(bucket, ledger)
    assert result.status is RunStatus.OK, result.error
    after = await items(ledger)
    assert sorted(after) == sorted([k for k in KEYS if k != "b/c.jpg"] + ["moved/elsewhere/c.jpg"])
    if bucket.renames_detected:
        assert counts(result) == {"listed": 5, "renamed": 1, "unchanged": 4}
        assert after["moved/elsewhere/c.jpg"].id == before["b/c.jpg"].id, "a rename keeps the item's id"
    else:
        # The copy's etag differs from the original's (see Bucket.renames_detected), so the
        # move cannot be told from "one object removed, another added".
        assert counts(result) == {"listed": 5, "added": 1, "removed": 1, "unchanged": 4}
        assert after["moved/elsewhere/c.jpg"].id != before["b/c.jpg"].id


async def test_rename_keeps_user_metadata(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    sql(
        db_path,
        "UPDATE items SET meta = ?, content_type = ? WHERE key = ?",
        ('{"album": "summer"}', "image/jpeg", "a.jpg"),
    )
    old = (await items(ledger))["a.jpg"]
    assert old.meta == {"album": "summer"}
    await bucket.rename("a.jpg", "z/a-renamed.jpg")
    result = await sync(bucket, ledger)
    new = (await items(ledger))["z/a-renamed.jpg"]
    if bucket.renames_detected:
        assert result.counts.renamed == 1
        assert new.id == old.id
        assert new.meta == {"album": "summer"} and new.content_type == "image/jpeg"
    else:  # see Bucket.renames_detected: a removal plus an addition
        assert (result.counts.removed, result.counts.added) == (1, 1)
        assert new.meta == {}


@fast_stores
async def test_renames_are_not_removals_for_the_guard(bucket: Bucket, ledger: Ledger) -> None:
    """Moving most of a dataset is not a mass delete; where renames are invisible it is."""
    await fill(bucket, KEYS[:4])
    await sync(bucket, ledger)
    for key in KEYS[:3]:
        await bucket.rename(key, f"archive/{key}")
    result = await sync(bucket, ledger)
    if bucket.renames_detected:
        assert result.status is RunStatus.OK, result.error
        assert counts(result) == {"listed": 4, "renamed": 3, "unchanged": 1}
        assert sorted(await items(ledger)) == sorted([f"archive/{k}" for k in KEYS[:3]] + [KEYS[3]])
    else:
        assert result.status is RunStatus.ABORTED
        assert result.counts.removed == 0
        assert len(await items(ledger)) == 4 + 3, "the additions are kept, nothing is removed"


@fast_stores
async def test_rename_and_other_changes_in_one_run(bucket: Bucket, ledger: Ledger) -> None:
    keys = [f"k{i}" for i in range(10)]
    await fill(bucket, keys)
    await sync(bucket, ledger)
    await bucket.rename("k1", "renamed/k1")
    await bucket.delete("k2")
    await bucket.put("k3", b"changed content, longer")
    await bucket.put("new", b"brand new")
    result = await sync(bucket, ledger)
    assert result.status is RunStatus.OK, result.error
    if bucket.renames_detected:
        assert counts(result) == {"listed": 10, "renamed": 1, "removed": 1, "modified": 1, "added": 1, "unchanged": 7}
    else:
        assert counts(result) == {"listed": 10, "removed": 2, "modified": 1, "added": 2, "unchanged": 7}
    assert sorted(await items(ledger)) == sorted(["k0", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "new", "renamed/k1"])


# ---------------------------------------------------------------------- the mass-delete guard


@fast_stores
async def test_mass_delete_guard_aborts(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    keys = [f"f{i:02d}" for i in range(10)]
    await fill(bucket, keys)
    await sync(bucket, ledger)
    before = table(db_path)
    for key in keys[:6]:
        await bucket.delete(key)
    result = await sync(bucket, ledger)
    assert result.status is RunStatus.ABORTED
    assert result.counts.removed == 0
    assert result.error is not None
    assert "would remove 6 of 10 items" in result.error and "max_delete_ratio=0.5" in result.error
    assert "nothing was removed" in result.error and "--force" in result.error
    assert table(db_path) == before, "nothing removed, nothing else touched"
    [run, *_] = await ledger.runs(await ledger.dataset_id(DATASET))
    assert run.status is RunStatus.ABORTED and run.error == result.error and not run.forced

    forced = await sync(bucket, ledger, force=True)
    assert forced.status is RunStatus.OK, forced.error
    assert counts(forced) == {"listed": 4, "removed": 6, "unchanged": 4}
    assert sorted(await items(ledger)) == keys[6:]
    [run, *_] = await ledger.runs(await ledger.dataset_id(DATASET))
    assert run.forced and run.status is RunStatus.OK


@fast_stores
async def test_ratio_setting_is_honoured(bucket: Bucket, ledger: Ledger) -> None:
    keys = [f"f{i:02d}" for i in range(10)]
    await fill(bucket, keys)
    await sync(bucket, ledger)
    for key in keys[:3]:
        await bucket.delete(key)
    strict = await sync(bucket, ledger, max_delete_ratio=0.2)
    assert strict.status is RunStatus.ABORTED and strict.counts.removed == 0
    assert "max_delete_ratio=0.2" in (strict.error or "")
    exact = await sync(bucket, ledger, max_delete_ratio=0.3)
    assert exact.status is RunStatus.OK and exact.counts.removed == 3, "exactly at the ratio is allowed"


@fast_stores
async def test_max_delete_count(bucket: Bucket, ledger: Ledger) -> None:
    keys = [f"f{i:02d}" for i in range(10)]
    await fill(bucket, keys)
    await sync(bucket, ledger)
    for key in keys[:3]:
        await bucket.delete(key)
    result = await sync(bucket, ledger, max_delete_count=2)
    assert result.status is RunStatus.ABORTED
    assert result.counts.removed == 0
    assert "would remove 3 items, more than max_delete_count=2" in (result.error or "")
    assert len(await items(ledger)) == 10
    assert (await sync(bucket, ledger, max_delete_count=3)).counts.removed == 3


# ---------------------------------------------------------------------- failures never remove


class FailsAfter(Wrapper):
    """Lists ``n`` objects, then fails like a dropped connection."""

    def __init__(self, inner: Store, n: int) -> None:
        super().__init__(inner)
        self.n = n

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        seen = 0
        async for info in self.inner.list(prefix):
            if seen == self.n:
                raise StorageError("connection reset by peer while listing")
            seen += 1
            yield info


class Unsorted(Wrapper):
    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        infos = [i async for i in self.inner.list(prefix)]
        for info in [*infos[2:], *infos[:2]]:
            yield info


class Duplicated(Wrapper):
    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix):
            yield info
            yield info


@fast_stores
async def test_listing_that_fails_midway(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    keys = ["a", "c", "e", "g", "i", "k"]
    await fill(bucket, keys)
    await sync(bucket, ledger)
    before = await items(ledger)
    await bucket.put("b", b"new before the failure")
    await bucket.put("c", b"modified before the failure")
    await bucket.delete("a")  # gone before the failure point: must not be removed
    await bucket.delete("k")  # gone after it
    await bucket.put("j", b"new after the failure")
    # The listing is now b, c, e, g, i, j: fail after b, c, e.
    result = await loop_for(FailsAfter(bucket.store, 3), ledger).run_once()
    assert result.status is RunStatus.FAILED
    assert result.error == "connection reset by peer while listing"
    assert result.counts.removed == 0 and result.counts.errors == 1
    assert (result.counts.listed, result.counts.added, result.counts.modified) == (3, 1, 1)
    after = await items(ledger)
    assert sorted(after) == ["a", "b", "c", "e", "g", "i", "k"], "everything kept; what was listed is indexed"
    assert after["c"].id == before["c"].id and after["c"].size == len(b"modified before the failure")
    [run, *_] = await ledger.runs(await ledger.dataset_id(DATASET))
    assert run.status is RunStatus.FAILED and run.error == result.error and run.counts.errors == 1

    healed = await sync(bucket, ledger)
    assert healed.status is RunStatus.OK
    assert counts(healed) == {"listed": 6, "added": 1, "removed": 2, "unchanged": 5}
    assert sorted(await items(ledger)) == ["b", "c", "e", "g", "i", "j"]


@fast_stores
async def test_listing_that_fails_at_once(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    before = table(db_path)
    result = await loop_for(FailsAfter(bucket.store, 0), ledger).run_once(force=True)
    assert result.status is RunStatus.FAILED
    assert result.counts.removed == 0, "not even forced: a failed listing never removes"
    assert table(db_path) == before


@fast_stores
async def test_out_of_order_store_fails(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    before = table(db_path)
    result = await loop_for(Unsorted(bucket.store), ledger).run_once(force=True)
    assert result.status is RunStatus.FAILED
    assert "listing is not in ascending key order" in (result.error or "")
    assert "out of order" in (result.error or "")
    assert result.counts.removed == 0
    assert table(db_path) == before


@fast_stores
async def test_duplicate_keys_from_a_store_fail(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    await bucket.delete("x/y/z.txt")
    result = await loop_for(Duplicated(bucket.store), ledger).run_once()
    assert result.status is RunStatus.FAILED
    assert "a duplicate" in (result.error or "")
    assert result.counts.removed == 0
    assert "x/y/z.txt" in await items(ledger)


async def test_missing_local_root_fails_and_removes_nothing(tmp_path: Path, ledger: Ledger, db_path: Path) -> None:
    root = tmp_path / "mounted"
    bucket = Bucket("local", LocalStore(str(root)))
    root.mkdir()
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    before = table(db_path)
    shutil.rmtree(root)  # an unmounted disk, a deleted folder
    result = await sync(bucket, ledger, force=True)
    assert result.status is RunStatus.FAILED
    assert "does not exist" in (result.error or "") and str(root) in (result.error or "")
    assert result.counts.removed == 0
    assert table(db_path) == before, "never 'everything was deleted'"


async def test_never_existing_local_root(tmp_path: Path, ledger: Ledger) -> None:
    result = await loop_for(LocalStore(str(tmp_path / "typo")), ledger).run_once()
    assert result.status is RunStatus.FAILED and "does not exist" in (result.error or "")


async def test_shutdown_stops_after_a_batch_without_removals(memory_store: MemoryStore, ledger: Ledger) -> None:
    memory_store.load((f"old{i}", b"x", 1.0) for i in range(10))
    await loop_for(memory_store, ledger).run_once()
    for i in range(10):
        await memory_store.delete(f"old{i}")
    memory_store.load((f"k{i:05d}", b"x", 1.0) for i in range(BATCH + 100))
    stop = asyncio.Event()
    stop.set()
    result = await loop_for(memory_store, ledger).run_once(stop=stop, force=True)
    assert result.status is RunStatus.FAILED
    assert result.error == "interrupted by shutdown or reload; nothing was removed"
    assert result.counts.removed == 0
    assert result.counts.added == BATCH, "the batch written before the stop is kept"
    got = await items(ledger)
    assert len(got) == BATCH + 10 and all(f"old{i}" in got for i in range(10))


# ---------------------------------------------------------------------- what is never an item


async def test_hidden_folder_markers_and_empty_folders_never_indexed(bucket: Bucket, ledger: Ledger) -> None:
    await bucket.put("a.jpg", b"a")
    await bucket.put("sub/b.jpg", b"b")
    await bucket.put(".bucketsync/thumbs/a.jpg", b"thumbnail")
    await bucket.put(".bucketsync/probe-test-file", b"probe")
    await bucket.folder("empty")
    await bucket.folder("sub/empty-too")
    await bucket.folder("sub")
    result = await sync(bucket, ledger)
    assert result.status is RunStatus.OK, result.error
    assert counts(result) == {"listed": 2, "added": 2}
    assert sorted(await items(ledger, state=None)) == ["a.jpg", "sub/b.jpg"]


@fast_stores
async def test_include_exclude(bucket: Bucket, ledger: Ledger) -> None:
    for key in ["a.jpg", "b.png", "sub/c.jpg", "sub/deep/d.JPG", "private/e.jpg", "private/deep/f.jpg", "tmp.jpg.part"]:
        await bucket.put(key, b"x")
    result = await sync(bucket, ledger, include=["**/*.jpg", "*.JPG"], exclude=["private/**"])
    assert result.status is RunStatus.OK
    assert counts(result) == {"listed": 3, "added": 3}
    assert sorted(await items(ledger)) == ["a.jpg", "sub/c.jpg", "sub/deep/d.JPG"]
    # Objects outside the filter are not "removed" items either: they never were items.
    await bucket.delete("private/e.jpg")
    again = await sync(bucket, ledger, include=["**/*.jpg", "*.JPG"], exclude=["private/**"])
    assert counts(again) == {"listed": 3, "unchanged": 3}


# ---------------------------------------------------------------------- dry runs


@fast_stores
async def test_dry_run_on_a_new_dataset_writes_nothing(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    await fill(bucket, KEYS)
    result = await sync(bucket, ledger, dry_run=True)
    assert result.dry_run and result.run is None
    assert result.status is RunStatus.OK
    assert counts(result) == {"listed": 5, "added": 5}
    assert sql(db_path, "SELECT count(*) FROM runs") == [(0,)]
    assert sql(db_path, "SELECT count(*) FROM items") == [(0,)]


@fast_stores
async def test_dry_run_reports_changes_and_writes_nothing(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    keys = [f"k{i}" for i in range(8)]
    await fill(bucket, keys)
    await sync(bucket, ledger)
    await bucket.rename("k1", "renamed/k1")
    await bucket.delete("k2")
    await bucket.put("k3", b"changed content, longer")
    await bucket.put("new", b"brand new")
    before_items, before_runs = table(db_path), sql(db_path, "SELECT * FROM runs")

    result = await sync(bucket, ledger, dry_run=True)
    assert result.dry_run and result.run is None and result.status is RunStatus.OK
    if bucket.renames_detected:
        assert counts(result) == {"listed": 8, "renamed": 1, "removed": 1, "modified": 1, "added": 1, "unchanged": 5}
    else:
        assert counts(result) == {"listed": 8, "removed": 2, "modified": 1, "added": 2, "unchanged": 5}
    assert table(db_path) == before_items
    assert sql(db_path, "SELECT * FROM runs") == before_runs, "no run row"

    real = await sync(bucket, ledger)
    assert real.counts == result.counts, "the dry run predicted the real run"


@fast_stores
async def test_dry_run_reports_a_guard_abort(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    for key in KEYS[:4]:
        await bucket.delete(key)
    result = await sync(bucket, ledger, dry_run=True)
    assert result.status is RunStatus.ABORTED and "would remove 4 of 5 items" in (result.error or "")
    forced = await sync(bucket, ledger, dry_run=True, force=True)
    assert forced.status is RunStatus.OK and forced.counts.removed == 4
    assert len(await items(ledger)) == 5


# ---------------------------------------------------------------------- tombstones


@fast_stores
async def test_tombstones(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    await fill(bucket, KEYS)
    await sync(bucket, ledger)
    sql(db_path, "UPDATE items SET state = 'tombstone' WHERE key = 'b/c.jpg'")
    tomb = (await items(ledger, state=ItemState.TOMBSTONE))["b/c.jpg"]

    again = await sync(bucket, ledger)
    assert again.status is RunStatus.OK
    assert counts(again) == {"listed": 5, "unchanged": 4}, "a tombstone is neither added, nor unchanged"
    assert "b/c.jpg" not in await items(ledger), "upstream never brings it back"
    assert (await items(ledger, state=ItemState.TOMBSTONE))["b/c.jpg"].id == tomb.id

    await bucket.put("b/c.jpg", b"rewritten in storage, bigger")
    changed = await sync(bucket, ledger)
    assert counts(changed) == {"listed": 5, "unchanged": 4}, "a change to a tombstone's object is not counted"
    still = (await items(ledger, state=ItemState.TOMBSTONE))["b/c.jpg"]
    assert still.id == tomb.id and still.size == len(b"rewritten in storage, bigger"), "its info is kept current"
    assert "b/c.jpg" not in await items(ledger)

    await bucket.delete("b/c.jpg")
    gone = await sync(bucket, ledger)
    assert gone.status is RunStatus.OK
    assert counts(gone) == {"listed": 4, "unchanged": 4}, "purging a tombstone is not a removal"
    assert sql(db_path, "SELECT count(*) FROM items WHERE key = 'b/c.jpg'") == [(0,)], "the tombstone is purged"
    assert sorted(await items(ledger, state=None)) == sorted(k for k in KEYS if k != "b/c.jpg")


@fast_stores
async def test_tombstones_do_not_count_for_the_guard(bucket: Bucket, ledger: Ledger, db_path: Path) -> None:
    keys = [f"f{i}" for i in range(6)]
    await fill(bucket, keys)
    await sync(bucket, ledger)
    sql(db_path, "UPDATE items SET state = 'tombstone' WHERE key IN ('f0', 'f1', 'f2')")
    for key in ("f3", "f4"):
        await bucket.delete(key)
    # 2 of 3 live items would go: over the ratio, though only 2 of 6 rows.
    result = await sync(bucket, ledger)
    assert result.status is RunStatus.ABORTED and "would remove 2 of 3 items" in (result.error or "")


# ---------------------------------------------------------------------- quota


@fast_stores
async def test_quota_stops_additions(bucket: Bucket, ledger: Ledger) -> None:
    await fill(bucket, KEYS)
    result = await sync(bucket, ledger, quota=3)
    assert result.status is RunStatus.OK
    assert counts(result) == {"listed": 5, "added": 3}
    assert "over quota" in (result.error or "") and "2 new objects were not added" in (result.error or "")
    assert len(await items(ledger)) == 3


async def test_rename_at_quota_keeps_the_item(local_store: LocalStore, ledger: Ledger) -> None:
    """A full dataset: a rename adds no item, so the quota must not turn it into a loss of the
    item (its id and metadata) and of the object's place in the index."""
    bucket = Bucket("local", local_store)
    await fill(bucket, KEYS[:3])
    await sync(bucket, ledger, quota=3)
    old = (await items(ledger))["a.jpg"]
    await ledger.merge_meta(old.id, {"keep": "me"})
    await bucket.rename("a.jpg", "renamed.jpg")
    result = await sync(bucket, ledger, quota=3)
    after = await items(ledger)
    assert sorted(after) == ["b/c.jpg", "b/d e.png", "renamed.jpg"], f"{result.counts}: {result.error}"
    assert counts(result) == {"listed": 3, "renamed": 1, "unchanged": 2}, result.error
    assert after["renamed.jpg"].id == old.id and after["renamed.jpg"].meta == {"keep": "me"}
    assert result.error is None, "nothing was over the quota"


# ---------------------------------------------------------------------- records and logs


@fast_stores
async def test_runs_recorded(bucket: Bucket, ledger: Ledger) -> None:
    await fill(bucket, KEYS)
    r1 = await sync(bucket, ledger)
    await bucket.delete("a.jpg")
    await bucket.put("new.jpg", b"new")
    r2 = await sync(bucket, ledger)
    r3 = await loop_for(FailsAfter(bucket.store, 1), ledger).run_once()
    runs = await ledger.runs(await ledger.dataset_id(DATASET))
    assert [r.id for r in runs] == [r3.run, r2.run, r1.run]
    for record, result in zip(runs, [r3, r2, r1], strict=True):
        assert record.status is result.status
        assert record.counts == result.counts
        assert record.error == result.error
        assert record.ended is not None and record.ended >= record.started
    assert [r.status for r in runs] == [RunStatus.FAILED, RunStatus.OK, RunStatus.OK]
    assert runs[1].counts.as_dict() == {
        "listed": 5,
        "added": 1,
        "modified": 0,
        "removed": 1,
        "renamed": 0,
        "unchanged": 4,
        "errors": 0,
    }
    assert r1.as_json()["run"] == r1.run and r1.as_json()["status"] == "ok"


@fast_stores
async def test_logs_carry_dataset_and_run(bucket: Bucket, ledger: Ledger) -> None:
    await fill(bucket, KEYS)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        ok = await sync(bucket, ledger)
        failed = await loop_for(FailsAfter(bucket.store, 2), ledger).run_once()
        structlog.get_logger("test").info("after the runs")
    runs = [e for e in logs if e["event"] in ("run started", "run finished")]
    assert [(e["event"], e["run"]) for e in runs] == [
        ("run started", ok.run),
        ("run finished", ok.run),
        ("run started", failed.run),
        ("run finished", failed.run),
    ]
    assert all(e["dataset"] == DATASET for e in runs)
    finished_ok, finished_failed = runs[1], runs[3]
    assert finished_ok["status"] == "ok" and finished_ok["added"] == 5 and finished_ok["log_level"] == "info"
    assert finished_failed["status"] == "failed" and finished_failed["log_level"] == "warning"
    assert finished_failed["error"] == failed.error
    after = next(e for e in logs if e["event"] == "after the runs")
    assert "dataset" not in after and "run" not in after, "the run's context ends with the run"


async def test_dry_run_logs_without_a_run_id(memory_store: MemoryStore, ledger: Ledger) -> None:
    await memory_store.put("a", one_chunk(b"a"))
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await loop_for(memory_store, ledger).run_once(dry_run=True)
    started = next(e for e in logs if e["event"] == "run started")
    assert started["dataset"] == DATASET and started["run"] is None and started["dry_run"] is True


# ---------------------------------------------------------------------- renames across runs, of tombstones


async def test_rename_split_by_a_failed_listing_keeps_the_item(local_store: LocalStore, ledger: Ledger) -> None:
    """A listing that fails between a rename's new key and its old one must not cost the item its
    id and metadata: the next, complete run still pairs them."""
    bucket = Bucket("local", local_store)
    await fill(bucket, ["m.jpg", "z-old.jpg"])
    await sync(bucket, ledger)
    old = (await items(ledger))["z-old.jpg"]
    await ledger.merge_meta(old.id, {"album": "summer"})
    await bucket.rename("z-old.jpg", "a-new.jpg")

    failed = await loop_for(FailsAfter(local_store, 1), ledger).run_once()  # lists a-new.jpg, then fails
    assert failed.status is RunStatus.FAILED and failed.counts.added == 1 and failed.counts.removed == 0

    healed = await sync(bucket, ledger)
    assert healed.status is RunStatus.OK, healed.error
    after = await items(ledger)
    assert sorted(after) == ["a-new.jpg", "m.jpg"]
    assert after["a-new.jpg"].id == old.id, f"{healed.counts}: the rename was not matched"
    assert after["a-new.jpg"].meta == {"album": "summer"}
    assert healed.counts.renamed == 1 and healed.counts.removed == 0


async def test_rename_of_a_tombstoned_object_does_not_bring_it_back(
    local_store: LocalStore, ledger: Ledger, db_path: Path
) -> None:
    """Invariant 3: a deleted item stays deleted when its object is moved in storage (a folder
    reorganised by another program); only an explicit restore brings it back."""
    bucket = Bucket("local", local_store)
    await fill(bucket, ["2023/a.jpg", "2023/b.jpg", "keep.jpg"])
    await sync(bucket, ledger)
    sql(db_path, "UPDATE items SET state = 'tombstone' WHERE key = '2023/a.jpg'")
    await bucket.rename("2023/a.jpg", "archive/2023/a.jpg")
    await bucket.rename("2023/b.jpg", "archive/2023/b.jpg")

    result = await sync(bucket, ledger)
    assert result.status is RunStatus.OK, result.error
    assert sorted(await items(ledger)) == ["archive/2023/b.jpg", "keep.jpg"], f"{result.counts}"
    assert sorted(await items(ledger, state=ItemState.TOMBSTONE)) == ["archive/2023/a.jpg"]


@fast_stores
async def test_keys_downstream_owns_are_left_alone_and_not_counted(bucket: Bucket, ledger: Ledger) -> None:
    """A key the outbox is writing (``in_flight``) or wrote during the run (``touched``) is listed
    but neither changed nor counted unchanged, whichever way the diff found it."""
    await fill(bucket, ["a", "b", "c", "d", "e"])
    await sync(bucket, ledger)
    before = await items(ledger)
    await bucket.put("b", b"being written")  # modified, owned
    await bucket.put("f", b"new and being written")  # added, owned
    await bucket.delete("e")  # removed, owned
    loop = loop_for(bucket.store, ledger)
    loop.in_flight = {"b", "f"}
    loop.touched = {"c": time.monotonic() + 60, "e": time.monotonic() + 60}  # c: unchanged, owned
    result = await loop.run_once()
    c = result.counts
    assert (c.listed, c.added, c.modified, c.removed, c.unchanged) == (5, 0, 0, 0, 2)  # a and d unchanged
    assert await items(ledger) == before
