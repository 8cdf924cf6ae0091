#!/usr/bin/env python
"""Benchmark: upstream sync of a large in-memory driver into an on-disk SQLite ledger.

    .venv/bin/python bench/sync_memory.py                      # 1,000,000 objects, prints a table
    .venv/bin/python bench/sync_memory.py --objects 100000     # a quick run
    .venv/bin/python bench/sync_memory.py --write docs/benchmarks.md
    .venv/bin/python bench/sync_memory.py --profile initial --profiler pyinstrument
    .venv/bin/python bench/sync_memory.py --objects 100000 --instructions nochange   # needs valgrind

Every scenario runs in a fresh child process (this same script with ``--child``):
the child builds the fixture (a ``MemoryStore`` filled through its bulk ``load()``),
measures its RSS (the baseline), resets the kernel's peak-RSS mark to it
(``/proc/self/clear_refs``, Linux >= 4.0), runs ``SyncLoop.run_once()`` and reads
``VmHWM``. It reports both the whole process's peak RSS (fixture included) and
the engine's increment over the baseline. The floors (raw sqlite3 insert and
scan of the same schema, a bare iteration of the store's listing) run in their
own child so the ratios engine/floor come from the same machine and moment.

Scenarios:

- ``initial``  : empty ledger, N objects listed and inserted.
- ``nochange`` : ledger already holds the N objects; nothing changed.
- ``changed``  : 1% of the objects re-put with new bytes (new size, etag, modified).
- ``churn``    : the 1% modified, plus 0.1% removed and 0.1% added (under the
                 mass-delete guard's default limits; no renames: new etags).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import io
import json
import os
import platform
import random
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

DATASET = "photos"
STORE = "bench"
BATCH = 5000  # as bucketsync.upstream.sync.BATCH: one transaction per 5000 writes
TARGETS = {"initial": 8.0, "nochange": 4.0}
RSS_TARGET_MB = 200.0
MARK_START = "<!-- bench/sync_memory.py: start (generated, do not edit by hand) -->"
MARK_END = "<!-- bench/sync_memory.py: end -->"

# -- the fixture ---------------------------------------------------------------

# (top folder, file prefix, extension): keys like images/2024/03/17/IMG_000123.jpg
KINDS = [
    ("audio", "REC", "m4a"),
    ("docs", "SCAN", "pdf"),
    ("images", "IMG", "jpg"),
    ("raw", "DSC", "nef"),
    ("video", "VID", "mp4"),
]
# A few shared payloads: an object's size varies, the fixture costs almost nothing.
SIZES = [1_234, 4_096, 23_456, 65_536, 180_224, 262_144]
BLOBS = [bytes(n) for n in SIZES]
CHANGED = BLOBS[1] + b"changed"  # the new bytes of a modified object (shared too)
EPOCH = dt.date(2016, 1, 1)


def fixture(n: int) -> Iterator[tuple[str, bytes, float]]:
    """``n`` objects as ``(key, data, modified)``, already in ascending key order.

    Each kind gets an equal share, spread over day folders of 40-400 files (a
    seeded random, so every process builds the identical fixture, etags included).
    """
    rnd = random.Random(20240317)
    per_kind = [n // len(KINDS) + (1 if i < n % len(KINDS) else 0) for i in range(len(KINDS))]
    width = max(6, len(str(max(per_kind))))
    i = 0
    for (folder, pfx, ext), count in zip(KINDS, per_kind, strict=True):
        seq = 0
        day = 0
        while seq < count:
            d = EPOCH + dt.timedelta(days=day)
            base = dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC).timestamp()
            in_folder = min(rnd.randint(40, 400), count - seq)
            head = f"{folder}/{d.year:04d}/{d.month:02d}/{d.day:02d}/{pfx}_"
            for j in range(in_folder):
                seq += 1
                i += 1
                yield f"{head}{seq:0{width}d}.{ext}", BLOBS[(i * 7919) % len(BLOBS)], base + j * 61.0 + 0.125
            day += 1


def fixture_keys(n: int) -> list[str]:
    return [k for k, _, _ in fixture(n)]


# -- measuring -----------------------------------------------------------------


def status_mb() -> dict[str, float]:
    text = Path("/proc/self/status").read_text()
    out = {}
    for field in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        out[field] = int(m.group(1)) / 1024 if m else float("nan")
    if "VmHWM" not in out or out["VmHWM"] != out["VmHWM"]:  # no /proc: ru_maxrss (kB on Linux)
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    s = status_mb()
    return s["VmHWM"] - s["VmRSS"] < 1.0


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class GcTimer:
    """Time spent in the cyclic garbage collector (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t
            self.collections[info["generation"]] += 1

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


# -- the child: one scenario in a fresh process ---------------------------------


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _copy_ledger(seed: Path, dest: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{seed}{suffix}")
        dst = Path(f"{dest}{suffix}")
        if dst.exists():
            dst.unlink()
        if src.exists():
            shutil.copyfile(src, dst)
            # flushed now, or the run's first checkpoint fsync would pay for writing back the whole copy
            fd = os.open(dst, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


async def child(spec: dict[str, Any]) -> dict[str, Any]:
    from bucketsync.config import DatasetConfig
    from bucketsync.ledger.ledger import Ledger
    from bucketsync.logs import configure
    from bucketsync.stores.memory import MemoryStore
    from bucketsync.upstream.sync import SyncLoop

    configure("warning", "json")
    gc.collect()
    imported_mb = status_mb()["VmRSS"]  # the interpreter and bucketsync, before the fixture
    scenario: str = spec["scenario"]
    n: int = spec["objects"]
    reps: int = spec["reps"]
    work = Path(spec["work"])
    t = time.perf_counter()
    store = MemoryStore(STORE)
    loaded = store.load(fixture(n))
    assert loaded == n
    fixture_seconds = time.perf_counter() - t
    keys = store._b.keys  # the store's own sorted key list (read only, to pick keys to change)

    modify: list[str] = []
    removed: list[str] = []
    added: list[str] = []
    if scenario in ("changed", "churn"):
        modify = keys[50::100]  # 1%, spread over every folder
    if scenario == "churn":
        removed = keys[37::1000]  # 0.1%
        added = [f"{stem}_edit.{ext}" for stem, ext in (k.rsplit(".", 1) for k in keys[501::1000])]  # 0.1%
        for k in removed:
            await store.delete(k)
        for k in added:
            await store.put(k, _chunks(BLOBS[0]))

    #: a PostgreSQL ledger: {"port", "bin", "seed"} of a server bench/sync_backends.py started
    pg: dict[str, Any] | None = spec.get("pg")
    server: Any = None
    if pg is not None:
        sys.path.insert(0, str(ROOT / "tests"))
        from emulators.postgres import PostgresServer

        server = PostgresServer(port=pg["port"], bin_dir=Path(pg["bin"]))
    results = []
    for rep in range(reps):
        db = work / f"ledger-{scenario}-{rep}.db"
        place: Path | str = db
        if server is not None:
            # a fresh database, or a copy of the seed one (CREATE DATABASE ... TEMPLATE)
            place = server.new_database("template0" if scenario == "initial" else pg["seed"])  # type: ignore[index]
        elif scenario == "initial":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        else:
            _copy_ledger(Path(spec["seed"]), db)
        for k in modify:
            await store.put(k, _chunks(CHANGED))
        ledger = await Ledger.open(place)
        loop = SyncLoop(DATASET, DatasetConfig(driver="mem"), store, ledger)
        await ledger.dataset_id(DATASET)  # schema + dataset row exist before the clock starts
        gc.collect()
        before = status_mb()
        peak_reset = reset_peak()
        cpu0, thread0 = cpu_seconds(), time.thread_time()
        profiler: Any = None
        if spec.get("profile") == "cprofile":
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        elif spec.get("profile") == "pyinstrument":
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="enabled", interval=0.001)
            profiler.start()
        with GcTimer() as gct:
            t0 = time.perf_counter()
            result = await loop.run_once()
            wall = time.perf_counter() - t0
        if profiler is not None:
            if spec["profile"] == "cprofile":
                import pstats

                profiler.disable()
                out = Path(spec["profile_out"])
                profiler.dump_stats(out.with_suffix(".prof"))
                buf = io.StringIO()
                ps = pstats.Stats(profiler, stream=buf)
                ps.sort_stats("tottime").print_stats(30)
                ps.sort_stats("cumulative").print_stats(40)
                out.write_text(buf.getvalue())
            else:
                profiler.stop()
                Path(spec["profile_out"]).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        cpu, thread = cpu_seconds() - cpu0, time.thread_time() - thread0
        after = status_mb()
        await ledger.close()
        c = result.counts
        assert str(result.status) == "ok", (result.status, result.error)
        expect = {
            "initial": {"added": n},
            "nochange": {"unchanged": n},
            "changed": {"modified": len(modify), "unchanged": n - len(modify)},
            "churn": {"modified": len(modify), "added": len(added), "removed": len(removed)},
        }[scenario]
        got = {k: getattr(c, k) for k in expect}
        assert got == expect, (scenario, got, expect)
        if server is not None:
            name = str(place).rsplit("/", 1)[1]
            db_mb = int(server.psql(f"SELECT pg_database_size('{name}')").strip()) / 2**20
            if scenario == "initial" and rep == 0 and spec.get("seed"):
                server.new_database(name, name=pg["seed"])  # type: ignore[index]
            server.drop_database(name)
        else:
            db_mb = db.stat().st_size / 2**20
            if scenario == "initial" and rep == 0 and spec.get("seed"):
                _copy_ledger(db, Path(spec["seed"]))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        results.append(
            {
                "wall": wall,
                "cpu": cpu,
                "cpu_main": thread,
                "gc_seconds": gct.seconds,
                "gc_collections": gct.collections,
                "baseline_mb": before["VmRSS"],
                "peak_mb": after["VmHWM"],
                "peak_reset": peak_reset,
                "counts": c.as_dict(),
                "db_mb": db_mb,
            }
        )
    return {
        "scenario": scenario,
        "objects": n,
        "fixture_seconds": fixture_seconds,
        "imported_mb": imported_mb,
        "reps": results,
    }


async def floors(spec: dict[str, Any]) -> dict[str, Any]:
    """Raw sqlite3 and a bare listing: what the engine cannot beat on this machine."""
    from bucketsync.ledger.sqlite import MIGRATIONS
    from bucketsync.stores.memory import MemoryStore

    n, reps, work = spec["objects"], spec["reps"], Path(spec["work"])
    store = MemoryStore(STORE)
    store.load(fixture(n))
    out: dict[str, list[float]] = {"list": [], "insert": [], "insert_1tx": [], "scan": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        count = 0
        async for _obj in store.list():
            count += 1
        out["list"].append(time.perf_counter() - t0)
        assert count == n

    def connect(path: Path) -> sqlite3.Connection:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(MIGRATIONS[0])
        db.execute("INSERT INTO datasets (name, created) VALUES ('photos', 0)")
        return db

    now = time.time()  # rows built before the clock starts: the floor is sqlite's own cost
    rows = [(1, key, len(data), mod, f"{i:x}", None, 1, now) for i, (key, data, mod) in enumerate(fixture(n), 1)]

    db_path = work / "floor.db"
    for _rep in range(reps):
        for single in (False, True):
            db = connect(db_path)
            it = iter(rows)
            t0 = time.perf_counter()
            if single:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO items (dataset_id, key, size, modified, etag, version, first_run, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    it,
                )
                db.execute("COMMIT")
            else:
                while batch := [r for _, r in zip(range(BATCH), it, strict=False)]:
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany(
                        "INSERT INTO items (dataset_id, key, size, modified, etag, version, first_run, updated) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        batch,
                    )
                    db.execute("COMMIT")
            out["insert_1tx" if single else "insert"].append(time.perf_counter() - t0)
            db.close()
    # the scan: what Ledger.snapshot asks for, rows as tuples, nothing built from them
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    for _ in range(reps):
        t0 = time.perf_counter()
        count = 0
        db.execute("BEGIN")
        cur = db.execute(
            "SELECT id, key, size, modified, etag, version, state FROM items WHERE dataset_id = ? ORDER BY key", (1,)
        )
        while batch := cur.fetchmany(8192):
            for _row in batch:
                count += 1
        db.execute("COMMIT")
        out["scan"].append(time.perf_counter() - t0)
        assert count == n
    db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    return {"scenario": "floors", "objects": n, "floors": out}


# -- the parent -------------------------------------------------------------------


def instructions(spec: dict[str, Any]) -> int:
    """Machine instructions a child executes, all threads, counted by valgrind's cachegrind
    (no cache simulation): unlike wall or CPU time, the count hardly moves with other work on
    the machine, so two versions of the code compare on a busy one."""
    with tempfile.NamedTemporaryFile(prefix="bucketsync-cachegrind-") as out:
        run_child(spec, ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out.name}"])
        for line in Path(out.name).read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise SystemExit("valgrind wrote no instruction count")


def count_run(base: dict[str, Any], scenario: str, seed: Path) -> str:
    """One run of ``scenario``, in instructions: a child that runs it once, less one that
    only builds the fixture (its imports, fixture and exit are the same in both)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind on PATH (apt install valgrind)")
    if scenario != "initial":
        run_child({**base, "scenario": "initial", "reps": 1, "seed": str(seed)})
    spec = {**base, "scenario": scenario, "seed": str(seed)}
    whole, setup = instructions({**spec, "reps": 1}), instructions({**spec, "reps": 0})
    net = whole - setup
    return (
        f"{scenario}, {base['objects']:,} objects: {net / 1e6:,.0f} M instructions for the run "
        f"({net / base['objects']:,.0f} per object); the child {whole / 1e6:,.0f} M, its set-up {setup / 1e6:,.0f} M"
    )


def run_child(spec: dict[str, Any], wrap: list[str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*(wrap or []), sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {spec['scenario']} failed (exit {proc.returncode})")
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {spec['scenario']}: done in {time.perf_counter() - t0:.1f} s (child process)", file=sys.stderr)
    return res


def source_version() -> str:
    """The commit the engine was measured at (read-only git), and whether src/ had local changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + (" with uncommitted changes in src/" if dirty.stdout.strip() else "")


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    mem = ""
    try:
        m = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem = f"{int(m.group(1)) / 2**20:.1f} GiB" if m else ""
    except OSError:
        pass
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "source": source_version(),
    }


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def render(results: dict[str, dict[str, Any]], n: int, total: float) -> str:
    fl = results["floors"]["floors"]
    f_list, f_ins, f_scan = med(fl["list"]), med(fl["insert"]), med(fl["scan"])
    f_ins1 = med(fl["insert_1tx"])
    floor_of = {
        "initial": (f_list + f_ins, "list + insert"),
        "nochange": (f_list + f_scan, "list + scan"),
        "changed": (f_list + f_scan, "list + scan"),
        "churn": (f_list + f_scan, "list + scan"),
    }
    names = {
        "initial": "1. initial sync",
        "nochange": "2. no-change re-sync",
        "changed": "3. re-sync, 1% modified",
        "churn": "3b. re-sync, 1% modified + 0.1% removed + 0.1% added",
    }
    lines = [
        f"{n:,} objects; wall time is the median of the runs shown; RSS in MiB.",
        "",
        "| scenario | wall time (s) | runs (s) | process peak RSS | engine RSS increment | floor (s) "
        "| engine / floor | CPU s (all threads / main) | GC s |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for sc in ("initial", "nochange", "changed", "churn"):
        if sc not in results:
            continue
        reps = results[sc]["reps"]
        walls = [r["wall"] for r in reps]
        peak = max(r["peak_mb"] for r in reps)
        inc = max(r["peak_mb"] - r["baseline_mb"] for r in reps)
        floor, what = floor_of[sc]
        cpu, cpu_main = med([r["cpu"] for r in reps]), med([r["cpu_main"] for r in reps])
        gcs = med([r["gc_seconds"] for r in reps])
        lines.append(
            f"| {names[sc]} | **{med(walls):.2f}** | {', '.join(f'{w:.2f}' for w in walls)} | {peak:.0f} | "
            f"{inc:.0f} | {floor:.2f} ({what}) | {med(walls) / floor:.1f}x | {cpu:.1f} / {cpu_main:.1f} | {gcs:.2f} |"
        )
    base = statistics.median(r["baseline_mb"] for r in results["initial"]["reps"])
    imported_mb = statistics.median(results[sc]["imported_mb"] for sc in results if sc != "floors")
    max_inc = max(r["peak_mb"] - r["baseline_mb"] for sc in results if sc != "floors" for r in results[sc]["reps"])
    db_mb = results["initial"]["reps"][0]["db_mb"]
    lines += [
        "",
        "Floors (same run, same machine, median of "
        f"{len(fl['list'])}): bare `async for` over `MemoryStore.list()` **{f_list:.2f} s**; "
        f"raw `sqlite3` sorted `executemany` insert into the ledger's own `items` schema, WAL + "
        f"`synchronous=FULL`, one transaction per {BATCH} rows **{f_ins:.2f} s** "
        f"(one single transaction: {f_ins1:.2f} s); sorted scan of them (the snapshot's query, rows as tuples) "
        f"**{f_scan:.2f} s**.",
        "",
        f"Fixture: RSS right after building it (the baseline) is about {base:.0f} MiB; "
        f"built in {results['initial']['fixture_seconds']:.1f} s; the ledger file after the initial sync is "
        f"{db_mb:.0f} MiB. Whole benchmark: {total:.0f} s.",
        "",
        f"RSS of a child right after importing bucketsync, before the fixture: {imported_mb:.0f} MiB; so an agent "
        "whose objects live in real storage (not in its own memory) would peak near that plus the engine "
        f"increment, about {imported_mb + max_inc:.0f} MiB for this dataset size.",
        "",
        "Targets:",
        "",
    ]
    for sc, target in TARGETS.items():
        if sc not in results:
            continue
        w = med([r["wall"] for r in results[sc]["reps"]])
        lines.append(f"- {names[sc]} <= {target:.0f} s: **{'met' if w <= target else 'NOT met'}** ({w:.2f} s)")
    for label, value in (
        (
            "engine RSS increment (peak minus fixture baseline)",
            max(r["peak_mb"] - r["baseline_mb"] for sc in results if sc != "floors" for r in results[sc]["reps"]),
        ),
        (
            "whole-process peak RSS (fixture included)",
            max(r["peak_mb"] for sc in results if sc != "floors" for r in results[sc]["reps"]),
        ),
    ):
        ok = value <= RSS_TARGET_MB
        lines.append(
            f"- peak RSS <= {RSS_TARGET_MB:.0f} MB, {label}: **{'met' if ok else 'NOT met'}** ({value:.0f} MiB)"
        )
    return "\n".join(lines)


def write_doc(path: Path, table: str, info: dict[str, str], n: int) -> None:
    header = (
        f"Generated by `.venv/bin/python bench/sync_memory.py"
        f"{'' if n == 1_000_000 else f' --objects {n}'} --write {path}` on "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}.\n\n"
        f"Machine: {info['cores']} cores ({info['cpu']}), {info['memory']} RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, SQLite {info['sqlite']}; ledger on local disk under the system temp dir. "
        f"Source: commit {info['source']}.\n\n"
    )
    block = f"{MARK_START}\n{header}{table}\n{MARK_END}"
    if path.exists():
        text = path.read_text()
        if MARK_START in text and MARK_END in text:
            pre, rest = text.split(MARK_START, 1)
            post = rest.split(MARK_END, 1)[1]
            path.write_text(pre + block + post)
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Benchmarks\n\n## Upstream sync, in-memory driver\n\n{block}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=1_000_000, help="objects in the driver (default 1,000,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario; the median is reported (default 3)")
    ap.add_argument("--write", type=Path, help="write the results into this markdown file (its generated block)")
    ap.add_argument(
        "--scenarios", default="initial,nochange,changed,churn", help="comma-separated subset (initial always runs)"
    )
    ap.add_argument("--profile", choices=["initial", "nochange", "changed"], help="profile one run of a scenario")
    ap.add_argument("--profiler", choices=["cprofile", "pyinstrument"], default="cprofile")
    ap.add_argument("--profile-out", type=Path, help="where the profile report goes (default: a temp file)")
    ap.add_argument("--json", type=Path, help="also dump the raw per-run measurements here")
    ap.add_argument(
        "--instructions",
        choices=["initial", "nochange", "changed", "churn"],
        help="count one run's machine instructions under valgrind: steady on a busy machine, for A/B comparisons",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(args.child)
        fn = floors if spec["scenario"] == "floors" else child
        print(json.dumps(asyncio.run(fn(spec))))
        return

    n, reps = args.objects, args.repeat
    t_all = time.perf_counter()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bucketsync-bench-") as tmp:
        work = Path(tmp)
        seed = work / "seed.db"
        base = {"objects": n, "work": str(work)}
        print(f"bucketsync sync benchmark: {n:,} objects, {reps} runs per scenario, work dir {work}", file=sys.stderr)
        results: dict[str, dict[str, Any]] = {}
        if args.instructions:
            print(count_run(base, args.instructions, seed))
            return
        if args.profile:
            out = args.profile_out or work.with_name(f"bucketsync-profile-{args.profile}-{args.profiler}.txt")
            if args.profile != "initial":
                run_child({**base, "scenario": "initial", "reps": 1, "seed": str(seed)})
            run_child(
                {
                    **base,
                    "scenario": args.profile,
                    "reps": 1,
                    "seed": str(seed),
                    "profile": args.profiler,
                    "profile_out": str(out),
                }
            )
            print(out.read_text())
            print(f"(profile written to {out})", file=sys.stderr)
            return
        # the first initial run leaves the seed ledger the re-sync scenarios start from
        first = run_child({**base, "scenario": "initial", "reps": 1, "seed": str(seed)})
        more = [run_child({**base, "scenario": "initial", "reps": 1}) for _ in range(reps - 1)]
        results["initial"] = {**first, "reps": first["reps"] + [r for m in more for r in m["reps"]]}
        for sc in [s for s in args.scenarios.split(",") if s and s != "initial"]:
            results[sc] = run_child({**base, "scenario": sc, "reps": reps, "seed": str(seed)})
        results["floors"] = run_child({**base, "scenario": "floors", "reps": reps})
    total = time.perf_counter() - t_all
    table = render(results, n, total)
    table += (
        f"\n\nLoad average (1 min) at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cores (other work on the machine shows up as noise in the wall times)."
    )
    print(table)
    if args.write:
        write_doc(args.write, table, machine(), n)
        print(f"(written to {args.write})", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results, "total_seconds": total}, indent=1))


if __name__ == "__main__":
    main()
