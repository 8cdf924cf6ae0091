"""The ledger conformance suite: one set of plain async checks that every ledger backend passes.

Like the store suite (tests/conformance.py), each check is a function, and a backend's test is a few lines
(tests/test_ledger_conformance.py runs ``CHECKS`` on every backend of its ``ledger_factory`` fixture)::

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    async def test_ledger_conformance(check, ledger_factory):
        await check(ledger_factory)

Every check takes an ``Opener``: a callable that opens the ledger at one FRESH, EMPTY place (a SQLite file, a
PostgreSQL database), the same place at each call, so a check can close the ledger and open it again as a
restarted agent would. The checks use only the ledger's public methods: what a backend stores, and how, is
its own business; what it answers is not.

This module is imported by a test file but is not one itself, so pytest does not rewrite its asserts:
every assert carries its own message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bucketsync.core.model import Counts, ItemState, ObjectInfo, OpKind, OpState, RunStatus
from bucketsync.ledger.ledger import Ledger

#: opens (or opens again) the ledger at the place this check was given
Opener = Callable[[], Awaitable[Ledger]]
Check = Callable[[Opener], Awaitable[None]]

# A walk of more rows than one fetch of a snapshot (PostgreSQL fetches 8,192 rows at a time, SQLite 1,024).
SNAPSHOT_ROWS = 9_000


# --------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def opened(open_ledger: Opener) -> AsyncIterator[Ledger]:
    ledger = await open_ledger()
    try:
        yield ledger
    finally:
        await ledger.close()


def objs(*keys: str, size: int = 1) -> list[ObjectInfo]:
    return [ObjectInfo(k, size, 1000.0 + i, f"etag-{k}", None) for i, k in enumerate(keys)]


async def fill(ledger: Ledger, name: str, keys: list[str]) -> tuple[int, int]:
    """A dataset whose first run added ``keys``: (dataset id, run id)."""
    ds = await ledger.dataset_id(name)
    run = await ledger.begin_run(ds, False)
    await ledger.write_batch(ds, run, objs(*keys), [], Counts(listed=len(keys), added=len(keys)))
    return ds, run


async def keys_of(ledger: Ledger, ds: int, state: ItemState | None = ItemState.LIVE) -> list[str]:
    return [i.key for i in await ledger.items(ds, state=state)]


async def run_counts(ledger: Ledger, run_id: int) -> Counts:
    run = await ledger.run(run_id)
    assert run is not None, f"run {run_id} is missing"
    return run.counts


async def ids_by_key(ledger: Ledger, ds: int) -> dict[str, int]:
    return {i.key: i.id for i in await ledger.items(ds, state=None)}


async def put_done(ledger: Ledger, ds: int, key: str, size: int, *, content_type: str | None = None) -> int:
    """A put through the outbox, executed: the item's id."""
    op_id = await ledger.enqueue(ds, OpKind.PUT, key, content_type=content_type, staged="/staged/x")
    op = await ledger.start_attempt(op_id)
    assert op is not None, "a fresh op can be started"
    item = await ledger.complete_put(op, ds, ObjectInfo(key, size, 2000.0, f"put-{key}-{size}", None))
    return item.id


# --------------------------------------------------------------------------- datasets and items


async def check_datasets(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        assert await ledger.find_dataset("photos") is None, "an unknown dataset is None"
        a = await ledger.dataset_id("photos")
        assert await ledger.dataset_id("photos") == a, "dataset_id is idempotent"
        b = await ledger.dataset_id("docs")
        assert a != b, "each dataset has its own id"
        assert await ledger.find_dataset("docs") == b
        assert await ledger.dataset_names() == [(a, "photos"), (b, "docs")]


async def check_write_batch_and_reads(open_ledger: Opener) -> None:
    keys = ["a", "a/b", "a/c", "a0", "a-x", "b/c/d", "é", "Z", "_"]
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", keys)
        other, _ = await fill(ledger, "other", ["a/zzz"])

        items = await ledger.items(ds)
        assert [i.key for i in items] == sorted(keys), f"ascending code-point order: {[i.key for i in items]}"
        assert len({i.id for i in items}) == len(keys), "one id per item"
        first = await ledger.item(ds, "_")
        assert first is not None, "item() finds an item by key"
        assert (first.size, first.modified, first.etag, first.state) == (1, 1008.0, "etag-_", ItemState.LIVE), first
        assert first.updated is not None and first.meta == {}, first
        assert await ledger.item(ds, "nope") is None, "a missing key is None"
        assert await ledger.item(other, "a") is None, "datasets do not mix"

        assert [i.key for i in await ledger.items(ds, prefix="a/")] == ["a/b", "a/c"], "prefix"
        assert [i.key for i in await ledger.items(ds, after="a/b")] == ["a/c", "a0", "b/c/d", "é"], "after"
        assert [i.key for i in await ledger.items(ds, after="a", limit=2)] == ["a-x", "a/b"], "after + limit"
        assert [i.key for i in await ledger.items(ds, prefix="a/", after="a/b")] == ["a/c"], "prefix + after"
        assert [i.key for i in await ledger.items(other)] == ["a/zzz"], "datasets do not mix"

        assert [i.key async for i in ledger.iter_items(ds, page=2)] == sorted(keys), "paged walk"
        walked = [i.key async for i in ledger.iter_items(ds, prefix="a", page=1)]
        assert walked == ["a", "a-x", "a/b", "a/c", "a0"], walked

        assert await ledger.live_count(ds) == len(keys)
        assert await ledger.counts_by_state(ds) == {"live": len(keys), "tombstone": 0}
        added = sorted(k for _, k, _, _, first_run in await ledger.added_since(ds, 0) if first_run == run)
        assert added == sorted(keys), "added_since names the run that first saw each item"
        assert await run_counts(ledger, run) == Counts(listed=len(keys), added=len(keys)), (
            "the batch's progress went into the run row"
        )


async def check_updates_keep_the_id(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", ["a", "b"])
        a = (await ledger.items(ds))[0]
        await ledger.write_batch(ds, run, [], [(a.id, ObjectInfo("a", 42, 2000.0, "etag-new", "v2"))], Counts())
        got = await ledger.item(ds, "a")
        assert got is not None
        assert (got.id, got.size, got.modified, got.etag, got.version) == (a.id, 42, 2000.0, "etag-new", "v2"), got


async def check_adding_an_existing_key_updates_it(open_ledger: Opener) -> None:
    """An add racing another writer of the same key (the outbox) updates that row: never a duplicate."""
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", ["a"])
        before = await ledger.item(ds, "a")
        await ledger.write_batch(ds, run, [ObjectInfo("a", 7, 5.0, "etag-2")], [], Counts())
        after = await ledger.items(ds)
        assert before is not None and len(after) == 1, after
        assert (after[0].id, after[0].size, after[0].etag) == (before.id, 7, "etag-2"), after


async def check_rows_for(open_ledger: Opener) -> None:
    """What an events batch compares with: live and tombstoned rows of the keys asked, more than one
    statement's worth of parameters, nothing of another dataset."""
    many = [f"k{i:04d}" for i in range(1200)]
    async with opened(open_ledger) as ledger:
        ds, _ = await fill(ledger, "photos", [*many, "gone"])
        other, _ = await fill(ledger, "other", ["k0001"])
        gone = await ledger.item(ds, "gone")
        assert gone is not None
        await ledger.set_state(gone.id, ItemState.TOMBSTONE)
        rows = await ledger.rows_for(ds, [*many, "gone", "absent"])
        assert set(rows) == {*many, "gone"}, "every asked key that has a row, no other"
        assert rows["gone"].state == ItemState.TOMBSTONE, rows["gone"]
        k1 = rows["k0001"]
        assert (k1.key, k1.size, k1.etag, k1.state) == ("k0001", 1, "etag-k0001", ItemState.LIVE), k1
        assert (await ledger.rows_for(other, ["k0001"]))["k0001"].id != k1.id, "datasets do not mix"
        assert await ledger.rows_for(ds, []) == {}


async def check_live_under(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds, _ = await fill(ledger, "photos", ["a/1", "a/2", "a/3", "a0", "b/1"])
        tomb = await ledger.item(ds, "a/2")
        assert tomb is not None
        await ledger.set_state(tomb.id, ItemState.TOMBSTONE)
        assert await ledger.live_under(ds, "a/", 10) == ["a/1", "a/3"], "live items under the prefix only"
        assert await ledger.live_under(ds, "a/", 1) == ["a/1"], "at most limit"


async def check_snapshot_is_a_consistent_view(open_ledger: Opener) -> None:
    """A run writes while it walks its snapshot: the walk sees none of those writes."""
    keys = [f"k{i:06d}" for i in range(SNAPSHOT_ROWS)]
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", keys)
        ids = await ids_by_key(ledger, ds)
        snap = ledger.snapshot(ds)
        first = await anext(snap)
        assert first.key == keys[0], first
        await ledger.write_batch(ds, run, objs("k000000x", "zzz"), [], Counts())
        await ledger.remove(None, [ids[keys[-1]], ids[keys[SNAPSHOT_ROWS // 2]]])
        rest = [i.key async for i in snap]
        assert [first.key, *rest] == keys, "the snapshot is the ledger as it was when the walk began"


# --------------------------------------------------------------------------- tombstones, removal, renames


async def check_tombstones(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds, _ = await fill(ledger, "photos", ["a", "b", "c", "d"])
        ids = await ids_by_key(ledger, ds)
        await ledger.set_state(ids["b"], ItemState.TOMBSTONE)
        await ledger.tombstone_many([ids["c"], ids["d"]])
        assert await keys_of(ledger, ds) == ["a"], "live items by default"
        assert await keys_of(ledger, ds, ItemState.TOMBSTONE) == ["b", "c", "d"]
        assert await keys_of(ledger, ds, None) == ["a", "b", "c", "d"], "state=None: every item"
        assert await ledger.counts_by_state(ds) == {"live": 1, "tombstone": 3}
        snapshot = [(i.key, i.state) async for i in ledger.snapshot(ds)]
        assert snapshot == [
            ("a", ItemState.LIVE),
            ("b", ItemState.TOMBSTONE),
            ("c", ItemState.TOMBSTONE),
            ("d", ItemState.TOMBSTONE),
        ], f"the snapshot holds tombstones too: {snapshot}"
        tomb = await ledger.item(ds, "b")
        assert tomb is not None and tomb.id == ids["b"] and tomb.state is ItemState.TOMBSTONE, tomb
        # A put over a tombstone brings the same item back.
        back = await put_done(ledger, ds, "b", 9)
        assert back == ids["b"], "the item keeps its id through its tombstone"
        assert await keys_of(ledger, ds) == ["a", "b"]


async def check_remove(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", ["a", "b", "c"])
        ids = await ids_by_key(ledger, ds)
        await ledger.remove(run, [ids["a"], ids["c"]], Counts(listed=1, removed=2))
        assert await keys_of(ledger, ds, None) == ["b"], "removed rows are gone, not tombstoned"
        assert await run_counts(ledger, run) == Counts(listed=1, removed=2), "with the run's progress"
        await ledger.remove(None, [ids["b"]])
        assert await ledger.items(ds) == []


async def check_rename_keeps_id_and_metadata(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds, _ = await fill(ledger, "photos", ["other"])
        old_id = await put_done(ledger, ds, "old/name.jpg", 1, content_type="image/jpeg")
        await ledger.merge_meta(old_id, {"tag": "cat"})
        old = await ledger.item(ds, "old/name.jpg")
        assert old is not None

        run2 = await ledger.begin_run(ds, False)
        await ledger.write_batch(ds, run2, [ObjectInfo("new/name.jpg", 1, 3000.0, old.etag, "v9")], [], Counts())
        [(fresh_id, fresh_key, _, _)] = [r[:4] for r in await ledger.added_since(ds, 0) if r[4] == run2]
        assert fresh_key == "new/name.jpg" and fresh_id != old.id

        await ledger.rename(run2, [(old.id, fresh_id, fresh_key)], Counts(renamed=1))
        items = {i.key: i for i in await ledger.items(ds, state=None)}
        assert set(items) == {"new/name.jpg", "other"}, f"the old key is gone, one row for the new: {set(items)}"
        got = items["new/name.jpg"]
        assert got.id == old.id, "the item keeps its id"
        assert got.meta == {"tag": "cat"} and got.content_type == "image/jpeg", f"and its metadata: {got}"
        assert (got.modified, got.version) == (3000.0, "v9"), f"with the new object's info: {got}"
        assert await run_counts(ledger, run2) == Counts(renamed=1)
        assert await ledger.counts_by_state(ds) == {"live": 2, "tombstone": 0}, "a rename adds nothing"


async def check_adopt_and_rekey(open_ledger: Opener) -> None:
    """A move through the API (adopt) and a runtime dataset's catalog-only move (rekey) keep the id."""
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        old = await put_done(ledger, ds, "a.jpg", 1)
        await ledger.merge_meta(old, {"tag": "cat"})
        await put_done(ledger, ds, "b.jpg", 5)  # the copy the move wrote
        await ledger.adopt(old, ds, "b.jpg")
        [moved] = await ledger.items(ds, state=None)
        assert (moved.id, moved.key, moved.size, moved.meta) == (old, "b.jpg", 5, {"tag": "cat"}), moved
        await ledger.rekey(ds, [(old, "c/b.jpg")])
        again = await ledger.item(ds, "c/b.jpg")
        assert again is not None and again.id == old, again


# --------------------------------------------------------------------------- runs


async def check_runs_history(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        other = await ledger.dataset_id("other")
        r1 = await ledger.begin_run(ds, False)
        await ledger.finish_run(r1, Counts(listed=3, added=3), RunStatus.OK, None)
        r2 = await ledger.begin_run(ds, True)
        await ledger.finish_run(r2, Counts(listed=1, errors=1), RunStatus.FAILED, "listing failed: boom")
        r3 = await ledger.begin_run(ds, False)
        await ledger.begin_run(other, False)

        runs = await ledger.runs(ds)
        assert [r.id for r in runs] == [r3, r2, r1], "newest first, this dataset only"
        assert [r.id for r in await ledger.runs(ds, limit=2)] == [r3, r2]
        assert runs[2].status is RunStatus.OK and runs[2].counts == Counts(listed=3, added=3), runs[2]
        assert runs[2].ended is not None and runs[2].ended >= runs[2].started, runs[2]
        assert runs[1].status is RunStatus.FAILED and runs[1].error == "listing failed: boom" and runs[1].forced
        assert runs[0].status is RunStatus.RUNNING and runs[0].ended is None, runs[0]
        assert await ledger.last_ok_run(ds) == runs[2]
        assert await ledger.last_ok_run(other) is None
        assert await ledger.run(r2) == runs[1]
        assert await ledger.run(r3 + 1000) is None
        as_json = runs[2].as_json()
        assert as_json["status"] == "ok" and as_json["dataset"] == "photos" and as_json["added"] == 3, as_json
        assert str(as_json["started"]).endswith("Z"), as_json


async def check_fail_stale_runs(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        done = await ledger.begin_run(ds, False)
        await ledger.finish_run(done, Counts(), RunStatus.OK, None)
        stale = [await ledger.begin_run(ds, False), await ledger.begin_run(ds, False)]
    # The agent stopped with two runs running; the next one to open the ledger fails them.
    async with opened(open_ledger) as ledger:
        assert await ledger.fail_stale_runs() == 2
        for run_id in stale:
            run = await ledger.run(run_id)
            assert run is not None and run.status is RunStatus.FAILED, run
            assert run.error == "the agent stopped during this run" and run.ended is not None, run
        ok = await ledger.run(done)
        assert ok is not None and ok.status is RunStatus.OK and ok.error is None, ok
        assert await ledger.fail_stale_runs() == 0


async def check_overview(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", ["a", "b"])
        await ledger.finish_run(run, Counts(listed=2, added=2), RunStatus.OK, None)
        await ledger.dataset_id("empty")
        overview = await ledger.overview()
        assert set(overview) == {"photos", "empty"}, overview
        counts, last = overview["photos"]
        assert counts == {"live": 2, "tombstone": 0} and last is not None and last.id == run, overview["photos"]
        assert overview["empty"] == ({"live": 0, "tombstone": 0}, None), overview["empty"]
        await ledger.write_batch(ds, run, objs("c"), [], Counts())
        assert (await ledger.overview())["photos"][0]["live"] == 3, "a commit is seen by the next overview"


# --------------------------------------------------------------------------- the outbox


async def check_outbox_lifecycle(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        other = await ledger.dataset_id("other")
        put = await ledger.enqueue(
            ds, OpKind.PUT, "a.bin", create_only=True, staged="/s/1", sha256="ab" * 32, content_type="text/plain"
        )
        delete = await ledger.enqueue(ds, OpKind.DELETE, "b.bin", if_match="etag-b")
        elsewhere = await ledger.enqueue(other, OpKind.PUT, "x", staged="/s/2")

        op = await ledger.op(put)
        assert op is not None and (op.dataset, op.kind, op.key, op.state) == (
            "photos",
            OpKind.PUT,
            "a.bin",
            OpState.PENDING,
        ), op
        assert (op.attempts, op.create_only, op.staged, op.sha256, op.content_type) == (
            0,
            True,
            "/s/1",
            "ab" * 32,
            "text/plain",
        ), op
        assert await ledger.op(elsewhere + 1000) is None
        assert [o.id for o in await ledger.ops(dataset_id=ds)] == [put, delete], "oldest first, by dataset"
        assert [o.id for o in await ledger.ops(state=OpState.PENDING, limit=2)] == [put, delete], "limit"
        assert await ledger.backlog() == 3
        assert await ledger.backlog_by_dataset() == {"photos": 2, "other": 1}
        assert [o.id for o in await ledger.due_ops(time.time() + 1)] == [put, delete, elsewhere]

        started = await ledger.start_attempt(put)
        assert started is not None and started.attempts == 1, "an attempt is counted before storage is touched"
        item = await ledger.complete_put(started, ds, ObjectInfo("a.bin", 3, 1500.0, "etag-a", "v1"))
        assert (item.key, item.size, item.etag, item.content_type, item.state) == (
            "a.bin",
            3,
            "etag-a",
            "text/plain",
            ItemState.LIVE,
        ), item
        done = await ledger.op(put)
        assert done is not None and done.state is OpState.DONE and done.staged is None, done

        await ledger.write_batch(ds, await ledger.begin_run(ds, False), objs("b.bin"), [], Counts())
        started = await ledger.start_attempt(delete)
        assert started is not None
        await ledger.complete_delete(started, ds)
        assert await ledger.item(ds, "b.bin") is None, "a delete removes the item"
        assert await ledger.backlog() == 1 and await ledger.backlog_by_dataset() == {"other": 1}
        assert [o.id for o in await ledger.ops(state=OpState.DONE)] == [put, delete]


async def check_outbox_one_op_per_key_at_a_time(open_ledger: Opener) -> None:
    """Only the oldest pending op of a (dataset, key) is due, even while it backs off."""
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        first = await ledger.enqueue(ds, OpKind.PUT, "k", staged="/s/1")
        second = await ledger.enqueue(ds, OpKind.DELETE, "k")
        other_key = await ledger.enqueue(ds, OpKind.PUT, "j", staged="/s/2")
        now = time.time() + 1
        assert [o.id for o in await ledger.due_ops(now)] == [first, other_key], "the later op on k waits"
        await ledger.retry_later(first, "503 slow down", now + 3600)
        backing_off = await ledger.op(first)
        assert backing_off is not None and backing_off.error == "503 slow down", backing_off
        assert backing_off.next_at == now + 3600, backing_off
        assert [o.id for o in await ledger.due_ops(now)] == [other_key], "k's second op waits for its first"
        assert [o.id for o in await ledger.due_ops(now + 3601)] == [first, other_key], "due again at next_at"
        assert [o.id for o in await ledger.due_ops(now + 3601, limit=1)] == [first], "limit"
        assert await ledger.cancel_op(first)
        assert [o.id for o in await ledger.due_ops(now)] == [second, other_key], "then the next op on k"


async def check_outbox_failure_retry_cancel(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        op_id = await ledger.enqueue(ds, OpKind.PUT, "k", staged="/s/1")
        await ledger.fail_op(op_id, "conflict", "the key exists")
        failed = await ledger.op(op_id)
        assert failed is not None and (failed.state, failed.error_code, failed.error) == (
            OpState.FAILED,
            "conflict",
            "the key exists",
        ), failed
        assert failed.staged == "/s/1", "a failed put's staged body stays recorded for a retry"
        assert await ledger.due_ops(time.time() + 1) == [], "a failed op is not due"
        assert await ledger.backlog() == 0

        assert await ledger.retry_op(op_id), "a failed op can be retried"
        retried = await ledger.op(op_id)
        assert retried is not None and retried.state is OpState.PENDING and retried.error is None, retried
        assert not await ledger.retry_op(op_id), "only a failed op"
        assert [o.id for o in await ledger.due_ops(time.time() + 1)] == [op_id]

        assert await ledger.cancel_op(op_id), "a pending op can be cancelled"
        cancelled = await ledger.op(op_id)
        assert cancelled is not None and cancelled.state is OpState.CANCELLED, cancelled
        assert cancelled.staged is None and cancelled.error_code == "cancelled", cancelled
        assert not await ledger.cancel_op(op_id), "not twice"
        done_id = await ledger.enqueue(ds, OpKind.PUT, "j", staged="/s/2")
        started = await ledger.start_attempt(done_id)
        assert started is not None
        await ledger.complete_put(started, ds, ObjectInfo("j", 1, 1.0, "e"))
        assert not await ledger.cancel_op(done_id), "a done op cannot be cancelled"
        assert not await ledger.retry_op(done_id), "nor retried"


async def check_outbox_stale_copy_never_runs_twice(open_ledger: Opener) -> None:
    """The worker reads its due ops while an earlier execution of one may be finishing: a stale copy of a
    settled (or cancelled) op cannot start another attempt."""
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        op_id = await ledger.enqueue(ds, OpKind.PUT, "k", staged="/s/1")
        [stale] = await ledger.due_ops(time.time() + 1)
        first = await ledger.start_attempt(op_id)
        assert first is not None and first.attempts == 1
        await ledger.complete_put(first, ds, ObjectInfo("k", 1, 1.0, "e"))
        assert await ledger.start_attempt(stale.id) is None, "a settled op does not start again"
        settled = await ledger.op(op_id)
        assert settled is not None and settled.state is OpState.DONE and settled.attempts == 1, settled

        cancelled = await ledger.enqueue(ds, OpKind.DELETE, "k")
        assert await ledger.cancel_op(cancelled)
        assert await ledger.start_attempt(cancelled) is None, "a cancelled op does not start"


async def check_enqueue_deletes(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        ids = await ledger.enqueue_deletes(ds, [("f/a", "e1"), ("f/b", None)])
        ops = [await ledger.op(i) for i in ids]
        assert [(o.kind, o.key, o.if_match) for o in ops if o] == [
            (OpKind.DELETE, "f/a", "e1"),
            (OpKind.DELETE, "f/b", None),
        ], ops


# --------------------------------------------------------------------------- quotas: the counts they read


async def check_counts_exact_through_every_write_path(open_ledger: Opener) -> None:
    """A quota is checked against ``live_count``, read from counts the ledger keeps as it writes; they
    stay exact through every write: batches, upserts, tombstones, removals, renames, puts and deletes."""
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", ["a", "b", "c", "d"])
        other, _ = await fill(ledger, "other", ["a"])

        async def expect(live: int, tomb: int, what: str) -> None:
            got = await ledger.counts_by_state(ds)
            assert got == {"live": live, "tombstone": tomb}, f"{what}: {got}"
            assert await ledger.live_count(ds) == live, what
            assert (await ledger.overview())["photos"][0] == got, f"{what}: the overview agrees"

        await expect(4, 0, "after the first batch")
        await ledger.write_batch(ds, run, objs("a", "e"), [], Counts())
        await expect(5, 0, "an add of an existing key is an update")
        ids = await ids_by_key(ledger, ds)
        await ledger.set_state(ids["a"], ItemState.TOMBSTONE)
        await ledger.tombstone_many([ids["b"]])
        await expect(3, 2, "tombstones")
        await ledger.remove(None, [ids["b"], ids["c"]])
        await expect(2, 1, "removals of a tombstone and a live item")
        await ledger.write_batch(ds, run, objs("z"), [], Counts())
        fresh = await ledger.item(ds, "z")
        assert fresh is not None
        await ledger.rename(run, [(ids["d"], fresh.id, "z")], Counts(renamed=1))
        await expect(2, 1, "a rename")
        await put_done(ledger, ds, "a", 3)
        await expect(3, 0, "a put over a tombstone")
        await put_done(ledger, ds, "new", 3)
        await expect(4, 0, "a put of a new key")
        op_id = await ledger.enqueue(ds, OpKind.DELETE, "new")
        op = await ledger.start_attempt(op_id)
        assert op is not None
        await ledger.complete_delete(op, ds)
        await expect(3, 0, "a delete")
        assert await ledger.counts_by_state(other) == {"live": 1, "tombstone": 0}, "the other dataset is untouched"


# --------------------------------------------------------------------------- crashes and restarts


async def check_a_failed_batch_commits_nothing(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", ["a"])
        a = await ledger.item(ds, "a")
        assert a is not None
        broken = ObjectInfo("a", None, 1.0)  # type: ignore[arg-type]  # size is NOT NULL in every backend
        with pytest.raises(Exception, match=r"(?i)not.null"):
            await ledger.write_batch(ds, run, objs("b", "c"), [(a.id, broken)], Counts(listed=99, added=99))
        assert await keys_of(ledger, ds, None) == ["a"], "the adds of the failed batch were rolled back"
        assert await run_counts(ledger, run) == Counts(listed=1, added=1), "and so was its progress"
        assert await ledger.counts_by_state(ds) == {"live": 1, "tombstone": 0}, "and its counts"
        await ledger.write_batch(ds, run, objs("b"), [], Counts(listed=2, added=2))
        assert await keys_of(ledger, ds) == ["a", "b"], "the ledger takes writes after a failed one"
    async with opened(open_ledger) as ledger:
        assert await keys_of(ledger, ds, None) == ["a", "b"], "after a restart too, nothing of the failed batch"


async def check_reopen_sees_everything_committed(open_ledger: Opener) -> None:
    """Close and open again (a restart): every commit is there, and nothing else."""
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", ["a", "b", "c"])
        await ledger.finish_run(run, Counts(listed=3, added=3), RunStatus.OK, None)
        ids = await ids_by_key(ledger, ds)
        await ledger.set_state(ids["c"], ItemState.TOMBSTONE)
        await ledger.merge_meta(ids["a"], {"tag": "cat"})
        await ledger.merge_dataset_meta(ds, {"owner": "ml"})
        op_id = await ledger.enqueue(ds, OpKind.PUT, "d", staged="/s/d")
        await ledger.create_clone("cats", ds, "photos", "key < ?", ["b"], True)
        await ledger.mark_resync(["photos"], "lost commits")
        await ledger.inbox_put(ds, [("e", "created", None, "etag-e", 1, 5.0)])
    async with opened(open_ledger) as ledger:
        assert await ledger.find_dataset("photos") == ds
        items = {i.key: i for i in await ledger.items(ds, state=None)}
        assert {k: i.id for k, i in items.items()} == ids, "the same items with the same ids"
        assert items["c"].state is ItemState.TOMBSTONE and items["a"].meta == {"tag": "cat"}, items
        assert (await ledger.datasets_meta())["photos"] == {"owner": "ml"}
        last = await ledger.last_ok_run(ds)
        assert last is not None and last.id == run and last.counts == Counts(listed=3, added=3), last
        op = await ledger.op(op_id)
        assert op is not None and op.state is OpState.PENDING and op.staged == "/s/d", op
        assert await ledger.runtime_datasets() == {"cats": ("clone", "photos")}
        cats = await ledger.find_dataset("cats")
        assert cats is not None and await keys_of(ledger, cats) == ["a"]
        assert await ledger.resync_pending() == {"photos"}
        assert [e for _, e in await ledger.inbox_take(ds, 0, 10)] == [("e", "created", None, "etag-e", 1, 5.0)]


# --------------------------------------------------------------------------- metadata


async def check_item_and_dataset_meta(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds, _ = await fill(ledger, "photos", ["a"])
        await ledger.dataset_id("docs")
        a = await ledger.item(ds, "a")
        assert a is not None
        await ledger.merge_meta(a.id, {"tag": "cat", "n": 3, "nested": {"x": [1, "é"]}})
        await ledger.merge_meta(a.id, {"n": None, "more": True})
        got = await ledger.item(ds, "a")
        assert got is not None and got.meta == {"tag": "cat", "nested": {"x": [1, "é"]}, "more": True}, got
        assert got.updated is not None and a.updated is not None and got.updated >= a.updated, got
        assert [i.key for i in await ledger.items(ds, meta={"tag": "cat"})] == ["a"], "items by metadata"
        assert await ledger.items(ds, meta={"tag": "dog"}) == []

        merged = await ledger.merge_dataset_meta(ds, {"owner": "ml", "stage": "raw"})
        assert merged == {"owner": "ml", "stage": "raw"}, merged
        assert await ledger.merge_dataset_meta(ds, {"stage": None}) == {"owner": "ml"}, "None removes a name"
        assert await ledger.datasets_meta() == {"photos": {"owner": "ml"}, "docs": {}}


# --------------------------------------------------------------------------- runtime datasets


async def check_clone_pointers(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds, run = await fill(ledger, "photos", ["a", "b", "c"])
        ids = await ids_by_key(ledger, ds)
        await ledger.merge_meta(ids["a"], {"tag": "cat"})
        clone, n = await ledger.create_clone("sub", ds, "photos", "key <= ?", ["b"], True)
        assert n == 2, "the live items the query matched"
        assert await ledger.runtime_datasets() == {"sub": ("clone", "photos")}
        assert await ledger.find_dataset("sub") == clone
        pointers = {i.key: i for i in await ledger.items(clone)}
        assert set(pointers) == {"a", "b"} and pointers["a"].meta == {"tag": "cat"}, pointers
        assert await ledger.pointed(pointers["b"].id) == ("photos", "b"), "a pointer names its source item"
        assert await ledger.pointed(ids["b"]) is None, "a synced item is no pointer"

        await ledger.write_batch(ds, run, [], [(ids["a"], ObjectInfo("a", 99, 9.0, "changed"))], Counts())
        await ledger.remove(None, [ids["b"]])
        states = {i.key: i.state for i in await ledger.items(clone, state=None)}
        assert states == {"a": ItemState.STALE, "b": ItemState.ORPHANED}, f"the source's changes reach it: {states}"
        assert await ledger.pointed(pointers["b"].id) is None, "an orphan's source is gone"

        assert await ledger.drop_runtime("sub") == 2, "dropping a clone deletes its pointers"
        assert await ledger.runtime_datasets() == {} and await ledger.find_dataset("sub") is None
        assert await ledger.drop_runtime("photos") == -1, "a synced dataset is not dropped"
        assert await keys_of(ledger, ds) == ["a", "c"], "nor touched"


async def check_merge_datasets(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        one, _ = await fill(ledger, "one", ["x.jpg", "only1"])
        two, _ = await fill(ledger, "two", ["x.jpg", "only2"])
        sources = [(one, "one"), (two, "two")]
        folder, n = await ledger.create_merge("by-folder", sources, "folder")
        assert n == 4 and await keys_of(ledger, folder) == ["one/only1", "one/x.jpg", "two/only2", "two/x.jpg"]
        suffix, n = await ledger.create_merge("by-suffix", sources, "suffix")
        assert n == 4 and await keys_of(ledger, suffix) == ["only1", "only2", "x.jpg", "x~two.jpg"]
        merged, n = await ledger.create_merge("merged", sources, "merge")
        assert n == 3 and await keys_of(ledger, merged) == ["only1", "only2", "x.jpg"]
        assert await ledger.runtime_datasets() == {
            "by-folder": ("merge", "one,two"),
            "by-suffix": ("merge", "one,two"),
            "merged": ("merge", "one,two"),
        }


async def check_folders(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("rt")
        assert await ledger.add_folder(ds, "a/")
        assert not await ledger.add_folder(ds, "a/"), "once"
        assert await ledger.add_folder(ds, "a/b/") and await ledger.add_folder(ds, "c/")
        assert await ledger.empty_folders(ds, "") == ["a/", "a/b/", "c/"]
        assert await ledger.empty_folders(ds, "a/") == ["a/b/"], "under a parent, at any depth"
        await ledger.drop_folders(ds, "a/")
        assert await ledger.empty_folders(ds, "") == ["c/"]


# --------------------------------------------------------------------------- re-sync marks, the inbox, retention


async def check_resync_marks(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        assert await ledger.resync_pending() == set()
        await ledger.mark_resync(["a", "b"], "lost commits")
        await ledger.mark_resync(["a"], "again")
        assert await ledger.resync_pending() == {"a", "b"}
        await ledger.resync_done("a")
        assert await ledger.resync_pending() == {"b"}


async def check_event_inbox(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        other = await ledger.dataset_id("other")
        events = [(f"k{i}", "created", f"t{i}", f"e{i}", i, float(i)) for i in range(5)]
        await ledger.inbox_put(ds, events)
        await ledger.inbox_put(other, [("o", "removed", None, None, None, None)])
        taken = await ledger.inbox_take(ds, 0, 3)
        assert [e for _, e in taken] == events[:3], "oldest first, this dataset only, at most limit"
        rest = await ledger.inbox_take(ds, taken[-1][0], 10)
        assert [e for _, e in rest] == events[3:], "resumed after the last id taken"
        await ledger.inbox_done([i for i, _ in taken])
        assert [e for _, e in await ledger.inbox_take(ds, 0, 10)] == events[3:], "done entries are forgotten"
        assert [e for _, e in await ledger.inbox_take(other, 0, 10)] == [("o", "removed", None, None, None, None)]
        # a cap counts this dataset's entries only, and refuses a whole post that would pass it
        assert await ledger.inbox_put(other, [("p", "created", None, None, None, None)], cap=2)
        assert not await ledger.inbox_put(other, [("q", "created", None, None, None, None)], cap=2)
        assert await ledger.inbox_put(ds, events[:1], cap=3)
        assert not await ledger.inbox_put(ds, events[:2], cap=4), "3 held + 2 would pass 4: none kept"
        assert [e[0] for _, e in await ledger.inbox_take(ds, 0, 10)] == ["k3", "k4", "k0"]
        assert [e[0] for _, e in await ledger.inbox_take(other, 0, 10)] == ["o", "p"]


async def check_retention(open_ledger: Opener) -> None:
    async with opened(open_ledger) as ledger:
        ds = await ledger.dataset_id("photos")
        runs = []
        for status in (RunStatus.OK, RunStatus.FAILED, RunStatus.FAILED, RunStatus.FAILED):
            runs.append(await ledger.begin_run(ds, False))
            await ledger.finish_run(runs[-1], Counts(), status, None)
        running = await ledger.begin_run(ds, False)
        assert await ledger.prune_runs(ds, keep=1, before=0.0) == 3, "all but the newest and the newest ok"
        assert [r.id for r in await ledger.runs(ds)] == [running, runs[0]], "a running run always stays"

        ops = [await ledger.enqueue(ds, OpKind.DELETE, f"k{i}") for i in range(3)]
        for op_id in ops[:2]:
            assert await ledger.cancel_op(op_id)
        assert await ledger.prune_ops(ds, keep=1, before=0.0) == 1, "finished ops past the newest kept"
        assert [o.id for o in await ledger.ops(dataset_id=ds)] == ops[1:], "a pending op always stays"


async def check_api_links_are_never_queued_for_enrichment(open_ledger: Opener) -> None:
    """An API link has no object in the bucket to read; an ordinary item beside it is queued."""
    from bucketsync.enrich.queue import EnrichQueue

    async with opened(open_ledger) as ledger:
        ds, _run = await fill(ledger, "photos", ["a.jpg"])
        queue = EnrichQueue(ledger)
        await queue.set_datasets([ds], [])
        assert await ledger.add_links(ds, [("linked.jpg", "https://example.org/x.jpg", "image/jpeg", None)]) == set()
        await fill(ledger, "photos", ["b.jpg"])
        ids = await ids_by_key(ledger, ds)
        found = await queue.of_items(list(ids.values()))
        assert ids["linked.jpg"] not in found
        assert found[ids["b.jpg"]].state == "pending"
        await ledger.rekey(ds, [(ids["linked.jpg"], "moved.jpg")])  # a move updates its key: still not queued
        assert ids["linked.jpg"] not in await queue.of_items([ids["linked.jpg"]])


CHECKS: list[Check] = [
    check_datasets,
    check_write_batch_and_reads,
    check_updates_keep_the_id,
    check_adding_an_existing_key_updates_it,
    check_rows_for,
    check_live_under,
    check_snapshot_is_a_consistent_view,
    check_tombstones,
    check_remove,
    check_rename_keeps_id_and_metadata,
    check_adopt_and_rekey,
    check_runs_history,
    check_fail_stale_runs,
    check_overview,
    check_outbox_lifecycle,
    check_outbox_one_op_per_key_at_a_time,
    check_outbox_failure_retry_cancel,
    check_outbox_stale_copy_never_runs_twice,
    check_enqueue_deletes,
    check_counts_exact_through_every_write_path,
    check_a_failed_batch_commits_nothing,
    check_reopen_sees_everything_committed,
    check_item_and_dataset_meta,
    check_clone_pointers,
    check_merge_datasets,
    check_folders,
    check_resync_marks,
    check_event_inbox,
    check_retention,
    check_api_links_are_never_queued_for_enrichment,
]
