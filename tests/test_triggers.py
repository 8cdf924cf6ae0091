"""Triggers: a real webhook server (signed, a 500 then 200; one always 500 and dead-lettered), a
local command fed the event on stdin, durable deliveries in the ledger, and the API that shows them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.util
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import images
from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.config import Settings, TriggerConfig, load_settings
from bucketsync.core.errors import ConfigError
from bucketsync.enrich import Deliveries
from bucketsync.server.api import make_app
from bucketsync.stores import one_chunk

DS = "photos"
REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret-for-tests"


@dataclass
class Hooks:
    """The receiving end: what each path was sent, and whether the signature held."""

    url: str
    seen: dict[str, list[tuple[dict[str, Any], bool]]] = field(default_factory=dict)
    fail_first: set[str] = field(default_factory=set)


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    state = Hooks("")

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(request.headers.get("X-Bucketsync-Signature", ""), expected)
        path = request.match_info["name"]
        event = json.loads(body)
        state.seen.setdefault(path, []).append((event, valid))
        if path == "always-500":
            return web.Response(status=500, text="broken on purpose")
        first = (path, event["event"], event["item"]["key"])
        if path == "flaky" and str(first) not in state.fail_first:
            state.fail_first.add(str(first))
            return web.Response(status=500, text="try again")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{name}", receive)
    server = TestServer(app)
    await server.start_server()
    state.url = str(server.make_url(""))
    try:
        yield state
    finally:
        await server.close()


def make_settings(tmp_path: Path, triggers: list[dict[str, Any]]) -> Settings:
    root = tmp_path / "bucket"
    root.mkdir(exist_ok=True)
    return Settings(
        agent={"ledger": tmp_path / "var" / "ledger.db"},
        drivers={"d": {"url": f"file://{root}"}},
        datasets={DS: {"driver": "d", "sync": "manual", "triggers": triggers}},
        enrich={"enabled": True, "thumbnails": False},
    )


async def settle(agent: Agent) -> None:
    """Deliver until nothing is pending (retries are due after a few ms with retry_base=10ms)."""
    assert agent.ledger is not None
    store = Deliveries(agent.ledger)
    for _ in range(500):
        await agent.triggers.drain()
        if not await store.list(state="pending"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"deliveries still pending: {await store.list(state='pending')}")


async def test_signed_webhook_retried_after_a_500_and_dead_lettered_after_n(tmp_path: Path, hooks: Hooks) -> None:
    out = tmp_path / "exec.jsonl"
    script = f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')"
    settings = make_settings(
        tmp_path,
        [
            {
                "name": "flaky",
                "on": ["created", "enriched"],
                "include": ["*.jpg"],
                "url": f"{hooks.url}/flaky",
                "secret": SECRET,
                "retry_base": "10ms",
            },
            {
                "name": "dead",
                "on": ["removed"],
                "url": f"{hooks.url}/always-500",
                "max_attempts": 3,
                "retry_base": "10ms",
            },
            {"name": "cmd", "on": ["created", "updated"], "exec": [sys.executable, "-c", script]},
        ],
    )
    metrics.init_hooks(settings)
    dead_before = metrics.TRIGGER_DELIVERIES.labels(DS, "dead", "dead")._value.get()
    async with Agent(settings) as agent:
        store = agent.stores["d"]
        await store.put("a.jpg", one_chunk(images.jpeg()))
        await store.put("notes.txt", one_chunk(b"hello"))
        loop = agent.loop(DS)
        await loop.run_once()
        await agent.enricher.drain()
        await settle(agent)

        # flaky: created and enriched for a.jpg only (the key filter), each a 500 then a 200,
        # the retry with the same body, every request signed.
        flaky = hooks.seen["flaky"]
        assert all(valid for _, valid in flaky)
        assert sorted((e["event"], e["item"]["key"]) for e, _ in flaky) == [
            ("created", "a.jpg"),
            ("created", "a.jpg"),
            ("enriched", "a.jpg"),
            ("enriched", "a.jpg"),
        ]
        for kind in ("created", "enriched"):
            first, retry = [e for e, _ in flaky if e["event"] == kind]
            assert first == retry  # the same delivery, the same body
        enriched = next(e for e, _ in flaky if e["event"] == "enriched")["item"]
        assert enriched["system"]["mimetype"] == "image/jpeg" and enriched["system"]["enrichment"] == "done"

        # cmd: the event as JSON on stdin, every key.
        lines = [json.loads(line) for line in out.read_text().splitlines() if line]
        assert sorted(e["item"]["key"] for e in lines) == ["a.jpg", "notes.txt"]
        assert all(e["event"] == "created" and e["dataset"] == DS for e in lines)

        # dead: a removal, refused 3 times, then dead-lettered with the reason.
        await store.delete("notes.txt")
        await loop.run_once()
        await settle(agent)
        assert [e["event"] for e, _ in hooks.seen["always-500"]] == ["removed"] * 3
        assert agent.ledger is not None
        (dead,) = await Deliveries(agent.ledger).list(state="dead")
        assert dead.trigger == "dead" and dead.key == "notes.txt" and dead.attempts == 3
        assert dead.error is not None and "HTTP 500" in dead.error and "broken on purpose" in dead.error
        assert metrics.TRIGGER_DELIVERIES.labels(DS, "dead", "dead")._value.get() == dead_before + 1

        async with TestClient(TestServer(make_app(agent, asyncio.Event()))) as client:
            resp = await client.get("/api/v1/triggers/deliveries", params={"state": "dead"})
            body = await resp.json()
            assert resp.status == 200 and [d["key"] for d in body["deliveries"]] == ["notes.txt"]
            assert body["counts"][DS] == {"pending": 0, "done": 4, "dead": 1}
            resp = await client.get("/api/v1/triggers/deliveries", params={"state": "nope"})
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_parameter"

        # updated: a new version of a key (a new etag) reaches the command as `updated`.
        await store.put("a.jpg", one_chunk(images.jpeg(seed=9)))
        await loop.run_once()
        await settle(agent)
        lines = [json.loads(line) for line in out.read_text().splitlines() if line]
        assert [(e["event"], e["item"]["key"]) for e in lines if e["event"] == "updated"] == [("updated", "a.jpg")]


async def test_events_are_durable_across_a_restart(tmp_path: Path, hooks: Hooks) -> None:
    """Events are rows committed with the items: the next agent delivers what the last one did not."""
    settings = make_settings(tmp_path, [{"name": "ok", "on": ["created"], "url": f"{hooks.url}/ok"}])
    async with Agent(settings) as agent:
        await agent.stores["d"].put("a.txt", one_chunk(b"a"))
        await agent.loop(DS).run_once()  # and the agent stops before any delivery
    assert "ok" not in hooks.seen
    async with Agent(settings) as agent:
        await settle(agent)
    assert [(e["event"], e["item"]["key"]) for e, _ in hooks.seen["ok"]] == [("created", "a.txt")]


async def test_a_target_that_hangs_does_not_hold_sync(tmp_path: Path) -> None:
    arrived, hang = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await hang.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/", slow)
    server = TestServer(app)
    await server.start_server()
    url = str(server.make_url("/"))
    settings = make_settings(
        tmp_path, [{"name": "slow", "on": ["created"], "url": url, "timeout": "300ms", "max_attempts": 1}]
    )
    stop = asyncio.Event()
    try:
        async with Agent(settings) as agent:
            store, loop = agent.stores["d"], agent.loop(DS)
            await store.put("a.txt", one_chunk(b"a"))
            await loop.run_once()
            worker = asyncio.create_task(agent.triggers.run(stop))
            await arrived.wait()  # a delivery is stuck at the target
            await store.put("b.txt", one_chunk(b"b"))
            result = await loop.run_once()
            assert (str(result.status), result.counts.added) == ("ok", 1)
            assert agent.triggers.running  # still in flight while the run came and went
            stop.set()
            await worker
            assert agent.ledger is not None
            dead = await Deliveries(agent.ledger).list(state="dead")
            assert "a.txt" in [d.key for d in dead]
            assert all(d.error is not None and "no answer within timeout=0.3s" in d.error for d in dead)
    finally:
        hang.set()
        await server.close()


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ({"on": ["created"]}, "set url (a webhook) or exec (a local command): exactly one"),
        ({"on": ["created"], "url": "http://x", "exec": ["true"]}, "exactly one"),
        ({"on": [], "url": "http://x"}, "on"),
        ({"on": ["born"], "url": "http://x"}, "on"),
        ({"on": ["created"], "url": "ftp://x"}, "must be an http:// or https:// URL"),
        ({"on": ["created"], "exec": ["true"], "secret": "s"}, "secret applies to webhooks"),
    ],
)
def test_bad_trigger_config_names_the_culprit(tmp_path: Path, trigger: dict[str, Any], message: str) -> None:
    import tomllib  # noqa: F401 - the config below is TOML, as users write it

    lines = [f"{k} = {json.dumps(v)}" for k, v in trigger.items()]
    cfg = tmp_path / "bucketsync.toml"
    cfg.write_text(
        f'[drivers.d]\nurl = "file://{tmp_path}"\n[datasets.photos]\ndriver = "d"\n'
        "[[datasets.photos.triggers]]\n" + "\n".join(lines) + "\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert "datasets.photos.triggers.0" in str(err.value) and message in str(err.value)


async def test_the_documented_webhook_adds_a_label_through_patch(tmp_path: Path) -> None:
    """docs/enrichment.md's worked example (examples/webhooks/label.py), run for real: an
    ``enriched`` event reaches it signed, and it PATCHes the label into the item's user metadata."""
    spec = importlib.util.spec_from_file_location("label_hook", REPO / "examples" / "webhooks" / "label.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    settings = make_settings(tmp_path, [])  # the webhook's URL is known once it listens: set below
    async with Agent(settings) as agent:
        api = TestServer(make_app(agent, asyncio.Event()))
        await api.start_server()
        hook = TestServer(example.make_app(SECRET, str(api.make_url("")).rstrip("/")))
        await hook.start_server()
        try:
            trigger = {"name": "label", "on": ["enriched"], "url": str(hook.make_url("/hook")), "secret": SECRET}
            conf = settings.datasets[DS].model_copy(update={"triggers": [TriggerConfig(**trigger)]})
            agent.settings = settings.model_copy(update={"datasets": {DS: conf}})
            await agent.enricher.sync_datasets()
            await agent.stores["d"].put("tall.jpg", one_chunk(images.jpeg(60, 40, orientation=6)))
            await agent.stores["d"].put("wide.jpg", one_chunk(images.jpeg(60, 40)))
            await agent.loop(DS).run_once()
            await agent.enricher.drain()
            await settle(agent)
            assert agent.ledger is not None
            assert await Deliveries(agent.ledger).list(state="dead") == []
            ds_id = await agent.ledger.dataset_id(DS)
            labels = {i.key: i.meta.get("shape") for i in await agent.ledger.items(ds_id)}
            assert labels == {"tall.jpg": "portrait", "wide.jpg": "landscape"}
        finally:
            await hook.close()
            await api.close()


async def test_finished_deliveries_are_pruned_pending_ones_never(tmp_path: Path, hooks: Hooks) -> None:
    settings = make_settings(tmp_path, [{"name": "ok", "on": ["created"], "url": f"{hooks.url}/ok"}])
    async with Agent(settings) as agent:
        assert agent.ledger is not None
        store = Deliveries(agent.ledger)
        for i in range(3):
            await agent.stores["d"].put(f"f{i}.txt", one_chunk(b"x"))
        await agent.loop(DS).run_once()
        await settle(agent)
        await agent.stores["d"].put("late.txt", one_chunk(b"x"))
        await agent.loop(DS).run_once()
        await agent.triggers.dispatch()  # late.txt: pending, not delivered yet
        assert await store.prune(time.time() + 1, keep=1) == 2  # the newest finished one is kept
        left = sorted((d.key, d.state) for d in await store.list())
        assert left == [("f2.txt", "done"), ("late.txt", "pending")]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_each_item_event_is_fanned_out_once_by_whichever_agent_takes_it(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Two agents that read the same events (a lease moved between one's read and its write, or
    both read before either wrote) fan them out once: only the events a transaction deletes get
    deliveries. And an agent on a shared ledger reads only the events and deliveries of its datasets."""
    place: Any = tmp_path / "ledger.db"
    if backend == "postgresql":
        place = request.getfixturevalue("postgres_server").new_database()
    from bucketsync.ledger.ledger import Ledger

    ledgers = [await Ledger.open(place)]
    if backend == "postgresql":
        ledgers.append(await Ledger.open(place))  # a second agent: its own connections
    try:
        mine, other = await ledgers[0].dataset_id("mine"), await ledgers[0].dataset_id("other")
        async with ledgers[0].db.transaction() as tx:
            await tx.executemany(
                "INSERT INTO item_events (dataset_id, item_id, kind, key, etag, size, created) "
                "VALUES (?, ?, 'created', ?, NULL, 1, 0)",
                [(ds, i, f"k{i}") for i, ds in enumerate([mine, mine, mine, other])],
            )
        a, b = Deliveries(ledgers[0]), Deliveries(ledgers[-1])
        seen = await a.events(datasets=["mine"])
        assert [e[1] for e in seen] == ["mine"] * 3, "another agent's dataset is not read"
        assert await a.events(datasets=[]) == []

        def rows(events: list[tuple[Any, ...]]) -> list[tuple[int, int, str, str, str, str]]:
            return [(e[0], e[8], "hook", "created", e[4], "{}") for e in events]

        ids = [e[0] for e in seen]
        taken = await asyncio.gather(a.fan_out(ids, rows(seen)), b.fan_out(ids, rows(seen)))
        assert sorted(taken) == [0, 3], "one of the two takes every event, the other none"
        due = await a.due(time.time() + 1, 100, [])
        assert sorted(d.key for d in due) == ["k0", "k1", "k2"], "one delivery per event"
        assert await a.due(time.time() + 1, 100, [], datasets=["other"]) == []
        assert [e[4] for e in await b.events()] == ["k3"], "the other dataset's event waits for its owner"
    finally:
        for ledger in ledgers:
            await ledger.close()
