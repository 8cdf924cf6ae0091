"""Listing on Azure (Azurite) and GCS (fake-gcs-server): bucketsync against the raw floor, the SDK
listing and rclone, whole processes.

One command starts its own servers, loads ``--objects`` objects (Azurite keeps them under ``--cache``
between runs; fake-gcs-server's memory backend is loaded from a folder written once under
``--cache``), then measures in one run, median of ``--repeat`` runs each, ratios to the raw floor
of the same server:

- the raw floor: signed List Blobs / objects.list requests over aiohttp, one page after another,
  each page read but not parsed (only the next marker or page token is looked for);
- the SDK listing: azure-storage-blob's ``list_blobs``, gcloud-aio-storage's ``list_objects`` pages;
- rclone ``lsf -R`` (``azureblob`` on Azurite; ``gcs`` with the API path in its endpoint);
- ``bucketsync sync``: initial sync (fresh SQLite ledger) and no-change re-sync (from a copy of it),
  with ``list_concurrency`` 8 (the default: parts listed in parallel) and 1 (one page after another);
- with ``--delay-ms``, the raw floor and bucketsync again through a proxy that holds every request
  that long (``listing_peers.py``'s), which is what a real cloud's round trip looks like.

Issue 12's target: a full sync <= 1.3 x the raw floor of the same server. Not a test: run it by hand
(``bench/README.md``); results in docs/benchmarks.md (``--write`` replaces the generated block).

    .venv/bin/python bench/listing_clouds.py                          # 20,000 objects, 3 runs each
    .venv/bin/python bench/listing_clouds.py --clouds azure --repeat 1
    .venv/bin/python bench/listing_clouds.py --delay-ms 50             # also through a 50 ms proxy
    .venv/bin/python bench/listing_clouds.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from listing_peers import (  # noqa: E402  (this folder, on the path above)
    BIN,
    Measured,
    Server,
    copy_ledger,
    drop_ledger,
    free_port,
    key_of,
    load_average,
    start_proxy,
    timed,
    use_venv,
    wait_port,
)

MARK_START = "<!-- bench/listing_clouds.py: start (generated, do not edit by hand) -->"
MARK_END = "<!-- bench/listing_clouds.py: end -->"
TARGET = 1.3
CONTAINER = BUCKET = "bench"
AZ_ACCOUNT = "devstoreaccount1"
# Azurite's published development key: only good for the emulator.
AZ_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE = ROOT / "tests" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
BODY = b"x" * 100


def az_connection_string(endpoint: str) -> str:
    return f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY};BlobEndpoint={endpoint};"


# --- servers and data ------------------------------------------------------------------------------


def start(argv: list[str], port: int, log: Path) -> Server:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
    server = Server(proc, port)
    wait_port(port)
    return server


def start_azurite(data: Path) -> Server:
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data)]
    argv += ["--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"]
    return start(argv, port, data / "azurite.log")


async def _az_load(endpoint: str, n: int) -> None:
    from azure.storage.blob.aio import ContainerClient

    async with ContainerClient.from_connection_string(az_connection_string(endpoint), CONTAINER) as container:
        if not await container.exists():
            await container.create_container()
        gate = asyncio.Semaphore(64)

        async def put(i: int) -> None:
            async with gate:
                await container.upload_blob(key_of(i), BODY, overwrite=True)

        await asyncio.gather(*(put(i) for i in range(n)))


def ensure_azure(server: Server, n: int, marker: Path) -> None:
    if marker.exists():
        return
    t0 = time.monotonic()
    asyncio.run(_az_load(f"{server.endpoint}/{AZ_ACCOUNT}", n))
    print(f"azure: loaded {n:,} blobs in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    marker.write_text(str(n))


def fake_gcs_binary() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from emulators.gcs import fake_gcs_binary as find

    return find()


def start_fake_gcs(data: Path, n: int) -> Server:
    """fake-gcs-server's memory backend, loaded from ``data`` (a folder per bucket, written once):
    it reads the folder after its port opens, so wait until a listing sees every object."""
    folder = data / BUCKET
    if not (data / "written").exists():
        for i in range(n):
            path = folder / key_of(i)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(BODY)
        (data / "written").write_text(str(n))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
    argv += ["-backend", "memory", "-data", str(data), "-external-url", url, "-public-host", f"127.0.0.1:{port}"]
    argv += ["-log-level", "warn"]
    t0 = time.monotonic()
    server = start(argv, port, data.parent / f"{data.name}.log")
    try:
        # The server holds requests while it loads: one listing waits for all of it.
        while (got := _gcs_count(url)) < n:
            print(f"gcs: {got:,} of {n:,} objects loaded", file=sys.stderr)
            time.sleep(5)
    except BaseException:
        server.stop()
        raise
    print(f"gcs: {n:,} objects loaded from {data} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return server


def _gcs_count(url: str) -> int:
    n, token = 0, ""
    while True:
        query = f"maxResults=1000&fields=items(name),nextPageToken{'&pageToken=' + token if token else ''}"
        with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}", timeout=1800) as resp:
            page = json.load(resp)
        n += len(page.get("items") or ())
        token = page.get("nextPageToken") or ""
        if not token:
            return n


# --- the listers (run as their own processes: ``--lister NAME ENDPOINT``) ------------------------------


async def _az_floor(endpoint: str) -> int:
    """List Blobs pages one after another, Shared Key signed over hmac; only the marker is looked for."""
    import base64
    import hashlib
    import hmac
    from email.utils import formatdate
    from urllib.parse import quote, urlsplit

    import aiohttp

    path = urlsplit(endpoint).path + "/" + CONTAINER
    marker_re = re.compile(rb"<NextMarker>([^<]+)</NextMarker>")
    key = base64.b64decode(AZ_KEY)
    n = 0
    marker = ""
    async with aiohttp.ClientSession() as http:
        while True:
            query = {"comp": "list", "maxresults": "1000", "restype": "container"}
            if marker:
                query["marker"] = marker
            headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2025-11-05"}
            to_sign = "GET\n" + "\n" * 11 + "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
            to_sign += f"/{AZ_ACCOUNT}{path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
            signature = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest()).decode()
            headers["authorization"] = f"SharedKey {AZ_ACCOUNT}:{signature}"
            qs = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
            async with http.get(f"{endpoint}/{CONTAINER}?{qs}", headers=headers) as resp:
                body = await resp.read()
            n += body.count(b"<Blob>")
            m = marker_re.search(body)
            if not m:
                return n
            marker = m.group(1).decode()


async def _az_sdk(endpoint: str) -> int:
    from azure.storage.blob.aio import ContainerClient

    n = 0
    async with ContainerClient.from_connection_string(az_connection_string(endpoint), CONTAINER) as container:
        async for _ in container.list_blobs(results_per_page=1000):
            n += 1
    return n


async def _gcs_floor(url: str) -> int:
    """objects.list pages one after another (the fields bucketsync asks for); only the token is looked for."""
    import aiohttp

    token_re = re.compile(rb'"nextPageToken":\s*"([^"]+)"')
    fields = "items(name,size,updated,md5Hash,etag,generation),nextPageToken"
    n = 0
    token = ""
    async with aiohttp.ClientSession() as http:
        while True:
            params = {"maxResults": "1000", "fields": fields, **({"pageToken": token} if token else {})}
            async with http.get(f"{url}/storage/v1/b/{BUCKET}/o", params=params) as resp:
                body = await resp.read()
            n += body.count(b'"name"')
            m = token_re.search(body)
            if not m:
                return n
            token = m.group(1).decode()


async def _gcs_sdk(url: str) -> int:
    import aiohttp
    from gcloud.aio.storage import Storage

    n = 0
    async with aiohttp.ClientSession() as session:
        storage = Storage(session=session, api_root=url)  # type: ignore[arg-type]
        params = {"maxResults": "1000"}
        while True:
            page = await storage.list_objects(BUCKET, params=params)
            n += len(page.get("items") or ())
            if not page.get("nextPageToken"):
                return n
            params["pageToken"] = page["nextPageToken"]


LISTERS = {"az-floor": _az_floor, "az-sdk": _az_sdk, "gcs-floor": _gcs_floor, "gcs-sdk": _gcs_sdk}


# --- measuring ---------------------------------------------------------------------------------------


def bucketsync_config(work: Path, cloud: str, endpoint: str, ledger: Path, concurrency: int) -> Path:
    if cloud == "azure":
        integration = f'[integrations.bench]\nkind = "azure"\nconnection_string = "{az_connection_string(endpoint)}"\n'
        driver = f'url = "az://{AZ_ACCOUNT}/{CONTAINER}/"\nintegration = "bench"'
    else:
        integration = ""
        driver = f'url = "gs://{BUCKET}/"\nendpoint_url = "{endpoint}"'
    path = work / f"bucketsync-{cloud}-{concurrency}.toml"
    path.write_text(
        f'[agent]\nledger = "{ledger}"\nlog_level = "warning"\n\n{integration}\n[drivers.d]\n{driver}\n'
        f'list_concurrency = {concurrency}\n\n[datasets.ds]\ndriver = "d"\nsync = "manual"\nmax_delete_ratio = 1.0\n'
    )
    return path


def rclone(cloud: str, endpoint: str) -> tuple[list[str], dict[str, str]]:
    argv = [str(BIN / "rclone"), "lsf", "-R", f"R:{CONTAINER}"]
    if cloud == "azure":
        env = {
            "RCLONE_CONFIG_R_TYPE": "azureblob",
            "RCLONE_CONFIG_R_ACCOUNT": AZ_ACCOUNT,
            "RCLONE_CONFIG_R_KEY": AZ_KEY,
            "RCLONE_CONFIG_R_ENDPOINT": endpoint,
        }
    else:
        env = {
            "RCLONE_CONFIG_R_TYPE": "google cloud storage",
            "RCLONE_CONFIG_R_ENDPOINT": f"{endpoint}/storage/v1/",
            "RCLONE_CONFIG_R_ANONYMOUS": "true",
        }
    return argv, {**os.environ, **env}


Row = tuple[str, Measured]


def measure(
    cloud: str, endpoint: str, n: int, repeat: int, work: Path, bucketsync: str, peers: bool = True
) -> list[Row]:
    """The raw floor, then (with ``peers``) the SDK listing and rclone, then bucketsync's syncs."""
    py, me = sys.executable, __file__
    env = dict(os.environ)
    rows: list[Row] = []
    short = "az" if cloud == "azure" else "gcs"
    rows.append(
        (
            "raw floor (signed aiohttp, no parsing)",
            timed([py, me, "--lister", f"{short}-floor", endpoint], env, None, repeat),
        )
    )
    if peers:
        rows.append(("SDK listing", timed([py, me, "--lister", f"{short}-sdk", endpoint], env, None, repeat)))
    if peers and (BIN / "rclone").exists():
        argv, renv = rclone(cloud, endpoint)
        rows.append(("`rclone lsf -R`", timed(argv, renv, None, repeat)))
    for concurrency in (8, 1):
        what = f", list_concurrency {concurrency}"
        ledger, base = work / f"ledger-{cloud}-{concurrency}.db", work / f"ledger-{cloud}-{concurrency}-base.db"
        cfg = bucketsync_config(work, cloud, endpoint, ledger, concurrency)
        argv = [bucketsync, "-c", str(cfg), "sync", "ds"]
        fresh = functools.partial(drop_ledger, ledger)
        rows.append((f"bucketsync initial sync{what}", timed(argv, env, fresh, repeat)))
        copy_ledger(ledger, base)  # the last initial sync's ledger
        again = functools.partial(copy_ledger, base, ledger)
        rows.append((f"bucketsync no-change re-sync{what}", timed(argv, env, again, repeat)))
    return rows


def table(rows: list[Row]) -> str:
    floor = rows[0][1].median
    lines = [
        "| lister | wall (s), median | runs (s) | peak RSS (MiB) | / raw floor | load (1 min) |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]
    for what, m in rows:
        lines.append(
            f"| {what} | **{m.median:.2f}** | {', '.join(f'{w:.2f}' for w in m.walls)} | {max(m.rss_mib):.0f} | "
            f"{m.median / floor:.2f} | {', '.join(f'{x:.1f}' for x in m.load)} |"
        )
    return "\n".join(lines)


def write_block(doc: Path, text: str) -> None:
    block = f"{MARK_START}\n{text}\n{MARK_END}"
    old = doc.read_text() if doc.exists() else ""
    if MARK_START in old and MARK_END in old:
        head, _, rest = old.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        doc.write_text(head + block + tail)
    else:
        doc.write_text(old + ("\n" if old else "") + block + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clouds", default="azure,gcs", help="comma-separated: azure, gcs")
    ap.add_argument("--delay-ms", type=float, default=0, help="also measure through a proxy adding this per request")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "bucketsync-bench")
    ap.add_argument("--write", type=Path, help="replace the generated block of this file (docs/benchmarks.md)")
    ap.add_argument("--json", type=Path, help="also write every run's raw figures here")
    ap.add_argument(
        "--venv", choices=("runtime", "test"), default="runtime", help="bucketsync as installed, or the test venv's"
    )
    ap.add_argument("--lister", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lister:
        name, endpoint = args.lister
        print(asyncio.run(LISTERS[name](endpoint)))
        return

    n = args.objects
    started, load0 = time.time(), load_average()
    # bucketsync's own modules byte-compiled, as an installed package's are: with PYTHONDONTWRITEBYTECODE
    # set (some shells do) an editable install would compile ~50 modules from source in every process.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src")], check=True)
    bucketsync = use_venv(args.venv, args.cache)
    sections: list[tuple[str, list[Row]]] = []
    with tempfile.TemporaryDirectory(prefix="bucketsync-bench-") as tmp:
        work = Path(tmp)
        for cloud in args.clouds.split(","):
            if cloud == "azure":
                data = args.cache / f"azurite-{n}"
                server = start_azurite(data)
                title, path = f"Azure on Azurite, {n:,} blobs", f"/{AZ_ACCOUNT}"
                try:
                    ensure_azure(server, n, data / "loaded")
                except BaseException:
                    server.stop()
                    raise
            elif cloud == "gcs":
                server = start_fake_gcs(args.cache / f"fake-gcs-{n}", n)
                title, path = f"GCS on fake-gcs-server (memory backend), {n:,} objects", ""
            else:
                raise SystemExit(f"unknown cloud {cloud!r} (azure, gcs)")
            try:
                rows = measure(cloud, server.endpoint + path, n, args.repeat, work, bucketsync)
                sections.append((title, rows))
                if args.delay_ms > 0:
                    proxy = start_proxy(server, args.delay_ms)
                    try:
                        rows = measure(cloud, proxy.endpoint + path, n, args.repeat, work, bucketsync, peers=False)
                        sections.append((f"{title}, {args.delay_ms:.0f} ms added per request", rows))
                    finally:
                        proxy.stop()
            finally:
                server.stop()
    out = [
        f"Generated by `.venv/bin/python bench/listing_clouds.py --objects {n} --repeat {args.repeat} "
        f"--clouds {args.clouds} --delay-ms {args.delay_ms:.0f} --venv {args.venv}` "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; "
        f"{os.cpu_count()} cores; load average (1 min) at start {load0:.1f}, at end {load_average():.1f}; "
        f"whole run {time.time() - started:.0f} s. Target: bucketsync's full sync <= {TARGET} x the raw floor.",
        "",
    ]
    for title, rows in sections:
        out += [f"**{title}**", "", table(rows), ""]
    text = "\n".join(out).rstrip()
    print(text)
    if args.write:
        write_block(args.write, text)
    if args.json:
        args.json.write_text(
            json.dumps([[t, [[w, m.walls, m.rss_mib, m.load] for w, m in rows]] for t, rows in sections], indent=1)
        )


if __name__ == "__main__":
    main()
