#!/usr/bin/env python
"""Benchmark: events mode on a local folder (``sync = "events"``, the ``watch`` source).

    .venv/bin/python bench/events_latency.py                      # everything (several minutes)
    .venv/bin/python bench/events_latency.py --only latency       # latency only
    .venv/bin/python bench/events_latency.py --singles 200 --burst 2000 --objects 20000   # a quick run

A real ``bucketsync run`` daemon (a subprocess on a free port) watches a temporary
folder; ``interval`` and ``reconcile_interval`` are one hour, so only events can
explain a change reaching the catalog. Measured:

- **latency**: for each file, (the commit time the ledger records for its item, the
  ``updated`` column, read from the ledger file) minus (the time the benchmark's
  ``write`` of the file returned). Over ``--singles`` writes one after another (each
  waits until the previous one is in the catalog) and over a burst of ``--burst``
  files written as fast as Python can; p50, p99, max, and how many never arrived.
- **completeness**: the daemon loses 5% of the events on purpose
  (``BUCKETSYNC_EVENTS_LOSE=0.05``); files are created, rewritten and deleted; once
  the events are applied, the catalog is compared with the folder (the changes it
  missed), a reconcile is asked for (``POST .../sync?wait=true``), and the catalog is
  compared again. The drift metric must equal the changes missed.
- **cpu at rest**: process CPU seconds (``process_cpu_seconds_total``) over
  ``--rest`` seconds of a dataset of ``--objects`` files with nothing changing, in
  events mode and in poll mode with ``interval = 60s``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sync_memory import machine  # noqa: E402  (bench/ is not a package)

DATASET = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, work: Path, folder: Path, *, sync: str, interval: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.ledger = work / "ledger.db"
        self.config = work / "bucketsync.toml"
        self.config.write_text(
            f'[agent]\nledger = "{self.ledger}"\nlisten = "127.0.0.1:{self.port}"\nlog_level = "info"\n\n'
            f'[drivers.d]\nurl = "{folder.resolve().as_uri()}"\n\n'
            f'[datasets.{DATASET}]\ndriver = "d"\nsync = "{sync}"\ninterval = "{interval}"\n'
            'reconcile_interval = "1h"\nmax_delete_ratio = 1.0\n'
        )
        self.log = open(work / "daemon.log", "ab")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bucketsync.cli", "-c", str(self.config), "run"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, method: str = "GET", timeout: float = 600) -> Any:
        req = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read().decode()
        return json.loads(body) if body.startswith(("{", "[")) else body

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                ready = self.get("/readyz")
                runs = self.get(f"/api/v1/datasets/{DATASET}/runs")["runs"]
                listed = any(r["status"] == "ok" and r["kind"] == "listing" for r in runs)
                events = ready["detail"][DATASET]["events"] if ready["status"] == "ready" else {}
                if listed and events in (None, {"source": "watch", "state": "up", "reason": None}):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the daemon did not become ready")

    def metric(self, name: str, **labels: str) -> float:
        want = [f'{k}="{v}"' for k, v in labels.items()]
        total = 0.0
        for line in self.get("/metrics").splitlines():
            if line.startswith((name + "{", name + " ")) and all(w in line for w in want):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def committed(ledger: Path) -> dict[str, float]:
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return {k: u for k, u in db.execute("SELECT key, updated FROM items WHERE state = 'live'")}
    finally:
        db.close()


def stats(lat: list[float]) -> dict[str, float]:
    if not lat:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return {"p50": q[49], "p99": q[98], "max": max(lat)}


def write(path: Path, data: bytes) -> float:
    with open(path, "wb") as f:
        f.write(data)
    return time.time()


def latency(work: Path, singles: int, burst: int) -> dict[str, Any]:
    folder = work / "data"
    folder.mkdir()
    d = Daemon(work, folder, sync="events", interval="1h")
    try:
        d.wait_ready()
        (folder / "single").mkdir()
        single: dict[str, float] = {}
        for i in range(singles):
            key = f"single/{i:05d}.bin"
            single[key] = write(folder / key, os.urandom(64))
            deadline = time.monotonic() + 10
            while key not in committed(d.ledger) and time.monotonic() < deadline:
                time.sleep(0.002)
        (folder / "burst").mkdir()
        wrote: dict[str, float] = {}
        for i in range(burst):
            key = f"burst/{i:06d}.bin"
            wrote[key] = write(folder / key, os.urandom(64))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            seen = committed(d.ledger)
            if all(k in seen for k in wrote):
                break
            time.sleep(0.2)
        seen = committed(d.ledger)
        s_lat = [seen[k] - t for k, t in single.items() if k in seen]
        b_lat = [seen[k] - t for k, t in wrote.items() if k in seen]
        return {
            "singles": {"n": singles, "lost": singles - len(s_lat), **stats(s_lat)},
            "burst": {"n": burst, "lost": burst - len(b_lat), **stats(b_lat)},
        }
    finally:
        d.stop()


def completeness(work: Path, files: int) -> dict[str, Any]:
    folder = work / "data"
    folder.mkdir()
    for i in range(files // 2):  # the dataset before: half the files
        (folder / f"f{i:06d}").write_bytes(b"v1")
    d = Daemon(work, folder, sync="events", interval="1h", env={"BUCKETSYNC_EVENTS_LOSE": "0.05"})
    try:
        d.wait_ready()
        for i in range(files // 2, files):  # creates
            (folder / f"f{i:06d}").write_bytes(b"v1")
        for i in range(0, files // 2, 4):  # rewrites (a different size)
            (folder / f"f{i:06d}").write_bytes(b"version 2")
        for i in range(1, files // 2, 4):  # deletes
            (folder / f"f{i:06d}").unlink()
        # settle: the events stop coming and the rename window passes
        last, quiet_since = -1.0, time.monotonic()
        while time.monotonic() - quiet_since < 3:
            n = d.metric("bucketsync_events_received_total", dataset=DATASET)
            if n != last:
                last, quiet_since = n, time.monotonic()
            time.sleep(0.2)
        db = sqlite3.connect(f"file:{d.ledger}?mode=ro", uri=True)
        catalog = {k: s for k, s in db.execute("SELECT key, size FROM items WHERE state = 'live'")}
        db.close()
        disk = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        missed = {
            "added": len(disk.keys() - catalog.keys()),
            "removed": len(catalog.keys() - disk.keys()),
            "modified": sum(1 for k in disk.keys() & catalog.keys() if disk[k] != catalog[k]),
        }
        received = d.metric("bucketsync_events_received_total", dataset=DATASET)
        run = d.get(f"/api/v1/datasets/{DATASET}/sync?wait=true", method="POST")
        drift = {c: d.metric("bucketsync_reconcile_drift_total", dataset=DATASET, change=c)
                 for c in ("added", "modified", "removed", "renamed")}  # fmt: skip
        after = committed(d.ledger)
        equal = set(after) == {p.name for p in folder.iterdir() if p.is_file()}
        return {
            "files": files,
            "changes": files // 2 + 2 * len(range(0, files // 2, 4)),
            "events_received": received,
            "events_lost_on_purpose": _lost_from_log(work / "daemon.log"),
            "missed_before_reconcile": missed,
            "drift_metric": drift,
            "reconcile_status": run["status"],
            "catalog_equals_folder_after": equal,
        }
    finally:
        d.stop()


def _lost_from_log(log: Path) -> int:
    total = 0
    for line in log.read_text(errors="replace").splitlines():
        if "events lost on purpose" in line:
            with contextlib.suppress(ValueError, KeyError):
                total = int(json.loads(line)["total"])
    return total


def cpu_at_rest(work: Path, objects: int, rest: float) -> dict[str, Any]:
    folder = work / "data"
    for i in range(objects):
        sub = folder / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"o{i:07d}").write_bytes(b"x")
    out: dict[str, Any] = {"objects": objects, "seconds": rest}
    for mode, interval in (("events", "1h"), ("poll", "60s")):
        (work / mode).mkdir()
        d = Daemon(work / mode, folder, sync=mode, interval=interval)
        try:
            d.wait_ready()
            time.sleep(2)
            c0, t0 = d.metric("process_cpu_seconds_total"), time.monotonic()
            time.sleep(rest)
            c1, t1 = d.metric("process_cpu_seconds_total"), time.monotonic()
            rss = d.metric("process_resident_memory_bytes")
            out[mode] = {"cpu_seconds": round(c1 - c0, 2), "cpu_share": round((c1 - c0) / (t1 - t0), 4),
                         "rss_mib": round(rss / 2**20, 1)}  # fmt: skip
        finally:
            d.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--singles", type=int, default=1000)
    p.add_argument("--burst", type=int, default=10_000)
    p.add_argument("--files", type=int, default=4000, help="completeness: files at the end")
    p.add_argument("--objects", type=int, default=100_000, help="cpu at rest: objects in the folder")
    p.add_argument("--rest", type=float, default=180.0, help="cpu at rest: seconds measured")
    p.add_argument("--only", choices=["latency", "completeness", "cpu"], action="append")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    only = set(args.only or ["latency", "completeness", "cpu"])
    results: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        base = Path(tmp)
        if "latency" in only:
            (base / "lat").mkdir()
            results["latency"] = latency(base / "lat", args.singles, args.burst)
            print(json.dumps(results["latency"], indent=2), flush=True)
        if "completeness" in only:
            (base / "comp").mkdir()
            results["completeness"] = completeness(base / "comp", args.files)
            print(json.dumps(results["completeness"], indent=2), flush=True)
        if "cpu" in only:
            (base / "cpu").mkdir()
            results["cpu_at_rest"] = cpu_at_rest(base / "cpu", args.objects, args.rest)
            print(json.dumps(results["cpu_at_rest"], indent=2), flush=True)
        shutil.rmtree(base, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps({"machine": results["machine"], "load": [results["load_before"], results["load_after"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
