"""The outbox under real network faults: a ``FaultProxy`` between the agent and each emulator.

The agent runs in-process (real ledger file, the real outbox worker) with its driver's
endpoint pointed at the proxy; what storage really holds is read straight from the
emulator, past the proxy. Issue 14 points 1 and 2, issue 13 points 11 and 13.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bucketsync.agent import Agent
from bucketsync.config import Settings
from bucketsync.core.model import ObjectInfo, OpState, RunStatus
from bucketsync.downstream.ops import Downstream
from bucketsync.stores import Store, one_chunk, open_store, read_all
from emulators.azure import ACCOUNT, ACCOUNT_KEY, PREFIX, Azurite
from emulators.gcs import FakeGcs
from emulators.s3 import REGION, S3Emulator
from faults import Action, FaultProxy, Rule

#: a put's wait for its op; generous: a waiter that times out only reports "pending"
WAIT = 120.0
#: how long the proxy holds a stalled response back (the issue measured 65 s stalls)
STALL = 65.0


@dataclass
class Target:
    """One emulator reached through a proxy: how to build the driver, and the upstream port."""

    name: str
    port: int
    driver: Callable[[str], dict[str, Any]]  # proxy url -> driver config
    integrations: dict[str, Any]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


@pytest.fixture(params=["seaweedfs", "azurite", "fake-gcs"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "seaweedfs":
        s3: S3Emulator = request.getfixturevalue("seaweedfs")
        bucket = s3.new_bucket()
        return Target(
            "seaweedfs",
            _port(s3.endpoint_url),
            lambda url: {
                "url": f"s3://{bucket}/{PREFIX}",
                "integration": "cloud",
                "endpoint_url": url,
                "region": REGION,
            },
            {"cloud": {"kind": "aws", "access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key}},
        )
    if request.param == "azurite":
        az: Azurite = request.getfixturevalue("azurite")
        container = f"t{uuid.uuid4().hex[:20]}"
        az.container(container).create_container()
        return Target(
            "azurite",
            az.port,
            lambda url: {
                "url": f"az://{ACCOUNT}/{container}/{PREFIX}",
                "integration": "cloud",
                "endpoint_url": f"{url}/{ACCOUNT}",
            },
            {"cloud": {"kind": "azure", "account_key": ACCOUNT_KEY}},
        )
    gcs: FakeGcs = request.getfixturevalue("fake_gcs")
    bucket = gcs.create_bucket()
    return Target("fake-gcs", _port(gcs.url), lambda url: {"url": f"gs://{bucket}/{PREFIX}", "endpoint_url": url}, {})


def settings_for(tmp_path: Path, target: Target, proxy_url: str, **driver: Any) -> Settings:
    return Settings(
        agent={"ledger": str(tmp_path / "var" / "ledger.db"), "outbox_concurrency": 8},
        integrations=target.integrations,
        drivers={"d": {**target.driver(proxy_url), "allow_delete": True, **driver}},
        datasets={"ds": {"driver": "d", "sync": "manual"}},
    )


class Running:
    """An agent with its outbox worker running, and a store that bypasses the proxy."""

    def __init__(self, agent: Agent, direct: Store) -> None:
        self.agent = agent
        self.direct = direct
        self.down = Downstream(agent, agent.outbox, wait=WAIT)

    async def storage(self) -> dict[str, ObjectInfo]:
        return {o.key: o async for o in self.direct.list()}

    async def catalog(self) -> dict[str, tuple[int, str | None]]:
        ledger = self.agent.ledger
        assert ledger is not None
        ds = await ledger.dataset_id("ds")
        return {i.key: (i.size, i.etag) async for i in ledger.iter_items(ds)}


async def running(tmp_path: Path, target: Target, proxy: FaultProxy, **driver: Any) -> AsyncIterator[Running]:
    settings = settings_for(tmp_path, target, proxy.url, **driver)
    direct_settings = settings_for(tmp_path, target, f"http://127.0.0.1:{target.port}")
    direct = open_store(direct_settings.drivers["d"], direct_settings)
    stop = asyncio.Event()
    try:
        async with Agent(settings) as agent:
            worker = asyncio.create_task(agent.outbox.run(stop))
            try:
                yield Running(agent, direct)
            finally:
                stop.set()
                await proxy.close()  # ends stalls, so the worker's last ops finish now
                await worker
    finally:
        await direct.aclose()


# -- 14.1 / 13.11: own writes under lost replies ------------------------------------------------


CREATES = 120
OVERWRITES = 80


async def test_puts_under_lost_replies_all_succeed_and_catalog_equals_storage(tmp_path: Path, target: Target) -> None:
    """200 PUTs (120 create-only, 80 overwrites) with ~20% faults, most of them lost replies:
    the server stored the object, the answer never arrived. Every op ends done, and the
    catalog is exactly what storage holds."""
    proxy = FaultProxy(
        target.port,
        rate=0.2,
        actions=(Action.LOST_REPLY, Action.LOST_REPLY, Action.LOST_REPLY, Action.DROP, Action.ERROR),
        seed=1402,
    )
    await proxy.start()
    gen = running(tmp_path, target, proxy)
    env = await anext(gen)
    try:
        rng = random.Random(7)
        bodies = {f"obj-{i:03d}.bin": rng.randbytes(rng.randint(1, 2048)) for i in range(CREATES)}
        outcomes = await asyncio.gather(*(env.down.put("ds", k, one_chunk(b)) for k, b in bodies.items()))
        assert [o.result for o in outcomes] == ["created"] * CREATES
        rewrites = {k: rng.randbytes(rng.randint(1, 2048)) for k in list(bodies)[:OVERWRITES]}
        outcomes = await asyncio.gather(
            *(env.down.put("ds", k, one_chunk(b), overwrite=True) for k, b in rewrites.items())
        )
        assert [o.result for o in outcomes] == ["overwritten"] * OVERWRITES
        bodies |= rewrites

        ledger = env.agent.ledger
        assert ledger is not None
        assert await ledger.ops(state=OpState.FAILED) == []
        assert await ledger.backlog() == 0
        assert proxy.stats[Action.LOST_REPLY] >= 20, proxy.stats  # the faults really happened

        storage = await env.storage()
        catalog = await env.catalog()
        assert set(storage) == set(bodies)
        assert catalog == {k: (o.size, o.etag) for k, o in storage.items()}
        for key in rng.sample(sorted(bodies), 10):
            assert await read_all(env.direct, key) == bodies[key]
        assert not list(env.agent.outbox.staging.glob("*"))  # every staged body cleaned up
    finally:
        await gen.aclose()


# -- 14.2: one stalled request does not hold the others -----------------------------------------


async def test_a_stalled_put_does_not_hold_other_ops(tmp_path: Path, target: Target) -> None:
    """One PUT stalls behind the proxy (65 s, read timeout 30 s): ten others complete while it
    is still stalled, because ops run concurrently."""
    proxy = FaultProxy(target.port, rules=[Rule(Action.STALL, path="slow", times=1, stall=STALL)])
    proxy.rules[0].matches = lambda req: req.method in ("PUT", "POST")
    await proxy.start()
    gen = running(tmp_path, target, proxy)
    env = await anext(gen)
    try:
        slow = asyncio.create_task(env.down.put("ds", "slow.bin", one_chunk(b"slow")))
        await _until(lambda: proxy.stalling == 1)
        outcomes = await asyncio.gather(*(env.down.put("ds", f"fast-{i}.bin", one_chunk(b"x" * i)) for i in range(10)))
        assert [o.result for o in outcomes] == ["created"] * 10
        assert proxy.stalling == 1 and not slow.done()  # still stalled, yet the others are done
        proxy.release()  # end the stall (a reset): the op retries and completes
        assert (await slow).result == "created"
        assert set(await env.storage()) == {"slow.bin", *(f"fast-{i}.bin" for i in range(10))}
    finally:
        await gen.aclose()


# -- 13.13: a stall costs the read timeout, not minutes ------------------------------------------


async def test_a_stalled_put_is_retried_after_the_read_timeout(tmp_path: Path, target: Target) -> None:
    """The proxy stalls the PUT's response for 65 s; with ``read_timeout = 1`` the client gives
    up after a second, retries, meets its own write and is done, while the stall still lasts."""
    proxy = FaultProxy(target.port, rules=[Rule(Action.STALL, path="stalled", times=1, stall=STALL)])
    proxy.rules[0].matches = lambda req: req.method in ("PUT", "POST")
    await proxy.start()
    gen = running(tmp_path, target, proxy, read_timeout="1s", connect_timeout="1s")
    env = await anext(gen)
    try:
        # A hang guard, not a speed goal: the old 60-120 s read timeouts could not finish in it.
        async with asyncio.timeout(STALL / 2):
            out = await env.down.put("ds", "stalled.bin", one_chunk(b"stalled body"))
        assert out.result == "created"
        assert proxy.stalling == 1  # the 65 s stall is still going on: the op did not wait for it
        assert await read_all(env.direct, "stalled.bin") == b"stalled body"
    finally:
        await gen.aclose()


async def test_a_stalled_listing_is_retried_after_the_read_timeout(tmp_path: Path, target: Target) -> None:
    proxy = FaultProxy(target.port, rules=[Rule(Action.STALL, method="GET", times=1, stall=STALL)])
    await proxy.start()
    gen = running(tmp_path, target, proxy, read_timeout="1s", connect_timeout="1s")
    env = await anext(gen)
    try:
        await env.direct.put("a.txt", one_chunk(b"a"))
        await env.direct.put("b.txt", one_chunk(b"b"))
        proxy.rules[0].used = 0  # the first GET from here on stalls
        async with asyncio.timeout(STALL / 2):  # a hang guard, as above
            result = await env.agent.loop("ds").run_once()
        assert result.status is RunStatus.OK, result
        assert result.counts.added == 2
        assert proxy.stats[Action.STALL] == 1 and proxy.stalling == 1
    finally:
        await gen.aclose()


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll a condition the proxy's own task changes (it has no event to wait on)."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def test_driver_timeouts_reach_every_sdk(tmp_path: Path) -> None:
    """``connect_timeout`` / ``read_timeout`` on a driver end up in each SDK's client settings."""
    settings = Settings(
        agent={"ledger": str(tmp_path / "ledger.db")},
        integrations={"az": {"kind": "azure", "account_key": ACCOUNT_KEY}},
        drivers={
            "s3": {
                "url": "s3://bucket/p/",
                "endpoint_url": "http://127.0.0.1:1",
                "connect_timeout": "2s",
                "read_timeout": 7,
            },
            "gs": {
                "url": "gs://bucket/p/",
                "endpoint_url": "http://127.0.0.1:1",
                "connect_timeout": 2,
                "read_timeout": 7,
            },
            "az": {
                "url": f"az://{ACCOUNT}/container/p/",
                "integration": "az",
                "endpoint_url": "http://127.0.0.1:1/x",
                "connect_timeout": 2,
                "read_timeout": "7s",
            },
            "default": {"url": "s3://bucket/p/", "endpoint_url": "http://127.0.0.1:1"},
        },
    )
    s3 = open_store(settings.drivers["s3"], settings)
    config = s3._botocore_config()  # type: ignore[attr-defined]
    assert (config.connect_timeout, config.read_timeout) == (2, 7)
    gs = open_store(settings.drivers["gs"], settings)
    assert (gs.timeout.sock_connect, gs.timeout.sock_read, gs.timeout.total) == (2, 7, None)  # type: ignore[attr-defined]
    az = open_store(settings.drivers["az"], settings)
    assert (az._connect_timeout, az._read_timeout) == (2, 7)  # type: ignore[attr-defined]
    default = open_store(settings.drivers["default"], settings)
    config = default._botocore_config()  # type: ignore[attr-defined]
    assert (config.connect_timeout, config.read_timeout) == (5, 30)  # seconds, not a minute
