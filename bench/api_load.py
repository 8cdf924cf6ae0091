#!/usr/bin/env python
"""Benchmark: the HTTP API of a real ``bucketsync run`` daemon under load.

    .venv/bin/python bench/api_load.py                          # the full load below, prints a table
    .venv/bin/python bench/api_load.py --datasets 5 --big 10000 --duration 10   # a quick run
    .venv/bin/python bench/api_load.py --sync-workers 2 --write docs/benchmarks.md   # with sync workers

The load (issue 13, point 14): 50 local-folder datasets of 1,000 files each, polled
every 5 s; a 100,000-file dataset re-synced back to back (no changes) through
``POST /sync?wait=true``; and a client reading the API at 50 requests/s for 60 s,
half ``GET /api/v1/datasets`` and half a 100-item page of a random dataset (from a
random place in it), plus ``/healthz`` at 10/s and ``/metrics`` at 1/s as a probe
and a scraper would. Requests are sent open-loop (on a fixed schedule, whether or
not earlier ones answered), so a slow agent cannot slow the client down and hide
its own latency. A request that errs, answers non-2xx or takes over 10 s fails.

The 100k sync's *idle* time comes first: the same ledger and folder, a daemon
configured with that dataset alone, nobody calling its API. Its *loaded* time is
every back-to-back run during the load window. Both are the run's own ``seconds``.

Each folder's files are hard links to one inode (the ``many_files(links=True)`` trick
of the tests): to a listing each is a file like any other, and 150,000 of them are made
in seconds instead of minutes on a busy disk. Public tools only: Python, aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK_START = "<!-- bench/api_load.py: start (generated, do not edit by hand) -->"
MARK_END = "<!-- bench/api_load.py: end -->"
TARGETS_MS = {"GET /api/v1/datasets": 100.0, "GET items page": 100.0, "GET /healthz": 20.0}
SYNC_RATIO_TARGET = 1.3
TIMEOUT = 10.0
LAG_TICK_S = 0.01
BIG = "big"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_folder(root: Path, files: int, per_dir: int = 1000) -> None:
    """``files`` one-byte files, ``per_dir`` to a folder, each folder's files hard links
    to one inode of its own (a file system caps the links to one inode, ext4 at 65,000)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        folder = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            folder.mkdir(exist_ok=True)
            source = root.parent / f".{root.name}-{folder.name}"
            source.write_bytes(b"x")
        os.link(source, folder / f"f{i % per_dir:04d}.bin")


def write_config(
    path: Path, work: Path, port: int, small: int, interval: str, sync_workers: int | None, nice: int | None = None
) -> None:
    lines = [
        "[agent]",
        f'ledger = "{work / "var" / "ledger.db"}"',
        f'listen = "127.0.0.1:{port}"',
        'log_format = "json"',
        *([f"sync_workers = {sync_workers}"] if sync_workers is not None else []),
        *([f"sync_workers_nice = {nice}"] if nice is not None else []),
        "",
        f"[drivers.{BIG}]",
        f'url = "{(work / "folders" / BIG).as_uri()}"',
        "",
        f"[datasets.{BIG}]",
        f'driver = "{BIG}"',
        'sync = "manual"',
        "",
    ]
    for n in range(small):
        name = f"ds{n:02d}"
        lines += [
            f"[drivers.{name}]",
            f'url = "{(work / "folders" / name).as_uri()}"',
            "",
            f"[datasets.{name}]",
            f'driver = "{name}"',
            f'interval = "{interval}"',
            "",
        ]
    path.write_text("\n".join(lines))


class Daemon:
    def __init__(self, config: Path, port: int, log: Path, profile: Path | None = None) -> None:
        self.config, self.url, self.log = config, f"http://127.0.0.1:{port}", log
        self.profile = profile  # cProfile of the daemon's main thread (its event loop)
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            return subprocess.Popen(
                [
                    sys.executable,
                    *(["-m", "cProfile", "-o", str(self.profile)] if self.profile else []),
                    "-m",
                    "bucketsync.cli",
                    "-c",
                    str(self.config),
                    "run",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def __aenter__(self) -> Daemon:
        self.proc = await asyncio.to_thread(self._spawn)
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the daemon exited ({self.proc.returncode}); see {self.log}")
                try:
                    async with s.get(self.url + "/healthz") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the daemon did not answer /healthz within 60 s")
                await asyncio.sleep(0.1)

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def sync_big(s: aiohttp.ClientSession, url: str) -> float:
    async with s.post(f"{url}/api/v1/datasets/{BIG}/sync", params={"wait": "true"}) as r:
        body = await r.json()
    if body.get("status") != "ok":
        raise SystemExit(f"the {BIG} sync did not end ok: {body}")
    return float(body["seconds"])


async def wait_synced(s: aiohttp.ClientSession, url: str, small: int) -> None:
    """Every small dataset has finished one run (its initial sync)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        async with s.get(f"{url}/api/v1/datasets") as r:
            rows = (await r.json())["datasets"]
        done = sum(1 for d in rows if d["dataset"] != BIG and d["last_run"] and d["last_run"]["status"] == "ok")
        if done == small:
            return
        await asyncio.sleep(1)
    raise SystemExit("the small datasets did not finish their initial sync within 10 minutes")


async def load(url: str, small: int, big_files: int, rate: float, duration: float) -> dict[str, Any]:
    lat: dict[str, list[float]] = {k: [] for k in (*TARGETS_MS, "GET /metrics")}
    #: every answered request: (when it was sent, seconds from the load's start; route; latency)
    timeline: list[tuple[float, str, float]] = []
    #: how late the client's own loop woke from a LAG_TICK_S sleep: (when, seconds late). The client shares
    #: the machine with the agent; time it loses is counted in every latency it measures.
    lag: list[tuple[float, float]] = []
    origin = time.perf_counter()
    fails: dict[str, list[str]] = {k: [] for k in lat}
    names = [f"ds{n:02d}" for n in range(small)] + [BIG]
    rng = random.Random(13)
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)

    async def one(s: aiohttp.ClientSession, route: str, path: str, params: dict[str, str] | None = None) -> None:
        t0 = time.perf_counter()
        try:
            async with s.get(url + path, params=params) as r:
                await r.read()
                if r.status >= 300:
                    fails[route].append(f"HTTP {r.status}")
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            fails[route].append(type(exc).__name__)
            return
        lat[route].append(time.perf_counter() - t0)
        timeline.append((t0 - origin, route, time.perf_counter() - t0))

    def page() -> tuple[str, dict[str, str]]:
        name = rng.choice(names)
        files = big_files if name == BIG else 1000
        i = rng.randrange(files)
        params = {"limit": "100"}
        if i:  # a cursor is the base64 of the last key seen; start from a random place
            import base64

            key = f"d{(i - 1) // 1000:04d}/f{(i - 1) % 1000:04d}.bin"
            params["cursor"] = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
        return f"/api/v1/datasets/{name}/items", params

    async def schedule(s: aiohttp.ClientSession, every: float, make: Any) -> None:
        start = time.perf_counter()
        n = 0
        while (due := start + n * every) < start + duration:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            task = asyncio.create_task(make(s, n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1

    async def api(s: aiohttp.ClientSession, n: int) -> None:
        if n % 2 == 0:
            await one(s, "GET /api/v1/datasets", "/api/v1/datasets")
        else:
            await one(s, "GET items page", *page())

    async def lag_monitor() -> None:
        end = time.perf_counter() + duration
        while (due := time.perf_counter() + LAG_TICK_S) < end:
            await asyncio.sleep(LAG_TICK_S)
            lag.append((due - origin, time.perf_counter() - due))

    syncs: list[float] = []

    async def resync() -> None:
        end = time.perf_counter() + duration
        async with aiohttp.ClientSession() as own:  # a sync takes as long as it takes
            while time.perf_counter() < end:
                syncs.append(await sync_big(own, url))

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:
        t0 = time.perf_counter()
        await asyncio.gather(
            schedule(s, 1 / rate, api),
            schedule(s, 0.1, lambda s, n: one(s, "GET /healthz", "/healthz")),
            schedule(s, 1.0, lambda s, n: one(s, "GET /metrics", "/metrics")),
            resync(),
            lag_monitor(),
        )
        if tasks:
            await asyncio.wait(tasks)
        wall = time.perf_counter() - t0
    return {"latency": lat, "failures": fails, "loaded_syncs": syncs, "wall": wall, "timeline": timeline, "lag": lag}


def ms(value: float) -> str:
    return "-" if value != value else f"{value * 1000:.1f}"  # NaN: no request succeeded


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def render(res: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"{args.datasets} datasets x 1,000 files polled every {args.interval}, a {args.big:,}-file dataset "
        f"re-synced back to back, {args.rate:g} API requests/s (half `GET /api/v1/datasets`, half a 100-item page) "
        f"plus `/healthz` at 10/s and `/metrics` at 1/s, for {args.duration:g} s; "
        + workers_said(args.sync_workers)
        + (f" `agent.sync_workers_nice = {args.sync_workers_nice}`." if args.sync_workers_nice is not None else ""),
        "",
        "| route | requests | failed | p50 (ms) | p99 (ms) | max (ms) | target p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    met: list[str] = []
    for route, values in res["latency"].items():
        failed = len(res["failures"][route])
        total = len(values) + failed
        p99 = pct(values, 99) * 1000
        target = TARGETS_MS.get(route)
        mark = "-"
        if target is not None:
            ok = p99 <= target and failed == 0
            mark = f"<= {target:g} ms: **{'met' if ok else 'NOT met'}**"
            met.append(
                f"- {route} p99 <= {target:g} ms, no failures: **{'met' if ok else 'NOT met'}** "
                f"(p99 {ms(pct(values, 99))} ms, {failed} of {total} failed)"
            )
        lines.append(
            f"| `{route}` | {total} | {failed} | {ms(pct(values, 50))} | {ms(pct(values, 99))} | "
            f"{ms(max(values, default=float('nan')))} | {mark} |"
        )
    idle, loaded = res["idle_syncs"], res["loaded_syncs"]
    ratio = statistics.median(loaded) / statistics.median(idle) if idle and loaded else float("nan")
    worst = max(loaded, default=float("nan")) / statistics.median(idle) if idle else float("nan")
    lines += [
        "",
        f"The {args.big:,}-file no-change sync: idle {', '.join(f'{x:.2f}' for x in idle)} s "
        f"(median {statistics.median(idle):.2f} s); under the load {len(loaded)} runs, median "
        f"{statistics.median(loaded) if loaded else float('nan'):.2f} s, max "
        f"{max(loaded, default=float('nan')):.2f} s: **{ratio:.2f}x** idle (the slowest {worst:.2f}x).",
        "",
        "Targets:",
        "",
        *met,
        f"- concurrent sync <= {SYNC_RATIO_TARGET}x its idle time (median): "
        f"**{'met' if ratio <= SYNC_RATIO_TARGET else 'NOT met'}** ({ratio:.2f}x)",
        "",
        f"Load average (1 min) at start / end: {res['load_start']:.2f} / {res['load_end']:.2f} on "
        f"{os.cpu_count()} cores.",
    ]
    lines += ["", client_lag(res)]
    bad = {r: sorted(set(f)) for r, f in res["failures"].items() if f}
    if bad:
        lines.append("")
        lines.append("Failures: " + "; ".join(f"{r}: {', '.join(f)}" for r, f in bad.items()))
    return "\n".join(lines)


def workers_said(setting: int | None) -> str:
    if setting is None:
        sys.path.insert(0, str(ROOT / "src"))
        from bucketsync.upstream.workers import workers_for

        return f"`agent.sync_workers` at its default, `auto` ({workers_for('auto')} worker processes here)."
    if setting == 0:
        return "`agent.sync_workers = 0` (runs list and diff in the agent's process)."
    return f"`agent.sync_workers = {setting}` (worker processes)."


def client_lag(res: dict[str, Any]) -> str:
    """How late the load client itself ran, and how many over-target probes it explains."""
    lag = res["lag"]
    late = [x for _, x in lag]
    slow = [(t, d) for t, route, d in res["timeline"] if route == "GET /healthz" and d * 1000 > TARGETS_MS[route]]
    # a probe is the client's doing when, while it was out, the client's own loop woke late by at least
    # half the probe's excess over the target
    explained = sum(
        1
        for t, d in slow
        if any(t <= at <= t + d and x >= (d - TARGETS_MS["GET /healthz"] / 1000) / 2 for at, x in lag)
    )
    return (
        f"The load client's own loop (same machine) woke from {LAG_TICK_S * 1000:g} ms sleeps late by p50 "
        f"{ms(pct(late, 50))} ms, p99 {ms(pct(late, 99))} ms, max {ms(max(late, default=float('nan')))} ms; "
        f"of the {len(slow)} `/healthz` probes over {TARGETS_MS['GET /healthz']:g} ms, {explained} were out while "
        "the client itself was late by at least half of their excess."
    )


def write_doc(path: Path, table: str, args: argparse.Namespace) -> None:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    import sqlite3

    header = (
        f"Generated by `.venv/bin/python bench/api_load.py {' '.join(sys.argv[1:])}` on "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Machine: {os.cpu_count()} cores, "
        f"Linux {os.uname().release}, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}. "
        f"Source: commit {source or 'unknown'}.\n\n"
    )
    block = f"{MARK_START}\n{header}{table}\n{MARK_END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        pre, rest = text.split(MARK_START, 1)
        text = pre + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## The HTTP API under load\n\n" + block + "\n"
    path.write_text(text)


async def main_async(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    make_folder(work / "folders" / BIG, args.big)
    for n in range(args.datasets):
        make_folder(work / "folders" / f"ds{n:02d}", 1000)
    print(f"folders made in {time.perf_counter() - t0:.1f} s under {work}", file=sys.stderr)

    idle: list[float] = []
    port = free_port()
    alone = work / "alone.toml"
    write_config(alone, work, port, 0, args.interval, args.sync_workers, args.sync_workers_nice)
    async with Daemon(alone, port, work / "daemon-idle.log") as d, aiohttp.ClientSession() as s:
        first = await sync_big(s, d.url)
        print(f"initial sync of {args.big:,} files: {first:.2f} s", file=sys.stderr)
        for _ in range(args.idle_runs):
            idle.append(await sync_big(s, d.url))
    print(f"idle no-change syncs: {idle}", file=sys.stderr)

    port = free_port()
    full = work / "full.toml"
    write_config(full, work, port, args.datasets, args.interval, args.sync_workers, args.sync_workers_nice)
    async with Daemon(full, port, work / "daemon-load.log", args.profile_daemon) as d:
        async with aiohttp.ClientSession() as s:
            await wait_synced(s, d.url, args.datasets)
        print("small datasets synced; load starts", file=sys.stderr)
        load_start = os.getloadavg()[0]
        res = await load(d.url, args.datasets, args.big, args.rate, args.duration)
        res["load_start"], res["load_end"] = load_start, os.getloadavg()[0]
    res["idle_syncs"] = idle
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=int, default=50, help="small datasets of 1,000 files (default 50)")
    ap.add_argument("--big", type=int, default=100_000, help="files in the big dataset (default 100,000)")
    ap.add_argument("--interval", default="5s", help="poll interval of the small datasets (default 5s)")
    ap.add_argument("--rate", type=float, default=50.0, help="API requests per second (default 50)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--idle-runs", type=int, default=3, help="idle no-change syncs of the big dataset (default 3)")
    ap.add_argument(
        "--sync-workers",
        type=int,
        help="agent.sync_workers of both daemons (default: the agent's own, auto; 0: listing and diffing in "
        "the agent's process)",
    )
    ap.add_argument("--sync-workers-nice", type=int, help="agent.sync_workers_nice of both daemons (default: agent's)")
    ap.add_argument("--write", type=Path, help="write the results into this markdown file (its generated block)")
    ap.add_argument("--json", type=Path, help="also dump the raw measurements here")
    ap.add_argument("--profile-daemon", type=Path, help="cProfile the loaded daemon's event loop into this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (folders, ledger, daemon logs)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bucketsync-api-load-"))
    try:
        res = asyncio.run(main_async(args, work))
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(res))
    table = render(res, args)
    print(table)
    if args.write:
        write_doc(args.write, table, args)


if __name__ == "__main__":
    main()
