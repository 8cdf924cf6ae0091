"""Downstream in-process: an Agent on a real ledger file, ``Downstream(in_process=True)``, memory and local stores.

Each test says what a user does (put, delete, restore, metadata) and checks both
sides: what the ledger says and what storage really holds.
"""

from __future__ import annotations

import ast
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import bucketsync
from bucketsync.agent import Agent
from bucketsync.config import Settings
from bucketsync.core.errors import AlreadyExists, InvalidKey, NotFound, PreconditionFailed, Refused
from bucketsync.core.model import CREATE, OVERWRITE, ItemState, OpKind, OpState, PutMode, RunStatus
from bucketsync.downstream.ops import Downstream, Outcome
from bucketsync.downstream.outbox import Outbox
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores import Store, one_chunk, read_all
from bucketsync.stores.memory import MemoryStore
from bucketsync.upstream.sync import SyncLoop

SRC = Path(bucketsync.__file__).resolve().parent

#: dataset -> (driver, dataset options); every dataset has its own driver (location)
DATASETS: dict[str, tuple[str, dict[str, Any]]] = {
    "main": ("keep", {}),  # allow_delete off: deletes are tombstones
    "del": ("del", {}),  # allow_delete on
    "ro": ("ro", {"read_only": True}),
    "q": ("q", {"quota": 2}),
}
ALLOW_DELETE = {"keep": False, "del": True, "ro": True, "q": False}


@dataclass
class Env:
    agent: Agent
    down: Downstream
    kind: str
    roots: dict[str, Path]  # local driver -> folder (empty for memory)

    @property
    def ledger(self) -> Ledger:
        assert self.agent.ledger is not None
        return self.agent.ledger

    @property
    def outbox(self) -> Outbox:
        return self.agent.outbox

    def store(self, dataset: str) -> Store:
        return self.agent.stores[self.agent.settings.datasets[dataset].driver]

    def loop(self, dataset: str) -> SyncLoop:
        return self.agent.loops[dataset]

    async def ds_id(self, dataset: str) -> int:
        return await self.ledger.dataset_id(dataset)

    async def keys(self, dataset: str) -> set[str]:
        return {o.key async for o in self.store(dataset).list()}

    async def read(self, dataset: str, key: str) -> bytes | None:
        try:
            return await read_all(self.store(dataset), key)
        except NotFound:
            return None

    async def foreign_put(self, dataset: str, key: str, data: bytes) -> None:
        """Somebody else writes the object, behind bucketsync's back (no ledger, no outbox)."""
        if self.kind == "local":
            path = self.roots[self.agent.settings.datasets[dataset].driver].joinpath(*key.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            await self.store(dataset).put(key, one_chunk(data), OVERWRITE)

    async def item_state(self, dataset: str, key: str) -> ItemState | None:
        item = await self.ledger.item(await self.ds_id(dataset), key)
        return None if item is None else item.state


@pytest.fixture(params=["memory", "local"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    kind: str = request.param
    tag = uuid.uuid4().hex[:12]
    roots: dict[str, Path] = {}
    drivers: dict[str, dict[str, Any]] = {}
    for name, allow in ALLOW_DELETE.items():
        if kind == "local":
            roots[name] = tmp_path / "storage" / name
            roots[name].mkdir(parents=True)
            url = roots[name].as_uri()
        else:
            url = f"mem://{tag}-{name}/some/prefix/"
        drivers[name] = {"url": url, "allow_delete": allow}
    settings = Settings(
        agent={"ledger": str(tmp_path / "var" / "ledger.db")},
        drivers=drivers,
        datasets={ds: {"driver": drv, "sync": "manual", **opts} for ds, (drv, opts) in DATASETS.items()},
    )
    try:
        async with Agent(settings) as agent:
            yield Env(agent, Downstream(agent, agent.outbox, in_process=True), kind, roots)
    finally:
        for name in ALLOW_DELETE:
            MemoryStore.drop(f"{tag}-{name}")


async def body(data: bytes) -> AsyncIterator[bytes]:
    """A request body in two chunks, as an upload streams in."""
    yield data[: len(data) // 2]
    yield data[len(data) // 2 :]


# ---------------------------------------------------------------------- put


async def test_put_creates_the_object_and_the_item(env: Env) -> None:
    out = await env.down.put("main", "a/b.txt", body(b"hello world"), content_type="text/plain")
    assert out.result == "created"
    assert out.item is not None and out.op is not None
    assert out.item.key == "a/b.txt" and out.item.size == 11 and out.item.state is ItemState.LIVE
    assert out.item.content_type == "text/plain"
    assert out.op.state is OpState.DONE and out.op.kind is OpKind.PUT
    assert await env.read("main", "a/b.txt") == b"hello world"
    head = await env.store("main").head("a/b.txt")
    assert out.item.etag == head.etag  # indexed as storage has it
    if env.kind == "local":
        assert (env.roots["keep"] / "a" / "b.txt").read_bytes() == b"hello world"
        assert not list((env.outbox.staging).glob("*")), "the staged body is removed once the op is done"


async def test_second_create_only_put_conflicts_and_leaves_storage_alone(env: Env) -> None:
    first = await env.down.put("main", "k.bin", body(b"first"))
    with pytest.raises(AlreadyExists):
        await env.down.put("main", "k.bin", body(b"second"))
    assert await env.read("main", "k.bin") == b"first"
    item = await env.ledger.item(await env.ds_id("main"), "k.bin")
    assert item is not None and first.item is not None
    assert (item.id, item.etag, item.size) == (first.item.id, first.item.etag, 5)


async def test_overwrite_replaces_and_keeps_the_item_id_and_metadata(env: Env) -> None:
    first = await env.down.put("main", "k.bin", body(b"first"))
    await env.down.patch_meta("main", "k.bin", {"owner": "ann"})
    out = await env.down.put("main", "k.bin", body(b"second version"), overwrite=True)
    assert out.result == "overwritten"
    assert out.item is not None and first.item is not None
    assert out.item.id == first.item.id
    assert out.item.size == len(b"second version")
    assert out.item.meta == {"owner": "ann"}
    assert await env.read("main", "k.bin") == b"second version"


async def test_overwrite_of_an_object_changed_behind_our_back_fails_and_keeps_theirs(env: Env) -> None:
    """Invariant 7: never silently overwrite an object that changed since it was indexed."""
    await env.down.put("main", "k.bin", body(b"ours"))
    await env.foreign_put("main", "k.bin", b"theirs, longer")
    with pytest.raises(PreconditionFailed):
        await env.down.put("main", "k.bin", body(b"ours again"), overwrite=True)
    assert await env.read("main", "k.bin") == b"theirs, longer"
    ops = await env.ledger.ops(state=OpState.FAILED)
    if ops:  # refused by the outbox (if-match) rather than by the reconcile in Downstream
        assert [(o.key, o.error_code) for o in ops] == [("k.bin", "precondition_failed")]


async def test_put_over_a_key_nobody_indexed_yet_is_create_only(env: Env) -> None:
    """An object already in storage but not in the ledger is not overwritten by a plain put."""
    await env.foreign_put("main", "there.txt", b"already there")
    with pytest.raises(AlreadyExists):
        await env.down.put("main", "there.txt", body(b"mine"))
    assert await env.read("main", "there.txt") == b"already there"
    assert await env.ledger.item(await env.ds_id("main"), "there.txt") is None


# Control characters other than NUL are keys like any other (issue 13.15); see test_keys.py.
@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a\x00b", "k" * 1025, ".bucketsync/x", "a//b", "a/./b"])
async def test_bad_keys_are_refused_before_anything_is_written(env: Env, key: str) -> None:
    with pytest.raises(InvalidKey):
        await env.down.put("main", key, body(b"x"))
    assert await env.keys("main") == set()
    assert await env.ledger.ops() == []
    if env.kind == "local":
        written = [p for p in env.roots["keep"].parent.parent.rglob("*") if p.is_file() and "var" not in p.parts]
        assert written == []


async def test_a_1024_byte_key_is_fine(env: Env) -> None:
    key = "/".join(["d" * 200] * 5) + "/" + "f" * 19  # 5 * 201 + 19 = 1024 bytes
    assert len(key.encode()) == 1024
    out = await env.down.put("main", key, body(b"x"))
    assert out.result == "created"
    assert await env.keys("main") == {key}


# ---------------------------------------------------------------------- delete and restore


async def test_delete_without_allow_delete_tombstones_and_sync_never_brings_it_back(env: Env) -> None:
    """Invariant 3."""
    await env.down.put("main", "t.txt", body(b"keep my bytes"))
    out = await env.down.delete("main", "t.txt")
    assert out.result == "tombstoned"
    assert out.op is None  # nothing goes to storage
    assert out.item is not None and out.item.state is ItemState.TOMBSTONE
    assert await env.read("main", "t.txt") == b"keep my bytes"
    assert [o.kind for o in await env.ledger.ops()] == [OpKind.PUT]
    ds = await env.ds_id("main")
    assert [i.key for i in await env.ledger.items(ds)] == []
    assert [i.key for i in await env.ledger.items(ds, state=ItemState.TOMBSTONE)] == ["t.txt"]

    # Deleting again is harmless.
    assert (await env.down.delete("main", "t.txt")).result == "tombstoned"

    # Upstream runs see the object, unchanged and then changed: still a tombstone.
    for change in (None, b"changed behind our back"):
        if change is not None:
            await env.foreign_put("main", "t.txt", change)
        result = await env.loop("main").run_once()
        assert result.status is RunStatus.OK, result.error
        assert result.counts.added == 0
        assert await env.item_state("main", "t.txt") is ItemState.TOMBSTONE

    out = await env.down.restore("main", "t.txt")
    assert out.result == "restored"
    assert out.item is not None and out.item.state is ItemState.LIVE
    assert out.item.size == len(b"changed behind our back")  # the tombstone's info was kept current
    assert (await env.down.restore("main", "t.txt")).result == "unchanged"
    assert await env.read("main", "t.txt") == b"changed behind our back"


async def test_put_over_a_tombstone_needs_overwrite_and_brings_the_item_back(env: Env) -> None:
    first = await env.down.put("main", "t.txt", body(b"one"))
    await env.down.delete("main", "t.txt")
    with pytest.raises(AlreadyExists):  # the object is still there
        await env.down.put("main", "t.txt", body(b"two"))
    assert await env.read("main", "t.txt") == b"one"
    out = await env.down.put("main", "t.txt", body(b"two"), overwrite=True)
    assert out.result == "overwritten"
    assert out.item is not None and first.item is not None
    assert (out.item.id, out.item.state, out.item.size) == (first.item.id, ItemState.LIVE, 3)
    assert await env.read("main", "t.txt") == b"two"


async def test_restore_respects_the_quota(env: Env) -> None:
    """A restored tombstone is an item again: past the quota it is refused like a new one."""
    await env.down.put("q", "1", body(b"one"))
    await env.down.put("q", "2", body(b"two"))
    await env.down.delete("q", "2")  # a tombstone frees a place ...
    await env.down.put("q", "3", body(b"three"))  # ... which a new item takes
    with pytest.raises(Refused) as err:
        await env.down.restore("q", "2")
    assert err.value.reason == "quota"
    assert await env.ledger.live_count(await env.ds_id("q")) == 2
    assert await env.item_state("q", "2") is ItemState.TOMBSTONE


async def test_delete_with_allow_delete_removes_object_and_item(env: Env) -> None:
    await env.down.put("del", "gone.txt", body(b"bye"))
    await env.down.put("del", "stays.txt", body(b"hi"))
    out = await env.down.delete("del", "gone.txt")
    assert out.result == "deleted"
    assert out.op is not None and out.op.state is OpState.DONE and out.op.kind is OpKind.DELETE
    assert await env.keys("del") == {"stays.txt"}
    assert await env.ledger.item(await env.ds_id("del"), "gone.txt") is None
    with pytest.raises(NotFound):
        await env.down.delete("del", "gone.txt")
    if env.kind == "local":
        assert not (env.roots["del"] / "gone.txt").exists()


async def test_delete_of_an_object_changed_behind_our_back_fails_and_keeps_it(env: Env) -> None:
    await env.down.put("del", "x.txt", body(b"ours"))
    await env.foreign_put("del", "x.txt", b"theirs now")
    with pytest.raises(PreconditionFailed):
        await env.down.delete("del", "x.txt")
    assert await env.read("del", "x.txt") == b"theirs now"
    assert await env.item_state("del", "x.txt") is ItemState.LIVE


async def test_delete_and_restore_of_unknown_items_are_not_found(env: Env) -> None:
    with pytest.raises(NotFound):
        await env.down.delete("main", "nope")
    with pytest.raises(NotFound):
        await env.down.restore("main", "nope")


async def test_a_queued_delete_on_a_driver_without_allow_delete_never_reaches_storage(env: Env) -> None:
    """Invariant 2 at execution time: the outbox asks the gate again right before storage."""
    await env.down.put("main", "v.txt", body(b"precious"))
    ds = await env.ds_id("main")
    op_id = await env.ledger.enqueue(ds, OpKind.DELETE, "v.txt")
    op = await env.ledger.op(op_id)
    assert op is not None
    await env.outbox.execute(op)
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.FAILED and op.error_code == "allow_delete_off"
    assert await env.read("main", "v.txt") == b"precious"
    assert await env.item_state("main", "v.txt") is ItemState.LIVE


# ---------------------------------------------------------------------- read_only and quota


async def test_read_only_dataset_refuses_put_and_delete_but_not_metadata(env: Env) -> None:
    await env.foreign_put("ro", "r.txt", b"read me")
    assert (await env.loop("ro").run_once()).counts.added == 1
    calls: list[Callable[[], Awaitable[Outcome]]] = [
        lambda: env.down.put("ro", "new.txt", body(b"x")),
        lambda: env.down.put("ro", "r.txt", body(b"x"), overwrite=True),
        lambda: env.down.delete("ro", "r.txt"),
    ]
    for call in calls:
        with pytest.raises(Refused) as err:
            await call()
        assert err.value.reason == "read_only"
    assert await env.keys("ro") == {"r.txt"}
    assert await env.read("ro", "r.txt") == b"read me"
    assert await env.ledger.ops() == []
    item = await env.ledger.item(await env.ds_id("ro"), "r.txt")
    assert item is not None and item.state is ItemState.LIVE and item.meta == {}
    # Metadata is catalog-only: read_only (no writes to storage) does not cover it.
    out = await env.down.patch_meta("ro", "r.txt", {"a": "b"})
    assert out.result == "updated" and out.op is None
    assert await env.read("ro", "r.txt") == b"read me"
    assert await env.ledger.ops() == []
    item = await env.ledger.item(await env.ds_id("ro"), "r.txt")
    assert item is not None and item.meta == {"a": "b"}


async def test_quota_refuses_new_items_but_not_overwrites(env: Env) -> None:
    await env.down.put("q", "1", body(b"one"))
    await env.down.put("q", "2", body(b"two"))
    with pytest.raises(Refused) as err:
        await env.down.put("q", "3", body(b"three"))
    assert err.value.reason == "quota"
    assert "quota" in str(err.value)
    assert await env.keys("q") == {"1", "2"}
    assert (await env.down.put("q", "1", body(b"one again"), overwrite=True)).result == "overwritten"
    # A tombstone frees a place.
    await env.down.delete("q", "2")
    assert (await env.down.put("q", "3", body(b"three"))).result == "created"


async def test_quota_is_checked_again_when_queued_puts_execute(env: Env) -> None:
    """Two puts queued while there was room for one: the second is refused at execution."""
    await env.down.put("q", "1", body(b"one"))
    ds = await env.ds_id("q")
    ops = []
    for key in ("2", "3"):
        staged, sha, _ = await env.outbox.stage(body(key.encode()))
        ops.append(await env.ledger.enqueue(ds, OpKind.PUT, key, create_only=True, staged=staged, sha256=sha))
    for op_id in ops:
        assert (await env.outbox.settle(op_id)) is not None
    states = [(o.key, o.state, o.error_code) for o in await env.ledger.ops() if o.key in ("2", "3")]
    assert states == [("2", OpState.DONE, None), ("3", OpState.FAILED, "quota")]
    assert await env.keys("q") == {"1", "2"}


async def test_upstream_sync_adds_only_up_to_the_quota_and_says_so(env: Env) -> None:
    for i in range(5):
        await env.foreign_put("q", f"f{i}", b"x")
    result = await env.loop("q").run_once()
    assert result.counts.added == 2
    assert result.error is not None and "quota" in result.error
    assert await env.ledger.live_count(await env.ds_id("q")) == 2


# ---------------------------------------------------------------------- metadata


async def test_patch_merges_and_null_removes(env: Env) -> None:
    await env.down.put("main", "m.txt", body(b"m"))
    await env.down.put("main", "n.txt", body(b"n"))
    out = await env.down.patch_meta("main", "m.txt", {"color": "red", "n": 3, "ok": True})
    assert out.result == "updated" and out.item is not None
    assert out.item.meta == {"color": "red", "n": 3, "ok": True}
    out = await env.down.patch_meta("main", "m.txt", {"n": None, "size": "L"})
    assert out.item is not None and out.item.meta == {"color": "red", "ok": True, "size": "L"}
    ds = await env.ds_id("main")
    assert [i.key for i in await env.ledger.items(ds, meta={"color": "red"})] == ["m.txt"]
    assert await env.read("main", "m.txt") == b"m"  # metadata never touches the object


@pytest.mark.parametrize("patch", [{"bad name": "x"}, {"": "x"}, {"k": [1]}, {"k": {"a": 1}}, {"x" * 65: "v"}])
async def test_bad_metadata_is_refused(env: Env, patch: dict[str, Any]) -> None:
    await env.down.put("main", "m.txt", body(b"m"))
    with pytest.raises(ValueError):
        await env.down.patch_meta("main", "m.txt", patch)
    item = await env.ledger.item(await env.ds_id("main"), "m.txt")
    assert item is not None and item.meta == {}


async def test_patch_of_a_tombstone_is_not_found(env: Env) -> None:
    await env.down.put("main", "m.txt", body(b"m"))
    await env.down.delete("main", "m.txt")
    with pytest.raises(NotFound):
        await env.down.patch_meta("main", "m.txt", {"a": "b"})


# ---------------------------------------------------------------------- upstream meets downstream


async def test_upstream_run_leaves_in_flight_keys_alone(env: Env) -> None:
    await env.down.put("main", "busy-old.txt", body(b"old"))
    loop = env.loop("main")
    # An upload's object is in storage but not indexed yet; a delete removed an object
    # whose item the outbox has not closed yet.
    await env.store("main").put("busy-new.txt", one_chunk(b"being written"), CREATE)
    await env.agent.stores["keep"].delete("busy-old.txt")
    loop.in_flight.update({"busy-new.txt", "busy-old.txt"})
    try:
        result = await loop.run_once()
    finally:
        loop.in_flight.clear()
    assert result.status is RunStatus.OK
    assert (result.counts.added, result.counts.removed) == (0, 0)
    assert await env.item_state("main", "busy-new.txt") is None
    assert await env.item_state("main", "busy-old.txt") is ItemState.LIVE
    loop.touched.clear()
    result = await loop.run_once(force=True)  # 1 of 1 removed: past the mass-delete ratio
    assert (result.counts.added, result.counts.removed) == (1, 1)


async def test_a_run_after_a_put_reports_nothing_new(env: Env) -> None:
    """The outbox indexes what it wrote: the next run finds it unchanged, no duplicate."""
    await env.down.put("main", "p.txt", body(b"p"))
    result = await env.loop("main").run_once()
    assert (result.counts.added, result.counts.modified, result.counts.unchanged) == (0, 0, 1)
    assert len(await env.ledger.items(await env.ds_id("main"), state=None)) == 1


# ---------------------------------------------------------------------- retries (invariant 8)


async def _queued_put(env: Env, key: str, data: bytes, *, create_only: bool = True, if_match: str | None = None) -> int:
    staged, sha, _ = await env.outbox.stage(one_chunk(data))
    ds = await env.ds_id("main")
    return await env.ledger.enqueue(
        ds, OpKind.PUT, key, create_only=create_only, if_match=if_match, staged=staged, sha256=sha
    )


async def _run(env: Env, op_id: int) -> None:
    op = await env.ledger.op(op_id)
    assert op is not None
    await env.outbox.execute(op)


async def test_a_stale_copy_of_a_settled_op_does_not_run_again(env: Env) -> None:
    """The worker reads its due ops while an earlier execution of one of them may be
    finishing: executing that stale copy must not run the op again (and fail it with
    staged_body_missing after it succeeded)."""
    op_id = await _queued_put(env, "s.bin", b"once")
    stale = await env.ledger.op(op_id)
    assert stale is not None
    await env.outbox.execute(stale)
    await env.outbox.execute(stale)
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.DONE and op.attempts == 1, op
    assert await env.read("main", "s.bin") == b"once"


async def test_retried_create_only_put_meeting_its_own_bytes_is_done(env: Env) -> None:
    op_id = await _queued_put(env, "r.bin", b"same bytes")
    # The first attempt reached storage, then the agent died before the ledger knew.
    await env.ledger.start_attempt(op_id)
    await env.store("main").put("r.bin", one_chunk(b"same bytes"), CREATE)
    await _run(env, op_id)
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.DONE, op
    assert op.attempts == 2
    item = await env.ledger.item(await env.ds_id("main"), "r.bin")
    assert item is not None and item.state is ItemState.LIVE and item.size == len(b"same bytes")
    assert await env.keys("main") == {"r.bin"}
    assert not list(env.outbox.staging.glob("*"))


async def test_retried_create_only_put_meeting_foreign_bytes_is_a_conflict(env: Env) -> None:
    op_id = await _queued_put(env, "r.bin", b"our bytes")
    await env.ledger.start_attempt(op_id)
    await env.foreign_put("main", "r.bin", b"their bytes")
    await _run(env, op_id)
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.FAILED and op.error_code == "already_exists"
    assert await env.read("main", "r.bin") == b"their bytes"
    assert await env.ledger.item(await env.ds_id("main"), "r.bin") is None


async def test_first_attempt_meeting_identical_bytes_is_done(env: Env) -> None:
    """Even a first attempt may meet its own write: HTTP clients (aiohttp under every cloud
    SDK) resend a PUT once behind our back when a reused connection resets. Storage then
    holds exactly the op's bytes, so the op is done and the item indexed (issue 14.1)."""
    await env.foreign_put("main", "r.bin", b"same")
    op_id = await _queued_put(env, "r.bin", b"same")
    await _run(env, op_id)
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.DONE and op.attempts == 1, op
    item = await env.ledger.item(await env.ds_id("main"), "r.bin")
    assert item is not None and item.size == 4


async def test_first_attempt_meeting_same_size_other_bytes_is_a_conflict(env: Env) -> None:
    await env.foreign_put("main", "r.bin", b"theirs")
    op_id = await _queued_put(env, "r.bin", b"ours!!")
    await _run(env, op_id)
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.FAILED and op.error_code == "already_exists"
    assert await env.read("main", "r.bin") == b"theirs"


async def test_put_executed_twice_after_a_crash_before_the_ledger_commit(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    op_id = await _queued_put(env, "twice.bin", b"payload")
    real = env.ledger.complete_put

    async def crash(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(env.ledger, "complete_put", real)
        raise RuntimeError("simulated crash after storage")

    monkeypatch.setattr(env.ledger, "complete_put", crash)
    with pytest.raises(RuntimeError):
        await _run(env, op_id)
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.PENDING and op.attempts == 1
    assert await env.read("main", "twice.bin") == b"payload"  # it did reach storage
    await _run(env, op_id)
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.DONE
    assert await env.keys("main") == {"twice.bin"}
    items = await env.ledger.items(await env.ds_id("main"), state=None)
    assert [(i.key, i.size, i.state) for i in items] == [("twice.bin", 7, ItemState.LIVE)]


async def test_if_match_overwrite_executed_twice_is_done(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    first = await env.down.put("main", "o.bin", body(b"v1"))
    assert first.item is not None and first.item.etag is not None
    op_id = await _queued_put(env, "o.bin", b"version two", create_only=False, if_match=first.item.etag)
    real = env.ledger.complete_put

    async def crash(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(env.ledger, "complete_put", real)
        raise RuntimeError("simulated crash after storage")

    monkeypatch.setattr(env.ledger, "complete_put", crash)
    with pytest.raises(RuntimeError):
        await _run(env, op_id)
    await _run(env, op_id)  # the etag moved on because of our own write: done, not a conflict
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.DONE, op
    item = await env.ledger.item(await env.ds_id("main"), "o.bin")
    assert item is not None and item.id == first.item.id and item.size == len(b"version two")
    assert item.etag == (await env.store("main").head("o.bin")).etag


async def test_delete_executed_twice_after_a_crash_is_done(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    first = await env.down.put("del", "d.bin", body(b"doomed"))
    assert first.item is not None
    ds = await env.ds_id("del")
    op_id = await env.ledger.enqueue(ds, OpKind.DELETE, "d.bin", if_match=first.item.etag)
    real = env.ledger.complete_delete

    async def crash(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(env.ledger, "complete_delete", real)
        raise RuntimeError("simulated crash after storage")

    monkeypatch.setattr(env.ledger, "complete_delete", crash)
    op = await env.ledger.op(op_id)
    assert op is not None
    with pytest.raises(RuntimeError):
        await env.outbox.execute(op)
    assert await env.keys("del") == set()
    assert await env.item_state("del", "d.bin") is ItemState.LIVE  # the ledger did not hear of it
    op = await env.ledger.op(op_id)
    assert op is not None
    await env.outbox.execute(op)
    op = await env.ledger.op(op_id)
    assert op is not None and op.state is OpState.DONE, op
    assert await env.ledger.item(ds, "d.bin") is None


async def test_a_crashed_put_left_pending_is_finished_by_the_worker(env: Env) -> None:
    """What a restart does: the worker picks the pending op up from the ledger."""
    op_id = await _queued_put(env, "w.bin", b"worker")
    due = await env.ledger.due_ops(1e12)
    assert [o.id for o in due] == [op_id]
    assert (await env.outbox.settle(op_id)).state is OpState.DONE
    assert await env.ledger.backlog() == 0
    assert await env.read("main", "w.bin") == b"worker"


# ---------------------------------------------------------------------- invariant 2, statically


def _calls(tree: ast.AST) -> list[tuple[ast.Call, list[ast.AST]]]:
    """Every call with its chain of enclosing function definitions."""
    out: list[tuple[ast.Call, list[ast.AST]]] = []

    def walk(node: ast.AST, funcs: list[ast.AST]) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            funcs = [*funcs, node]
        if isinstance(node, ast.Call):
            out.append((node, funcs))
        for child in ast.iter_child_nodes(node):
            walk(child, funcs)

    walk(tree, [])
    return out


def _asks_the_gate(func: ast.AST) -> bool:
    for node in ast.walk(func):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name == "decide_delete":
                return True
    return False


def test_store_delete_is_called_only_from_the_outbox_the_probe_and_thumbnail_cleanup_behind_the_gate() -> None:
    #: `.delete(` calls outside the stores that are not on a store: Downstream.delete
    downstream_receivers = {("cli/main.py", "d"), ("server/routes/items.py", "request.app[DOWNSTREAM]")}
    #: acknowledged queue messages, not objects: the event sources' queue clients
    message_deletes = {
        ("upstream/events/sqs.py", "sqs", "delete_message_batch"),
        ("upstream/events/azure_queue.py", "self._client", "delete_message"),
    }
    store_calls: dict[str, int] = {}
    unexpected: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("stores/"):
            continue  # the stores implement delete (and call their SDKs)
        for call, funcs in _calls(ast.parse(path.read_text(), filename=rel)):
            f = call.func
            if not (isinstance(f, ast.Attribute) and f.attr.startswith("delete")):
                continue
            receiver = ast.unparse(f.value)
            where = f"{rel}:{call.lineno}: {ast.unparse(call)}"
            if (rel, receiver) in downstream_receivers and f.attr == "delete":
                continue
            if (rel, receiver, f.attr) in message_deletes:
                continue
            owners = ("downstream/outbox.py", "upstream/probe.py", "enrich/worker.py")  # worker: thumbnails
            if rel in owners and receiver == "store" and f.attr == "delete":
                assert funcs and _asks_the_gate(funcs[-1]), f"{where} does not ask gate.decide_delete first"
                store_calls[rel] = store_calls.get(rel, 0) + 1
                continue
            unexpected.append(where)
    assert unexpected == [], "storage deletes outside the outbox/probe/thumbnail cleanup:\n" + "\n".join(unexpected)
    assert set(store_calls) == {"downstream/outbox.py", "upstream/probe.py", "enrich/worker.py"}


def test_the_probe_deletes_only_in_the_hidden_folder() -> None:
    src = (SRC / "upstream" / "probe.py").read_text()
    assert 'key = f"{HIDDEN}probe-' in src


def test_put_mode_is_create_or_if_match_never_both() -> None:
    with pytest.raises(ValueError):
        PutMode(create=True, if_match="x")
