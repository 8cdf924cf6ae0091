"""Datasets created at run time: clones and merges of synced datasets, as pointer items.

A clone is persisted in the ledger (``kind`` ``clone``, ``source`` the dataset it came
from), never synced upstream and without a driver of its own: its items point at the
source's binaries (same driver, same keys, nothing copied in storage). Deleting in a
clone unlinks the pointer only; the gate decides so, whatever ``allow_delete`` says.
"""

from __future__ import annotations

import re
from typing import Any

import structlog

from bucketsync.agent import Agent
from bucketsync.catalog.query import compile_filter
from bucketsync.core import gate
from bucketsync.core.errors import AlreadyExists, ConfigError, NotFound
from bucketsync.core.model import Item

log = structlog.get_logger("bucketsync.catalog")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


async def kind_of(agent: Agent, name: str) -> tuple[str, str | None] | None:
    """(kind, source) of a runtime dataset, None for a configured one; ConfigError (404)
    naming the known datasets when it is neither."""
    if name in agent.settings.datasets:
        return None
    assert agent.ledger is not None
    runtime = await agent.ledger.runtime_datasets()
    if name in runtime:
        return runtime[name]
    agent.settings.dataset(name)  # raises ConfigError naming the configured datasets
    raise ConfigError(f"no dataset {name!r}")


async def clone(agent: Agent, source: str, name: Any, with_metadata: bool, flt: Any) -> dict[str, Any]:
    """Create the clone ``name`` of the synced dataset ``source``: one INSERT ... SELECT."""
    ledger = agent.ledger
    assert ledger is not None
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"a clone's name must match {NAME.pattern}, not {name!r}")
    if source not in agent.settings.datasets:
        raise ValueError(f"{source!r} is not a synced dataset: a clone is made of a synced dataset's items")
    if name in agent.settings.datasets or name in await ledger.runtime_datasets() or await ledger.find_dataset(name):
        raise AlreadyExists(f"a dataset named {name!r} exists already")
    where = compile_filter(flt if flt is not None else {})
    src_id = await ledger.dataset_id(source)
    _id, n = await ledger.create_clone(name, src_id, source, where.sql, where.params, with_metadata)
    log.info("cloned", dataset=name, source=source, items=n, with_metadata=with_metadata)
    return {"dataset": name, "kind": "clone", "source": source, "items": n}


ON_CONFLICT = ("folder", "suffix", "merge")


async def merge(agent: Agent, name: Any, sources: Any, on_conflict: Any) -> dict[str, Any]:
    """Create the merge ``name`` of synced datasets ``sources`` (see ``Ledger.create_merge``)."""
    ledger = agent.ledger
    assert ledger is not None
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"a merge's name must match {NAME.pattern}, not {name!r}")
    if not isinstance(sources, list) or not all(isinstance(src, str) for src in sources):
        raise ValueError('"sources" must list two or more different synced datasets')
    if len(sources) < 2 or len(set(sources)) != len(sources):
        raise ValueError('"sources" must list two or more different synced datasets')
    for src in sources:
        if src not in agent.settings.datasets:
            await kind_of(agent, src)  # ConfigError (404) for no dataset at all
            raise ValueError(f"{src!r} is not a synced dataset: a merge is made of synced datasets' items")
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f'"on_conflict" must be one of {", ".join(ON_CONFLICT)}')
    if name in agent.settings.datasets or name in await ledger.runtime_datasets() or await ledger.find_dataset(name):
        raise AlreadyExists(f"a dataset named {name!r} exists already")
    ids = [(await ledger.dataset_id(src), src) for src in sources]
    _id, n = await ledger.create_merge(name, ids, on_conflict)
    log.info("merged", dataset=name, sources=sources, items=n, on_conflict=on_conflict)
    return {"dataset": name, "kind": "merge", "source": ",".join(sources), "items": n}


async def unlink_pointer(agent: Agent, dataset: str, item: Item) -> dict[str, Any]:
    """Unlink a clone's item; the gate says it never reaches storage."""
    ledger = agent.ledger
    assert ledger is not None
    decision = gate.decide_delete(key=item.key, read_only=False, allow_delete=False, pointer=True)
    assert decision.allowed and decision.action == gate.UNLINK
    await ledger.remove(None, [item.id])
    log.info("unlinked", dataset=dataset, key=item.key, item=item.id)
    return {"result": "unlinked", "item": None, "op": None}


async def runtime_status(agent: Agent, names: list[str]) -> list[dict[str, Any]]:
    """Status rows of runtime datasets, in the shape of the synced ones (no driver, no runs)."""
    if not names:
        return []  # GET /datasets without clones: no reads on the polled path
    ledger = agent.ledger
    assert ledger is not None
    runtime = await ledger.runtime_datasets()
    meta = await ledger.datasets_meta()
    out = []
    for name in names:
        kind, source = runtime[name]
        ds_id = await ledger.find_dataset(name)
        if ds_id is None:
            raise NotFound(f"no dataset {name!r}")
        out.append(
            {
                "dataset": name,
                "kind": kind,
                "source": source,
                "driver": None,
                "url": None,
                "sync": "never",
                "interval": 0.0,
                "read_only": False,
                "allow_delete": False,
                "items": await ledger.counts_by_state(ds_id),
                "last_run": None,
                "next_run": None,
                "running": None,
                "ready": None,
                "not_ready_reason": None,
                "downstream": None,
                "downstream_reason": None,
                "guard_blocked": False,
                "metadata": meta.get(name, {}),
            }
        )
    return out
