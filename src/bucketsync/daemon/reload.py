"""Reloading the configuration in a running agent (SIGHUP, ``bucketsync reload``).

``plan`` is pure: it compares the running settings with the new ones and says
which datasets are added, removed, changed or untouched. A dataset is *changed*
when its own section, its driver's, or its driver's integration changed,
including the contents of a ``*_file`` secret, so rotating a credential file and
reloading restarts exactly the datasets that use it. ``apply`` then stops the
removed and changed datasets (their runs end after the current batch, nothing
removed; the ledger keeps their catalogs), swaps the settings, and starts the
added and changed ones. Untouched datasets keep their loop, their store and any
run in progress.

The ``[agent]`` section (listen address, ledger, token, logging) cannot change
under a running server: a reload keeps the running values and says so.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.config import Settings, _Integration
from bucketsync.core.errors import ConfigError
from bucketsync.stores import open_store

log = structlog.get_logger("bucketsync.reload")


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    #: ``agent.*`` options that differ in the file but need a restart to take effect
    needs_restart: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "unchanged": list(self.unchanged),
            "needs_restart": list(self.needs_restart),
        }

    def summary(self) -> str:
        parts = [
            f"{label} {', '.join(names) if names else 'none'}"
            for label, names in (("added", self.added), ("removed", self.removed), ("changed", self.changed))
        ]
        text = "; ".join(parts) + f"; {len(self.unchanged)} untouched"
        if self.needs_restart:
            text += f"; needs a restart to apply: {', '.join(self.needs_restart)}"
        return text


def _integration_fingerprint(integ: _Integration, strict: bool) -> str:
    """The integration's options and the *values* of its secrets (hashed, never kept or logged).

    ``strict``: an unreadable secret file is a ``ConfigError`` (a new config); otherwise it
    counts as its own value (the running config, whose stores already read what they could).
    """
    h = hashlib.sha256(integ.model_dump_json().encode())
    for name in integ.SECRETS:
        try:
            value = integ.secret(name) or ""
        except ConfigError:
            if strict:
                raise
            value = "\0unreadable"
        h.update(b"\0" + value.encode())
    return h.hexdigest()


def driver_fingerprints(settings: Settings, *, strict: bool = True) -> dict[str, str]:
    """driver name -> a digest of its options, its integration's, and its secrets' contents.

    The supervisor takes these when its stores are opened: comparing them with a new config's
    tells which drivers (and so datasets) a reload must restart, rotated secret files included.
    """
    integrations = {name: _integration_fingerprint(i, strict) for name, i in settings.integrations.items()}
    out = {}
    for name, driver in settings.drivers.items():
        integ = integrations.get(driver.integration) if driver.integration else ""
        out[name] = hashlib.sha256(f"{driver.model_dump_json()}\0{integ}".encode()).hexdigest()
    return out


def plan(old: Settings, new: Settings, running: dict[str, str] | None = None) -> ReloadPlan:
    """What a reload from ``old`` to ``new`` does. ``running``: the fingerprints taken when ``old``'s
    stores were opened (default: now). Raises ``ConfigError`` if a new secret file is unreadable."""
    old_drivers = running if running is not None else driver_fingerprints(old, strict=False)
    new_drivers = driver_fingerprints(new)
    added, removed, changed, unchanged = [], [], [], []
    for name in sorted(old.datasets.keys() | new.datasets.keys()):
        before, after = old.datasets.get(name), new.datasets.get(name)
        if before is None:
            added.append(name)
        elif after is None:
            removed.append(name)
        elif before != after or old_drivers.get(before.driver) != new_drivers[after.driver]:
            changed.append(name)
        else:
            unchanged.append(name)
    agent_old, agent_new = old.agent.model_dump(), new.agent.model_dump()
    restart = tuple(f"agent.{k}" for k in agent_old if agent_old[k] != agent_new[k] and not _same_secret(old, new, k))
    return ReloadPlan(tuple(added), tuple(removed), tuple(changed), tuple(unchanged), restart)


def _same_secret(old: Settings, new: Settings, field: str) -> bool:
    # model_dump masks SecretStr values as '**********': compare the real ones.
    if field != "api_token":
        return False
    a, b = old.agent.api_token, new.agent.api_token
    return (a.get_secret_value() if a else None) == (b.get_secret_value() if b else None)


def effective(old: Settings, new: Settings) -> Settings:
    """The settings a reload runs with: the new file, but the running ``[agent]`` section."""
    return new.model_copy(update={"agent": old.agent})


class DatasetRunner(Protocol):
    """What ``apply`` needs from the supervisor: start a dataset's task, stop it and wait for it."""

    def start(self, name: str) -> None: ...

    async def stop(self, name: str) -> None: ...


async def apply(agent: Agent, runner: DatasetRunner, new: Settings, running: dict[str, str]) -> ReloadPlan:
    """Move the running agent to ``new``; datasets not in the plan's added/removed/changed are untouched.

    ``running`` holds the driver fingerprints of the running stores; it is updated in place.
    New stores are opened before anything stops, so a driver that cannot even be
    set up leaves the running configuration exactly as it was.
    """
    assert agent.ledger is not None
    new = effective(agent.settings, new)
    old_fp, new_fp = running, driver_fingerprints(new)
    p = plan(agent.settings, new, old_fp)
    old_stores = agent.stores
    stores = {n: s for n, s in old_stores.items() if n in new_fp and old_fp.get(n) == new_fp[n]}
    opened: list[Any] = []
    try:
        for name, driver in new.drivers.items():
            if name not in stores:
                stores[name] = open_store(driver, new)
                opened.append(stores[name])
    except BaseException:
        for store in opened:
            await _close(store)
        raise
    going = (*p.removed, *p.changed)
    old_loops = [agent.loops[n] for n in going if n in agent.loops]
    await asyncio.gather(*(runner.stop(n) for n in going))
    # A run the API started is not the loop's task: let it end before its loop is replaced.
    await asyncio.gather(*(loop.idle() for loop in old_loops))
    for name in p.removed:
        agent.loops.pop(name, None)
        agent.not_ready.pop(name, None)
        agent.downstream_unavailable.pop(name, None)
        metrics.forget_dataset(name)
    agent.settings = new
    agent.stores = stores
    await agent.ensure_indexes()  # a reload may name new indexes; existing ones are kept
    metrics.init({n: new.datasets[n] for n in p.added}, shared=agent.leases is not None)  # at 0, as at start-up
    metrics.init_events(n for n in p.changed if new.datasets[n].sync == "events")  # now in events mode
    metrics.init_hooks(agent.settings)
    await agent.enricher.sync_datasets()  # before the new loops commit anything
    for name in (*p.added, *p.changed):
        ds = new.datasets[name]
        agent.loops[name] = agent.make_loop(name, ds, stores[ds.driver])
        # Until its probe says otherwise: not ready, and storage's last known answer to writes.
        agent.set_ready(name, "permission probe not run yet")
        runner.start(name)
    for name, store in old_stores.items():
        if stores.get(name) is not store:
            await _close(store)
    running.clear()
    running.update(new_fp)
    return p


async def _close(store: Any) -> None:
    try:
        await store.aclose()
    except Exception:
        log.exception("closing a store failed", store=store.url)
