"""A real ``bucketsync run`` daemon (a subprocess on a free port) over local folders in ``tmp_path``.

Each test starts its own daemon and talks to it as an operator would: HTTP (health,
readiness, metrics, the API), signals, the CLI beside it, and its JSON log lines.
Waits are polls with generous timeouts; nothing asserts how fast anything is.
"""

from __future__ import annotations

import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e import (
    SYNC_KEYS,
    Daemon,
    cli,
    describe,
    items,
    ledger_of,
    local_driver,
    many_files,
    parallel,
    poll,
    query_ledger,
    status,
    sync,
    write_config,
    write_files,
)

pytestmark = pytest.mark.slow

TICK = "0.5s"  # the poll interval of the daemon tests' datasets
GRACE = 2.0  # the agent.grace every test config gets (see e2e.write_config)
STOP_TIMEOUT = GRACE + 8  # how long a stopping daemon may take before the test fails


def ds(driver: str, **options: Any) -> dict[str, Any]:
    """A dataset over ``driver`` that polls every ``TICK``."""
    return {"driver": driver, "interval": TICK, **options}


def runs(daemon: Daemon, dataset: str) -> list[dict[str, Any]]:
    """The dataset's runs, newest first, from the API."""
    r = daemon.api("GET", f"/datasets/{dataset}/runs", params={"limit": "1000"})
    assert r.status == 200, r.text
    return list(r.body["runs"])


def finished_runs(daemon: Daemon, dataset: str, state: str = "ok") -> list[dict[str, Any]]:
    return [r for r in runs(daemon, dataset) if r["status"] == state]


def ledger_count(ledger: Path, dataset: str) -> int:
    rows = query_ledger(
        ledger,
        "SELECT count(*) FROM items i JOIN datasets d ON d.id = i.dataset_id WHERE d.name = ? AND i.state = 'live'",
        (dataset,),
    )
    return int(rows[0][0]) if rows else 0


def scrape(daemon: Daemon) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` parsed: sample name -> {sorted label pairs: value}."""
    r = daemon.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def sample(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float | None:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())))


# ---------------------------------------------------------------------- life cycle


def test_health_ready_json_logs_and_sigterm(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.jpg": "1", "b.jpg": "22", "c/d.jpg": "333"})
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"photos": ds("local")})
    with Daemon(cfg) as daemon:
        r = daemon.get("/healthz")
        assert (r.status, r.body) == (200, {"status": "ok"})
        assert daemon.wait_ready().body["status"] == "ready"
        poll(lambda: finished_runs(daemon, "photos"), what="a first run")
        assert ledger_count(ledger_of(cfg), "photos") == 3

        code = daemon.stop(signal.SIGTERM, timeout=STOP_TIMEOUT)
        assert code == 0, daemon.log

    records = daemon.log_records()  # every line is a JSON object: stderr is not a TTY
    events = [r["event"] for r in records]
    assert events[0] == "agent started"
    assert events[-1] == "agent stopped"
    assert all("level" in r and "timestamp" in r for r in records)
    started = records[0]
    assert started["listen"] == daemon.url.removeprefix("http://")
    assert started["datasets"] == ["photos"]
    assert started["pid"] == daemon.pid
    run_lines = [r for r in records if r["event"] in ("run started", "run finished")]
    assert any(r["event"] == "run finished" for r in run_lines)
    for r in run_lines:
        assert r["dataset"] == "photos", r
        assert isinstance(r["run"], int), r
    finished = [r for r in run_lines if r["event"] == "run finished"]
    assert finished[0]["added"] == 3 and finished[0]["status"] == "ok"


def test_sigint_stops_cleanly(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"photos": ds("local")})
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        assert daemon.stop(signal.SIGINT, timeout=STOP_TIMEOUT) == 0, daemon.log
    assert daemon.events("agent stopped"), daemon.log
    assert "Traceback" not in daemon.log
    assert not daemon.events("grace period over: cancelled")


@pytest.mark.parametrize("name", ["photos", "outbox"])  # "outbox" is also the name of the agent's own task
def test_sigterm_during_a_run_lets_it_end_cleanly(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    total = len(many_files(data, folders=2000, per_folder=10, links=True))  # a run of four batches
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {name: ds("local")})
    ledger = ledger_of(cfg)
    with Daemon(cfg) as daemon:
        poll(lambda: 0 < ledger_count(ledger, name) < total, interval=0.002, what="a run half-way")
        assert daemon.stop(signal.SIGTERM, timeout=STOP_TIMEOUT) == 0, daemon.log
    left = query_ledger(ledger, "SELECT id, status, error, removed FROM runs WHERE status NOT IN ('ok')")
    assert len(left) == 1, f"the run in progress does not complete after SIGTERM: {left}"
    assert all(status == "failed" for _, status, _, _ in left), f"runs left open by the shutdown: {left}"
    for _, _, error, removed in left:
        assert "interrupted by shutdown" in error and removed == 0
    assert not daemon.events("sync loop error"), daemon.log[-3000:]
    assert daemon.log_records()[-1]["event"] == "agent stopped"


def test_second_agent_on_the_same_ledger_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"photos": ds("local")})
    with Daemon(cfg) as first:
        first.wait_ready()
        # Another port, so the only thing in the way is the ledger's lock.
        other = Daemon(cfg, env={"BUCKETSYNC_AGENT__LISTEN": "127.0.0.1:0"})
        try:
            code = other.start(wait=False).wait(timeout=20)
        finally:
            other.close()
        assert code != 0, other.log
        assert "another bucketsync agent" in other.log
        assert f"pid {first.pid}" in other.log
        assert str(ledger_of(cfg)) in other.log
        assert "Traceback" not in other.log
        assert first.running
        assert first.get("/healthz").status == 200
        assert first.get("/readyz").status == 200


def test_readyz_names_the_broken_dataset_while_the_other_syncs(tmp_path: Path) -> None:
    write_files(tmp_path / "good", {"one.txt": "1", "two.txt": "2"})
    missing = tmp_path / "missing"
    cfg = write_config(
        tmp_path,
        {"good": local_driver(tmp_path / "good"), "gone": local_driver(missing)},
        {"fine": ds("good"), "broken": ds("gone")},
    )
    ledger = ledger_of(cfg)
    with Daemon(cfg) as daemon:

        def only_broken_unready() -> dict[str, str] | None:
            r = daemon.get("/readyz")
            datasets = r.body.get("datasets", {}) if r.status == 503 else {}
            return datasets if set(datasets) == {"broken"} else None

        reasons = poll(only_broken_unready, what="/readyz 503 naming only 'broken'")
        assert "driver 'gone'" in reasons["broken"]
        assert "cannot be synced: list: bucket or folder not found" in reasons["broken"]
        detail = daemon.get("/readyz").body["detail"]
        assert detail["broken"]["ready"] is False and detail["fine"]["ready"] is True
        # the healthy dataset syncs regardless
        poll(lambda: ledger_count(ledger, "fine") == 2, what="dataset 'fine' synced")
        assert [i["key"] for i in items(cfg, "fine")] == ["one.txt", "two.txt"]
        listed = {d["dataset"]: d for d in daemon.api("GET", "/datasets").body["datasets"]}
        assert listed["broken"]["ready"] is False
        assert "bucket or folder not found" in listed["broken"]["not_ready_reason"]
        assert listed["fine"]["ready"] is True
        assert daemon.get("/readyz").status == 503

        # Once the folder exists, the probe passes, the agent is ready and the dataset syncs.
        write_files(missing, {"late.txt": "late"})
        assert daemon.wait_ready().body["status"] == "ready"
        poll(lambda: ledger_count(ledger, "broken") == 1, what="dataset 'broken' synced once its folder exists")
        assert daemon.stop(timeout=STOP_TIMEOUT) == 0, daemon.log


# ---------------------------------------------------------------------- syncing


def test_items_follow_the_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_files(data, {"a.txt": "a", "b.txt": "b", "c.txt": "c-content", "d.txt": "d"})
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {"photos": ds("local")})
    with Daemon(cfg) as daemon:
        first = poll(lambda: rows if len(rows := items(cfg, "photos")) == 4 else None, what="4 items")
        ids = {r["key"]: r["id"] for r in first}

        write_files(data, {"e.txt": "new", "a.txt": "a, rewritten longer"})
        (data / "b.txt").unlink()
        (data / "moved").mkdir()
        (data / "c.txt").rename(data / "moved" / "c.txt")
        want = {"a.txt": 19, "d.txt": 1, "e.txt": 3, "moved/c.txt": 9}

        def followed() -> list[dict[str, Any]] | None:
            rows = items(cfg, "photos")
            return rows if {r["key"]: r["size"] for r in rows} == want else None

        now = {r["key"]: r for r in poll(followed, what=f"items == {want}")}
        assert now["moved/c.txt"]["id"] == ids["c.txt"], "the rename kept the item"
        assert now["a.txt"]["id"] == ids["a.txt"]
        assert daemon.running


def test_metrics(tmp_path: Path) -> None:
    write_files(tmp_path / "p", {"1.jpg": "1", "2.jpg": "2", "3.jpg": "3"})
    write_files(tmp_path / "d", {"x.pdf": "x", "y.pdf": "y"})
    cfg = write_config(
        tmp_path,
        {"p": local_driver(tmp_path / "p"), "d": local_driver(tmp_path / "d")},
        # Runs one after the other, so the numbers are exact (see the concurrency test).
        {"photos": ds("p", sync="manual"), "docs": ds("d", sync="manual")},
    )
    t0 = time.time()
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        for name in ("photos", "docs", "photos"):
            r = daemon.api("POST", f"/datasets/{name}/sync", params={"wait": "true"})
            assert r.status == 200 and r.body["status"] == "ok", r.text
        m = scrape(daemon)
    for name in (
        "bucketsync_runs_total",
        "bucketsync_items_total",
        "bucketsync_run_duration_seconds_count",
        "bucketsync_run_duration_seconds_sum",
        "bucketsync_run_duration_seconds_bucket",
        "bucketsync_last_success_timestamp_seconds",
        "bucketsync_dataset_items",
    ):
        assert name in m, f"{name} missing from /metrics"
    for name, n, ok_runs in (("photos", 3, 2), ("docs", 2, 1)):
        assert sample(m, "bucketsync_runs_total", dataset=name, status="ok") == ok_runs
        assert sample(m, "bucketsync_runs_total", dataset=name, status="failed") == 0, "counters start at 0"
        assert sample(m, "bucketsync_run_duration_seconds_count", dataset=name) == ok_runs
        duration = sample(m, "bucketsync_run_duration_seconds_sum", dataset=name)
        assert duration is not None and duration > 0
        assert sample(m, "bucketsync_run_duration_seconds_bucket", dataset=name, le="+Inf") == ok_runs
        assert sample(m, "bucketsync_items_total", dataset=name, change="added") == n
        assert sample(m, "bucketsync_items_total", dataset=name, change="listed") is None, "listing is no change"
        assert sample(m, "bucketsync_listed_objects_total", dataset=name) == n * ok_runs
        assert sample(m, "bucketsync_dataset_items", dataset=name, state="live") == n
        assert sample(m, "bucketsync_dataset_items", dataset=name, state="tombstone") == 0
        last = sample(m, "bucketsync_last_success_timestamp_seconds", dataset=name)
        assert last is not None and t0 <= last <= time.time()
    labelled = {dict(k).get("dataset") for v in m.values() for k in v}
    assert {"photos", "docs"} <= labelled
    assert labelled - {"photos", "docs", None} == set(), labelled


def test_cli_beside_the_daemon(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a", "b.txt": "bb"})
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"photos": ds("local")})
    offline = status(cfg)["photos"]  # no agent yet: read from the ledger
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        write_files(tmp_path / "data", {"c.txt": "ccc"})
        code, out, proc = sync(cfg, "photos")  # the daemon holds the lock: this goes through its API
        assert code == 0, describe(proc)
        assert set(out) == SYNC_KEYS
        assert out["status"] == "ok"
        assert isinstance(out["run"], int)
        assert out["listed"] == 3
        ran_here = [r["run"] for r in daemon.events("run finished")]
        assert out["run"] in ran_here, "the daemon ran the CLI's sync"

        assert [i["key"] for i in items(cfg, "photos")] == ["a.txt", "b.txt", "c.txt"]

        def scheduled() -> dict[str, Any] | None:
            st = status(cfg)["photos"]
            return st if st["next_run"] else None

        st = poll(scheduled, what="status --json showing next_run")
        assert st["next_run"].endswith("Z")
        assert st["ready"] is True
        assert st["items"]["live"] == 3
        assert daemon.running
    # agent.datasets_status: "the same shape for `bucketsync status --json` and GET /datasets"
    assert set(st) == set(offline), f"status --json changes shape with a running agent: {set(st) ^ set(offline)}"


def test_poll_dataset_syncs_at_start_not_after_a_whole_interval(tmp_path: Path) -> None:
    write_files(tmp_path / "in", {"a.txt": "1", "b/c.txt": "2"})
    cfg = write_config(tmp_path, {"in": local_driver(tmp_path / "in")}, {"slow": ds("in", interval="1h")})
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        # An hour-long interval: only a start-up run can index these within the timeout.
        poll(lambda: ledger_count(ledger_of(cfg), "slow") == 2 or None, timeout=15, what="start-up sync")
        (listed,) = daemon.api("GET", "/datasets").body["datasets"]
        assert listed["last_run"]["status"] == "ok"


def test_manual_dataset_runs_only_when_asked(tmp_path: Path) -> None:
    write_files(tmp_path / "in", {"m1.txt": "1", "m2.txt": "2"})
    cfg = write_config(tmp_path, {"in": local_driver(tmp_path / "in")}, {"inbox": ds("in", sync="manual")})
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        time.sleep(4 * 0.5)  # four intervals (TICK) go by
        assert runs(daemon, "inbox") == []
        assert ledger_count(ledger_of(cfg), "inbox") == 0
        (listed,) = daemon.api("GET", "/datasets").body["datasets"]
        assert (listed["sync"], listed["next_run"], listed["last_run"]) == ("manual", None, None)

        code, out, proc = sync(cfg, "inbox")
        assert code == 0, describe(proc)
        assert (out["status"], out["added"]) == ("ok", 2)
        assert [r["id"] for r in runs(daemon, "inbox")] == [out["run"]]
        assert ledger_count(ledger_of(cfg), "inbox") == 2


def test_concurrent_runs_of_datasets_in_one_agent(tmp_path: Path) -> None:
    """Datasets sync at the same time in one agent; their ledger transactions must not mix."""
    data = tmp_path / "data"
    keys = many_files(data, folders=1500, per_folder=10, links=True)  # three batches per run
    names = ("one", "two", "three", "four")
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {n: ds("local", sync="manual") for n in names})
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        # four runs at once, as four poll datasets whose intervals line up
        posted = parallel(*(partial(daemon.api, "POST", f"/datasets/{n}/sync") for n in names))
        assert [r.status for r in posted] == [202] * len(names), [r.text for r in posted]
        started = {n: r.body["run"] for n, r in zip(names, posted, strict=True)}

        def all_done() -> dict[str, dict[str, Any]] | None:
            got = {n: daemon.api("GET", f"/datasets/{n}/runs/{rid}").body for n, rid in started.items()}
            return got if all(r["status"] != "running" for r in got.values()) else None

        results = poll(all_done, what="the runs to end")
        outcome = {n: (r["status"], r["error"]) for n, r in results.items()}
        assert outcome == dict.fromkeys(names, ("ok", None)), f"{outcome}\nlog tail:\n{daemon.log[-2500:]}"
        ledger = ledger_of(cfg)
        assert {n: ledger_count(ledger, n) for n in names} == dict.fromkeys(names, len(keys))
        assert not daemon.events("sync loop error")


def test_api_lists_datasets_and_runs_a_sync(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a", "b.txt": "b"})
    cfg = write_config(
        tmp_path,
        {"local": local_driver(tmp_path / "data")},
        {"photos": ds("local", sync="manual"), "other": ds("local", interval="1h")},
    )
    with Daemon(cfg) as daemon:
        r = daemon.api("GET", "/datasets")
        assert r.status == 200
        assert [d["dataset"] for d in r.body["datasets"]] == ["photos", "other"]
        assert r.body["datasets"][0]["url"] == (tmp_path / "data").resolve().as_uri()

        r = daemon.api("POST", "/datasets/photos/sync")
        assert r.status == 202, r.text
        assert r.body["status"] == "running" and r.body["dataset"] == "photos"
        run_id = r.body["run"]
        assert isinstance(run_id, int)

        def done() -> dict[str, Any] | None:
            got = daemon.api("GET", f"/datasets/photos/runs/{run_id}")
            assert got.status == 200, got.text
            return got.body if got.body["status"] != "running" else None

        run = poll(done, what=f"run {run_id} to finish")
        assert (run["status"], run["id"], run["added"], run["error"]) == ("ok", run_id, 2, None)

        r = daemon.api("GET", "/datasets/nope/runs/1")
        assert r.status == 404 and "nope" in r.body["error"]["message"]
        r = daemon.api("GET", f"/datasets/other/runs/{run_id}")
        assert r.status == 404, "a run belongs to its dataset"


# ---------------------------------------------------------------------- crash safety


class _Missed(Exception):
    """The initial run finished before the test could kill the daemon."""


def _kill_during_initial_run(tmp_path: Path, data: Path, total: int, attempt: int) -> tuple[Path, int, int] | None:
    """Start a daemon on a fresh ledger and ``kill -9`` it while its first run is half done.

    Returns (config, the killed run's id, items committed before the kill), or None
    when the run finished first (a race the caller retries).
    """
    cfg = write_config(
        tmp_path,
        {"local": local_driver(data)},
        {"big": ds("local")},
        agent={"ledger": str(tmp_path / f"var{attempt}" / "ledger.db")},
        name=f"attempt{attempt}.toml",
    )
    ledger = ledger_of(cfg)

    def mid_run() -> bool:
        if query_ledger(ledger, "SELECT id FROM runs WHERE status != 'running'"):
            raise _Missed
        running = query_ledger(ledger, "SELECT id FROM runs WHERE status = 'running'")
        return bool(running) and 0 < ledger_count(ledger, "big") < total

    daemon = Daemon(cfg).start()
    try:
        try:
            poll(mid_run, interval=0.002, what="the initial run to have committed part of its items")
        except _Missed:
            return None
        daemon.send(signal.SIGSTOP)  # freeze it, then make sure the run is still open
        stale = query_ledger(ledger, "SELECT id FROM runs WHERE status = 'running'")
        if not stale:
            return None
        assert daemon.kill() == -signal.SIGKILL
        return cfg, int(stale[0][0]), ledger_count(ledger, "big")
    finally:
        if daemon.running:
            daemon.kill()


def test_kill_9_during_initial_sync_then_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    keys = many_files(data, folders=1500, per_folder=10, links=True)  # 15,000 tiny files
    total = len(keys)
    for attempt in range(3):  # catching the run half-way is a race: a fresh ledger per attempt
        if (killed := _kill_during_initial_run(tmp_path, data, total, attempt)) is not None:
            break
    else:
        raise AssertionError("could not kill the daemon during its initial run in 3 attempts")
    cfg, stale_id, killed_at = killed
    assert 0 < killed_at < total

    with Daemon(cfg) as again:
        poll(lambda: finished_runs(again, "big"), what="a complete run after the restart")
        history = {r["id"]: r for r in runs(again, "big")}
        assert history[stale_id]["status"] == "failed"
        assert history[stale_id]["error"] == "the agent stopped during this run"
        assert again.events("marked runs left running by a previous agent as failed")[0]["runs"] == 1
        ok = finished_runs(again, "big")[-1]  # the first successful run
        assert ok["id"] > stale_id
        assert (ok["listed"], ok["added"], ok["unchanged"], ok["removed"]) == (
            total,
            total - killed_at,
            killed_at,
            0,
        )
        rows = items(cfg, "big")
    assert len(rows) == total
    assert {r["key"] for r in rows} == keys, "no losses"
    assert len({r["id"] for r in rows}) == total, "no duplicates"
    assert query_ledger(ledger_of(cfg), "SELECT count(*) FROM items")[0][0] == total


def test_cli_run_exit_code_on_bad_listen(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"photos": ds("local")})
    proc = cli(cfg, "run", env={"BUCKETSYNC_AGENT__LISTEN": "0.0.0.0:1"}, timeout=20)
    assert proc.returncode == 2, describe(proc)
    assert "agent.listen" in proc.stderr and "api_token" in proc.stderr
