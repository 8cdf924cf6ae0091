"""Enrichment end to end in one process: real stores (a folder and the emulators), the real
ledger file, the real worker; thumbnails in the hidden folder, their cleanup, a restart
mid-queue, a read-only dataset's local cache, and puts through the outbox."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from structlog.testing import capture_logs

import images
from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.cli.main import cmd_enrich, parse_args
from bucketsync.config import Settings
from bucketsync.core.errors import ConfigError, NotFound
from bucketsync.core.keys import HIDDEN
from bucketsync.core.model import Counts, ObjectInfo
from bucketsync.downstream.ops import Downstream
from bucketsync.enrich import Enrichment, EnrichQueue, worker
from bucketsync.enrich.queue import Result
from bucketsync.enrich.triggers import Deliveries
from bucketsync.ledger.ledger import Ledger
from bucketsync.server.api import make_app
from bucketsync.stores import Store, one_chunk, read_all
from faults import Action, FaultProxy, Rule

DS = "photos"


def make_settings(
    tmp_path: Path, driver: dict[str, Any], integrations: dict[str, Any] | None = None, **ds: Any
) -> Settings:
    return Settings(
        agent={"ledger": tmp_path / "var" / "ledger.db", "enrich_concurrency": 3},
        integrations=integrations or {},
        drivers={"d": driver},
        datasets={DS: {"driver": "d", "sync": "manual", **ds}},
        enrich={"enabled": True, "thumbnail_size": 32, "cache_dir": tmp_path / "cache", "max_pixels": 10_000_000},
    )


def local_driver(tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "bucket"
    root.mkdir(exist_ok=True)
    return {"url": f"file://{root}"}


async def enrichment(agent: Agent) -> dict[str, Enrichment]:
    """Key -> the item's recorded enrichment."""
    assert agent.ledger is not None
    ds_id = await agent.ledger.dataset_id(DS)
    items = await agent.ledger.items(ds_id)
    found = await EnrichQueue(agent.ledger).of_items([i.id for i in items])
    return {i.key: found[i.id] for i in items if i.id in found}


async def put_all(store: Store, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        await store.put(key, one_chunk(data))


async def exists(store: Store, key: str) -> bool:
    try:
        await store.head(key)
    except NotFound:
        return False
    return True


FILES = {
    "a.jpg": images.jpeg(60, 40, orientation=6),
    "b.png": images.png(),
    "c.jpg": images.png(),  # a PNG named .jpg
    "notes.txt": b"just some text\n",
    "broken.jpg": images.truncated_jpeg(),
}


@pytest.mark.parametrize("kind", ["local", "s3", "gcs", "azure"])
async def test_thumbnails_land_in_the_hidden_folder_and_go_with_their_item(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "local":
        driver, integrations = local_driver(tmp_path), {}
    else:
        conf = request.getfixturevalue(f"{kind}_config")
        driver, integrations = conf["driver"], conf["integrations"]
    async with Agent(make_settings(tmp_path, driver, integrations)) as agent:
        store = agent.stores["d"]
        await put_all(store, FILES)
        loop = agent.loop(DS)
        assert (await loop.run_once()).counts.added == 5
        assert await agent.enricher.drain() == 5

        found = await enrichment(agent)
        a = found["a.jpg"]
        assert a.state == "done" and a.error is None
        assert a.meta["mimetype"] == "image/jpeg" and a.meta["orientation"] == 6
        assert (a.meta["width"], a.meta["height"], a.meta["display_width"], a.meta["display_height"]) == (
            60,
            40,
            40,
            60,
        )
        assert found["c.jpg"].meta["mimetype"] == "image/png"
        assert found["notes.txt"].state == "done" and found["notes.txt"].thumbnail is None
        assert found["notes.txt"].meta["encoding"] == "us-ascii"
        broken = found["broken.jpg"]
        assert broken.state == "failed" and broken.error is not None and "truncated" in broken.error
        assert (broken.meta["width"], broken.meta["height"]) == (400, 300)

        for key in ("a.jpg", "b.png", "c.jpg"):
            thumb = found[key].thumbnail
            assert thumb is not None and thumb.startswith(f"{HIDDEN}thumbnails/{key}.") and not found[key].local
            with Image.open(io.BytesIO(await read_all(store, thumb))) as im:
                assert im.format == "JPEG" and max(im.size) == 32
        with Image.open(io.BytesIO(await read_all(store, str(a.thumbnail)))) as im:
            assert im.size[0] < im.size[1]  # upright: orientation 6 shows the 60x40 image as portrait

        # Never indexed: the listing does not show the hidden folder, and a run adds nothing.
        assert sorted([o.key async for o in store.list()]) == sorted(FILES)
        again = await loop.run_once()
        assert (again.counts.listed, again.counts.added) == (5, 0)

        # Replaced and removed items take their thumbnails along (no allow_delete needed).
        await store.put("a.jpg", one_chunk(images.jpeg(80, 40, orientation=3, seed=7)))
        await store.delete("b.png")
        result = await loop.run_once()
        assert (result.counts.modified, result.counts.removed) == (1, 1)
        assert await agent.enricher.drain() == 1
        now = await enrichment(agent)
        assert "b.png" not in now
        assert not await exists(store, str(found["b.png"].thumbnail))
        assert not await exists(store, str(a.thumbnail))
        new_a = now["a.jpg"]
        assert new_a.state == "done" and new_a.thumbnail != a.thumbnail and new_a.meta["orientation"] == 3
        assert await exists(store, str(new_a.thumbnail))
        assert await exists(store, str(found["c.jpg"].thumbnail))  # untouched items keep theirs


async def test_a_restart_mid_queue_resumes_and_runs_nothing_twice(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, local_driver(tmp_path))
    async with Agent(settings) as agent:
        await put_all(agent.stores["d"], {f"img{i}.jpg": images.jpeg(seed=i) for i in range(6)})
        await agent.loop(DS).run_once()
        assert await agent.enricher.drain(max_items=2) == 2
    # A new agent on the same ledger (as after a restart) finds the rest pending.
    async with Agent(settings) as agent:
        assert agent.ledger is not None
        counts = await EnrichQueue(agent.ledger).counts(await agent.ledger.dataset_id(DS))
        assert counts == {"pending": 4, "done": 2, "failed": 0}
        assert await agent.enricher.drain() == 4
        assert await agent.enricher.drain() == 0
    with sqlite3.connect(settings.agent.ledger) as db:
        rows = db.execute("SELECT state, attempts FROM enrichment").fetchall()
    assert rows == [("done", 1)] * 6  # each item (each etag) was enriched once


async def test_agents_sharing_a_ledger_enrich_only_the_datasets_they_hold(tmp_path: Path) -> None:
    """On a ledger shared by agents, each dataset's enrichment is taken by the agent that holds its
    lease (the one that syncs it), as its outbox ops are: not raced for by every agent."""
    settings = make_settings(tmp_path, local_driver(tmp_path))
    async with Agent(settings) as agent:
        await put_all(agent.stores["d"], {f"img{i}.jpg": images.jpeg(seed=i) for i in range(3)})
        await agent.loop(DS).run_once()
        agent.leases = SimpleNamespace(held={"other": 1})  # type: ignore[assignment]
        assert await agent.enricher.drain() == 0, "another agent's dataset: not this one's to enrich"
        agent.leases.held[DS] = 4
        assert await agent.enricher.drain() == 3
        agent.leases = None


async def test_bomb_and_oversized_objects_are_never_decoded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, local_driver(tmp_path))
    settings = settings.model_copy(update={"enrich": settings.enrich.model_copy(update={"max_bytes": 65536})})
    big = images.jpeg(1500, 1000, quality=100)  # > 64 KiB
    assert len(big) > 65536
    async with Agent(settings) as agent:
        await put_all(agent.stores["d"], {"bomb.png": images.bomb(), "big.jpg": big})
        await agent.loop(DS).run_once()
        before = metrics.ENRICH_BYTES_READ.labels(DS)._value.get()
        assert await agent.enricher.drain() == 2
        read = metrics.ENRICH_BYTES_READ.labels(DS)._value.get() - before
        found = await enrichment(agent)
    bomb = found["bomb.png"]
    assert bomb.state == "failed" and bomb.error is not None and "decompression bomb" in bomb.error
    assert (bomb.meta["width"], bomb.meta["height"]) == (6000, 6000) and bomb.thumbnail is None
    large = found["big.jpg"]
    assert large.state == "done" and large.thumbnail is None and "max_bytes" in large.meta["thumbnail_skipped"]
    assert (large.meta["width"], large.meta["height"]) == (1500, 1000)
    # big.jpg: one ranged read of the head, nothing else. bomb.png is named like an image and
    # within max_bytes, so it was read whole at once for its thumbnail, and never decoded.
    assert read == 2048 + len(images.bomb())


async def test_an_image_for_a_thumbnail_is_read_in_one_request_and_its_type_still_comes_from_the_bytes(
    tmp_path: Path,
) -> None:
    jpeg = images.jpeg(600, 400, orientation=6)
    assert len(jpeg) > 2048
    files = {"named.jpg": jpeg, "unnamed.bin": jpeg, "png-named.JPG": images.png(), "text.png": b"not an image\n"}
    async with Agent(make_settings(tmp_path, local_driver(tmp_path))) as agent:
        store = agent.stores["d"]
        await put_all(store, files)
        await agent.loop(DS).run_once()
        reads: dict[str, list[tuple[int, int | None]]] = {}
        real_open = store.open

        def counting_open(key: str, offset: int = 0, length: int | None = None) -> Any:
            reads.setdefault(key, []).append((offset, length))
            return real_open(key, offset, length)

        store.open = counting_open  # type: ignore[method-assign]
        assert await agent.enricher.drain() == 4
        found = await enrichment(agent)
    assert reads["named.jpg"] == [(0, None)] and reads["png-named.JPG"] == [(0, None)]
    assert reads["unnamed.bin"] == [(0, 2048), (2048, None)]  # the head first: its name says nothing
    assert reads["text.png"] == [(0, None)]
    for key in ("named.jpg", "unnamed.bin"):
        assert found[key].state == "done" and found[key].thumbnail is not None
        assert (found[key].meta["mimetype"], found[key].meta["orientation"]) == ("image/jpeg", 6)
    assert found["png-named.JPG"].meta["mimetype"] == "image/png"
    assert found["text.png"].state == "done" and found["text.png"].thumbnail is None
    assert found["text.png"].meta["mimetype"] == "text/plain"


async def test_read_only_dataset_keeps_thumbnails_in_the_local_cache(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, local_driver(tmp_path), read_only=True)
    stop = asyncio.Event()
    async with Agent(settings) as agent:
        store = agent.stores["d"]
        await put_all(store, {"a.jpg": images.jpeg(orientation=8), "t.txt": b"x"})
        loop = agent.loop(DS)
        await loop.run_once()
        await agent.enricher.drain()
        a = (await enrichment(agent))["a.jpg"]
        assert a.local and a.thumbnail is not None
        cached = tmp_path / "cache" / DS / a.thumbnail
        assert cached.is_file()
        assert not (tmp_path / "bucket" / ".bucketsync" / "thumbnails").exists()  # nothing written to storage

        async with TestClient(TestServer(make_app(agent, stop))) as client:
            resp = await client.get(f"/api/v1/datasets/{DS}/items/a.jpg/thumbnail")
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
            assert await resp.read() == cached.read_bytes()
            resp = await client.get(f"/api/v1/datasets/{DS}/items/t.txt/thumbnail")
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "no_thumbnail"
            item = await (await client.get(f"/api/v1/datasets/{DS}/items/a.jpg")).json()
            assert item["system"]["mimetype"] == "image/jpeg" and item["system"]["display_width"] == 40
            page = await (
                await client.get(f"/api/v1/datasets/{DS}/items", params={"system.mimetype": "text/plain"})
            ).json()
            assert [i["key"] for i in page["items"]] == ["t.txt"]
            status = await (await client.get(f"/api/v1/datasets/{DS}/enrich")).json()
            assert status == {"dataset": DS, "enabled": True, "pending": 0, "done": 2, "failed": 0}

        (tmp_path / "bucket" / "a.jpg").unlink()
        await loop.run_once()
        await agent.enricher.drain()
        assert not cached.exists()


async def test_puts_through_the_outbox_are_enriched_and_backfill_requeues(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, local_driver(tmp_path))
    async with Agent(settings) as agent:
        assert agent.ledger is not None
        down = Downstream(agent, agent.outbox, in_process=True)
        out = await down.put(DS, "up/new.jpg", one_chunk(images.jpeg(orientation=5)))
        assert out.result == "created"
        queue = EnrichQueue(agent.ledger)
        ds_id = await agent.ledger.dataset_id(DS)
        assert (await queue.counts(ds_id))["pending"] == 1
        assert await agent.enricher.drain() == 1
        assert (await enrichment(agent))["up/new.jpg"].meta["display_height"] == 60
        # Re-runs: --failed finds none, --all queues the one item again.
        assert await queue.requeue(ds_id, "failed") == 0
        assert await queue.requeue(ds_id, "all") == 1
        assert await agent.enricher.drain() == 1


async def test_a_dataset_that_does_not_enrich_queues_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, local_driver(tmp_path), enrich=False)
    async with Agent(settings) as agent:
        await put_all(agent.stores["d"], {"a.jpg": images.jpeg()})
        await agent.loop(DS).run_once()
        assert await agent.enricher.drain() == 0
        assert await enrichment(agent) == {}


async def test_a_stalled_read_fails_the_item_at_the_time_limit(tmp_path: Path, s3_config: dict[str, Any]) -> None:
    """A GET that stalls behind a real proxy (SeaweedFS behind it): the item fails at enrich.timeout
    with the reason; the other items are enriched meanwhile."""
    upstream = int(s3_config["driver"]["endpoint_url"].rsplit(":", 1)[1])
    proxy = FaultProxy(upstream, rules=[Rule(Action.STALL, method="GET", path="slow.jpg", times=None, stall=30)])
    await proxy.start()
    try:
        driver = {**s3_config["driver"], "endpoint_url": f"http://127.0.0.1:{proxy.port}"}
        settings = make_settings(tmp_path, driver, s3_config["integrations"])
        settings = settings.model_copy(update={"enrich": settings.enrich.model_copy(update={"timeout": 0.5})})
        async with Agent(settings) as agent:
            await put_all(agent.stores["d"], {"slow.jpg": images.jpeg(), "fine.jpg": images.jpeg(seed=3)})
            await agent.loop(DS).run_once()
            assert await agent.enricher.drain() == 2
            found = await enrichment(agent)
        assert found["fine.jpg"].state == "done"
        slow = found["slow.jpg"]
        assert slow.state == "failed" and slow.error == "took longer than enrich.timeout=0.5s"
    finally:
        await proxy.close()


class _Buggy:
    """A store whose reads of one key hit a bug (not a storage error): what a crash looks like."""

    def __init__(self, inner: Store, key: str) -> None:
        self.inner, self.key = inner, key

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Any:
        if key == self.key:
            raise RuntimeError("a bug")
        return self.inner.open(key, offset, length)


async def test_a_crash_is_retried_then_fails_the_item_never_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "RETRY_MIN", 0.0)
    monkeypatch.setattr(worker, "RETRY_BASE", 0.01)
    settings = make_settings(tmp_path, local_driver(tmp_path))
    settings = settings.model_copy(update={"enrich": settings.enrich.model_copy(update={"max_attempts": 2})})
    async with Agent(settings) as agent:
        await put_all(agent.stores["d"], {"bug.jpg": images.jpeg(), "ok.jpg": images.jpeg(seed=1)})
        agent.stores["d"] = _Buggy(agent.stores["d"], "bug.jpg")  # type: ignore[assignment]
        await agent.loop(DS).run_once()
        assert agent.ledger is not None
        queue = EnrichQueue(agent.ledger)
        ds_id = await agent.ledger.dataset_id(DS)
        with capture_logs() as logs:
            for _ in range(300):  # the retry waits a (here tiny) backoff of its own
                await agent.enricher.drain()
                if (await queue.counts(ds_id))["pending"] == 0:
                    break
                await asyncio.sleep(0.01)
        found = await enrichment(agent)
    assert found["ok.jpg"].state == "done"
    bug = found["bug.jpg"]
    assert bug.state == "failed"
    assert bug.error == "internal error (RuntimeError); see the agent's log (after 2 attempts)"
    crashes = [e for e in logs if e["event"] == "enriching an item crashed"]
    assert len(crashes) == 2 and all(e["key"] == "bug.jpg" and e["exc_info"] for e in crashes)


async def test_enrich_cli_refuses_bad_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad requests are ConfigErrors (exit 2) naming the dataset and the fix; nothing is queued."""
    settings = make_settings(tmp_path, local_driver(tmp_path), enrich=False)
    with pytest.raises(
        ConfigError, match=r"dataset 'photos' does not enrich: set enrich\.enabled = true or datasets\.photos\.enrich"
    ):
        await cmd_enrich(settings, parse_args(["enrich", DS]))
    with pytest.raises(ConfigError, match="no dataset named 'nope'"):
        await cmd_enrich(settings, parse_args(["enrich", "nope"]))
    with pytest.raises(SystemExit) as exc:
        parse_args(["enrich", DS, "--all", "--failed"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert not settings.agent.ledger.exists()


async def test_a_driver_that_refuses_writes_keeps_thumbnails_in_the_local_cache(
    tmp_path: Path, seaweedfs: Any, s3_config: dict[str, Any]
) -> None:
    """Read+list-only credentials (SeaweedFS enforces them): the thumbnail put is refused, so the
    thumbnail goes to the local cache, served by the same API, and the bucket is untouched."""
    bucket_url = s3_config["driver"]["url"]
    bucket = bucket_url.removeprefix("s3://").split("/", 1)[0]
    seaweedfs.client().put_object(Bucket=bucket, Key="some/prefix/a.jpg", Body=images.jpeg(orientation=6))
    key_id, secret = seaweedfs.readonly
    integrations = {"ro": {"kind": "aws", "access_key_id": key_id, "secret_access_key": secret}}
    driver = {**s3_config["driver"], "integration": "ro"}
    async with Agent(make_settings(tmp_path, driver, integrations)) as agent:
        await agent.loop(DS).run_once()
        assert await agent.enricher.drain() == 1
        a = (await enrichment(agent))["a.jpg"]
        assert a.state == "done" and a.local and a.thumbnail is not None
        assert (tmp_path / "cache" / DS / a.thumbnail).is_file()
    listed = seaweedfs.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["some/prefix/a.jpg"]  # nothing written to the bucket


async def test_thumbnail_cleanup_never_deletes_outside_the_hidden_folder(tmp_path: Path) -> None:
    """Even with allow_delete and a trash row naming a user's object, only thumbnails are deleted."""
    settings = make_settings(tmp_path, {**local_driver(tmp_path), "allow_delete": True})
    async with Agent(settings) as agent:
        assert agent.ledger is not None
        store = agent.stores["d"]
        await put_all(store, {"keep.jpg": images.jpeg()})
        ds_id = await agent.ledger.dataset_id(DS)
        async with agent.ledger.transaction() as tx:
            await tx.execute(
                "INSERT INTO thumbnail_trash (dataset_id, key, local, created) VALUES (?, 'keep.jpg', 0, 0)", (ds_id,)
            )
        await agent.enricher.empty_trash()
        assert await exists(store, "keep.jpg")
        assert await EnrichQueue(agent.ledger).trash() == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_result_for_a_version_that_is_gone_is_not_recorded(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The queue on both ledgers, a batch at a time: a result is recorded (with its ``enriched``
    event) only while its row still waits for the version the worker read. An item replaced while
    it was enriched keeps waiting for its new version, and the thumbnail made of the old one goes
    to the trash; a removed item's result is dropped the same way. A job for a version that is gone
    is not claimed."""
    where = request.getfixturevalue("postgres_server").new_database() if backend == "postgresql" else tmp_path / "l.db"
    ledger = await Ledger.open(where)
    try:
        ds = await ledger.dataset_id("d")
        queue = EnrichQueue(ledger)
        await queue.set_datasets([ds], [ds])
        run = await ledger.begin_run(ds, False)
        await ledger.write_batch(ds, run, [ObjectInfo(k, 1, 1.0, f"e-{k}") for k in "abc"], [], Counts())
        jobs = await queue.claim(await queue.due(10))
        a, b, c = jobs
        assert [(j.key, j.etag) for j in jobs] == [("a", "e-a"), ("b", "e-b"), ("c", "e-c")]
        # Meanwhile a gets a new version and c is removed.
        item_a, item_c = await ledger.item(ds, "a"), await ledger.item(ds, "c")
        assert item_a is not None and item_c is not None
        await ledger.write_batch(ds, run, [], [(item_a.id, ObjectInfo("a", 2, 2.0, "e-a2"))], Counts())
        await ledger.remove(run, [item_c.id], Counts())
        assert await queue.claim([a]) == []  # the version it names is gone

        results = [
            Result(a, "done", {"mimetype": "image/png"}, None, ".bucketsync/thumbnails/a.1.jpg", False),
            Result(b, "failed", {"mimetype": "image/png"}, "truncated image: x", None, False),
            Result(c, "done", {}, None, ".bucketsync/thumbnails/c.1.jpg", False),
        ]
        assert sorted(await queue.finish(results)) == ["a", "c"]
        found = await queue.of_items([item_a.id, b.item_id])
        assert found[b.item_id].state == "failed" and found[b.item_id].error == "truncated image: x"
        assert found[item_a.id].state == "pending" and found[item_a.id].meta == {}
        assert [(j.key, j.etag, j.attempts) for j in await queue.due(10)] == [("a", "e-a2", 0)]
        assert sorted(t.key for t in await queue.trash()) == [
            ".bucketsync/thumbnails/a.1.jpg",
            ".bucketsync/thumbnails/c.1.jpg",
        ]
        enriched = [e[4] for e in await Deliveries(ledger).events() if e[3] == "enriched"]
        assert enriched == ["b"]
    finally:
        await ledger.close()
