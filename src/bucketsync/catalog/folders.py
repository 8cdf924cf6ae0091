"""Folders, derived from keys: listed from the ledger, deleted through the gate.

Object storage has no folders, only keys with '/' in them, so a folder exists while an
item lies under it. That is why an empty folder cannot be created in a synced dataset:
nothing would hold it in the bucket, and the next sync would find it gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import structlog

from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.core import gate
from bucketsync.core.errors import InvalidKey, NotFound, Refused
from bucketsync.core.keys import check_key
from bucketsync.core.model import Item, ItemState
from bucketsync.ledger.ledger import Ledger

log = structlog.get_logger("bucketsync.catalog")

#: the refusal's code and its reason, for the API and the docs
NO_EMPTY_FOLDERS = "empty_folders_unsupported"
NO_EMPTY_FOLDERS_WHY = (
    "a synced dataset cannot hold an empty folder: object storage has no folders, only keys with '/' in them, "
    "so an empty folder would exist nowhere in the bucket and the next sync would drop it; put an item under it"
)


def parent_of(raw: str) -> str:
    """A folder path as the ledger's keys start: "" (the top) or ending in "/"; InvalidKey otherwise."""
    raw = raw.strip("/") if raw in ("/", "") else raw
    if not raw:
        return ""
    check_key(raw.rstrip("/"))  # the same rules as a key: no '..', no hidden folder, ...
    return raw.rstrip("/") + "/"


@dataclass(frozen=True, slots=True)
class Folder:
    name: str
    path: str
    items: int
    size: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "items": self.items, "size": self.size}


@dataclass(frozen=True, slots=True)
class Listing:
    """The sub-folders of ``parent`` and the totals of the items directly in it."""

    parent: str
    folders: list[Folder]
    items: int
    size: int

    def as_json(self) -> dict[str, Any]:
        return {
            "parent": self.parent,
            "folders": [f.as_json() for f in self.folders],
            "items": self.items,
            "size": self.size,
        }


async def listing(ledger: Ledger, dataset_id: int, parent: str, state: str = "live") -> Listing:
    """From the keys; a runtime dataset's persisted empty folders join them (0 items)."""
    folders, items, size = {}, 0, 0
    for name, n, nbytes in await ledger.folder_counts(dataset_id, parent, state):
        if name:
            folders[name] = Folder(name, parent + name + "/", n, nbytes)
        else:
            items, size = n, nbytes
    for path in await ledger.empty_folders(dataset_id, parent):
        name = path[len(parent) :].split("/", 1)[0]
        folders.setdefault(name, Folder(name, parent + name + "/", 0, 0))
    return Listing(parent, [folders[n] for n in sorted(folders)], items, size)


async def create_folder(agent: Agent, dataset: str, path: str) -> dict[str, Any]:
    """An empty folder: persisted in a runtime dataset's catalog, refused in a synced one."""
    folder = parent_of(path)
    if not folder:
        raise InvalidKey("a folder path must not be empty")
    if dataset in agent.settings.datasets:
        refuse_empty_folder(path)
    assert agent.ledger is not None
    created = await agent.ledger.add_folder(await agent.ledger.dataset_id(dataset), folder)
    return {"folder": folder, "created": created}


async def all_under(ledger: Ledger, dataset_id: int, folder: str) -> list[Item]:
    """Every live item under ``folder`` (at any depth)."""
    out: list[Item] = []
    async for item in ledger.iter_items(dataset_id, prefix=folder, state=ItemState.LIVE):
        out.append(item)
    return out


@dataclass(frozen=True, slots=True)
class FolderDeleted:
    folder: str
    result: str  # "deleted" (ops queued) or "tombstoned"
    items: int
    ops: list[int]

    def as_json(self) -> dict[str, Any]:
        return {"folder": self.folder, "result": self.result, "items": self.items, "ops": self.ops}


def decide(
    *,
    folder: str,
    items: int,
    live: int,
    read_only: bool,
    allow_delete: bool,
    storage_denies: str | None,
    max_delete_ratio: float,
    max_delete_count: int,
    force: bool,
) -> gate.OpDecision:
    """The gate's answer for a whole folder: the mass-delete guard first (a folder is many
    deletes at once), then the same decision a single delete gets. Raises Refused."""
    guard = gate.removal_guard(
        removals=items,
        live_before=live,
        listing_complete=True,
        max_delete_ratio=max_delete_ratio,
        max_delete_count=max_delete_count,
        force=force,
    )
    if not guard.allowed:
        raise Refused(guard.reason, f"deleting folder {folder!r}: {guard.message}")
    decision = gate.decide_delete(
        key=folder.rstrip("/"), read_only=read_only, allow_delete=allow_delete, storage_denies=storage_denies
    )
    if not decision.allowed:
        raise Refused(decision.reason, f"deleting folder {folder!r}: {decision.message}")
    return decision


def refuse_empty_folder(path: str) -> NoReturn:
    """Creating an empty folder in a synced dataset: always refused (see the module's docstring)."""
    if not path.strip("/"):
        raise InvalidKey("a folder path must not be empty")
    raise Refused(NO_EMPTY_FOLDERS, f"cannot create folder {path!r}: {NO_EMPTY_FOLDERS_WHY}")


async def drop_folder(agent: Agent, dataset: str, folder: str, *, force: bool = False) -> FolderDeleted:
    """Delete every live item under ``folder`` through the gate, as one operation: the
    mass-delete guard counts the folder as a whole (``force`` passes it), the gate decides
    for the driver as for one item, and then either every item is tombstoned in one ledger
    transaction (no ``allow_delete``) or one delete op per item is queued in one outbox
    transaction (each conditional on the item's etag, executed by the outbox as any delete)."""
    ledger = agent.ledger
    assert ledger is not None
    ds_id = await ledger.dataset_id(dataset)
    doomed = await all_under(ledger, ds_id, folder)
    if dataset not in agent.settings.datasets:
        return await _unlink_folder(agent, dataset, ds_id, folder, doomed, force)
    ds = agent.settings.datasets[dataset]
    driver = agent.settings.drivers[ds.driver]
    if not doomed:
        raise NotFound(f"dataset {dataset!r} has no live item under folder {folder!r}", key=folder)
    decision = decide(
        folder=folder,
        items=len(doomed),
        live=await ledger.live_count(ds_id),
        read_only=ds.read_only,
        allow_delete=driver.allow_delete,
        storage_denies=agent.storage_denies(dataset),
        max_delete_ratio=ds.max_delete_ratio,
        max_delete_count=ds.max_delete_count,
        force=force,
    )
    if decision.action == gate.TOMBSTONE:
        await ledger.tombstone_many([i.id for i in doomed])
        metrics.TOMBSTONES.labels(dataset).inc(len(doomed))
        await agent.refresh_item_gauges(dataset)
        log.info("folder tombstoned", dataset=dataset, folder=folder, items=len(doomed))
        return FolderDeleted(folder, "tombstoned", len(doomed), [])
    ops = await ledger.enqueue_deletes(ds_id, [(i.key, i.etag) for i in doomed])
    agent.outbox.wake.set()
    log.info("folder delete queued", dataset=dataset, folder=folder, items=len(doomed), ops=len(ops))
    return FolderDeleted(folder, "deleted", len(doomed), ops)


#: a runtime dataset has no config: its folder deletes pass the default guard
DEFAULT_RATIO = 0.5


async def _unlink_folder(
    agent: Agent, dataset: str, ds_id: int, folder: str, doomed: list[Item], force: bool
) -> FolderDeleted:
    """A folder of a clone or merge: its pointers are unlinked, never storage (the gate's
    UNLINK); the mass-delete guard still counts them together."""
    ledger = agent.ledger
    assert ledger is not None
    if not doomed and not await ledger.empty_folders(ds_id, folder[:-1]):  # the folder itself, or under it
        raise NotFound(f"dataset {dataset!r} has no folder {folder!r}", key=folder)
    guard = gate.removal_guard(
        removals=len(doomed),
        live_before=await ledger.live_count(ds_id),
        listing_complete=True,
        max_delete_ratio=DEFAULT_RATIO,
        max_delete_count=0,
        force=force,
    )
    if not guard.allowed:
        raise Refused(guard.reason, f"deleting folder {folder!r}: {guard.message}")
    decision = gate.decide_delete(key=folder, read_only=False, allow_delete=False, pointer=True)
    assert decision.action == gate.UNLINK
    await ledger.remove(None, [i.id for i in doomed])
    await ledger.drop_folders(ds_id, folder)
    log.info("folder unlinked", dataset=dataset, folder=folder, items=len(doomed))
    return FolderDeleted(folder, "unlinked", len(doomed), [])
