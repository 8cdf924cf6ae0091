"""What users do to items through bucketsync: put, delete, restore, and metadata.

The API and the CLI both call these. Each asks the gate first (a refusal touches
nothing), then records an op in the outbox, so the bucket follows durably.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

import structlog

from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.catalog.query import META_NAME
from bucketsync.core import gate
from bucketsync.core.errors import (
    AlreadyExists,
    DiskFull,
    KeyFiltered,
    NotFound,
    PreconditionFailed,
    Refused,
    from_code,
)
from bucketsync.core.keys import check_key
from bucketsync.core.model import Item, ItemState, Op, OpKind, OpState
from bucketsync.downstream.outbox import Outbox
from bucketsync.ledger import durability
from bucketsync.stores import check_storable

log = structlog.get_logger("bucketsync.downstream")
META_VALUE = (str, int, float, bool)


@dataclass(slots=True)
class Outcome:
    """What a downstream call did. ``op`` is None when no storage op was needed."""

    result: str  # "created", "overwritten", "deleted", "tombstoned", "restored", "unchanged", "pending"
    item: Item | None
    op: Op | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "item": self.item.as_json(full=True) if self.item else None,
            "op": self.op.as_json() if self.op else None,
        }


def _refuse(decision: gate.OpDecision, dataset: str, key: str) -> Refused:
    metrics.GATE_REFUSALS.labels(decision.reason).inc()
    log.info("refused by the gate", dataset=dataset, key=key, reason=decision.reason, message=decision.message)
    return Refused(decision.reason, decision.message)


def _raise_failed(op: Op) -> None:
    raise from_code(op.error_code or "storage_error", op.error or "the operation failed", op.key)


class Downstream:
    def __init__(self, agent: Agent, outbox: Outbox, *, in_process: bool = False, wait: float = 60.0) -> None:
        self.agent = agent
        self.outbox = outbox
        self.in_process = in_process  # no worker running: settle ops here (CLI without a daemon)
        self.wait = wait

    async def _item(self, dataset: str, key: str) -> tuple[int, Item | None]:
        ledger = self.agent.ledger
        assert ledger is not None
        self.agent.settings.dataset(dataset)
        ds_id = await ledger.dataset_id(dataset)
        return ds_id, await ledger.item(ds_id, check_key(key))

    async def _settle(self, op_id: int) -> Op | None:
        if self.in_process:
            return await self.outbox.settle(op_id)
        self.outbox.wake.set()
        return await self.outbox.wait(op_id, self.wait)

    async def put(
        self,
        dataset: str,
        key: str,
        body: AsyncIterable[bytes],
        *,
        overwrite: bool = False,
        content_type: str | None = None,
    ) -> Outcome:
        ds_id, item = await self._item(dataset, key)
        ledger = self.agent.ledger
        assert ledger is not None
        ds = self.agent.settings.datasets[dataset]
        store = self.agent.stores[ds.driver]
        # Refusals that need no storage, before a byte is staged. The gate first: a read-only
        # dataset refuses every put (403) whatever the key; then a key the next sync would
        # drop (outside the filters), a key the store cannot hold.
        live = item is not None and item.state is ItemState.LIVE
        decision = gate.decide_put(
            read_only=ds.read_only,
            quota=ds.quota,
            live_items=await ledger.live_count(ds_id),
            new_key=not live,
            storage_denies=self.agent.storage_denies(dataset),
        )
        if not decision.allowed:  # before the body is staged: a refusal reads none of it
            raise _refuse(decision, dataset, key)
        why = self.agent.loops[dataset].filter.refusal(key)
        if why is not None:
            raise KeyFiltered(f"dataset {dataset!r}: {why}")
        check_storable(store, key)
        if item is not None and not overwrite:
            raise AlreadyExists(
                f"{key!r} already exists in dataset {dataset!r}; "
                "to replace it, pass --overwrite (CLI) or overwrite=true (API)",
                key=key,
            )
        if_match = None
        if overwrite and item is not None and item.etag is not None:
            if store.conditional_writes:
                if_match = item.etag
            else:  # reconcile: refuse if storage moved on since the item was indexed
                current = await store.head(key)
                if current.etag != item.etag:
                    raise PreconditionFailed(f"{key!r} changed in storage since it was indexed", key=key)
        try:
            staged, sha, _size = await self.outbox.stage(body)
        except OSError as exc:
            if durability.kind_of(exc) != "disk_full":
                raise
            metrics.LEDGER_WRITE_ERRORS.labels("disk_full").inc()
            raise DiskFull(
                f"cannot stage the upload of {key!r} in {self.outbox.staging}: the disk is full; "
                "free space there (nothing was written; send it again)"
            ) from None
        op_id = await ledger.enqueue(
            ds_id,
            OpKind.PUT,
            key,
            create_only=not overwrite,
            if_match=if_match,
            staged=staged,
            sha256=sha,
            content_type=content_type,
        )
        op = await self._settle(op_id)
        if op is None:
            return Outcome("pending", item, await ledger.op(op_id))
        if op.state in (OpState.FAILED, OpState.CANCELLED):
            _raise_failed(op)
        written = self.outbox.results.pop(op_id, None) or await ledger.item(ds_id, key)
        return Outcome("overwritten" if item is not None else "created", written, op)

    async def delete(self, dataset: str, key: str) -> Outcome:
        ds_id, item = await self._item(dataset, key)
        if item is None:
            raise NotFound(f"dataset {dataset!r} has no item {key!r}", key=key)
        ledger = self.agent.ledger
        assert ledger is not None
        ds = self.agent.settings.datasets[dataset]
        driver = self.agent.settings.drivers[ds.driver]
        decision = gate.decide_delete(
            key=key,
            read_only=ds.read_only,
            allow_delete=driver.allow_delete,
            storage_denies=self.agent.storage_denies(dataset),
            link=item.link,
        )
        if not decision.allowed:
            raise _refuse(decision, dataset, key)
        if decision.action == gate.UNLINK:  # a linked item made through the API: no object anywhere to delete
            await ledger.remove(None, [item.id])
            await self.agent.refresh_item_gauges(dataset)
            log.info("link unlinked", dataset=dataset, key=key, item=item.id)
            return Outcome("unlinked", None)
        if decision.action == gate.TOMBSTONE:
            if item.state is not ItemState.TOMBSTONE:
                await ledger.set_state(item.id, ItemState.TOMBSTONE)
                metrics.TOMBSTONES.labels(dataset).inc()
                await self.agent.refresh_item_gauges(dataset)
                log.info("tombstoned", dataset=dataset, key=key, item=item.id)
            return Outcome("tombstoned", await ledger.item(ds_id, key))
        op_id = await ledger.enqueue(ds_id, OpKind.DELETE, key, if_match=item.etag)
        op = await self._settle(op_id)
        if op is None:
            return Outcome("pending", item, await ledger.op(op_id))
        if op.state in (OpState.FAILED, OpState.CANCELLED):
            _raise_failed(op)
        return Outcome("deleted", None, op)

    async def restore(self, dataset: str, key: str) -> Outcome:
        ds_id, item = await self._item(dataset, key)
        if item is None:
            raise NotFound(f"dataset {dataset!r} has no item {key!r}", key=key)
        ledger = self.agent.ledger
        assert ledger is not None
        if item.state is ItemState.LIVE:
            return Outcome("unchanged", item)
        ds = self.agent.settings.datasets[dataset]
        decision = gate.decide_put(
            read_only=False, quota=ds.quota, live_items=await ledger.live_count(ds_id), new_key=True
        )  # a restored item counts against the quota like a new one
        if not decision.allowed:
            raise _refuse(decision, dataset, key)
        await ledger.set_state(item.id, ItemState.LIVE)
        await self.agent.refresh_item_gauges(dataset)
        log.info("restored", dataset=dataset, key=key, item=item.id)
        return Outcome("restored", await ledger.item(ds_id, key))

    async def patch_meta(self, dataset: str, key: str, patch: dict[str, Any]) -> Outcome:
        for name, value in patch.items():
            if not META_NAME.match(name):
                raise ValueError(f"metadata name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
            if value is not None and not isinstance(value, META_VALUE):
                raise ValueError(f"metadata {name!r} must be a string, number, boolean or null")
        ds_id, item = await self._item(dataset, key)
        if item is None or item.state is not ItemState.LIVE:
            raise NotFound(f"dataset {dataset!r} has no live item {key!r}", key=key)
        # No read_only check: user metadata lives in the catalog only, and read_only
        # means no writes to storage.
        ledger = self.agent.ledger
        assert ledger is not None
        await ledger.merge_meta(item.id, patch)
        return Outcome("updated", await ledger.item(ds_id, key))
