"""Operators' control of outbox ops: retry a failed op, cancel a pending or failed one.

The API and the CLI (without a daemon) both call these; the CLI goes through the
daemon's API when one runs, so its worker never races a cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import structlog

from bucketsync.core.errors import OpStateError
from bucketsync.core.model import Op, OpKind, OpState
from bucketsync.downstream.outbox import Outbox
from bucketsync.ledger.ledger import Ledger

log = structlog.get_logger("bucketsync.ops")


async def _op(ledger: Ledger, op_id: int) -> Op:
    op = await ledger.op(op_id)
    if op is None:
        raise OpStateError("op_not_found", f"no op {op_id}")
    return op


async def retry(ledger: Ledger, outbox: Outbox | None, op_id: int) -> Op:
    """Queue a failed op again, due now. A put needs its staged body still on disk."""
    op = await _op(ledger, op_id)
    if op.state is not OpState.FAILED:
        raise OpStateError("op_not_failed", f"op {op_id} is {op.state}; only a failed op can be retried")
    if op.kind is OpKind.PUT and (op.staged is None or not await asyncio.to_thread(os.path.exists, op.staged)):
        raise OpStateError(
            "staged_body_missing",
            f"op {op_id}'s uploaded body is no longer staged (failed by an older bucketsync, or removed); "
            "put the file again instead",
        )
    if not await ledger.retry_op(op_id):
        raise OpStateError("op_not_failed", f"op {op_id} changed state meanwhile; look at it again")
    log.info("op queued again", op=op_id, kind=str(op.kind), dataset=op.dataset, key=op.key)
    if outbox is not None:
        outbox.wake.set()
    return await _op(ledger, op_id)


async def cancel(ledger: Ledger, outbox: Outbox | None, op_id: int) -> Op:
    """Cancel a pending or failed op and remove its staged body. Storage is not touched."""
    op = await _op(ledger, op_id)
    if outbox is not None and op_id in outbox.active:
        raise OpStateError(
            "op_running", f"op {op_id} is talking to storage right now; wait for it to settle, then cancel it"
        )
    if op.state not in (OpState.PENDING, OpState.FAILED):
        raise OpStateError("op_settled", f"op {op_id} is {op.state}; only a pending or failed op can be cancelled")
    if not await ledger.cancel_op(op_id):
        raise OpStateError("op_settled", f"op {op_id} settled meanwhile; look at it again")
    if op.staged is not None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, op.staged)
    log.info("op cancelled", op=op_id, kind=str(op.kind), dataset=op.dataset, key=op.key)
    if outbox is not None:
        await outbox.notify(op_id)
    return await _op(ledger, op_id)
