"""Moving items to a folder. In a synced dataset it is a real move in storage: the gate
first (it needs ``allow_delete``), then a copy to the new key through the outbox
(create-only), then the item's row takes the new key (so it keeps its id and user
metadata), then a delete op for the old object (conditional on its etag)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.core import gate
from bucketsync.core.errors import BucketsyncError, Refused
from bucketsync.core.keys import check_key
from bucketsync.core.model import ItemState, OpKind
from bucketsync.downstream.ops import Downstream

log = structlog.get_logger("bucketsync.catalog")
MAX_MOVE = 10_000


@dataclass(frozen=True, slots=True)
class Moved:
    key: str
    to: str
    result: str  # "moved", "unchanged", "failed"
    error: str | None = None
    op: int | None = None  # the delete op of the old object

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "to": self.to, "result": self.result, "error": self.error, "op": self.op}


def target(key: str, folder: str) -> str:
    """Where ``key`` lands in ``folder`` ("" or ending in "/"): its last segment under it."""
    return check_key(folder + key.rsplit("/", 1)[-1])


async def move(agent: Agent, downstream: Downstream, dataset: str, keys: list[str], folder: str) -> list[Moved]:
    """Move each key into ``folder``; one result per key. The gate refuses the whole request
    (Refused, nothing touched) when the dataset cannot move at all."""
    ledger = agent.ledger
    assert ledger is not None
    if dataset not in agent.settings.datasets:
        return await _rekey(agent, dataset, keys, folder)
    ds = agent.settings.datasets[dataset]
    driver = agent.settings.drivers[ds.driver]
    decision = gate.decide_move(
        key=folder,
        read_only=ds.read_only,
        allow_delete=driver.allow_delete,
        storage_denies=agent.storage_denies(dataset),
    )
    if not decision.allowed:
        metrics.GATE_REFUSALS.labels(decision.reason).inc()
        raise Refused(decision.reason, decision.message)
    ds_id = await ledger.dataset_id(dataset)
    store = agent.stores[ds.driver]
    out = []
    for key in keys:
        to = target(key, folder)
        item = await ledger.item(ds_id, key)
        if item is None or item.state is not ItemState.LIVE:
            out.append(Moved(key, to, "failed", f"no live item {key!r}"))
            continue
        if to == key:
            out.append(Moved(key, to, "unchanged"))
            continue
        try:
            copied = await downstream.put(dataset, to, store.open(key), content_type=item.content_type)
        except BucketsyncError as exc:
            out.append(Moved(key, to, "failed", f"copy to {to!r}: {exc}"))
            continue
        if copied.result == "pending":
            op = copied.op.id if copied.op else None
            out.append(Moved(key, to, "failed", f"the copy to {to!r} is still pending (op {op}); the item stays"))
            continue
        await ledger.adopt(item.id, ds_id, to)
        op_id = await ledger.enqueue(ds_id, OpKind.DELETE, key, if_match=item.etag)
        agent.outbox.wake.set()
        log.info("moved", dataset=dataset, key=key, to=to, item=item.id, delete_op=op_id)
        out.append(Moved(key, to, "moved", op=op_id))
    return out


async def _rekey(agent: Agent, dataset: str, keys: list[str], folder: str) -> list[Moved]:
    """In a clone or merge a move is catalog-only: the pointer's key changes, storage does not."""
    ledger = agent.ledger
    assert ledger is not None
    ds_id = await ledger.dataset_id(dataset)
    out, moving, taken = [], [], set()
    for key in keys:
        to = target(key, folder)
        item = await ledger.item(ds_id, key)
        if item is None:
            out.append(Moved(key, to, "failed", f"no item {key!r}"))
        elif to == key:
            out.append(Moved(key, to, "unchanged"))
        elif to in taken or await ledger.item(ds_id, to) is not None:
            out.append(Moved(key, to, "failed", f"{to!r} exists already"))
        else:
            taken.add(to)
            moving.append((item.id, to))
            out.append(Moved(key, to, "moved"))
    await ledger.rekey(ds_id, moving)
    return out
