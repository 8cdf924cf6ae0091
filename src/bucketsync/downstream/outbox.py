"""The outbox: durable downstream operations, executed at least once, idempotent in effect.

A put's body is staged to disk (fsynced) and the op recorded in the ledger before
storage is touched; the worker then writes to storage and, in one transaction,
indexes the result and closes the op. A crash between any two steps leaves a
pending op that the next start finishes (invariant 8):

- a create-only or if-match put that meets its *own* earlier write (same size and
  content: ``ownwrite.landed``) counts as done, not as a conflict, on any attempt:
  an HTTP client may have resent it behind our back;
- deletes are idempotent, and a retried if-match delete of an object already gone
  is done.

Only ``Transient`` errors are retried (with backoff); any other error fails the op
with its code, keeping a put's staged body so ``ops retry`` can run it again, until
the op is cancelled.

Ops run concurrently, up to ``agent.outbox_concurrency`` at once, so one stalled
request holds one slot, not the queue; ops on the same (dataset, key) still run one
after another in the order they were queued (``Ledger.due_ops`` offers only the
oldest pending op of a key, and a running op's key is not offered twice).

Every op passes the gate again right before storage is touched: the only call to
``Store.delete`` on user data is in this module, behind ``gate.decide_delete``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING

import structlog

from bucketsync import metrics
from bucketsync.core import failpoints, gate
from bucketsync.core.errors import (
    AlreadyExists,
    LeaseLost,
    NotFound,
    PreconditionFailed,
    StorageError,
    Transient,
    code_of,
)
from bucketsync.core.model import CREATE, OVERWRITE, Item, ItemState, Op, OpKind, OpState, PutMode
from bucketsync.core.retry import backoff
from bucketsync.downstream import ownwrite
from bucketsync.ledger.leases import FENCE

if TYPE_CHECKING:
    from bucketsync.agent import Agent
    from bucketsync.ledger.ledger import Ledger
    from bucketsync.stores import Store

log = structlog.get_logger("bucketsync.outbox")
CHUNK = 1 << 20
#: attempts after which an op that keeps crashing (not a storage error) is failed
CRASH_ATTEMPTS = 5
#: how often a waiter on an agent sharing the ledger looks whether another agent settled its op
SHARED_POLL = 0.2


async def file_chunks(path: str) -> AsyncIterator[bytes]:
    """A file's bytes in 1 MiB chunks, read in a worker thread."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
    finally:
        f.close()


class Outbox:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.staging = agent.settings.agent.local_state / "staging"
        self.wake = asyncio.Event()
        self._settled: dict[int, asyncio.Future[Op]] = {}
        self.results: dict[int, Item | None] = {}  # item written by a settled put, for its waiter
        #: ids of the ops executing now (the API refuses to cancel one mid-flight)
        self.active: set[int] = set()
        self._busy_keys: set[tuple[str, str]] = set()
        #: per dataset: new-key puts past the quota gate, not yet committed; and the lock
        #: under which they are counted and committed
        self._reserved: Counter[str] = Counter()
        self._quota_locks: dict[str, asyncio.Lock] = {}

    @property
    def ledger(self) -> Ledger:
        assert self.agent.ledger is not None
        return self.agent.ledger

    # -- staging and submitting ----------------------------------------------------

    async def stage(self, chunks: AsyncIterable[bytes]) -> tuple[str, str, int]:
        """Write a body to the staging folder, fsynced; return (path, sha256, size).

        Streams: a multi-GB upload is never held in memory.
        """
        await asyncio.to_thread(self.staging.mkdir, parents=True, exist_ok=True)
        path = str(self.staging / f"{uuid.uuid4().hex}.part")
        h = hashlib.sha256()
        size = 0
        f = await asyncio.to_thread(open, path, "wb")
        try:
            async for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(f.flush)
            await asyncio.to_thread(os.fsync, f.fileno())
        except BaseException:
            f.close()
            await asyncio.to_thread(_unlink, path)
            raise
        f.close()
        return path, h.hexdigest(), size

    def _future(self, op_id: int) -> asyncio.Future[Op]:
        fut = self._settled.get(op_id)
        if fut is None:
            fut = self._settled[op_id] = asyncio.get_running_loop().create_future()
        return fut

    async def wait(self, op_id: int, timeout: float | None) -> Op | None:
        """The op once it is done or failed, or None if still pending after ``timeout``."""
        op = await self.ledger.op(op_id)
        if op is not None and op.state is not OpState.PENDING:
            return op
        fut = self._future(op_id)
        if self.agent.leases is None:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                return None
        # Shared by agents: the dataset's owner (maybe another agent) settles the op; the
        # ledger says when. Woken at once when this agent settles it itself.
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(
                    asyncio.shield(fut), SHARED_POLL if deadline is None else min(left, SHARED_POLL)
                )
            op = await self.ledger.op(op_id)
            if op is not None and op.state is not OpState.PENDING:
                self._settled.pop(op_id, None)
                return op
        return None

    async def settle(self, op_id: int) -> Op:
        """Run one op to its end in this process (the CLI without a daemon; burst mode)."""
        while True:
            op = await self.ledger.op(op_id)
            assert op is not None
            if op.state is not OpState.PENDING:
                return op
            await asyncio.sleep(max(0.0, op.next_at - time.time()))
            await self.execute(op)

    # -- the worker ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Execute due ops until ``stop``, up to ``outbox_concurrency`` at once.

        Ops already running when ``stop`` is set finish before it returns.
        """
        limit = self.agent.settings.agent.outbox_concurrency
        running: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                self.wake.clear()
                if len(running) < limit:
                    # Running ops are still pending in the ledger: ask for enough to see past them.
                    # Shared by agents: only the ops of the datasets whose leases this agent holds.
                    keeper = self.agent.leases
                    owned = sorted(keeper.held) if keeper is not None else None
                    due = await self.ledger.due_ops(time.time(), limit=len(running) + limit, datasets=owned)
                    metrics.set_backlog(await self.ledger.backlog_by_dataset())
                    for op in due:
                        if len(running) >= limit or stop.is_set():
                            break
                        if op.id in self.active or (op.dataset, op.key) in self._busy_keys:
                            continue
                        running.add(asyncio.create_task(self._guarded(op), name=f"outbox-op-{op.id}"))
                waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())}
                done, _ = await asyncio.wait(waiters | running, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                running -= done
        finally:
            if running:
                await asyncio.wait(running)

    async def _guarded(self, op: Op) -> None:
        """One op in its own task: a crash there never stops the worker or the other ops.

        An unexpected error (a bug, the ledger in trouble, the staged body unreadable)
        is retried a few times, then fails the op: nothing is retried forever.
        """
        if (keeper := self.agent.leases) is not None:
            fence = keeper.fence(op.dataset)
            if fence is None:
                return  # the lease moved on since the op was listed: its new owner runs it
            FENCE.set(fence)  # this op's task: its attempt, completion and retries are fenced
        try:
            await self.execute(op)
        except LeaseLost as exc:
            # Refused before anything was written; storage may have been written, and the
            # lease's new owner retries the op, which finds its own write (ownwrite.landed).
            log.info("outbox op stopped: this agent lost the dataset's lease", op=op.id, error=str(exc))
        except Exception as exc:
            with contextlib.suppress(Exception):
                if op.attempts + 1 >= CRASH_ATTEMPTS:
                    log.exception("outbox op crashed again; failing it", op=op.id, attempts=op.attempts + 1)
                    await self._fail(op, "internal", f"internal error ({type(exc).__name__}); see the agent's log")
                    await self.notify(op.id)
                else:
                    log.exception("outbox op crashed; it stays pending", op=op.id)
                    await self.ledger.retry_later(op.id, "internal error; see the agent's log", time.time() + 30)

    async def execute(self, op: Op) -> None:
        loop = self.agent.loops[op.dataset]
        slot = (op.dataset, op.key)
        self.active.add(op.id)
        self._busy_keys.add(slot)
        loop.in_flight.add(op.key)
        try:
            # The op we were handed may be stale: the worker's list of due ops can be read
            # while an earlier execution of the same op is finishing. Only a claim on a
            # still-pending op runs; running a settled one again would undo its result.
            claimed = await self.ledger.start_attempt(op.id)
            if claimed is None:
                return
            op = claimed
            if op.kind is OpKind.PUT:
                await self._put(op)
            else:
                await self._delete(op)
        except Transient as exc:
            delay = backoff(op.attempts, base=1.0, cap=300.0) + 0.1  # attempts counts this one
            log.warning("outbox op will be retried", op=op.id, kind=str(op.kind), key=op.key, error=str(exc))
            metrics.DOWNSTREAM_OPS.labels(str(op.kind), "retry").inc()
            await self.ledger.retry_later(op.id, str(exc), time.time() + delay)
        except StorageError as exc:
            await self._fail(op, code_of(exc), str(exc))  # permanent: retrying cannot help
        finally:
            loop.in_flight.discard(op.key)
            loop.touched[op.key] = time.monotonic()
            self.active.discard(op.id)
            self._busy_keys.discard(slot)
        await self.notify(op.id)

    async def notify(self, op_id: int) -> None:
        """Hand a settled (done, failed, cancelled) op to whoever waits for it."""
        settled = await self.ledger.op(op_id)
        if settled is not None and settled.state is not OpState.PENDING:
            fut = self._settled.pop(op_id, None)
            if fut is not None and not fut.done():
                fut.set_result(settled)

    async def _fail(self, op: Op, code: str, message: str) -> None:
        """Fail the op; a put keeps its staged body, so ``ops retry`` can run it again."""
        log.warning("outbox op failed", op=op.id, kind=str(op.kind), key=op.key, code=code, error=message)
        metrics.DOWNSTREAM_OPS.labels(str(op.kind), code).inc()
        await self.ledger.fail_op(op.id, code, message)

    async def _put(self, op: Op) -> None:
        agent = self.agent
        ds = agent.settings.datasets[op.dataset]
        store = agent.stores[ds.driver]
        ds_id = await self.ledger.dataset_id(op.dataset)
        # Concurrent puts of new keys each see the same live count: a put that passed the
        # gate holds a quota reservation until its item is committed (or it ends), and
        # counting, deciding and committing happen under the dataset's lock.
        lock = self._quota_locks.setdefault(op.dataset, asyncio.Lock())
        async with lock:
            existing = await self.ledger.item(ds_id, op.key)
            new_key = existing is None or existing.state != "live"
            decision = gate.decide_put(
                read_only=ds.read_only,
                quota=ds.quota,
                live_items=await self.ledger.live_count(ds_id) + self._reserved[op.dataset],
                new_key=new_key,
            )
            if not decision.allowed:
                metrics.GATE_REFUSALS.labels(decision.reason).inc()
                await self._fail(op, decision.reason, decision.message)
                return
            held = new_key
            if held:
                self._reserved[op.dataset] += 1

        def release() -> None:  # once, whichever way the write ends
            nonlocal held
            if held:
                held = False
                self._reserved[op.dataset] -= 1

        try:
            await self._write(op, store, ds_id, lock, release)
        finally:
            release()

    async def _write(self, op: Op, store: Store, ds_id: int, lock: asyncio.Lock, release: Callable[[], None]) -> None:
        """Write the staged body to storage, then index it and close the op."""
        if op.staged is None or not os.path.exists(op.staged):
            await self._fail(op, "staged_body_missing", "the staged upload is gone; upload again")
            return
        mode: PutMode = CREATE if op.create_only else PutMode.matching(op.if_match) if op.if_match else OVERWRITE
        failpoints.hit("outbox.before_storage")
        try:
            info = await store.put(op.key, file_chunks(op.staged), mode, op.content_type)
        except (AlreadyExists, PreconditionFailed):
            # Maybe our own earlier write, whose answer was lost (a crash, a reset, a
            # resend by the HTTP client): on ANY attempt, same bytes means done.
            landed = await ownwrite.landed(store, op.key, op.staged)
            if landed is None:
                raise
            log.info("put found its own earlier write in storage", op=op.id, dataset=op.dataset, key=op.key)
            info = landed
        failpoints.hit("outbox.after_storage")
        async with lock:  # the item counts as live from here: its reservation ends in the same step
            item = await self.ledger.complete_put(op, ds_id, info)
            release()
        await self.agent.refresh_item_gauges(op.dataset)
        self.agent.enricher.wake.set()  # the put is committed: its enrichment follows
        self.results[op.id] = item
        await asyncio.to_thread(_unlink, op.staged)
        metrics.DOWNSTREAM_OPS.labels("put", "ok").inc()
        log.info("put done", op=op.id, dataset=op.dataset, key=op.key, size=info.size)

    async def _delete(self, op: Op) -> None:
        agent = self.agent
        ds = agent.settings.datasets[op.dataset]
        driver = agent.settings.drivers[ds.driver]
        store = agent.stores[ds.driver]
        ds_id = await self.ledger.dataset_id(op.dataset)
        item = await self.ledger.item(ds_id, op.key)
        link = item.link if item is not None else None
        decision = gate.decide_delete(key=op.key, read_only=ds.read_only, allow_delete=driver.allow_delete, link=link)
        if item is not None and link is not None:
            # A linked item (a folder delete queued it): nothing in storage is its to delete.
            if decision.action == gate.TOMBSTONE:  # a link file stays in the bucket
                await self.ledger.set_state(item.id, ItemState.TOMBSTONE)
                await self.ledger.op_done(op.id)
            else:
                await self.ledger.complete_delete(op, ds_id)
            await self.agent.refresh_item_gauges(op.dataset)
            log.info("delete of a linked item: catalog only", op=op.id, dataset=op.dataset, key=op.key, link=link)
            return
        if decision.action != gate.DELETE_OBJECT:
            # allow_delete went off (or the dataset became read-only) after the op was queued.
            reason = decision.reason or "allow_delete_off"
            metrics.GATE_REFUSALS.labels(reason).inc()
            await self._fail(op, reason, decision.message or "the driver no longer allows deletes; nothing deleted")
            return
        failpoints.hit("outbox.before_storage")
        try:
            if op.if_match is not None and not store.conditional_writes:
                # No native conditional delete: reconcile against storage first.
                current = await store.head(op.key)
                if current.etag != op.if_match:
                    raise PreconditionFailed(f"{op.key} changed in storage since it was indexed", key=op.key)
                await store.delete(op.key)
            else:
                await store.delete(op.key, if_match=op.if_match)
        except NotFound:
            pass  # already gone: a delete is done when the object is absent
        except PreconditionFailed:
            try:
                await store.head(op.key)
            except NotFound:
                pass  # our own earlier attempt deleted it
            else:
                raise
        failpoints.hit("outbox.after_storage")
        await self.ledger.complete_delete(op, ds_id)
        await self.agent.refresh_item_gauges(op.dataset)
        metrics.DOWNSTREAM_OPS.labels("delete", "ok").inc()
        log.info("delete done", op=op.id, dataset=op.dataset, key=op.key)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
