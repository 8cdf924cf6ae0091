"""The ledger under real faults, through the real CLI and daemon.

Real corrupt bytes written over the file, a real non-root uid (``setpriv``), a real
tmpfs that fills up, a real ``kill -9`` followed by a deleted ``-wal``, and a real
port already taken. Every command runs as a subprocess with a timeout: a hang fails
the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e import (
    Daemon,
    Response,
    cli,
    describe,
    items,
    ledger_of,
    local_driver,
    many_files,
    one_json,
    parallel,
    poll,
    query_ledger,
    sync,
    write_config,
    write_files,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
PAGE = 4096


def metric(daemon: Daemon, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(daemon.get("/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, describe(proc)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def synced_ledger(tmp_path: Path, files: int = 0, **dataset: Any) -> tuple[Path, Path]:
    """A config over ``tmp_path/data`` and its ledger after one CLI sync (checkpointed, no -wal)."""
    data = tmp_path / "data"
    if files:
        many_files(data, folders=max(1, files // 500), per_folder=min(files, 500), links=True)
    else:
        write_files(data, {"a.txt": "a", "b/c.txt": "bc"})
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {"d": {"driver": "local", **dataset}})
    code, out, proc = sync(cfg, "d")
    assert code == 0 and out["status"] == "ok", describe(proc)
    ledger = ledger_of(cfg)
    assert not Path(f"{ledger}-wal").exists(), "a clean exit checkpoints the WAL into the main file"
    return cfg, ledger


# ---------------------------------------------------------------------- 14.3: a damaged header


def test_damaged_header_every_command_exits_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    cfg, ledger = synced_ledger(tmp_path)
    overwrite(ledger, 0, b"this is not an SQLite header at all")
    # Each of these printed "file is not a database" and then never exited: the timeout catches a hang.
    procs = parallel(
        lambda: cli(cfg, "status", timeout=30),
        lambda: cli(cfg, "sync", "d", "--json", timeout=30),
        lambda: cli(cfg, "items", "d", timeout=30),
        lambda: cli(cfg, "run", timeout=30),
    )
    for proc in procs:
        assert proc.returncode == 1, describe(proc)
        no_traceback(proc)
        text = proc.stderr + proc.stdout
        assert str(ledger) in text and "damaged" in text, describe(proc)
        assert "bucketsync backup" in text and "aside" in text, describe(proc)
    # sync --json still prints its one JSON object.
    out = one_json(procs[1])
    assert out["status"] == "failed" and out["run"] is None and "damaged" in out["error"]


async def test_ledger_open_closes_its_connection_when_the_file_is_damaged(tmp_path: Path) -> None:
    import threading

    from bucketsync.core.errors import LedgerError
    from bucketsync.ledger.ledger import Ledger

    path = tmp_path / "ledger.db"
    await (await Ledger.open(path)).close()
    overwrite(path, 0, b"\0" * 100)
    before = threading.active_count()
    for readonly in (False, True):
        with pytest.raises(LedgerError, match="damaged"):
            await Ledger.open(path, readonly=readonly)
    # aiosqlite's thread of a connection left open is what kept the process alive.
    poll(lambda: threading.active_count() <= before, timeout=5, what="aiosqlite threads to end")


# ---------------------------------------------------------------------- 13.9: a ledger that cannot be written


@contextlib.contextmanager
def world_readable_dir() -> Iterator[Path]:
    """A folder under /tmp that uid 65534 can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="bucketsync-nobody-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(cfg: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETSYNC_")}
    return subprocess.run(
        [*NOBODY, *_cli_argv(cfg, *args)], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def _cli_argv(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bucketsync.cli", "-c", str(cfg), *args]


def test_setpriv_drops_root_here() -> None:
    """The permission tests below mean something only if the uid really changes."""
    proc = subprocess.run([*NOBODY, "id", "-u"], capture_output=True, text=True, timeout=10, check=True)
    assert proc.stdout.strip() == "65534"


def test_unwritable_ledger_folder_and_read_only_ledger_are_clear_errors() -> None:
    with world_readable_dir() as base:
        data = base / "data"
        write_files(data, {"a.txt": "a"})
        cfg = write_config(base, {"local": local_driver(data)}, {"d": {"driver": "local"}})
        ledger = ledger_of(cfg)
        ledger.parent.mkdir()  # root's folder: uid 65534 may not create anything in it

        for args in (("run",), ("sync", "d")):
            proc = as_nobody(cfg, *args)
            assert proc.returncode == 1, describe(proc)
            no_traceback(proc)
            assert str(ledger) in proc.stderr and "writable" in proc.stderr, describe(proc)

        code, _, proc = sync(cfg, "d")  # root creates the ledger: a file uid 65534 may only read
        assert code == 0, describe(proc)
        for args in (("status",), ("items", "d"), ("sync", "d", "--json"), ("run",)):
            proc = as_nobody(cfg, *args)  # `status` hung here
            assert proc.returncode == 1, describe(proc)
            no_traceback(proc)
            text = proc.stderr + proc.stdout
            assert str(ledger) in text and "uid 0" in text and "writable" in text, describe(proc)


# ---------------------------------------------------------------------- 13.18: start-up


def test_no_config_found_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    proc = cli(None, "run", cwd=tmp_path, timeout=30)
    assert proc.returncode == 2, describe(proc)
    for place in ("-c/--config", "$BUCKETSYNC_CONFIG", "bucketsync.toml", str(tmp_path), "bucketsync init"):
        assert place in proc.stderr, describe(proc)
    assert list(tmp_path.iterdir()) == [], "no var/bucketsync.db left in the working directory"


def test_init_writes_a_commented_starter_and_never_overwrites(tmp_path: Path) -> None:
    proc = cli(None, "init", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    written = tmp_path / "bucketsync.toml"
    text = written.read_text()
    assert text.count("\n#") > 10, "commented"
    proc = cli(None, "status", "--json", cwd=tmp_path)  # the starter is a valid config as it is
    assert proc.returncode == 0 and one_json(proc) == {"datasets": []}, describe(proc)

    written.write_text(text + "# mine\n")
    proc = cli(None, "init", cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr and str(written) in proc.stderr, describe(proc)
    assert written.read_text().endswith("# mine\n"), "an existing config is left alone"

    proc = cli(None, "init", tmp_path / "other.toml")
    assert proc.returncode == 0 and (tmp_path / "other.toml").read_text() == text, describe(proc)


def test_quickstart_config_still_loads() -> None:
    """`make run` passes -c config/quickstart.toml from the repository root."""
    proc = cli(REPO / "config" / "quickstart.toml", "check", "photos", "--json", cwd=REPO)
    assert proc.returncode == 0, describe(proc)


def test_a_start_that_fails_leaves_no_ledger_behind(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(
            tmp_path,
            {"local": local_driver(tmp_path / "data")},
            {"d": {"driver": "local"}},
            agent={"listen": f"127.0.0.1:{port}"},
        )
        proc = cli(cfg, "run", timeout=30)
    assert proc.returncode == 2 and "cannot listen" in proc.stderr, describe(proc)
    assert not (tmp_path / "var").exists(), sorted(p.name for p in (tmp_path / "var").iterdir())

    # A ledger that was there before is kept as it was.
    code, _, p = sync(cfg, "d")
    assert code == 0, describe(p)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = cli(cfg, "run", timeout=30)
    assert proc.returncode == 2, describe(proc)
    assert ledger_of(cfg).exists()


# ---------------------------------------------------------------------- 14.4: dying loops, damage in the middle


def test_a_loop_that_keeps_dying_is_not_ready_counted_and_the_agent_stays_up(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a"})
    write_files(tmp_path / "ok", {"b.txt": "b"})
    cfg = write_config(
        tmp_path,
        {"local": local_driver(tmp_path / "data"), "ok": local_driver(tmp_path / "ok")},
        {"d": {"driver": "local"}, "fine": {"driver": "ok"}},
    )
    # Every start of every dataset loop raises (a bug escaping the task), forever.
    with Daemon(cfg, env={"BUCKETSYNC_RAISEPOINT": "supervisor.dataset_start:1000"}) as daemon:
        r = poll(
            lambda: r if (r := daemon.get("/readyz")).status == 503 and "sync loop died" in str(r.body) else None,
            what="/readyz to name the dead loop",
        )
        assert r.body["datasets"]["d"].startswith("sync loop died (FailpointError: raise point")
        poll(lambda: (metric(daemon, "bucketsync_loop_restarts_total", dataset="d") or 0) >= 2, what="2 restarts")
        died = [e for e in daemon.events("dataset loop died; restarting it") if e.get("dataset") == "d"]
        assert len(died) >= 2 and all(e["level"] == "error" for e in died), daemon.log
        assert "raise point" in died[0]["error"] and "Traceback" in died[0].get("exception", ""), died[0]
        assert daemon.get("/healthz").status == 200 and daemon.running

        proc = cli(cfg, "status", "--json")
        assert proc.returncode == 0, describe(proc)
        rows = {row["dataset"]: row for row in one_json(proc)["datasets"]}
        assert rows["d"]["ready"] is False and "sync loop died" in rows["d"]["not_ready_reason"]
        proc = cli(cfg, "status")
        assert "not ready: sync loop died" in proc.stdout, describe(proc)
    assert "Task exception was never retrieved" not in daemon.log


def test_a_dead_loop_is_restarted_and_becomes_ready(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a", "b.txt": "b"})
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"d": {"driver": "local"}})
    with Daemon(cfg, env={"BUCKETSYNC_RAISEPOINT": "supervisor.dataset_start:2"}) as daemon:
        daemon.wait_ready(timeout=60)
        assert metric(daemon, "bucketsync_loop_restarts_total", dataset="d") == 2
        assert len(daemon.events("dataset loop died; restarting it")) == 2
        poll(lambda: len(items(cfg, "d")) == 2, what="the restarted loop to sync")


def corrupt_middle(ledger: Path, first: float = 0.3, last: float = 0.7) -> None:
    """Random bytes over the pages in the middle of the file; the header page stays intact."""
    pages = ledger.stat().st_size // PAGE
    rng = random.Random(14)
    for page in range(max(2, int(pages * first)), int(pages * last)):
        overwrite(ledger, page * PAGE, rng.randbytes(PAGE))


def test_damage_in_the_middle_is_found_at_start_and_the_agent_is_not_ready(tmp_path: Path) -> None:
    cfg, ledger = synced_ledger(tmp_path, files=3000)
    corrupt_middle(ledger)
    with Daemon(cfg) as daemon:
        r = poll(lambda: r if (r := daemon.get("/readyz")).status == 503 and "ledger" in r.body else None)
        assert "damaged" in r.body["ledger"] and "bucketsync backup" in r.body["ledger"], r.body
        found = daemon.events("ledger quick_check found damage")
        assert found and found[0]["level"] == "error" and found[0]["problems"], daemon.log
        assert metric(daemon, "bucketsync_ledger_quick_check", result="damaged") == 1
        assert metric(daemon, "bucketsync_ledger_quick_check", result="ok") == 0
        # The dataset's loop meets the damage too: it dies and is restarted, or its runs fail.
        # (Item counts are kept in their own table, so only the run's snapshot reads the damaged
        # items: the run then ends failed, with the database error.)
        poll(
            lambda: (
                daemon.events("dataset loop died; restarting it")
                or daemon.events("sync loop error")
                or [r for r in daemon.events("run finished") if r["status"] == "failed" and r.get("error")]
            ),
            what="the damaged reads to be reported",
        )
        assert daemon.get("/healthz").status == 200 and daemon.running
    assert "Task exception was never retrieved" not in daemon.log


def test_damage_in_the_middle_read_by_the_cli_is_a_clear_error(tmp_path: Path) -> None:
    cfg, ledger = synced_ledger(tmp_path, files=3000)
    corrupt_middle(ledger, 0.05, 0.95)
    for proc in parallel(lambda: cli(cfg, "status", timeout=30), lambda: cli(cfg, "items", "d", timeout=30)):
        assert proc.returncode == 1, describe(proc)
        no_traceback(proc)
        assert str(ledger) in proc.stderr and "bucketsync backup" in proc.stderr, describe(proc)


def test_a_healthy_ledger_passes_the_start_up_check(tmp_path: Path) -> None:
    cfg, _ = synced_ledger(tmp_path)
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        assert daemon.events("agent started")[0]["ledger_check"] == "ok"
        assert metric(daemon, "bucketsync_ledger_quick_check", result="ok") == 1


# ---------------------------------------------------------------------- 14.5: disk full, on a real tmpfs


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def grow(path: Path, size: str) -> None:
    """More space on the mounted tmpfs, as an operator freeing space would give."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=30)


def fill(path: Path) -> Path:
    """A file taking every free byte of the file system under ``path``."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def test_disk_full_cli_sync_records_only_what_committed_then_recovers(tmp_path: Path) -> None:
    keys = many_files(tmp_path / "data", folders=50, per_folder=1000, links=True)
    with tmpfs(tmp_path / "small", "2m") as small:
        cfg = write_config(
            tmp_path,
            {"local": local_driver(tmp_path / "data")},
            {"d": {"driver": "local"}},
            agent={"ledger": str(small / "ledger.db")},
        )
        code, out, proc = sync(cfg, "d")
        assert code == 1, describe(proc)
        no_traceback(proc)
        assert out["status"] == "failed" and "disk is full" in out["error"], out
        committed = query_ledger(small / "ledger.db", "SELECT count(*) FROM items")[0][0]
        assert 0 < committed < len(keys), "the disk filled up part-way"
        assert out["added"] == committed, f"the run says added={out['added']}, but {committed} committed"
        run = query_ledger(small / "ledger.db", "SELECT status, added, error FROM runs WHERE id = ?", (out["run"],))
        assert run and run[0][0] == "failed" and run[0][1] == committed and "disk is full" in run[0][2]

        grow(small, "64m")  # space again: the next sync simply works
        code, out, proc = sync(cfg, "d")
        assert code == 0 and out["status"] == "ok", describe(proc)
        assert out["added"] == len(keys) - committed
        assert query_ledger(small / "ledger.db", "SELECT count(*) FROM items")[0][0] == len(keys)


def test_disk_full_daemon_507_not_ready_metric_and_recovery_without_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_files(data, {"a.txt": "a"})
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(256 * 1024))
    with tmpfs(tmp_path / "small", "8m") as small:
        cfg = write_config(
            tmp_path,
            {"local": local_driver(data)},
            {"d": {"driver": "local", "interval": "0.5s"}},
            agent={"ledger": str(small / "ledger.db")},
        )
        with Daemon(cfg) as daemon:
            daemon.wait_ready()
            # The start-up run first, so the disk fills under the run that needs space, not under it.
            poll(
                lambda: any(r["status"] == "ok" for r in daemon.api("GET", "/datasets/d/runs").body["runs"]),
                what="the start-up run",
            )
            filler = fill(small)
            many_files(data / "more", folders=10, per_folder=1000, links=True)  # a run that needs space

            r = poll(lambda: r if (r := daemon.get("/readyz")).status == 503 else None, what="/readyz 503")
            assert "disk is full" in r.body["ledger"], r.body
            assert (metric(daemon, "bucketsync_ledger_write_errors_total", reason="disk_full") or 0) >= 1
            assert metric(daemon, "bucketsync_ledger_writable") == 0

            body = upload.read_bytes()
            resp = _put(daemon, "new.bin", body)
            assert resp.status == 507 and resp.body["error"]["code"] == "disk_full", resp.text
            assert daemon.get("/healthz").status == 200

            filler.unlink()  # space again: no restart
            daemon.wait_ready(timeout=30)
            assert metric(daemon, "bucketsync_ledger_writable") == 1
            resp = _put(daemon, "new.bin", body)
            assert resp.status in (200, 201), resp.text
            # Every file in the folder (the links' source and new.bin included), not the hidden folder.
            files = sum(1 for p in data.rglob("*") if p.is_file() and ".bucketsync" not in p.parts)
            poll(lambda: len(items(cfg, "d")) == files, timeout=60, what="the catalog to catch up")
            # Every run's end is recorded (one the full disk interrupted, at the next run), and
            # the runs' additions add up to what the catalog holds: nothing counted twice or lost.
            runs = daemon.api("GET", "/datasets/d/runs", params={"limit": "1000"}).body["runs"]
            # A run the full disk cut short is recorded as failed, naming the full disk; none is left running.
            for run in runs[1:]:
                assert run["status"] == "ok" or (run["status"] == "failed" and "disk is full" in run["error"]), runs
            assert sum(run["added"] for run in runs) == files - 1, runs  # new.bin came by PUT
        assert daemon.returncode == 0


def _put(daemon: Daemon, key: str, body: bytes) -> Response:
    """A raw-bytes PUT (``Daemon.request`` sends JSON bodies)."""
    req = urllib.request.Request(daemon.url + f"/api/v1/datasets/d/items/{key}", data=body, method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return Response(status, json.loads(raw), {})


# ---------------------------------------------------------------------- 14.6: a lost -wal


def test_a_deleted_wal_is_detected_and_every_dataset_resynced(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_files(data, {f"f{i:03d}.txt": str(i) for i in range(50)})
    # manual: only the forced re-sync can bring the items back without being asked
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {"d": {"driver": "local", "sync": "manual"}})
    ledger = ledger_of(cfg)
    sidecar = Path(f"{ledger}.seq")
    daemon = Daemon(cfg).start()
    try:
        r = daemon.api("POST", "/datasets/d/sync", params={"wait": "true"})
        assert r.status == 200 and r.body["added"] == 50, r.text
        seq = query_ledger(ledger, "SELECT seq FROM commit_seq")[0][0]
        poll(lambda: sidecar.exists() and int(sidecar.read_text()) == seq, what="the sidecar to mirror the seq")
        assert Path(f"{ledger}-wal").stat().st_size > 0, "the commits are still in the WAL"
    finally:
        daemon.kill()
    os.unlink(f"{ledger}-wal")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{ledger}-shm")
    assert query_ledger(ledger, "SELECT count(*) FROM items") in ([], [(0,)]), "SQLite lost them, silently"

    with Daemon(cfg) as daemon:
        poll(lambda: len(items(cfg, "d")) == 50, what="the forced re-sync to bring the items back")
        lost = daemon.events(
            "the ledger lost committed transactions: it is older than its commit-sequence sidecar "
            "(its -wal was deleted after a crash, or an older copy replaced it); every dataset is re-synced "
            "in full, and user metadata or ops written in the lost transactions are gone"
        )
        assert lost and lost[0]["level"] == "error" and lost[0]["sidecar_seq"] == seq, daemon.log
        assert metric(daemon, "bucketsync_ledger_rollbacks_detected_total") == 1
        poll(lambda: query_ledger(ledger, "SELECT count(*) FROM resync") == [(0,)], what="the re-sync mark to clear")
    with Daemon(cfg) as daemon:  # once re-synced, a restart is quiet
        daemon.wait_ready()
        assert metric(daemon, "bucketsync_ledger_rollbacks_detected_total") == 0


async def test_a_reader_never_writes_the_sidecar(tmp_path: Path) -> None:
    """A read-only ledger (the CLI's reads, a sync worker's snapshot) closed while the agent runs
    used to write 0 over the agent's number, so a -wal lost after that went unnoticed."""
    from bucketsync.ledger.ledger import Ledger

    path = tmp_path / "ledger.db"
    writer = await Ledger.open(path)
    try:
        await writer.dataset_id("d")  # a write transaction: the sequence moves on
        await writer.db.mirror.close()
        mirrored = int(Path(f"{path}.seq").read_text())
        assert mirrored > 0
        for _ in range(2):
            await (await Ledger.open(path, readonly=True)).close()
        assert int(Path(f"{path}.seq").read_text()) == mirrored
    finally:
        await writer.close()


def test_a_command_waits_for_an_agent_that_holds_the_lock_but_does_not_answer_yet(tmp_path: Path) -> None:
    """Between taking the ledger's lock and listening (a start, or one failing on a damaged ledger) an
    agent does not answer: a command waits until it does or lets the lock go, then runs on its own,
    instead of failing with "the agent holds the ledger lock but its API does not answer"."""
    import threading

    from bucketsync.ledger.sqlite import InstanceLock

    cfg, ledger = synced_ledger(tmp_path)
    lock = InstanceLock(ledger)
    lock.acquire()  # an "agent" that never listens, and lets go after a while
    release = threading.Timer(1.5, lock.release)
    release.start()
    try:
        proc = cli(cfg, "status", timeout=60)
    finally:
        release.cancel()
        lock.release()
    assert proc.returncode == 0, describe(proc)
    assert "does not answer" not in proc.stderr and "d" in proc.stdout, describe(proc)


def test_clean_restarts_and_cli_runs_raise_no_alarm(tmp_path: Path) -> None:
    cfg, ledger = synced_ledger(tmp_path)
    for _ in range(2):
        code, _, proc = sync(cfg, "d")
        assert code == 0 and "lost committed" not in proc.stderr, describe(proc)
    assert int(Path(f"{ledger}.seq").read_text()) == query_ledger(ledger, "SELECT seq FROM commit_seq")[0][0]


# ---------------------------------------------------------------------- bucketsync backup


def test_backup_while_the_daemon_writes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    many_files(data, folders=4, per_folder=500, links=True)
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {"d": {"driver": "local", "interval": "0.2s"}})
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        poll(lambda: len(items(cfg, "d")) == 2000, what="the first sync")
        copy = tmp_path / "backups" / "copy.db"
        copy.parent.mkdir()
        proc = cli(cfg, "backup", copy, "--json", timeout=60)  # runs are committing meanwhile
        assert proc.returncode == 0, describe(proc)
        out = one_json(proc)
        assert out["backup"] == str(copy) and out["bytes"] == copy.stat().st_size > 0

        db = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
            assert db.execute("SELECT count(*) FROM items").fetchone() == (2000,)
            assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",), "one self-contained file"
        finally:
            db.close()
        assert not list(copy.parent.glob(".*.part")), "no half copy left behind"

        proc = cli(cfg, "backup", copy)
        assert proc.returncode == 2 and "--overwrite" in proc.stderr, describe(proc)
        proc = cli(cfg, "backup", copy.parent)  # a folder: the copy keeps the ledger's name
        assert proc.returncode == 0 and (copy.parent / ledger_of(cfg).name).exists(), describe(proc)
        assert daemon.running
    assert daemon.returncode == 0
