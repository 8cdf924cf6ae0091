#!/usr/bin/env python
"""Benchmark: upstream sync of a real local folder, ``verify = "stat"`` against ``verify = "hash"``.

    .venv/bin/python bench/sync_local.py                              # 100,000 files of 4 KiB
    .venv/bin/python bench/sync_local.py --files 20000 --repeat 1     # a quick run
    .venv/bin/python bench/sync_local.py --write docs/benchmarks.md   # also rewrite the generated block

A folder of N real files (folders of 200, keys like ``images/2024/03/17/IMG_000123.jpg``,
each with different bytes) is synced into a real SQLite ledger by ``SyncLoop.run_once()``
through the store ``open_store`` builds for a ``file://`` driver, once per mode. Every
sync runs in a fresh child process, so the ``hash`` mode has nothing in memory: what it
does not re-read comes from its memo beside the ledger. Scenarios, in this order:

- ``initial``  : empty ledger (``hash``: every file is read and hashed);
- ``nochange`` : nothing changed;
- ``chmod``    : 1% of the files chmod'ed (``stat``: modifications; ``hash``: re-read, unchanged);
- ``rewrite``  : 1% of the files rewritten with other bytes of the same size, mtime restored
                 (what ``touch -r`` does): modifications in both modes.

Each child reports wall time around ``run_once()``, its CPU time (user + system, all
threads), its peak RSS, the run's counts and how many files it read to hash. The page
cache is warm (the fixture was just written): this measures the engine, not the disk.
The floor is a bare iteration of ``LocalStore.list()`` in ``stat`` mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from sync_memory import machine  # noqa: E402  (bench/ is not a package)

MARK_START = "<!-- bench/sync_local.py: start (generated, do not edit by hand) -->"
MARK_END = "<!-- bench/sync_local.py: end -->"
PER_FOLDER = 200
KINDS = [("images", "IMG", "jpg"), ("docs", "SCAN", "pdf"), ("video", "VID", "mp4")]


def keys(n: int) -> list[str]:
    out = []
    for i in range(n):
        top, stem, ext = KINDS[i % len(KINDS)]
        folder = i // PER_FOLDER
        day = f"{2016 + folder // 365 % 10}/{folder % 12 + 1:02d}/{folder % 28 + 1:02d}"
        out.append(f"{top}/{day}/{stem}_{i:07d}.{ext}")
    return sorted(out)


def build(root: Path, n: int, size: int) -> float:
    """N files of ``size`` bytes, each a different slice of one random buffer."""
    rnd = random.Random(7)
    pool = rnd.randbytes(1 << 22)
    t0 = time.perf_counter()
    made: set[str] = set()
    for i, key in enumerate(keys(n)):
        path = root / key
        folder = str(path.parent)
        if folder not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        at = (i * 4099) % (len(pool) - size)
        path.write_bytes(pool[at : at + size])
    return time.perf_counter() - t0


def change(root: Path, n: int, how: str, rep: int, salt: str) -> int:
    """Change 1% of the files (every 100th, shifted per repetition); returns how many. New bytes
    depend on ``salt`` too: a second mode's rewrite of the same files must write other bytes."""
    rnd = random.Random(f"{salt}-{rep}")
    count = 0
    for i, key in enumerate(keys(n)):
        if (i + rep * 37) % 100:
            continue
        path = root / key
        if how == "chmod":
            os.chmod(path, 0o600 if path.stat().st_mode & 0o777 != 0o600 else 0o644)
        else:
            st = path.stat()
            path.write_bytes(rnd.randbytes(st.st_size))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        count += 1
    return count


# -- the child: one sync in a fresh process ------------------------------------------------


async def child(spec: dict[str, Any]) -> dict[str, Any]:
    from bucketsync.config import DatasetConfig, DriverConfig, Settings
    from bucketsync.ledger.ledger import Ledger
    from bucketsync.stores import local, open_store
    from bucketsync.upstream.sync import SyncLoop

    root, ledger_path, mode = spec["root"], Path(spec["ledger"]), spec["mode"]
    read = 0
    real = local.hash_file

    def counting(path: str, tries: int = 3) -> tuple[str, os.stat_result]:
        nonlocal read
        read += 1
        return real(path, tries)

    local.hash_file = counting  # type: ignore[assignment]  # counts the files read, changes nothing else
    driver = DriverConfig(url=f"file://{root}", verify=mode)
    settings = Settings(agent={"ledger": ledger_path}, drivers={"d": driver})  # type: ignore[arg-type]
    store = open_store(driver, settings)
    ledger = await Ledger.open(ledger_path)
    if spec["scenario"] == "floor":
        t0, c0 = time.perf_counter(), time.process_time()
        listed = sum([1 async for _ in store.list()])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        counts: dict[str, int] = {"listed": listed}
    else:
        loop = SyncLoop("bench", DatasetConfig(driver="d", max_delete_ratio=1.0), store, ledger)
        t0, c0 = time.perf_counter(), time.process_time()
        result = await loop.run_once()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert result.status.value == "ok", result.error
        counts = result.counts.as_dict()
    await ledger.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall": wall, "cpu": cpu, "peak_mb": peak, "counts": counts, "read": read}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {spec['mode']} {spec['scenario']} failed (exit {proc.returncode})")
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


# -- the parent --------------------------------------------------------------------------


def measure(n: int, size: int, repeat: int, work: Path) -> dict[str, Any]:
    root = work / "folder"
    root.mkdir()
    print(f"building {n:,} files of {size:,} bytes ...", file=sys.stderr)
    built = build(root, n, size)
    print(f"  built in {built:.1f} s", file=sys.stderr)
    out: dict[str, Any] = {"files": n, "size": size, "build_seconds": built, "modes": {}}
    floor = [run_child({"root": str(root), "ledger": str(work / "floor.db"), "mode": "stat", "scenario": "floor"})]
    floor += [
        run_child({"root": str(root), "ledger": str(work / "floor.db"), "mode": "stat", "scenario": "floor"})
        for _ in range(repeat - 1)
    ]
    out["floor"] = floor
    for mode in ("stat", "hash"):
        ledger = work / f"{mode}.db"
        spec = {"root": str(root), "ledger": str(ledger), "mode": mode}
        res: dict[str, list[dict[str, Any]]] = {"initial": [run_child(spec | {"scenario": "initial"})]}
        print(f"  {mode} initial: {res['initial'][0]['wall']:.2f} s", file=sys.stderr)
        res["nochange"] = [run_child(spec | {"scenario": "nochange"}) for _ in range(repeat)]
        for how in ("chmod", "rewrite"):
            res[how] = []
            for rep in range(repeat):
                changed = change(root, n, how, rep, mode)
                r = run_child(spec | {"scenario": how})
                r["changed"] = changed
                res[how].append(r)
        out["modes"][mode] = res
        memo = sum(f.stat().st_size for f in Path(f"{ledger}.hashes").glob("*")) if mode == "hash" else 0
        out.setdefault("memo_mb", {})[mode] = memo / 2**20
        out.setdefault("ledger_mb", {})[mode] = ledger.stat().st_size / 2**20
        print(f"  {mode}: done", file=sys.stderr)
    return out


def med(runs: list[dict[str, Any]], field: str) -> float:
    return statistics.median(r[field] for r in runs)


def table(data: dict[str, Any]) -> str:
    n = data["files"]
    lines = [
        "| scenario | stat: wall s | stat: CPU s | hash: wall s | hash: CPU s | hash / stat (wall) "
        "| files read to hash | modified (stat / hash) | peak RSS MiB (stat / hash) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    names = {
        "initial": "1. initial sync",
        "nochange": "2. no-change re-sync",
        "chmod": "3. re-sync, 1% chmod'ed",
        "rewrite": "4. re-sync, 1% rewritten (same size, mtime restored)",
    }
    for key, label in names.items():
        s, h = data["modes"]["stat"][key], data["modes"]["hash"][key]
        sw, hw = med(s, "wall"), med(h, "wall")
        lines.append(
            f"| {label} | **{sw:.2f}** | {med(s, 'cpu'):.2f} | **{hw:.2f}** | {med(h, 'cpu'):.2f} | {hw / sw:.2f}x | "
            f"{int(med(h, 'read')):,} | {int(statistics.median(r['counts']['modified'] for r in s)):,} / "
            f"{int(statistics.median(r['counts']['modified'] for r in h)):,} | "
            f"{med(s, 'peak_mb'):.0f} / {med(h, 'peak_mb'):.0f} |"
        )
    floor = med(data["floor"], "wall")
    runs = len(data["modes"]["stat"]["nochange"])
    lines += [
        "",
        f"{n:,} files of {data['size']:,} bytes ({n * data['size'] / 2**20:,.0f} MiB) in folders of {PER_FOLDER}; "
        f"wall and CPU are medians of {runs} runs (initial: 1 run), each sync in a fresh process.",
        f"Floor: a bare iteration of `LocalStore.list()` (`stat`) **{floor:.2f} s** for {n:,} files. "
        f"Ledger file: {data['ledger_mb']['stat']:.0f} MiB (`stat`), {data['ledger_mb']['hash']:.0f} MiB (`hash`); "
        f"hash memo beside it: {data['memo_mb']['hash']:.0f} MiB. Fixture built in {data['build_seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def write_doc(path: Path, text: str) -> None:
    block = f"{MARK_START}\n{text}\n{MARK_END}"
    doc = path.read_text() if path.exists() else ""
    if MARK_START in doc and MARK_END in doc:
        pre, rest = doc.split(MARK_START, 1)
        doc = pre + block + rest.split(MARK_END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--size", type=int, default=4096, help="bytes per file")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--write", type=Path, help="rewrite the generated block of this markdown file")
    p.add_argument("--json", type=Path, help="also keep every run's raw measurements")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(json.loads(args.child)))))
        return
    work = Path(tempfile.mkdtemp(prefix="bucketsync-bench-local-"))
    load0 = os.getloadavg()[0]
    started = time.time()
    try:
        data = measure(args.files, args.size, args.repeat, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    files = f" --files {args.files}" if args.files != 100_000 else ""
    header = (
        f"Generated by `.venv/bin/python bench/sync_local.py{files} --write docs/benchmarks.md` on {stamp}.\n\n"
        f"Machine: {info['cores']} cores ({info['cpu']}), {info['memory']} RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, SQLite {info['sqlite']}; folder and ledger on local disk under the system "
        f"temp dir. Source: commit {info['source']}. "
        f"Load average (1 min) at start / end: {load0:.2f} / {os.getloadavg()[0]:.2f}.\n\n"
    )
    text = header + table(data)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    if args.write:
        write_doc(args.write, text)


if __name__ == "__main__":
    main()
