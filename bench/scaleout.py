#!/usr/bin/env python
"""Benchmark: one agent against three on one PostgreSQL ledger, a round of syncs of 12 datasets (issue 11).

    .venv/bin/python bench/scaleout.py                            # 12 datasets x 50,000 files, 3 repetitions
    .venv/bin/python bench/scaleout.py --files 10000 --repeat 1   # a quick run
    .venv/bin/python bench/scaleout.py --baseline main            # before/after, interleaved, same server
    .venv/bin/python bench/scaleout.py --write docs/benchmarks.md

The store is local folders (each of hard links to one inode per folder of 1,000, as bench/api_load.py
makes them: to a listing each is a file like any other); a store every agent process reads itself,
not an in-process one. PostgreSQL is a throwaway local server (tests/emulators/postgres.py) with
``fsync``, ``synchronous_commit`` and ``full_page_writes`` on, as a real ledger's would be.

Each repetition, for 1 agent and then for 3 (``--agents``), on a fresh database: the agents are
real ``bucketsync run`` processes with the same configuration (every dataset ``sync = "manual"``, so
nothing runs before it is asked to). Once the leases are divided (4 datasets per agent), every
dataset's sync is asked of its owner at once (``POST /datasets/NAME/sync?wait=true``), and the
round's wall time is until the last one answers: first the **initial** round (an empty ledger: every
file added), then a **no-change** round. Reported per round: the median wall time over the
repetitions, 1 agent / 3 agents (the speedup), each agent's CPU seconds and PostgreSQL's (all its
processes), and how many of PostgreSQL's backends were waiting for a lock, sampled every 20 ms
(the mean over the round; the ledger's advisory write locks apart from row locks), and the load
average at start and end. The target: 3 agents finish a round
>= 2x faster than one.

``--baseline REV`` runs the same repetitions a second time with ``src/`` as it was at git revision
REV (``git archive``), interleaved with the current code, on the same server and folders.
Public tools only: Python, aiohttp, asyncpg.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from api_load import free_port, make_folder  # noqa: E402  (this folder, on the path above)
from emulators.postgres import PostgresServer, running_postgres  # noqa: E402
from sync_memory import machine  # noqa: E402

MARK_START = "<!-- bench/scaleout.py: start (generated, do not edit by hand) -->"
MARK_END = "<!-- bench/scaleout.py: end -->"
TARGET = 2.0
ROUNDS = ("initial", "nochange")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (threads included) and of its reaped children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / TICK


def postgres_cpu(port: int) -> float:
    """The CPU of the PostgreSQL server on ``port``: its postmaster (with the children it reaped)
    and every process it runs now (backends, background workers). Other servers on the machine
    (other test runs) are not counted."""
    procs: dict[int, tuple[int, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                procs[int(entry.name)] = (ppid, (entry / "cmdline").read_bytes())
            except (OSError, ValueError, IndexError):
                continue
    mark = f"-cport={port}".encode()
    main = [pid for pid, (_, cmd) in procs.items() if mark in cmd.split(b"\0")]
    if not main:
        return 0.0
    return cpu_seconds(main[0]) + sum(cpu_seconds(pid) for pid, (ppid, _) in procs.items() if ppid == main[0])


def write_config(path: Path, work: Path, url: str, datasets: int) -> None:
    lines = ["[agent]", f'ledger = "{url}"', f'state_dir = "{work / "state"}"', 'log_format = "json"', ""]
    for n in range(datasets):
        name = f"ds{n:02d}"
        lines += [
            f"[drivers.{name}]",
            f'url = "{(work / "folders" / name).as_uri()}"',
            "",
            f"[datasets.{name}]",
            f'driver = "{name}"',
            'sync = "manual"',
            "",
        ]
    path.write_text("\n".join(lines))


@dataclass
class Agent:
    id: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_agents(n: int, config: Path, url: str, work: Path, src: Path | None, tag: str) -> list[Agent]:
    agents = []
    for i in range(n):
        agent_id, port = f"agent{i}", free_port()
        env = {
            **os.environ,
            "BUCKETSYNC_AGENT__ID": agent_id,
            "BUCKETSYNC_AGENT__LISTEN": f"127.0.0.1:{port}",
            "BUCKETSYNC_AGENT__LEDGER": f"{url}?application_name={agent_id}",
        }
        if src is not None:
            env["PYTHONPATH"] = str(src)
        with open(work / f"{tag}-{agent_id}.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bucketsync.cli", "-c", str(config), "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        agents.append(Agent(agent_id, port, proc))
    return agents


def stop_agents(agents: list[Agent]) -> None:
    for a in agents:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
    for a in agents:
        try:
            a.proc.wait(30)
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait(10)


async def divided(url: str, agents: list[Agent], datasets: int, timeout: float = 120) -> dict[str, str]:
    """dataset -> owner once every agent holds its fair share (the first agent to start takes
    every dataset and releases the surplus as the others join)."""
    share = -(-datasets // len(agents))
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(url)
    try:
        while time.monotonic() < deadline:
            for a in agents:
                if a.proc.poll() is not None:
                    raise SystemExit(f"agent {a.id} exited ({a.proc.returncode}); see its log")
            rows = await conn.fetch("SELECT dataset, owner FROM leases WHERE expires > clock_timestamp()")
            owners = {str(r[0]): str(r[1]) for r in rows if r[1] is not None}
            per = [sum(1 for o in owners.values() if o == a.id) for a in agents]
            if len(owners) == datasets and max(per) <= share:
                return owners
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    raise SystemExit(f"the leases were not divided among {len(agents)} agents within {timeout:.0f} s")


async def healthy(agents: list[Agent], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        for a in agents:
            while True:
                if a.proc.poll() is not None:
                    raise SystemExit(f"agent {a.id} exited ({a.proc.returncode}); see its log")
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(a.url + "/healthz") as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise SystemExit(f"agent {a.id} did not answer /healthz within {timeout:.0f} s")
                await asyncio.sleep(0.1)


async def lock_waits(url: str, stop: asyncio.Event, into: list[tuple[int, int]]) -> None:
    """Sample, every 20 ms, how many of the database's backends wait for a lock: (for an advisory
    lock (the ledger's write locks), for anything else (rows: the commit sequence, counts))."""
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            row = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE l.locktype = 'advisory'), "
                "count(*) FILTER (WHERE l.locktype <> 'advisory') "
                "FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE NOT l.granted AND d.datname = current_database()"
            )
            into.append((int(row[0]), int(row[1])))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
    finally:
        await conn.close()


@dataclass
class Round:
    wall: float
    agent_cpu: list[float]
    pg_cpu: float
    waiting: float  # mean number of backends waiting for an advisory lock (the write locks)
    rows: float  # ... for any other lock (rows)


async def one_round(url: str, port: int, agents: list[Agent], owners: dict[str, str]) -> Round:
    by_id = {a.id: a for a in agents}
    before = [cpu_seconds(a.proc.pid) for a in agents]
    pg_before = postgres_cpu(port)
    stop, samples = asyncio.Event(), []
    sampler = asyncio.create_task(lock_waits(url, stop, samples))
    timeout = aiohttp.ClientTimeout(total=None)

    async def sync(s: aiohttp.ClientSession, name: str) -> None:
        async with s.post(f"{by_id[owners[name]].url}/api/v1/datasets/{name}/sync", params={"wait": "true"}) as r:
            body = await r.json()
        if r.status != 200 or body.get("status") != "ok":
            raise SystemExit(f"the sync of {name} did not end ok: HTTP {r.status} {body}")

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await asyncio.gather(*(sync(s, name) for name in sorted(owners)))
    wall = time.perf_counter() - t0
    stop.set()
    await sampler
    return Round(
        wall,
        [cpu_seconds(a.proc.pid) - b for a, b in zip(agents, before, strict=True)],
        postgres_cpu(port) - pg_before,
        statistics.mean(a for a, _ in samples) if samples else 0.0,
        statistics.mean(b for _, b in samples) if samples else 0.0,
    )


async def repetition(
    server: PostgresServer, work: Path, n: int, datasets: int, src: Path | None, tag: str
) -> dict[str, Round]:
    name = f"scaleout_{tag}_{n}"
    server.drop_database(name)
    url = server.new_database(name=name)
    config = work / f"{tag}-{n}.toml"
    write_config(config, work, url, datasets)
    agents = start_agents(n, config, url, work, src, tag)
    try:
        await healthy(agents)
        owners = await divided(url, agents, datasets)
        out = {}
        for r in ROUNDS:
            out[r] = await one_round(url, server.port, agents, owners)
            print(
                f"{tag} {n} agent(s) {r}: {out[r].wall:.2f} s, agents' CPU "
                f"{', '.join(f'{c:.1f}' for c in out[r].agent_cpu)} s, PostgreSQL {out[r].pg_cpu:.1f} s, "
                f"waiting for the write locks {out[r].waiting:.2f}, for rows {out[r].rows:.2f}",
                file=sys.stderr,
            )
        return out
    finally:
        stop_agents(agents)
        server.drop_database(name)


def export(rev: str, into: Path) -> Path:
    """``src/`` at git revision ``rev``, in a folder of its own."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


@dataclass
class Results:
    #: (code, agents, round) -> the rounds of every repetition
    rounds: dict[tuple[str, int, str], list[Round]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)


def render(res: Results, args: argparse.Namespace, codes: list[str], version: str, seconds: float) -> str:
    lo, hi = min(args.agents), max(args.agents)
    lines = [
        f"{args.datasets} datasets x {args.files:,} files in local folders; PostgreSQL {version} on the same "
        "machine (local TCP; `fsync`, `synchronous_commit` and `full_page_writes` on); agents are "
        "`bucketsync run` processes. Wall time of a round: every dataset's sync asked of its owner at once, "
        "until the last one answered. Median of the repetitions shown; CPU seconds per round (median).",
        "",
        "| code | round | agents | wall (s) | runs | each agent's CPU (s) | PostgreSQL CPU (s) "
        "| waiting: write locks | waiting: rows | speedup |",
        "| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    verdicts = []
    for code in codes:
        for rnd in ROUNDS:
            base = statistics.median(r.wall for r in res.rounds[(code, lo, rnd)])
            for n in args.agents:
                rs = res.rounds[(code, n, rnd)]
                wall = statistics.median(r.wall for r in rs)
                cpus = [statistics.median(r.agent_cpu[i] for r in rs) for i in range(n)]
                speed = base / wall
                lines.append(
                    f"| {code or 'this'} | {rnd} | {n} | **{wall:.2f}** | {', '.join(f'{r.wall:.2f}' for r in rs)} "
                    f"| {', '.join(f'{c:.1f}' for c in cpus)} | {statistics.median(r.pg_cpu for r in rs):.1f} "
                    f"| {statistics.median(r.waiting for r in rs):.2f} | {statistics.median(r.rows for r in rs):.2f} "
                    f"| {speed:.2f}x |"
                )
                if n == hi and n != lo:
                    verdicts.append(
                        f"- {code or 'this code'}, {rnd} round: {hi} agents {speed:.2f}x faster than {lo}: "
                        f"**{'met' if speed >= TARGET else 'NOT met'}** (target >= {TARGET:.0f}x)"
                    )
    lines += [
        "",
        *verdicts,
        "",
        f"Whole benchmark {seconds:.0f} s; load average (1 min) at start / end: "
        f"{res.load[0]:.2f} / {res.load[-1]:.2f} on {os.cpu_count()} cores (a shared machine: noise).",
    ]
    return "\n".join(lines)


def write_doc(path: Path, table: str) -> None:
    info = machine()
    header = (
        f"Generated by `.venv/bin/python bench/scaleout.py {' '.join(sys.argv[1:])}` on "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Machine: {info['cores']} cores "
        f"({info['cpu']}), {info['memory']} RAM, Python {info['python']}. Source: commit {info['source']}.\n\n"
    )
    block = f"{MARK_START}\n{header}{table}\n{MARK_END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        pre, rest = text.split(MARK_START, 1)
        text = pre + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Scale-out: one agent against three on PostgreSQL\n\n" + block + "\n"
    path.write_text(text)


async def main_async(args: argparse.Namespace, work: Path) -> tuple[Results, list[str], str]:
    # SIGTERM cancels the benchmark: the agents and the server are stopped on the way out.
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    t0 = time.perf_counter()
    for n in range(args.datasets):
        make_folder(work / "folders" / f"ds{n:02d}", args.files)
    print(f"folders made in {time.perf_counter() - t0:.1f} s under {work}", file=sys.stderr)
    # A copy of this tree's src/: editing the sources while the benchmark runs changes nothing in it.
    codes: list[tuple[str, Path | None]] = [("", Path(shutil.copytree(ROOT / "src", work / "this" / "src")))]
    if args.baseline:
        (work / "baseline").mkdir()
        codes.insert(0, (args.baseline, export(args.baseline, work / "baseline")))
    res = Results(load=[os.getloadavg()[0]])
    with running_postgres(fsync="on", synchronous_commit="on", full_page_writes="on") as server:
        for rep in range(args.repeat):
            for code, src in codes:
                for n in args.agents:
                    tag = f"r{rep}{'b' if code else 'c'}"
                    got = await repetition(server, work, n, args.datasets, src, tag)
                    for rnd, r in got.items():
                        res.rounds.setdefault((code, n, rnd), []).append(r)
        version = server.version()
    res.load.append(os.getloadavg()[0])
    return res, [c for c, _ in codes], version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=int, default=12)
    ap.add_argument("--files", type=int, default=50_000, help="files per dataset (default 50,000)")
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", metavar="REV", help="also run with src/ at git revision REV, interleaved")
    ap.add_argument("--write", type=Path, help="write the results into this markdown file (its generated block)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (folders, agents' logs)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bucketsync-scaleout-"))
    try:
        res, codes, version = asyncio.run(main_async(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = render(res, args, codes, version, time.perf_counter() - t0)
    print(table)
    if args.write:
        write_doc(args.write, table)


if __name__ == "__main__":
    main()
