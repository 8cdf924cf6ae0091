#!/usr/bin/env python
"""Benchmark: event-to-catalog latency of ``sync = "events"`` with S3 on moto and SQS (issue 7).

    .venv/bin/python bench/events_sqs.py                       # 1,000 single writes, then a burst of 10,000
    .venv/bin/python bench/events_sqs.py --single 200 --burst 1000 --rate 20

A moto server (S3 and SQS on one port, real bucket notifications) is started on a
free port; ``bucketsync events setup``'s apply wires the bucket to a fresh queue, and
a real daemon (``bucketsync run``, a subprocess) keeps a dataset in events mode with
polling and reconcile an hour apart, so every item reaches the catalog through the queue.

- single: ``--single`` puts, one at a time at ``--rate`` per second;
- burst:  ``--burst`` puts from ``--writers`` threads, as fast as moto takes them.

Latency of a key = (when the ledger committed its item, ``items.updated``) minus (when
its put returned). The API reads that ledger, so the commit is when the item becomes
visible there; ``updated`` is taken just before the commit, so this understates by
the commit itself (a few ms). Reported: p50, p99, max, and keys never seen (lost)
within ``--patience`` seconds of the last put. The API's item count is checked at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from bucketsync.config import load_settings  # noqa: E402
from bucketsync.upstream.events import setup as events_setup  # noqa: E402
from e2e import Daemon, ledger_of, query_ledger, write_config  # noqa: E402
from emulators import free_port, start, stop, venv_bin  # noqa: E402
from emulators.s3 import PREFIX, REGION, S3Emulator, _wait_for_s3  # noqa: E402


def committed(config: Path, prefix: str) -> dict[str, float]:
    rows = query_ledger(
        ledger_of(config),
        "SELECT key, updated FROM items WHERE state = 'live' AND key LIKE ? || '%'",
        (prefix,),
    )
    return {key: float(updated) for key, updated in rows}


def wait_for(config: Path, written: dict[str, float], prefix: str, patience: float) -> dict[str, float]:
    """Poll the ledger until every written key is committed, or ``patience`` after the last put."""
    last = max(written.values())
    seen: dict[str, float] = {}
    while True:
        seen = committed(config, prefix)
        if all(k in seen for k in written) or time.time() > last + patience:
            return seen
        time.sleep(0.25)


def summary(name: str, written: dict[str, float], seen: dict[str, float], seconds: float) -> dict[str, Any]:
    lat = sorted(seen[k] - t for k, t in written.items() if k in seen)
    lost = [k for k in written if k not in seen]

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else float("nan")

    return {
        "phase": name,
        "writes": len(written),
        "write_seconds": round(seconds, 1),
        "p50": round(statistics.median(lat), 3) if lat else None,
        "p99": pct(0.99),
        "max": round(lat[-1], 3) if lat else None,
        "lost": len(lost),
        "lost_keys": lost[:10],
    }


def put(s3: Any, bucket: str, key: str) -> float:
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=key.encode())
    return time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", type=int, default=1000, help="single writes (default 1000)")
    parser.add_argument("--rate", type=float, default=20.0, help="single writes per second (default 20)")
    parser.add_argument("--burst", type=int, default=10_000, help="writes in the burst (default 10000)")
    parser.add_argument("--writers", type=int, default=4, help="threads writing the burst (default 4)")
    parser.add_argument("--patience", type=float, default=120.0, help="seconds after the last put to wait")
    args = parser.parse_args()
    # SIGTERM (a stopped benchmark) unwinds through the finally below: no daemon or moto left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    root = Path(tempfile.mkdtemp(prefix="bench-events-sqs-"))
    port = free_port()
    moto_bin = venv_bin("moto_server")
    server = start([moto_bin, "-H", "127.0.0.1", "-p", str(port)], port, what="moto", log=root / "moto.log")
    daemon: Daemon | None = None
    try:
        moto = S3Emulator("moto", f"http://127.0.0.1:{port}", "k", "s")
        _wait_for_s3(moto)
        bucket, queue = moto.new_bucket(), moto.new_queue(VisibilityTimeout="30")
        config = write_config(
            root,
            integrations={"aws": {"kind": "aws", "access_key_id": "k", "secret_access_key": "s"}},
            drivers={
                "raw": {
                    "url": f"s3://{bucket}/{PREFIX}",
                    "integration": "aws",
                    "endpoint_url": moto.endpoint_url,
                    "region": REGION,
                    "events": {"source": "sqs", "queue": queue},
                }
            },
            datasets={"raw": {"driver": "raw", "sync": "events", "interval": "1h", "reconcile_interval": "1h"}},
            agent={"log_level": "warning"},
        )
        settings = load_settings(config)
        asyncio.run(events_setup.apply(settings, events_setup.plan(settings, "raw")))
        daemon = Daemon(config).start()
        while not query_ledger(ledger_of(config), "SELECT 1 FROM runs WHERE kind = 'listing' AND ended IS NOT NULL"):
            time.sleep(0.1)
        s3 = moto.client()
        results = []

        if args.single:
            written: dict[str, float] = {}
            t0 = time.monotonic()
            for i in range(args.single):
                written[f"single/{i:06d}"] = put(s3, bucket, f"single/{i:06d}")
                time.sleep(max(0.0, t0 + (i + 1) / args.rate - time.monotonic()))
            seconds = time.monotonic() - t0
            results.append(summary("single", written, wait_for(config, written, "single/", args.patience), seconds))
            print(json.dumps(results[-1]), flush=True)

        if args.burst:
            burst: dict[str, float] = {}
            lock = threading.Lock()
            local = threading.local()

            def one(i: int) -> None:
                if not hasattr(local, "s3"):  # a client per thread (botocore clients are not shared safely)
                    local.s3 = S3Emulator("moto", moto.endpoint_url, "k", "s").client()
                key = f"burst/{i:06d}"
                t = put(local.s3, bucket, key)
                with lock:
                    burst[key] = t

            t0 = time.monotonic()
            with ThreadPoolExecutor(args.writers) as pool:
                list(pool.map(one, range(args.burst)))
            seconds = time.monotonic() - t0
            results.append(summary("burst", burst, wait_for(config, burst, "burst/", args.patience), seconds))
            print(json.dumps(results[-1]), flush=True)

        listings = query_ledger(ledger_of(config), "SELECT count(*) FROM runs WHERE kind = 'listing'")[0][0]
        api = daemon.get("/api/v1/datasets")
        datasets = api.body.get("datasets", []) if api.status == 200 else []
        counts = {d["dataset"]: d.get("items") for d in datasets} or api.status
        print(json.dumps({"listing_runs": listings, "api_items": counts}))
        print("| phase | writes | write time | p50 | p99 | max | lost |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(
                f"| {r['phase']} | {r['writes']:,} | {r['write_seconds']} s | {r['p50']} s | {r['p99']} s "
                f"| {r['max']} s | {r['lost']} |"
            )
        print(f"run id {uuid.uuid4().hex[:8]}, files in {root}")
    finally:
        if daemon is not None:
            daemon.close()
        stop(server, grace=3.0)


if __name__ == "__main__":
    main()
