"""Video enrichment: real videos encoded with PyAV, read through ranged reads of real stores.

The reader (``RangeFile``) on its own; ``video.analyse`` over each container kind, a rotated
video, a truncated one, a bomb and the caps; then the worker on SeaweedFS and a local folder:
metadata, upright thumbnails in the hidden folder, and far fewer bytes read than the objects
hold; without PyAV, a video gets its mimetype and the reason; a read that stalls in the decoder's
thread fails the item at the time limit."""

from __future__ import annotations

import asyncio
import io
import json
import random
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

import videos
from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.core.errors import Transient
from bucketsync.enrich import ranged, video
from bucketsync.enrich.ranged import BLOCK, CACHE_BLOCKS, RangeFile, ReadBudget, ReadStopped
from bucketsync.server.api import make_app
from bucketsync.stores import read_all
from faults import Action, FaultProxy, Request, Rule
from test_enrich import DS, enrichment, local_driver, make_settings, put_all

CAP = 10_000_000


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The videos every test here reads, encoded once: 2 s of 320x240 noise at 25 fps (~1 MB)
    with the index at the end and at the start, a rotated one, one cut in half, other containers."""
    tmp = tmp_path_factory.mktemp("videos")
    end = videos.encode(tmp / "end.mp4", frames=50)
    return {
        "end.mp4": end,
        "fast.mp4": videos.encode(tmp / "fast.mp4", frames=50, faststart=True),
        "turned.mp4": videos.encode(tmp / "turned.mp4", frames=5, rotation=90),
        "cut.mp4": end[: len(end) // 2],
        "clip.mov": videos.encode(tmp / "clip.mov", fmt="mov", frames=5),
        "clip.mkv": videos.encode(tmp / "clip.mkv", fmt="matroska", frames=5),
        "clip.webm": videos.encode(tmp / "clip.webm", fmt="webm", codec="libvpx", frames=3, width=64, height=48),
        "clip.avi": videos.encode(tmp / "clip.avi", fmt="avi", frames=5),
    }


def fetcher(data: bytes, log: list[tuple[int, int]] | None = None) -> ranged.Fetch:
    async def fetch(offset: int, length: int) -> bytes:
        if log is not None:
            log.append((offset, length))
        return data[offset : offset + length]

    return fetch


async def analysed(data: bytes, *, thumbnail_size: int | None = 32, budget: int = 1 << 26, **caps: int) -> Any:
    """``video.analyse`` as the worker runs it: in a thread, over a RangeFile on this loop."""
    reader = RangeFile(fetcher(data), len(data), asyncio.get_running_loop(), budget)
    found = await asyncio.to_thread(
        video.analyse,
        reader,
        thumbnail_size=thumbnail_size,
        fmt="jpeg",
        max_pixels=caps.get("max_pixels", CAP),
        max_memory=caps.get("max_memory", 1 << 28),
    )
    return found, reader


# -- the reader ----------------------------------------------------------------------------------


async def test_range_file_reads_and_seeks_as_the_bytes_do_with_a_bounded_cache() -> None:
    data = random.Random(1).randbytes(40 * BLOCK + 123)
    log: list[tuple[int, int]] = []
    reader = RangeFile(fetcher(data, log), len(data), asyncio.get_running_loop(), 1 << 30)
    same = io.BytesIO(data)
    rng = random.Random(2)

    def walk() -> None:
        for _ in range(300):
            whence = rng.choice((io.SEEK_SET, io.SEEK_CUR, io.SEEK_END))
            offset = {io.SEEK_SET: rng.randrange(len(data)), io.SEEK_CUR: rng.randrange(-50, 5000)}.get(
                whence, -rng.randrange(1, 3 * BLOCK)
            )
            if same.seek(0, io.SEEK_CUR) + offset < 0 and whence == io.SEEK_CUR:
                continue
            assert reader.seek(offset, whence) == same.seek(offset, whence)
            n = rng.choice((1, 100, 32768, BLOCK + 7, 3 * BLOCK))
            assert reader.read(n) == same.read(n)
            assert reader.tell() == same.tell()
            assert len(reader._cache) <= CACHE_BLOCKS

    await asyncio.to_thread(walk)
    assert reader.fetched == sum(length for _, length in log) and reader.fetches == len(log)
    assert reader.seek(0, io.SEEK_END) == len(data) and reader.read(10) == b""


async def test_range_file_fetches_a_block_once_and_grows_sequential_runs() -> None:
    data = bytes(range(256)) * (20 * BLOCK // 256)
    log: list[tuple[int, int]] = []
    reader = RangeFile(fetcher(data, log), len(data), asyncio.get_running_loop(), 1 << 30)

    def sequential() -> None:
        while reader.read(32768):
            pass
        reader.seek(100)
        reader.read(1000)  # block 0 again: cached

    await asyncio.to_thread(sequential)
    # Runs double (1, 2, 4, 8 blocks, ...) while reads go on where the last fetch ended; each
    # block is fetched once; block 0 comes from the cache on the second visit.
    assert [n // BLOCK for _, n in log] == [1, 2, 4, 8, 5]
    assert reader.fetched == len(data)


async def test_range_file_keeps_to_its_budget() -> None:
    data = bytes(10 * BLOCK)
    reader = RangeFile(fetcher(data), len(data), asyncio.get_running_loop(), 2 * BLOCK)

    def read() -> None:
        reader.read(BLOCK)
        reader.seek(5 * BLOCK)
        reader.read(BLOCK)
        reader.seek(8 * BLOCK)
        reader.read(1)

    with pytest.raises(ReadBudget, match=r"more than enrich\.max_bytes=131072 bytes"):
        await asyncio.to_thread(read)
    assert reader.fetched == 2 * BLOCK


async def test_stop_fails_a_read_waiting_in_the_thread_so_the_thread_ends() -> None:
    """A fetch that never answers (a stalled server): ``stop`` from the loop (what the worker does
    when the item runs out of time) cancels it, and the thread's read raises ReadStopped."""
    started, never = asyncio.Event(), asyncio.Event()

    async def stalls(offset: int, length: int) -> bytes:
        started.set()
        await never.wait()
        return b""

    reader = RangeFile(stalls, 10 * BLOCK, asyncio.get_running_loop(), 1 << 30)
    ended = threading.Event()
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            reader.read(10)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            ended.set()

    thread = threading.Thread(target=read)
    thread.start()
    await started.wait()
    reader.stop()
    await asyncio.to_thread(ended.wait, 30)  # bounded so a regression fails instead of hanging
    assert ended.is_set() and isinstance(outcome[0], ReadStopped)
    with pytest.raises(ReadStopped):  # and every later read too
        await asyncio.to_thread(reader.read, 10)
    thread.join()


# -- analyse -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "codec", "frames"),
    [
        ("end.mp4", "mpeg4", 50),
        ("fast.mp4", "mpeg4", 50),
        ("clip.mov", "mpeg4", 5),
        ("clip.mkv", "mpeg4", 5),
        ("clip.webm", "vp8", 3),
        ("clip.avi", "mpeg4", 5),
    ],
)
async def test_metadata_and_thumbnail_of_each_container(
    clips: dict[str, bytes], name: str, codec: str, frames: int
) -> None:
    found, reader = await analysed(clips[name])
    assert found.error is None and found.thumbnail_skipped is None
    meta = found.meta
    w, h = (64, 48) if name == "clip.webm" else (320, 240)
    assert (meta["codec"], meta["width"], meta["height"], meta["frame_rate"]) == (codec, w, h, 25.0)
    assert meta["duration"] == pytest.approx(frames / 25, abs=0.05)
    assert (meta["rotation"], meta["orientation"], meta["display_width"], meta["display_height"]) == (0, 1, w, h)
    with Image.open(io.BytesIO(found.thumbnail)) as im:
        assert im.format == "JPEG" and max(im.size) == 32 and im.size[0] > im.size[1]
    if name.endswith(".mp4"):  # the index (at either end) and the first frame, not the object
        assert reader.fetched < len(clips[name]) / 3


async def test_a_rotated_video_is_displayed_upright(clips: dict[str, bytes]) -> None:
    """A display matrix turning the 320x240 picture a quarter (as a phone held upright records):
    the upright size is 240x320, the orientation its EXIF equivalent, the thumbnail a portrait."""
    found, _ = await analysed(clips["turned.mp4"])
    meta = found.meta
    assert (meta["width"], meta["height"], meta["display_width"], meta["display_height"]) == (320, 240, 240, 320)
    assert (meta["rotation"], meta["orientation"]) == (270, 8)  # 90 counter-clockwise = 270 clockwise
    assert videos.first_frame_size(clips["turned.mp4"]) == (320, 240)  # stored sideways
    with Image.open(io.BytesIO(found.thumbnail)) as im:
        assert im.size == (24, 32)


async def test_metadata_only_reads_no_more_than_with_a_thumbnail(clips: dict[str, bytes]) -> None:
    found, reader = await analysed(clips["end.mp4"], thumbnail_size=None)
    assert found.thumbnail is None and found.meta["orientation"] == 1 and found.meta["codec"] == "mpeg4"
    assert reader.fetched < len(clips["end.mp4"]) / 3


async def test_an_audio_only_mp4_gets_its_duration_and_codec(tmp_path: Path) -> None:
    found, _ = await analysed(videos.audio_only(tmp_path / "a.mp4"))
    assert found.error is None and found.thumbnail is None
    assert found.meta["codec"] == "aac" and found.meta["duration"] == pytest.approx(1.28, abs=0.05)
    assert "width" not in found.meta


async def test_a_truncated_video_fails_with_the_reason(clips: dict[str, bytes]) -> None:
    found, _ = await analysed(clips["cut.mp4"])  # its moov index was at the end: gone
    assert found.error is not None and found.error.startswith("corrupt or truncated video: ")
    assert found.thumbnail is None


async def test_garbage_after_a_video_signature_fails_never_crashes() -> None:
    data = b"\x00\x00\x00\x18ftypmp42" + random.Random(3).randbytes(200_000)
    found, _ = await analysed(data)
    assert found.error is not None and "video" in found.error


async def test_caps_a_bomb_fails_a_large_frame_gets_no_thumbnail_an_index_past_max_bytes_fails(
    clips: dict[str, bytes],
) -> None:
    found, _ = await analysed(clips["end.mp4"], max_pixels=320 * 240 - 1)
    assert found.error is not None and found.error.startswith("decompression bomb: 320x240 = 76800 pixels")
    assert (found.meta["width"], found.meta["height"], found.meta["codec"]) == (320, 240, "mpeg4")

    found, _ = await analysed(clips["end.mp4"], max_memory=100_000)
    assert found.error is None and found.thumbnail is None and "enrich.max_memory" in found.thumbnail_skipped
    assert found.meta["duration"] == pytest.approx(2.0, abs=0.05)

    # The head is one block, the moov index another at the far end: a budget of one block fails.
    found, reader = await analysed(clips["end.mp4"], budget=BLOCK)
    assert found.error is not None and "enrich.max_bytes=65536" in found.error
    assert reader.fetched == BLOCK


# -- the worker, on real stores -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "local"])
async def test_videos_are_enriched_through_ranged_reads_of_the_store(
    kind: str, clips: dict[str, bytes], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "local":
        driver, integrations = local_driver(tmp_path), {}
    else:
        conf = request.getfixturevalue("s3_config")
        driver, integrations = conf["driver"], conf["integrations"]
    files = {k: clips[k] for k in ("end.mp4", "fast.mp4", "turned.mp4", "cut.mp4")}
    stop = asyncio.Event()
    async with Agent(make_settings(tmp_path, driver, integrations)) as agent:
        store = agent.stores["d"]
        await put_all(store, files)
        await agent.loop(DS).run_once()
        before = metrics.ENRICH_BYTES_READ.labels(DS)._value.get()
        assert await agent.enricher.drain() == 4
        read = metrics.ENRICH_BYTES_READ.labels(DS)._value.get() - before
        found = await enrichment(agent)

        end, fast, turned = found["end.mp4"], found["fast.mp4"], found["turned.mp4"]
        for e in (end, fast):
            assert e.state == "done" and e.error is None
            assert e.meta["mimetype"] == "video/mp4" and e.meta["codec"] == "mpeg4"
            assert e.meta["duration"] == pytest.approx(2.0, abs=0.05) and e.meta["frame_rate"] == 25.0
        assert (turned.meta["display_width"], turned.meta["display_height"], turned.meta["orientation"]) == (
            240,
            320,
            8,
        )
        with Image.open(io.BytesIO(await read_all(store, str(turned.thumbnail)))) as im:
            assert im.format == "JPEG" and im.size == (24, 32)  # upright, in the hidden folder
        assert str(end.thumbnail).startswith(".bucketsync/thumbnails/end.mp4.") and not end.local
        cut = found["cut.mp4"]
        assert cut.state == "failed" and str(cut.error).startswith("corrupt or truncated video")
        # The head, the index and the first frame of each: a fraction of what the bucket holds.
        assert read < sum(len(d) for d in files.values()) / 3

        if kind == "local":  # the new fields filter like the image ones, through the API
            async with TestClient(TestServer(make_app(agent, stop))) as client:
                wanted = {"duration": {"$gte": 1.5}, "codec": "mpeg4"}
                resp = await client.get(f"/api/v1/datasets/{DS}/items", params={"filter": json.dumps(wanted)})
                assert resp.status == 200, await resp.text()
                assert sorted(i["key"] for i in (await resp.json())["items"]) == ["end.mp4", "fast.mp4"]
                item = await (await client.get(f"/api/v1/datasets/{DS}/items/turned.mp4")).json()
                assert item["system"]["rotation"] == 270 and item["system"]["frame_rate"] == 25.0
                resp = await client.get(f"/api/v1/datasets/{DS}/items/turned.mp4/thumbnail")
                assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"


async def test_without_pyav_a_video_gets_its_mimetype_and_the_reason(
    clips: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # ``import av`` now fails as if it were not installed
    assert video.missing() == video.NO_PYAV
    async with Agent(make_settings(tmp_path, local_driver(tmp_path))) as agent:
        await put_all(agent.stores["d"], {"end.mp4": clips["end.mp4"]})
        await agent.loop(DS).run_once()
        assert await agent.enricher.drain() == 1
        e = (await enrichment(agent))["end.mp4"]
    assert e.state == "done" and e.error is None and e.thumbnail is None
    assert e.meta == {"mimetype": "video/mp4", "video_skipped": video.NO_PYAV}


async def test_a_read_that_stalls_in_the_decoders_thread_fails_the_item_at_the_time_limit(
    clips: dict[str, bytes], tmp_path: Path, s3_config: dict[str, Any]
) -> None:
    """SeaweedFS behind a proxy that stalls the GET of the moov index at the end of one video:
    that read is made from PyAV's thread. The item fails at enrich.timeout; the other is done (3 s:
    room for it on a loaded machine)."""
    upstream = int(s3_config["driver"]["endpoint_url"].rsplit(":", 1)[1])

    def tail_of_slow(req: Request) -> bool:
        return "slow.mp4" in req.target and not (req.header("range") or "").startswith("bytes=0-")

    proxy = FaultProxy(upstream, rules=[Rule(Action.STALL, method="GET", times=None, stall=30, matches=tail_of_slow)])
    await proxy.start()
    try:
        driver = {**s3_config["driver"], "endpoint_url": f"http://127.0.0.1:{proxy.port}"}
        settings = make_settings(tmp_path, driver, s3_config["integrations"])
        settings = settings.model_copy(update={"enrich": settings.enrich.model_copy(update={"timeout": 3.0})})
        async with Agent(settings) as agent:
            await put_all(agent.stores["d"], {"slow.mp4": clips["end.mp4"], "fine.mp4": clips["turned.mp4"]})
            await agent.loop(DS).run_once()
            assert await agent.enricher.drain() == 2
            found = await enrichment(agent)
        assert found["fine.mp4"].state == "done"
        slow = found["slow.mp4"]
        assert slow.state == "failed" and slow.error == "took longer than enrich.timeout=3s"
    finally:
        await proxy.close()


async def test_a_storage_error_in_ffmpegs_thread_reaches_the_worker_as_itself(clips: dict[str, bytes]) -> None:
    """PyAV keeps an exception raised by the file's read and raises it again: a ``Transient`` from the
    store stays one (the worker retries the item), never a 'corrupt video' failure."""
    data = clips["end.mp4"]
    calls = 0

    async def hiccup(offset: int, length: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:  # the seek to the moov index at the end
            raise Transient("connection reset")
        return data[offset : offset + length]

    reader = RangeFile(hiccup, len(data), asyncio.get_running_loop(), 1 << 26)
    with pytest.raises(Transient, match="connection reset"):
        await asyncio.to_thread(
            video.analyse, reader, thumbnail_size=None, fmt="jpeg", max_pixels=CAP, max_memory=1 << 28
        )
