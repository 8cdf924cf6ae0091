"""Listing against the peers: bucketsync, s5cmd, rclone, aiobotocore and the raw floor, whole processes.

One command starts its own SeaweedFS, loads the objects once (cached between runs under
``--cache``), then measures in one run, median of ``--repeat`` runs each, with ratios to the
peers of the same run:

- S3 on SeaweedFS: bucketsync initial sync, no-change re-sync and re-sync after 1% added,
  1% modified and 1% removed (parallel, and ``list_concurrency = 1``); beside them the raw floor
  (signed aiohttp requests, pages read but not parsed), ``s5cmd ls``, ``rclone lsjson -R
  --fast-list``, ``rclone lsf -R --disable ListR --checkers 8`` and the aiobotocore paginator;
- the same through a proxy (its own process) that holds every request ``--delay-ms`` (50 ms:
  what real clouds look like);
- peak RSS of each bucketsync process (``/usr/bin/time -v``'s maximum resident set size).

Not a test: run it by hand (``bench/README.md``); results and analysis in docs/benchmarks.md.

    .venv/bin/python bench/listing_peers.py                      # 100,000 objects, 3 runs each
    .venv/bin/python bench/listing_peers.py --objects 20000 --repeat 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def use_venv(kind: str, cache: Path) -> str:
    """Measure bucketsync as a user installs it ("runtime", the default): a venv of its own under
    ``cache`` with the runtime dependencies only, this checkout installed editable in it (so the
    code measured is the working tree's; ``main`` byte-compiles it). Or "test":
    the venv this script runs in. The test venv holds packages a user's install does not (rich,
    through schemathesis), and structlog imports rich whenever it is there: 0.14 s of CPU in
    every bucketsync process, which no user pays. The first run builds the venv (about a
    minute, from the package index); later runs only check it."""
    if kind == "test":
        return str(BIN / "bucketsync")
    venv = cache / "venv-runtime"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-e", str(ROOT)], check=True)
    return str(venv / "bin" / "bucketsync")


KEY_ID, SECRET = "bench-key", "bench-secret"
BUCKET = "bench"
CHANGED = 0.01  # the 1% scenario: this share added, as much modified, as much removed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def load_average() -> float:
    return os.getloadavg()[0]


# --- the data ----------------------------------------------------------------------------------


def key_of(i: int) -> str:
    """Keys like a camera roll: images/YYYY/MM/DD/IMG_nnnnnn.jpg, about 150 per day folder."""
    day = i // 150
    return f"images/{2020 + day // 336}/{day // 28 % 12 + 1:02d}/{day % 28 + 1:02d}/IMG_{i:06d}.jpg"


def changes(n: int) -> tuple[list[str], list[str], list[str]]:
    """(added, modified, removed) keys of the 1% scenario, spread over the whole bucket."""
    k = max(1, int(n * CHANGED))
    step = n // k
    modified = [key_of(i) for i in range(0, n, step)][:k]
    removed = [key_of(i) for i in range(step // 2, n, step)][:k]
    added = [key_of(i).replace("IMG_", "NEW_") for i in range(step // 3, n, step)][:k]
    return added, modified, removed


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def grpc_free_port() -> int:
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def start_seaweedfs(data: Path) -> Server:
    data.mkdir(parents=True, exist_ok=True)
    ports = {name: grpc_free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    argv = [
        str(BIN / "weed"),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        *(f"-{name}.port={port}" for name, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    log = (data / "weed.log").open("ab")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
    server = Server(proc, ports["s3"])
    wait_port(server.port)
    for _ in range(100):  # the S3 gateway answers a little after its port opens
        if run_quiet(s5cmd(server, "ls"), env=s3_env()) == 0:
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError("SeaweedFS does not answer")


def run_quiet(argv: list[str], env: dict[str, str] | None = None) -> int:
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False).returncode


def s5cmd(server: Server, *args: str) -> list[str]:
    return [str(BIN / "s5cmd"), "--endpoint-url", server.endpoint, *args]


def s3_env() -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}


def put_keys(server: Server, keys: list[str], body: bytes, work: Path) -> None:
    """Upload ``keys`` with one s5cmd batch (``run`` of a command file, 256 workers)."""
    src = work / "body"
    src.write_bytes(body)
    commands = work / "commands.txt"
    commands.write_text("".join(f"cp {src} s3://{BUCKET}/{k}\n" for k in keys))
    subprocess.run(s5cmd(server, "run", str(commands)), env=s3_env(), stdout=subprocess.DEVNULL, check=True)


def delete_keys(server: Server, keys: list[str], work: Path) -> None:
    commands = work / "commands.txt"
    commands.write_text("".join(f"rm s3://{BUCKET}/{k}\n" for k in keys))
    subprocess.run(s5cmd(server, "run", str(commands)), env=s3_env(), stdout=subprocess.DEVNULL, check=True)


def ensure_loaded(server: Server, n: int, marker: Path, work: Path) -> None:
    """The bucket with ``n`` objects, each of the base state; loaded once, then kept in the cache."""
    added, modified, removed = changes(n)
    if not marker.exists():
        subprocess.run(s5cmd(server, "mb", f"s3://{BUCKET}"), env=s3_env(), stdout=subprocess.DEVNULL, check=False)
        t0 = time.monotonic()
        put_keys(server, [key_of(i) for i in range(n)], b"x" * 100, work)
        print(f"loaded {n:,} objects in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        marker.write_text(str(n))
        return
    # a previous run left the 1% changes in place: back to the base state
    put_keys(server, modified + removed, b"x" * 100, work)
    delete_keys(server, added, work)


def apply_changes(server: Server, n: int, work: Path) -> None:
    added, modified, removed = changes(n)
    put_keys(server, added, b"x" * 100, work)
    put_keys(server, modified, b"y" * 150, work)
    delete_keys(server, removed, work)


# --- the delaying proxy (its own process) ---------------------------------------------------------


async def _proxy(listen: int, upstream: int, delay: float) -> None:
    """Hold every chunk from a client ``delay`` seconds before passing it on: a request (one
    chunk for a list call) then costs one added round trip, as on a real cloud."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float) -> None:
        try:
            while data := await reader.read(65536):
                if hold:
                    await asyncio.sleep(hold)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pipe(client_r, server_w, delay), pipe(server_r, client_w, 0.0))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def start_proxy(upstream: Server, delay_ms: float) -> Server:
    port = free_port()
    argv = [sys.executable, __file__, "--proxy", str(port), str(upstream.port), str(delay_ms)]
    proc = subprocess.Popen(argv, start_new_session=True)
    wait_port(port)
    return Server(proc, port)


# --- the listers ---------------------------------------------------------------------------------


async def _floor(endpoint: str, concurrency: int) -> int:
    """Signed ListObjectsV2 pages one after another; the body is read, only the token is looked for."""
    import aiohttp
    from aiobotocore.session import get_session
    from botocore.config import Config

    session = get_session()
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
    token_re = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")
    n = 0
    async with (
        session.create_client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config) as client,
        aiohttp.ClientSession() as http,
    ):
        token = None
        while True:
            params = {"Bucket": BUCKET, "MaxKeys": 1000, **({"ContinuationToken": token} if token else {})}
            url = await client.generate_presigned_url("list_objects_v2", Params=params)
            async with http.get(url) as resp:
                body = await resp.read()
            n += body.count(b"<Contents>")
            m = token_re.search(body)
            if not m:
                return n
            token = m.group(1).decode()


async def _paginator(endpoint: str) -> int:
    from aiobotocore.session import get_session
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"})
    n = 0
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=config
    ) as client:
        async for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            n += len(page.get("Contents", ()))
    return n


def rclone_env(endpoint: str) -> dict[str, str]:
    return {
        **os.environ,
        "RCLONE_CONFIG_B_TYPE": "s3",
        "RCLONE_CONFIG_B_PROVIDER": "Other",
        "RCLONE_CONFIG_B_ENDPOINT": endpoint,
        "RCLONE_CONFIG_B_ACCESS_KEY_ID": KEY_ID,
        "RCLONE_CONFIG_B_SECRET_ACCESS_KEY": SECRET,
        "RCLONE_CONFIG_B_FORCE_PATH_STYLE": "true",
    }


@dataclass
class Measured:
    walls: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


def timed(argv: list[str], env: dict[str, str], prepare: Callable[[], None] | None, repeat: int) -> Measured:
    """Wall time (and peak RSS) of a whole process, ``repeat`` times; ``prepare`` runs untimed before each."""
    out = Measured()
    for _ in range(repeat):
        if prepare is not None:
            prepare()
        out.load.append(load_average())
        with tempfile.NamedTemporaryFile("r") as stats:
            t0 = time.perf_counter()
            proc = subprocess.run(
                ["/usr/bin/time", "-o", stats.name, "-f", "%M", *argv],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
            )
            wall = time.perf_counter() - t0
            rss = stats.read().strip().splitlines()
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[:3]} failed ({proc.returncode}): {proc.stderr.decode()[-800:]}")
        out.walls.append(wall)
        out.rss_mib.append(int(rss[-1]) / 1024 if rss and rss[-1].isdigit() else float("nan"))
    return out


#: a ledger's files: the database, its WAL and shared memory, its commit-sequence sidecar
LEDGER_FILES = ("", "-wal", "-shm", ".seq")


def drop_ledger(path: Path) -> None:
    for suffix in LEDGER_FILES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def copy_ledger(src: Path, dst: Path) -> None:
    drop_ledger(dst)
    for suffix in LEDGER_FILES:
        if Path(f"{src}{suffix}").exists():
            shutil.copyfile(f"{src}{suffix}", f"{dst}{suffix}")


def bucketsync_config(work: Path, endpoint: str, concurrency: int, ledger: Path) -> Path:
    path = work / f"bucketsync-{concurrency}-{abs(hash(endpoint))}.toml"
    path.write_text(
        f"""[agent]
ledger = "{ledger}"
log_level = "warning"

[integrations.bench]
kind = "aws"
access_key_id = "{KEY_ID}"
secret_access_key = "{SECRET}"

[drivers.d]
url = "s3://{BUCKET}/"
endpoint_url = "{endpoint}"
integration = "bench"
list_concurrency = {concurrency}

[datasets.ds]
driver = "d"
sync = "manual"
max_delete_ratio = 1.0
"""
    )
    return path


@dataclass
class Row:
    name: str
    what: str
    measured: Measured


def measure_s3(
    server: Server, endpoint: str, n: int, repeat: int, work: Path, label: str, bucketsync: str
) -> list[Row]:
    """Every lister against ``endpoint`` (SeaweedFS itself, or the proxy in front of it)."""
    rows: list[Row] = []
    env = s3_env()
    py = sys.executable
    me = __file__
    rows.append(
        Row(label, "raw floor (signed aiohttp, no parsing)", timed([py, me, "--floor", endpoint], env, None, repeat))
    )
    rows.append(
        Row(
            label,
            "`s5cmd ls`",
            timed([str(BIN / "s5cmd"), "--endpoint-url", endpoint, "ls", f"s3://{BUCKET}/*"], env, None, repeat),
        )
    )
    rclone = str(BIN / "rclone")
    rows.append(
        Row(
            label,
            "`rclone lsjson -R --fast-list`",
            timed(
                [rclone, "lsjson", "-R", "--fast-list", "--use-server-modtime", "--no-mimetype", f"B:{BUCKET}"],
                rclone_env(endpoint),
                None,
                repeat,
            ),
        )
    )
    rows.append(
        Row(
            label,
            "`rclone lsf -R --disable ListR --checkers 8`",
            timed(
                [rclone, "lsf", "-R", "--disable", "ListR", "--checkers", "8", f"B:{BUCKET}"],
                rclone_env(endpoint),
                None,
                repeat,
            ),
        )
    )
    rows.append(Row(label, "aiobotocore paginator", timed([py, me, "--paginator", endpoint], env, None, repeat)))
    for concurrency in (8, 1):
        what = "parallel (8)" if concurrency > 1 else "sequential (1)"
        ledger = work / f"ledger-{concurrency}.db"
        base = work / f"ledger-{concurrency}-base.db"
        cfg = bucketsync_config(work, endpoint, concurrency, ledger)
        argv = [bucketsync, "-c", str(cfg), "sync", "ds"]

        def fresh(ledger: Path = ledger) -> None:
            drop_ledger(ledger)

        def from_base(ledger: Path = ledger, base: Path = base) -> None:
            copy_ledger(base, ledger)

        rows.append(Row(label, f"bucketsync initial sync, {what}", timed(argv, env, fresh, repeat)))
        copy_ledger(ledger, base)  # the last initial sync's ledger (checkpointed at close)
        rows.append(Row(label, f"bucketsync no-change re-sync, {what}", timed(argv, env, from_base, repeat)))
    return rows


def table(rows: list[Row], peers: dict[str, float]) -> str:
    lines = [
        "| lister | wall (s), median | runs (s) | peak RSS (MiB) | / s5cmd | / rclone lsf walk | load (1 min) |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        m = r.measured
        s5 = m.median / peers["s5cmd"] if peers.get("s5cmd") else float("nan")
        rc = m.median / peers["rclone"] if peers.get("rclone") else float("nan")
        lines.append(
            f"| {r.what} | **{m.median:.2f}** | {', '.join(f'{w:.2f}' for w in m.walls)} | "
            f"{max(m.rss_mib):.0f} | {s5:.2f} | {rc:.2f} | {', '.join(f'{x:.1f}' for x in m.load)} |"
        )
    return "\n".join(lines)


def peers_of(rows: list[Row]) -> dict[str, float]:
    out = {}
    for r in rows:
        if r.what == "`s5cmd ls`":
            out["s5cmd"] = r.measured.median
        if r.what.startswith("`rclone lsf"):
            out["rclone"] = r.measured.median
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--delay-ms", type=float, default=50.0, help="added per request by the proxy (0: no proxy runs)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "bucketsync-bench")
    ap.add_argument("--json", type=Path, help="also write every run's raw figures here")
    ap.add_argument(
        "--venv", choices=("runtime", "test"), default="runtime", help="bucketsync as installed, or the test venv's"
    )
    ap.add_argument("--proxy", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--floor", help=argparse.SUPPRESS)
    ap.add_argument("--paginator", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.proxy:
        listen, upstream, delay = args.proxy
        asyncio.run(_proxy(int(listen), int(upstream), float(delay) / 1000))
        return
    if args.floor:
        os.environ.update(s3_env())
        print(asyncio.run(_floor(args.floor, 1)))
        return
    if args.paginator:
        os.environ.update(s3_env())
        print(asyncio.run(_paginator(args.paginator)))
        return

    n = args.objects
    data = args.cache / f"seaweedfs-{n}"
    started = time.time()
    load0 = load_average()
    # bucketsync's own modules byte-compiled, as an installed package's are: with PYTHONDONTWRITEBYTECODE
    # set (some shells do) an editable install would compile them from source in every process (~0.4 s).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src")], check=True)
    bucketsync = use_venv(args.venv, args.cache)
    server = start_seaweedfs(data)
    proxy = None
    try:
        with tempfile.TemporaryDirectory(prefix="bucketsync-bench-") as tmp:
            work = Path(tmp)
            ensure_loaded(server, n, data / "loaded", work)
            sections: list[tuple[str, list[Row]]] = []
            sections.append(
                (
                    f"S3 on SeaweedFS, {n:,} objects, no added latency",
                    measure_s3(server, server.endpoint, n, args.repeat, work, "direct", bucketsync),
                )
            )
            # the 1% scenario: from the base ledgers, after the changes
            apply_changes(server, n, work)
            one = []
            for concurrency in (8, 1):
                ledger = work / f"ledger-{concurrency}.db"
                base = work / f"ledger-{concurrency}-base.db"
                cfg = bucketsync_config(work, server.endpoint, concurrency, ledger)

                def from_base(ledger: Path = ledger, base: Path = base) -> None:
                    copy_ledger(base, ledger)

                what = "parallel (8)" if concurrency > 1 else "sequential (1)"
                one.append(
                    Row(
                        "direct",
                        f"bucketsync re-sync after 1% added, modified, removed, {what}",
                        timed([bucketsync, "-c", str(cfg), "sync", "ds"], s3_env(), from_base, args.repeat),
                    )
                )
            ensure_loaded(server, n, data / "loaded", work)  # back to the base state
            sections.append((f"S3 on SeaweedFS, {n:,} objects, re-sync after 1% changed", one))
            if args.delay_ms:
                proxy = start_proxy(server, args.delay_ms)
                sections.append(
                    (
                        f"S3 on SeaweedFS, {n:,} objects, {args.delay_ms:.0f} ms added per request",
                        measure_s3(server, proxy.endpoint, n, args.repeat, work, "proxy", bucketsync),
                    )
                )
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
    direct_peers = peers_of(sections[0][1])
    out = [
        f"Generated by `.venv/bin/python bench/listing_peers.py --objects {n} --repeat {args.repeat} "
        f"--delay-ms {args.delay_ms:g} --venv {args.venv}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; "
        f"{os.cpu_count()} cores; load average (1 min) at start {load0:.1f}, at end {load_average():.1f}; "
        f"whole run {time.time() - started:.0f} s.",
        "",
    ]
    for title, rows in sections:
        peers = peers_of(rows) or direct_peers
        out += [f"**{title}**", "", table(rows, peers), ""]
    print("\n".join(out))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    [t, [[r.what, r.measured.walls, r.measured.rss_mib, r.measured.load] for r in rows]]
                    for t, rows in sections
                ],
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
