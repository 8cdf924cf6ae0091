#!/usr/bin/env python
"""Benchmark: enrichment throughput, bytes read per item and peak RSS on SeaweedFS (issue 8).

    .venv/bin/python bench/enrich.py                           # the issue's set: 10,000 images of 1-5 MB (~25 GB)
    .venv/bin/python bench/enrich.py --items 600               # what fits a shared machine (~1.5 GB)
    .venv/bin/python bench/enrich.py --items 600 --concurrency 2 4 8
    .venv/bin/python bench/enrich.py --items 10000 --thumbnail-items 1000 --baseline main   # before/after

A SeaweedFS (``weed mini`` from the venv) is started on free ports. A pool of real images is
generated with Pillow at realistic sizes (JPEG 2400x1600 to 4000x3000, 1.9-4.3 MB; PNG 1000x800 and
1400x1000, 1.1-1.9 MB; a third of the JPEGs with EXIF orientation 3, 6 or 8), and ``--items`` objects
are uploaded from it, each with 8 bytes of its own appended after the image's end marker (decoders
ignore them) so every object has its own etag. Then, each in a child process of its own (so its
peak RSS is its own):

- ``metadata``: an agent with ``enrich.thumbnails = false`` syncs the bucket (not timed) and enriches
  every item (timed): ranged reads of the head only;
- ``thumbnails``: the same with thumbnails (256 px JPEG, written back into the hidden folder);
- ``thumbnails (1/4 of the items)``: the same on a quarter of the items, to show that peak RSS
  follows the concurrency and not the number of items.

Reported per run: items/s (wall clock); the agent process's CPU time per item (threads included),
which is what bounds the rate on cores nobody else uses, and SeaweedFS's beside it (it shares the
cores); bytes read from storage per item (``bucketsync_enrich_read_bytes_total``); peak RSS (VmHWM);
and the load average over the run (1-minute figure at its start and end), since the machine may
be shared.

``--baseline REV`` runs every scenario a second time with bucketsync's ``src/`` as it was at git
revision REV (``git archive``), interleaved with the current code, on the same server and objects:
before and after under the same conditions. ``--thumbnail-items N`` enriches only N items in the
thumbnail scenarios (they read whole objects: far slower than metadata-only).
Targets (issue 8): <= 64 KiB read per image on average and >= 200 items/s metadata-only, >= 30 items/s
with thumbnails, on 2 cores against the local emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: the bucketsync sources a child runs (``--baseline``: a revision's, exported to a temporary folder)
sys.path.insert(0, os.environ.get("ENRICH_BENCH_SRC", str(ROOT / "src")))
sys.path.insert(0, str(HERE))

from PIL import Image  # noqa: E402

from bucketsync import metrics  # noqa: E402
from bucketsync.agent import Agent  # noqa: E402
from bucketsync.config import Settings  # noqa: E402
from bucketsync.logs import configure  # noqa: E402
from bucketsync.stores import one_chunk, open_store  # noqa: E402
from outbox_faults import KEY, SECRET, start_seaweedfs, stop, wait_for_s3  # noqa: E402

DS = "ds"

#: (format, width, height, quality or None, EXIF orientation or None)
POOL = [
    ("JPEG", 2400, 1600, 90, None),
    ("JPEG", 2400, 1600, 90, 6),
    ("JPEG", 3000, 2000, 85, None),
    ("JPEG", 3000, 2000, 85, 8),
    ("JPEG", 4000, 3000, 80, None),
    ("JPEG", 4000, 3000, 80, 3),
    ("PNG", 1000, 800, None, None),
    ("PNG", 1400, 1000, None, None),
]


def make_image(fmt: str, w: int, h: int, quality: int | None, orientation: int | None, seed: int) -> bytes:
    """A photo-like image: noise over a gradient, so it compresses as a photo does."""
    random.seed(seed)
    noise = Image.effect_noise((w, h), 30 + seed % 20).convert("RGB")
    ramp = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    im = Image.blend(noise, ramp, 0.5)
    buf = io.BytesIO()
    if fmt == "JPEG":
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
        im.save(buf, "JPEG", quality=quality, exif=exif.tobytes() if orientation else b"")
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def settings(work: Path, port: int, bucket: str, concurrency: int, thumbnails: bool) -> Settings:
    return Settings(
        agent={"ledger": str(work / "ledger.db"), "enrich_concurrency": concurrency},
        integrations={"aws": {"kind": "aws", "access_key_id": KEY, "secret_access_key": SECRET}},
        drivers={
            "d": {
                "url": f"s3://{bucket}/bench/",
                "integration": "aws",
                "endpoint_url": f"http://127.0.0.1:{port}",
                "region": "us-east-1",
            }
        },
        datasets={DS: {"driver": "d", "sync": "manual"}},
        enrich={"enabled": True, "thumbnails": thumbnails, "cache_dir": str(work / "cache")},
    )


async def upload(port: int, bucket: str, items: int, tmp: Path) -> dict[str, Any]:
    print(f"generating {len(POOL)} base images ...", file=sys.stderr)
    pool = [make_image(*spec, seed=i) for i, spec in enumerate(POOL)]
    conf = settings(tmp / "upload", port, bucket, 1, False)
    store = open_store(conf.drivers["d"], conf)
    client = await store._get_client()  # type: ignore[attr-defined]
    await client.create_bucket(Bucket=bucket)
    sem = asyncio.Semaphore(16)
    total = 0
    t0 = time.monotonic()

    async def one(i: int) -> None:
        nonlocal total
        spec = i % len(pool)
        ext = "jpg" if POOL[spec][0] == "JPEG" else "png"
        async with sem:  # the body is made inside: 16 in memory at once, not --items of them
            data = pool[spec] + i.to_bytes(8, "big")  # after the end marker: its own etag, same image
            await store.put(f"img/{i // 1000:03d}/{i:06d}.{ext}", one_chunk(data))
            total += len(data)

    await asyncio.gather(*(one(i) for i in range(items)))
    await store.aclose()
    sizes = sorted(len(p) for p in pool)
    return {
        "items": items,
        "bytes": total,
        "mean_mb": round(total / items / 1e6, 2),
        "pool_mb": [round(s / 1e6, 2) for s in sizes],
        "upload_s": round(time.monotonic() - t0, 1),
    }


async def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measured run in this (fresh) process: sync, then enrich every item (or ``--limit``)."""
    configure("warning", "json")
    work = Path(tempfile.mkdtemp(prefix="enrich-bench-", dir=args.tmp))
    conf = settings(work, args.port, args.bucket, args.concurrency, args.thumbnails)
    async with Agent(conf) as agent:
        t0 = time.monotonic()
        result = await agent.loop(DS).run_once()
        sync_s = time.monotonic() - t0
        read0 = metrics.ENRICH_BYTES_READ.labels(DS)._value.get()
        cpu0 = time.process_time()
        t0 = time.monotonic()
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        done = await agent.enricher.drain(max_items=args.limit)
        seconds = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        if args.profile:
            prof.disable()
            prof.dump_stats(args.profile)
        read = metrics.ENRICH_BYTES_READ.labels(DS)._value.get() - read0
        assert agent.ledger is not None
        states = {s: n for s, n in await agent.ledger.db.read("SELECT state, count(*) FROM enrichment GROUP BY state")}
    return {
        "listed": result.counts.listed,
        "enriched": done,
        "states": states,
        "sync_s": round(sync_s, 2),
        "seconds": round(seconds, 2),
        "items_per_s": round(done / seconds, 1),
        "cpu_ms_per_item": round(cpu / done * 1000, 1),
        "items_per_cpu_s": round(done / cpu, 1),
        "read_per_item_kib": round(read / done / 1024, 1),
        "peak_rss_mb": round(peak_rss() / 1024, 1),
    }


def peak_rss() -> int:
    """This process's peak RSS in KiB: VmHWM (``ru_maxrss`` would carry the parent's over the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (the SeaweedFS server), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, idle: float = 0.05, window: float = 2.0, limit: float = 300.0) -> float:
    """Wait until the server has finished its own work on the upload (after gigabytes, SeaweedFS
    keeps a core busy for minutes): its CPU below ``idle`` of a core over ``window`` seconds, or
    ``limit`` seconds. Seconds waited; the measurements start after it."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = cpu_seconds(pid)
        time.sleep(window)
        if cpu_seconds(pid) - before < idle * window:
            break
    return round(time.monotonic() - start, 1)


def export(rev: str, into: Path) -> Path:
    """``src/`` at git revision ``rev``, in a folder of its own."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def run_child(
    args: argparse.Namespace,
    bucket: str,
    concurrency: int,
    thumbnails: bool,
    limit: int | None,
    src: Path | None = None,
    server: int | None = None,
) -> Any:
    argv = [
        sys.executable, __file__, "--child", "--port", str(args.port), "--bucket", bucket,
        "--concurrency", str(concurrency), "--tmp", str(args.tmp),
    ]  # fmt: skip
    if thumbnails:
        argv.append("--thumbnails")
    if limit is not None:
        argv += ["--limit", str(limit)]
    if args.profile:
        argv += ["--profile", f"{args.profile}.{'thumbnails' if thumbnails else 'metadata'}.{limit or 'all'}"]
    env = {**os.environ, "ENRICH_BENCH_SRC": str(src)} if src is not None else None
    load0, server0 = load1(), cpu_seconds(server) if server else 0.0
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = f"{load0:.1f}-{load1():.1f}"
    if server:  # the server's CPU over the whole child (its sync included): an upper bound per item
        result["server_cpu_ms_per_item"] = round((cpu_seconds(server) - server0) / result["enriched"] * 1000, 1)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[4])
    p.add_argument("--thumbnail-items", type=int, help="enrich only this many items with thumbnails")
    p.add_argument("--baseline", metavar="REV", help="also run each scenario with src/ at git revision REV")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bucket", help=argparse.SUPPRESS)
    p.add_argument("--thumbnails", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--profile", help="write a cProfile of each child's enrichment to PATH.SCENARIO")
    args = p.parse_args()
    if args.child:
        args.concurrency = args.concurrency[0]
        print(json.dumps(asyncio.run(child(args))))
        return 0
    with tempfile.TemporaryDirectory(prefix="enrich-bench-") as tmp_name:
        tmp = Path(tmp_name)
        args.tmp = tmp
        proc, port = start_seaweedfs(tmp)
        args.port = port
        try:
            asyncio.run(wait_for_s3(port, tmp))
            bucket = f"enrich-{random.randrange(1 << 30):x}"
            data = asyncio.run(upload(port, bucket, args.items, tmp))
            data["settle_s"] = settle(proc.pid)
            print(json.dumps(data), file=sys.stderr)
            codes: list[tuple[str, Path | None]] = [("", None)]
            if args.baseline:
                codes.insert(0, (f"{args.baseline}: ", export(args.baseline, tmp)))
            thumbs_n = args.thumbnail_items or args.items
            rows = []
            for c in args.concurrency:
                for name, thumbs, limit in (
                    ("metadata", False, None),
                    ("thumbnails", True, args.thumbnail_items),
                    ("thumbnails, 1/4 of the items", True, max(1, thumbs_n // 4)),
                ):
                    for label, src in codes:
                        r = run_child(args, bucket, c, thumbs, limit, src, proc.pid)
                        print(json.dumps({"scenario": label + name, "concurrency": c, **r}), file=sys.stderr)
                        rows.append((label + name, c, r))
        finally:
            stop(proc)
    size = f"{data['bytes'] / 1e9:.2f} GB (mean {data['mean_mb']} MB; pool {data['pool_mb']} MB)"
    print(f"\n{data['items']} objects, {size}\n")
    print(
        "| scenario | concurrency | items | items/s (wall) | CPU per item | items per CPU-second |"
        " server CPU per item |",
        end="",
    )
    print(" read per item | peak RSS | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, c, r in rows:
        print(
            f"| {name} | {c} | {r['enriched']} | {r['items_per_s']} | {r['cpu_ms_per_item']} ms | "
            f"{r['items_per_cpu_s']} | {r.get('server_cpu_ms_per_item', '?')} ms | {r['read_per_item_kib']} KiB | "
            f"{r['peak_rss_mb']} MB | {r['load']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
