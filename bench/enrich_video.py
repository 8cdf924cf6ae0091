#!/usr/bin/env python
"""Benchmark: video enrichment on SeaweedFS: items/s, CPU per item, and bytes read against object size.

    .venv/bin/python bench/enrich_video.py                 # 60 videos of 720p H.264, 4 s each
    .venv/bin/python bench/enrich_video.py --items 200 --seconds 8

A SeaweedFS (``weed mini`` from the venv) is started on free ports. Two base videos are encoded
with PyAV (the [video] extra): 1280x720 H.264 at 25 fps, noise over a gradient (so frames are as
large as real footage's), one with its ``moov`` index at the end (most muxers' default) and one
"faststart" (index first); ``--items`` objects are uploaded from them, each with bytes of its own
appended (an own etag). Then, in a fresh child process each, an agent syncs the bucket (not timed)
and enriches every item (timed), metadata only and with thumbnails. Reported: items/s (wall), the
agent's CPU per item (threads included), bytes read per item (``bucketsync_enrich_read_bytes_total``)
against the mean object size, and the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import av  # noqa: E402
from PIL import Image  # noqa: E402

from bucketsync import metrics  # noqa: E402
from bucketsync.agent import Agent  # noqa: E402
from bucketsync.logs import configure  # noqa: E402
from bucketsync.stores import one_chunk, open_store  # noqa: E402
from enrich import DS, load1, peak_rss, settings  # noqa: E402
from outbox_faults import start_seaweedfs, stop, wait_for_s3  # noqa: E402


def encode(path: Path, seconds: int, faststart: bool) -> bytes:
    """A 1280x720 H.264 video: a few noise frames cycled over a moving gradient."""
    w, h, rate = 1280, 720, 25
    ramp = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    noise = [Image.effect_noise((w, h), 40 + i * 7).convert("RGB") for i in range(5)]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as out:
        stream = out.add_stream("libx264", rate=rate, options={"preset": "ultrafast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(seconds * rate):
            frame = av.VideoFrame.from_image(Image.blend(noise[i % 5], ramp.rotate(i % 360), 0.5))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes()


async def upload(port: int, bucket: str, items: int, seconds: int, tmp: Path) -> dict[str, Any]:
    print("encoding 2 base videos ...", file=sys.stderr)
    pool = [encode(tmp / "end.mp4", seconds, False), encode(tmp / "fast.mp4", seconds, True)]
    conf = settings(tmp / "upload", port, bucket, 1, False)
    store = open_store(conf.drivers["d"], conf)
    client = await store._get_client()  # type: ignore[attr-defined]
    await client.create_bucket(Bucket=bucket)
    total = 0
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        nonlocal total
        async with sem:
            data = pool[i % 2] + i.to_bytes(8, "big")  # after the last box: its own etag, same video
            await store.put(f"vid/{i:05d}.mp4", one_chunk(data))
            total += len(data)

    await asyncio.gather(*(one(i) for i in range(items)))
    await store.aclose()
    return {"items": items, "bytes": total, "mean_mb": round(total / items / 1e6, 2)}


async def child(args: argparse.Namespace) -> dict[str, Any]:
    configure("warning", "json")
    work = Path(tempfile.mkdtemp(prefix="enrich-video-", dir=args.tmp))
    conf = settings(work, args.port, args.bucket, args.concurrency, args.thumbnails)
    async with Agent(conf) as agent:
        await agent.loop(DS).run_once()
        read0 = metrics.ENRICH_BYTES_READ.labels(DS)._value.get()
        cpu0, t0 = time.process_time(), time.monotonic()
        done = await agent.enricher.drain()
        seconds, cpu = time.monotonic() - t0, time.process_time() - cpu0
        read = metrics.ENRICH_BYTES_READ.labels(DS)._value.get() - read0
        assert agent.ledger is not None
        states = dict(await agent.ledger.db.read("SELECT state, count(*) FROM enrichment GROUP BY state"))
    return {
        "enriched": done,
        "states": states,
        "items_per_s": round(done / seconds, 1),
        "cpu_ms_per_item": round(cpu / done * 1000, 1),
        "read_per_item_kib": round(read / done / 1024, 1),
        "peak_rss_mb": round(peak_rss() / 1024, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=60)
    p.add_argument("--seconds", type=int, default=4, help="length of each video")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--thumbnails", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bucket", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        return 0
    with tempfile.TemporaryDirectory(prefix="enrich-video-") as tmp_name:
        tmp = Path(tmp_name)
        proc, port = start_seaweedfs(tmp)
        try:
            asyncio.run(wait_for_s3(port, tmp))
            bucket = f"video-{random.randrange(1 << 30):x}"
            data = asyncio.run(upload(port, bucket, args.items, args.seconds, tmp))
            print(json.dumps(data), file=sys.stderr)
            rows = []
            for thumbnails in (False, True):
                argv = [
                    sys.executable, __file__, "--child", "--port", str(port), "--bucket", bucket,
                    "--concurrency", str(args.concurrency), "--tmp", str(tmp),
                ]  # fmt: skip
                if thumbnails:
                    argv.append("--thumbnails")
                load0 = load1()
                out = subprocess.run(argv, check=True, capture_output=True, text=True, env=dict(os.environ))
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r["load"] = f"{load0:.1f}-{load1():.1f}"
                print(json.dumps(r), file=sys.stderr)
                rows.append(("thumbnails" if thumbnails else "metadata", r))
        finally:
            stop(proc)
    print(f"\n{data['items']} videos, mean {data['mean_mb']} MB, concurrency {args.concurrency}\n")
    print("| scenario | items | items/s (wall) | agent CPU per item | read per item | peak RSS | load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(
            f"| {name} | {r['enriched']} | {r['items_per_s']} | {r['cpu_ms_per_item']} ms | "
            f"{r['read_per_item_kib']} KiB | {r['peak_rss_mb']} MB | {r['load']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
