"""The outbox: durable downstream operations, executed at least once, idempotent in effect.

A put's body is staged to disk (fsynced) and the op recorded in the ledger before
storage is touched; the worker then writes to storage and, in one transaction,
indexes the result and closes the op. A crash between any two steps leaves a
pending op that the next start finishes (invariant 8):

- a retried create-only or if-match put that meets its *own* earlier write (the
  stored bytes hash to the staged body's sha256) counts as done, not as a conflict;
- deletes are idempotent, and a retried if-match delete of an object already gone
  is done.

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
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from bucketsync import failpoints, gate, metrics
from bucketsync.errors import (
    AlreadyExists,
    NotFound,
    PreconditionFailed,
    StorageError,
    Transient,
    code_of,
)
from bucketsync.model import CREATE, OVERWRITE, Item, Op, OpKind, OpState, PutMode
from bucketsync.retry import backoff

if TYPE_CHECKING:
    from bucketsync.agent import Agent
    from bucketsync.ledger import Ledger

log = structlog.get_logger("bucketsync.outbox")
CHUNK = 1 << 20


async def file_chunks(path: str) -> AsyncIterator[bytes]:
    """A file's bytes in 1 MiB chunks, read in a worker thread."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
    finally:
        f.close()


async def _sha256_of(chunks: AsyncIterable[bytes]) -> str:
    h = hashlib.sha256()
    async for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


class Outbox:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.staging = Path(agent.settings.agent.ledger).parent / "staging"
        self.wake = asyncio.Event()
        self._settled: dict[int, asyncio.Future[Op]] = {}
        self.results: dict[int, Item | None] = {}  # item written by a settled put, for its waiter

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
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
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
        """Execute due ops until ``stop``; the current op finishes before it returns."""
        while not stop.is_set():
            self.wake.clear()
            due = await self.ledger.due_ops(time.time())
            metrics.set_backlog(await self.ledger.backlog_by_dataset())
            for op in due:
                if stop.is_set():
                    break
                try:
                    await self.execute(op)
                except Exception:
                    log.exception("outbox op crashed; it stays pending", op=op.id)
                    await self.ledger.retry_later(op.id, "internal error; see the agent's log", time.time() + 30)
            if not due:
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
                await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()

    async def execute(self, op: Op) -> None:
        loop = self.agent.loops[op.dataset]
        loop.in_flight.add(op.key)
        try:
            await self.ledger.start_attempt(op.id)
            if op.kind is OpKind.PUT:
                await self._put(op)
            else:
                await self._delete(op)
        except Transient as exc:
            delay = backoff(op.attempts + 1, base=1.0, cap=300.0) + 0.1
            log.warning("outbox op will be retried", op=op.id, kind=str(op.kind), key=op.key, error=str(exc))
            metrics.DOWNSTREAM_OPS.labels(str(op.kind), "retry").inc()
            await self.ledger.retry_later(op.id, str(exc), time.time() + delay)
        except StorageError as exc:
            await self._fail(op, code_of(exc), str(exc))
        finally:
            loop.in_flight.discard(op.key)
            loop.touched[op.key] = time.monotonic()
        settled = await self.ledger.op(op.id)
        if settled is not None and settled.state is not OpState.PENDING:
            fut = self._settled.pop(op.id, None)
            if fut is not None and not fut.done():
                fut.set_result(settled)

    async def _fail(self, op: Op, code: str, message: str) -> None:
        log.warning("outbox op failed", op=op.id, kind=str(op.kind), key=op.key, code=code, error=message)
        metrics.DOWNSTREAM_OPS.labels(str(op.kind), code).inc()
        await self.ledger.fail_op(op.id, code, message)
        if op.staged:
            await asyncio.to_thread(_unlink, op.staged)

    async def _put(self, op: Op) -> None:
        agent = self.agent
        ds = agent.settings.datasets[op.dataset]
        store = agent.stores[ds.driver]
        ds_id = await self.ledger.dataset_id(op.dataset)
        existing = await self.ledger.item(ds_id, op.key)
        decision = gate.decide_put(
            read_only=ds.read_only,
            quota=ds.quota,
            live_items=await self.ledger.live_count(ds_id),
            new_key=existing is None or existing.state != "live",
        )
        if not decision.allowed:
            metrics.GATE_REFUSALS.labels(decision.reason).inc()
            await self._fail(op, decision.reason, decision.message)
            return
        if op.staged is None or not os.path.exists(op.staged):
            await self._fail(op, "staged_body_missing", "the staged upload is gone; upload again")
            return
        mode: PutMode = CREATE if op.create_only else PutMode.matching(op.if_match) if op.if_match else OVERWRITE
        failpoints.hit("outbox.before_storage")
        try:
            info = await store.put(op.key, file_chunks(op.staged), mode, op.content_type)
        except (AlreadyExists, PreconditionFailed):
            # A retry after a crash may meet its own earlier write: same bytes, so done.
            if op.attempts == 0 or op.sha256 is None or not await self._holds_our_bytes(op):
                raise
            info = await store.head(op.key)
        failpoints.hit("outbox.after_storage")
        item = await self.ledger.complete_put(op, ds_id, info)
        await self.agent.refresh_item_gauges(op.dataset)
        self.results[op.id] = item
        await asyncio.to_thread(_unlink, op.staged)
        metrics.DOWNSTREAM_OPS.labels("put", "ok").inc()
        log.info("put done", op=op.id, dataset=op.dataset, key=op.key, size=info.size)

    async def _holds_our_bytes(self, op: Op) -> bool:
        store = self.agent.stores[self.agent.settings.datasets[op.dataset].driver]
        try:
            return await _sha256_of(store.open(op.key)) == op.sha256
        except NotFound:
            return False

    async def _delete(self, op: Op) -> None:
        agent = self.agent
        ds = agent.settings.datasets[op.dataset]
        driver = agent.settings.drivers[ds.driver]
        store = agent.stores[ds.driver]
        ds_id = await self.ledger.dataset_id(op.dataset)
        decision = gate.decide_delete(key=op.key, read_only=ds.read_only, allow_delete=driver.allow_delete)
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
