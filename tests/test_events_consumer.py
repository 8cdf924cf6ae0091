"""The events consumer: the pure sift and decide, and ``Consumer.step`` on a real folder and ledger.

``step`` is what the daemon's consumer loop calls for each group of batches; calling it
directly makes every case deterministic (no watcher, no timing): a removal waits for
the rename window unless the step is ``final``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bucketsync import metrics
from bucketsync.config import DatasetConfig
from bucketsync.core.keys import KeyFilter
from bucketsync.core.model import Indexed, ItemState, ObjectInfo
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores.local import LocalStore
from bucketsync.upstream.events import Batch, Event, EventKind, EventSource, SourceFailed
from bucketsync.upstream.events.consumer import Consumer, Tokens, decide, sift
from bucketsync.upstream.sync import SyncLoop

CHANGED, REMOVED = EventKind.CHANGED, EventKind.REMOVED
DS = "ev"


# ---------------------------------------------------------------------- sift and decide (pure)


def test_sift_drops_older_tokens_filtered_keys_and_collapses_duplicates() -> None:
    tokens = Tokens()
    keep = KeyFilter([], ["*.tmp"])
    first = sift([Event("a", CHANGED, "0002", at=5.0), Event("a", CHANGED, "0002", at=3.0)], tokens, keep)
    assert first.keys == {"a": 3.0} and not first.dropped  # a duplicate is no stale event: one HEAD
    later = sift(
        [
            Event("a", REMOVED, "0001"),  # older than the last applied: no HEAD
            Event("a", REMOVED, "0003"),
            Event(".bucketsync/thumb.png", CHANGED),  # the hidden folder
            Event("folder/", CHANGED),  # a folder marker
            Event("x.tmp", CHANGED),  # excluded
            Event("b", CHANGED),  # no token: always HEADed
        ],
        tokens,
        keep,
    )
    assert later.keys == {"a": None, "b": None}
    assert dict(later.dropped) == {"stale": 1, "filtered": 3}


def test_tokens_are_bounded_and_forget_the_least_recent_key() -> None:
    tokens = Tokens(limit=2)
    for key in ("a", "b", "c"):
        tokens.saw(Event(key, CHANGED, "0005"))
    assert not tokens.stale(Event("a", CHANGED, "0001"))  # forgotten: costs a HEAD, never wrong
    assert tokens.stale(Event("c", CHANGED, "0001"))


def _row(id: int, key: str, size: int = 1, etag: str = "e", state: ItemState = ItemState.LIVE) -> Indexed:
    return Indexed(id, key, size, 1.0, etag, None, state)


def test_decide_maps_heads_against_rows() -> None:
    heads = {
        "new": ObjectInfo("new", 1, 1.0, "e"),
        "same": ObjectInfo("same", 1, 1.0, "e"),
        "grown": ObjectInfo("grown", 2, 1.0, "f"),
        "tomb": ObjectInfo("tomb", 9, 1.0, "g"),
        "gone": None,
        "gone-tomb": None,
        "never": None,
    }
    rows = {
        "same": _row(1, "same"),
        "grown": _row(2, "grown"),
        "tomb": _row(3, "tomb", state=ItemState.TOMBSTONE),
        "gone": _row(4, "gone"),
        "gone-tomb": _row(5, "gone-tomb", state=ItemState.TOMBSTONE),
    }
    d = decide(heads, rows)
    assert [o.key for o in d.adds] == ["new"]
    assert [(i, o.key) for i, o in d.updates] == [(2, "grown")]
    assert [(i, o.key) for i, o in d.keep_current] == [(3, "tomb")]  # info kept current, still a tombstone
    assert [r.id for r in d.removals] == [4] and [r.id for r in d.purges] == [5]
    assert d.unchanged == 1 and d.unknown_gone == ["never"]


# ---------------------------------------------------------------------- Consumer.step


class Acks:
    def __init__(self) -> None:
        self.done: list[str] = []

    def batch(self, name: str, *events: Event) -> Batch:
        async def ack() -> None:
            self.done.append(name)

        return Batch(list(events), ack=ack)


def _never() -> EventSource:
    raise SourceFailed("not used")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


async def _consumer(root: Path, ledger: Ledger, **config: object) -> tuple[Consumer, SyncLoop]:
    loop = SyncLoop(DS, DatasetConfig(driver="d", sync="events", **config), LocalStore(str(root)), ledger)  # type: ignore[arg-type]
    await loop.run_once()
    return Consumer(loop, await ledger.dataset_id(DS), _never), loop


async def _keys(ledger: Ledger, state: ItemState | None = ItemState.LIVE) -> dict[str, int]:
    return {i.key: i.id for i in await ledger.items(await ledger.dataset_id(DS), state=state)}


def write(root: Path, key: str, data: str = "x") -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)


async def test_adds_and_updates_commit_in_an_events_run_and_ack_after(root: Path, ledger: Ledger) -> None:
    c, _ = await _consumer(root, ledger)
    acks = Acks()
    write(root, "a.txt")
    write(root, "b.txt", "bb")
    await c.step([acks.batch("1", Event("a.txt", CHANGED), Event("b.txt", CHANGED), Event("b.txt", CHANGED))])
    assert set(await _keys(ledger)) == {"a.txt", "b.txt"} and acks.done == ["1"]
    write(root, "a.txt", "longer")
    await c.step([acks.batch("2", Event("a.txt", CHANGED))], final=True)
    item = await ledger.item(await ledger.dataset_id(DS), "a.txt")
    assert item is not None and item.size == 6
    (run, *_) = [r for r in await ledger.runs(await ledger.dataset_id(DS)) if r.kind == "events"]
    assert (run.counts.added, run.counts.modified, run.status) == (2, 1, "ok")


async def test_a_removal_is_acknowledged_only_once_it_is_committed(root: Path, ledger: Ledger) -> None:
    write(root, "gone.txt")
    write(root, "stay.txt")
    c, _ = await _consumer(root, ledger)
    acks = Acks()
    (root / "gone.txt").unlink()
    await c.step([acks.batch("del", Event("gone.txt", REMOVED))])
    assert "gone.txt" in await _keys(ledger) and acks.done == []  # waits for the rename window
    write(root, "late.txt")
    await c.step([acks.batch("later", Event("late.txt", CHANGED))])
    assert acks.done == []  # in order: nothing after an unsettled batch either
    await c.step([], final=True)
    assert set(await _keys(ledger)) == {"stay.txt", "late.txt"} and acks.done == ["del", "later"]


@pytest.mark.parametrize("order", ["delete first", "create first"])
async def test_a_move_within_the_window_is_a_rename_that_keeps_the_id(root: Path, ledger: Ledger, order: str) -> None:
    write(root, "old/name.txt", "payload")
    write(root, "other.txt")
    c, _ = await _consumer(root, ledger)
    before = (await _keys(ledger))["old/name.txt"]
    os.rename(root / "old" / "name.txt", root / "new.txt")  # same inode and mtime: same etag and size
    events = [Event("old/name.txt", REMOVED), Event("new.txt", CHANGED)]
    if order == "create first":
        events.reverse()
    acks = Acks()
    for i, ev in enumerate(events):
        await c.step([acks.batch(str(i), ev)])
    await c.step([], final=True)
    assert await _keys(ledger) == {"new.txt": before, "other.txt": (await _keys(ledger))["other.txt"]}
    runs = [r for r in await ledger.runs(await ledger.dataset_id(DS)) if r.kind == "events"]
    assert sum(r.counts.renamed for r in runs) == 1 and sum(r.counts.added for r in runs) == 0


async def test_a_tombstone_never_comes_back_and_goes_with_its_object(root: Path, ledger: Ledger) -> None:
    write(root, "t.txt")
    c, _ = await _consumer(root, ledger)
    ds_id = await ledger.dataset_id(DS)
    await ledger.set_state((await _keys(ledger))["t.txt"], ItemState.TOMBSTONE)
    write(root, "t.txt", "rewritten")
    await c.step([Batch([Event("t.txt", CHANGED)])], final=True)
    item = await ledger.item(ds_id, "t.txt")
    assert item is not None and item.state == ItemState.TOMBSTONE and item.size == 9
    (root / "t.txt").unlink()
    await c.step([Batch([Event("t.txt", REMOVED)])], final=True)
    assert await ledger.item(ds_id, "t.txt") is None


async def test_a_removed_folder_removes_the_items_under_it(root: Path, ledger: Ledger) -> None:
    for k in ("dir/a", "dir/sub/b", "dirt", "e", "f"):
        write(root, k)
    c, _ = await _consumer(root, ledger)
    for k in ("dir/sub/b", "dir/a"):
        (root / k).unlink()
    (root / "dir" / "sub").rmdir()
    (root / "dir").rmdir()
    await c.step([Batch([Event("dir", REMOVED)])], final=True)  # a watcher may report only the folder
    assert set(await _keys(ledger)) == {"dirt", "e", "f"}


async def test_a_burst_of_removals_past_the_guard_is_held_for_a_reconcile(root: Path, ledger: Ledger) -> None:
    for i in range(10):
        write(root, f"f{i}")
    c, loop = await _consumer(root, ledger, max_delete_ratio=0.5)
    held = metrics.EVENTS_DROPPED.labels(DS, "guard")._value.get()
    for i in range(6):
        (root / f"f{i}").unlink()
    acks = Acks()
    await c.step([acks.batch("burst", *(Event(f"f{i}", REMOVED) for i in range(6)))], final=True)
    assert len(await _keys(ledger)) == 10  # nothing removed
    assert loop.wake.is_set()  # a reconcile is asked for
    assert metrics.EVENTS_DROPPED.labels(DS, "guard")._value.get() == held + 6
    assert acks.done == ["burst"]  # handed to the reconcile, which lists everything
    # ... and the reconcile decides under the same guard: it refuses too (unless forced)
    result = await loop.run_once()
    assert str(result.status) == "aborted" and len(await _keys(ledger)) == 10
    forced = await loop.run_once(force=True)
    assert forced.counts.removed == 6


async def test_quota_and_in_flight_keys_are_left_alone(root: Path, ledger: Ledger) -> None:
    write(root, "a")
    c, loop = await _consumer(root, ledger, quota=2)
    for k in ("b", "c", "d"):
        write(root, k)
    loop.in_flight.add("d")  # the outbox writes it now and indexes it itself
    await c.step([Batch([Event(k, CHANGED) for k in ("b", "c", "d")])], final=True)
    assert set(await _keys(ledger)) == {"a", "b"}


async def test_a_failed_head_asks_for_a_reconcile(root: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    c, loop = await _consumer(root, ledger)
    write(root, "a")

    async def broken(key: str) -> ObjectInfo:
        raise OSError("disk on fire")

    monkeypatch.setattr(c.store, "head", broken)
    loop.wake.clear()
    await c.step([Batch([Event("a", CHANGED)])], final=True)
    assert loop.wake.is_set() and await _keys(ledger) == {}


async def test_run_falls_back_when_the_source_fails_and_returns_when_it_delivers(root: Path, ledger: Ledger) -> None:
    """A source that fails degrades the dataset (poll at interval, a listing now); the next one restores events."""
    import asyncio

    loop = SyncLoop(DS, DatasetConfig(driver="d", sync="events", interval=5.0), LocalStore(str(root)), ledger)
    states: list[str | None] = []
    stop = asyncio.Event()
    opened = 0

    class Once:
        name = "test"

        def __init__(self, fail: bool) -> None:
            self.fail = fail

        async def _gen(self) -> object:
            if self.fail:
                raise SourceFailed("queue gone")
            yield Batch([])
            stop.set()
            await asyncio.Event().wait()  # a live source delivers forever

        def batches(self) -> object:
            return self._gen()

        async def aclose(self) -> None:
            return None

    def source() -> EventSource:
        nonlocal opened
        opened += 1
        return Once(fail=opened == 1)  # type: ignore[return-value]

    def on_state(s: str | None) -> None:
        states.append(s)
        if s is not None:
            assert loop.events_degraded and loop.period == 5.0 and loop.wake.is_set()

    c = Consumer(loop, await ledger.dataset_id(DS), source, on_state=on_state)
    import bucketsync.upstream.events.consumer as mod

    mod.RETRY_BASE, saved = 0.01, mod.RETRY_BASE
    try:
        await asyncio.wait_for(c.run(stop), timeout=30)
    finally:
        mod.RETRY_BASE = saved
    assert states[0] is not None and "queue gone" in states[0] and states[-1] is None
    assert not loop.events_degraded and loop.period == 3600.0


async def test_applying_events_is_no_run_in_progress(root: Path, ledger: Ledger) -> None:
    """The consumer excludes runs while it applies a batch, but the API must not answer 409 run_in_progress."""
    _, loop = await _consumer(root, ledger)
    async with loop.lock:
        assert not loop.busy


async def test_a_reconcile_never_renames_an_item_events_added_onto_itself(root: Path, ledger: Ledger) -> None:
    """An item first seen by events (after the last listing) and gone now is a removal under the guard."""
    for k in ("a", "b", "c"):
        write(root, k)
    c, loop = await _consumer(root, ledger, max_delete_ratio=0.3)
    write(root, "new", "payload")
    await c.step([Batch([Event("new", CHANGED)])], final=True)
    (root / "new").unlink()
    result = await loop.run_once()  # the events of the delete were lost: the reconcile finds it
    assert (str(result.status), result.counts.renamed, result.counts.removed) == ("ok", 0, 1)
    assert set(await _keys(ledger)) == {"a", "b", "c"}
    (root / "a").unlink()
    (root / "b").unlink()
    blocked = await loop.run_once()  # 2 of 3: past the guard, and nothing slips through as a "rename"
    assert (str(blocked.status), blocked.counts.renamed) == ("aborted", 0) and len(await _keys(ledger)) == 3
