"""What an operator sees without reading code: logs, dry-run plans, guard state, retention, metrics.

Real daemons and real CLI subprocesses; logs are the daemon's own JSON lines.
"""

from __future__ import annotations

import http.client
import re
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from e2e import (
    Daemon,
    cli,
    describe,
    items,
    local_driver,
    one_json,
    poll,
    query_ledger,
    sync,
    write_config,
    write_files,
)

REPO = Path(__file__).resolve().parents[1]


def ds(driver: str, **options: Any) -> dict[str, Any]:
    return {"driver": driver, "interval": "200ms", **options}


def scrape(daemon: Daemon) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(daemon.get("/metrics").text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def sample(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float | None:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())))


def run_ids(cfg: Path, dataset: str) -> list[int]:
    rows = query_ledger(
        Path(cfg.parent / "var" / "ledger.db"),
        "SELECT r.id FROM runs r JOIN datasets d ON d.id = r.dataset_id WHERE d.name = ? ORDER BY r.id",
        (dataset,),
    )
    return [int(r[0]) for r in rows]


# ---------------------------------------------------------------------- logs


def test_a_no_change_run_logs_one_info_line_and_per_key_changes_go_to_debug(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a", "b.txt": "b"})
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"docs": ds("local")},
                       agent={"log_format": "json"})  # fmt: skip
    with Daemon(cfg) as daemon:
        poll(lambda: len(run_ids(cfg, "docs")) >= 4, what="four runs")
        assert daemon.stop() == 0
    records = daemon.log_records()
    info = [r for r in records if r.get("dataset") == "docs" and r["level"] != "debug"]
    by_run: dict[int, list[str]] = {}
    for r in info:
        if r.get("run") is not None:
            by_run.setdefault(r["run"], []).append(r["event"])
    assert len(by_run) >= 4
    assert all(events == ["run finished"] for events in by_run.values()), by_run
    assert not [r for r in records if r.get("event") in ("added", "run started")], "debug lines at info level"
    assert not [r for r in records if r.get("event") == "request"], "the access log is debug only"


def test_no_change_runs_can_go_to_debug_and_debug_shows_keys_and_requests(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a", "b.txt": "b"})
    cfg = write_config(
        tmp_path,
        {"local": local_driver(tmp_path / "data")},
        {"docs": ds("local")},
        agent={"log_format": "json", "no_change_log_level": "debug"},
    )
    with Daemon(cfg) as daemon:
        poll(lambda: len(run_ids(cfg, "docs")) >= 4, what="four runs")
        assert daemon.stop() == 0
    # A poll still waiting on its sync worker when the stop comes ends there, logged as interrupted
    # (a warning): it is not a no-change run, and whether one is under way then is timing.
    finished = [r for r in daemon.events("run finished") if "interrupted by shutdown" not in (r.get("error") or "")]
    assert [r["added"] for r in finished] == [2], f"only the run that changed something logs at info: {finished}"

    debug_cfg = write_config(
        tmp_path,
        {"local": local_driver(tmp_path / "data")},
        {"docs": ds("local")},
        agent={"log_format": "json", "log_level": "debug", "ledger": str(tmp_path / "debug.db")},
        name="debug.toml",
    )
    with Daemon(debug_cfg) as daemon:
        daemon.wait_ready()
        poll(lambda: daemon.events("added") and daemon.events("request"), what="debug lines")
        (tmp_path / "data" / "a.txt").rename(tmp_path / "data" / "moved.txt")
        (tmp_path / "data" / "b.txt").write_text("b, longer now")
        poll(lambda: daemon.events("renamed") and daemon.events("modified"), what="rename and modify lines")
        assert daemon.stop() == 0
    # (a rename's new key is listed as an addition first; matching renames needs the whole listing)
    assert {"a.txt", "b.txt"} <= {r["key"] for r in daemon.events("added")}
    assert [(r["old_key"], r["key"]) for r in daemon.events("renamed")] == [("a.txt", "moved.txt")]
    assert [r["key"] for r in daemon.events("modified")] == ["b.txt"]
    request = daemon.events("request")[0]
    assert request["level"] == "debug"
    assert {"method", "path", "status", "seconds"} <= set(request)


def test_a_dataset_that_is_not_ready_warns_once_not_every_attempt(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"gone": local_driver(tmp_path / "missing")}, {"broken": ds("gone")},
                       agent={"log_format": "json"})  # fmt: skip
    with Daemon(cfg) as daemon:
        poll(
            lambda: (sample(scrape(daemon), "bucketsync_loop_errors_total", dataset="broken") or 0) >= 3,
            timeout=30,
            what="three failed probes",
        )
        assert daemon.stop() == 0
    warned = daemon.events("dataset not ready")
    assert len(warned) == 1, warned
    assert warned[0]["level"] == "warning"
    assert "bucket or folder not found" in warned[0]["reason"]
    assert not [r for r in daemon.log_records() if r["level"] == "error"], daemon.log


def test_a_client_that_hangs_up_is_not_an_error(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"big.bin": b"x" * (32 << 20)})
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"docs": ds("local")},
                       agent={"log_format": "json"})  # fmt: skip
    with Daemon(cfg) as daemon:
        poll(lambda: items(cfg, "docs"), what="the big file indexed")
        host, port = daemon.url.removeprefix("http://").split(":")
        for _ in range(3):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", "/api/v1/datasets/docs/items/big.bin/content")
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read(1024)
            conn.sock.close()  # hang up mid-body
            conn.close()
        time.sleep(1.0)
        assert daemon.get("/healthz").status == 200
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log
    assert not [r for r in daemon.log_records() if r["level"] in ("error", "critical")], daemon.log


# ---------------------------------------------------------------------- dry runs and the guard


def test_a_dry_run_lists_the_keys_it_would_remove_and_rename(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_files(data, {f"k{i}.txt": f"content {i}" for i in range(8)})
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {"docs": {"driver": "local", "sync": "manual"}})
    assert sync(cfg, "docs")[0] == 0
    (data / "k1.txt").unlink()
    (data / "k2.txt").unlink()
    (data / "k3.txt").rename(data / "renamed.txt")
    code, out, proc = sync(cfg, "docs", "--dry-run")
    assert code == 0, describe(proc)
    assert out["dry_run"] is True and out["removed"] == 2 and out["renamed"] == 1
    assert out["would_remove"] == {"count": 2, "keys": ["k1.txt", "k2.txt"], "truncated": False}
    assert out["would_rename"] == {"count": 1, "renames": [{"from": "k3.txt", "to": "renamed.txt"}], "truncated": False}
    human = cli(cfg, "sync", "docs", "--dry-run")
    assert "would remove 2:\n  - k1.txt\n  - k2.txt\n" in human.stdout
    assert "would rename 1:\n  k3.txt -> renamed.txt\n" in human.stdout
    assert len(items(cfg, "docs")) == 8, "a dry run writes nothing"


def test_the_plan_is_bounded_and_a_guard_blocked_dataset_shows_everywhere(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_files(data, {f"f{i:05d}.txt": str(i) for i in range(1010)})
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {"docs": {"driver": "local", "sync": "manual"}})
    assert sync(cfg, "docs")[0] == 0
    for i in range(1005):
        (data / f"f{i:05d}.txt").unlink()
    code, out, _ = sync(cfg, "docs", "--dry-run")
    assert code == 1 and out["status"] == "aborted"  # the guard would stop it
    plan = out["would_remove"]
    assert plan["count"] == 1005 and plan["truncated"] is True
    assert plan["keys"] == [f"f{i:05d}.txt" for i in range(1000)]

    code, out, _ = sync(cfg, "docs")
    assert code == 1 and out["status"] == "aborted"
    st = one_json(cli(cfg, "status", "--json"))["datasets"][0]
    assert st["guard_blocked"] is True
    human = cli(cfg, "status")
    assert "guard-blocked" in human.stdout and "--force" in human.stdout
    check = cli(cfg, "status", "--check")
    assert check.returncode == 1, describe(check)
    assert "docs" in check.stderr

    # the daemon knows it from the ledger at start-up: /readyz detail and the gauge
    with Daemon(cfg) as daemon:
        ready = daemon.wait_ready().body
        assert ready["detail"]["docs"]["guard_blocked"] is True
        assert sample(scrape(daemon), "bucketsync_guard_blocked", dataset="docs") == 1
        forced = daemon.api("POST", "/datasets/docs/sync", params={"force": "true", "wait": "true"})
        assert forced.body["status"] == "ok", forced.text
        assert daemon.get("/readyz").body["detail"]["docs"]["guard_blocked"] is False
        assert sample(scrape(daemon), "bucketsync_guard_blocked", dataset="docs") == 0
    assert cli(cfg, "status", "--check").returncode == 0


# ---------------------------------------------------------------------- retention


def test_the_daemon_prunes_old_runs_in_the_background(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a"})
    cfg = write_config(
        tmp_path,
        {"local": local_driver(tmp_path / "data")},
        {"docs": {"driver": "local", "interval": "100ms"}},
        agent={"keep_runs": 3, "prune_interval": "300ms"},
    )
    with Daemon(cfg) as daemon:
        poll(lambda: (ids := run_ids(cfg, "docs")) and ids[-1] >= 12, timeout=30, what="twelve runs")
        poll(lambda: len(run_ids(cfg, "docs")) <= 4, timeout=10, what="old runs pruned")
        ids = run_ids(cfg, "docs")
        assert ids == sorted(ids) and ids[-1] >= 12 and ids[0] > 1, ids
        assert (sample(scrape(daemon), "bucketsync_pruned_total", kind="runs") or 0) >= 8
        assert daemon.stop() == 0
    assert len(items(cfg, "docs")) == 1, "pruning history touches no item"


# ---------------------------------------------------------------------- metrics


def test_metrics_start_at_zero_for_every_known_label_and_readme_lists_them_all(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a", "b.txt": "b"})
    cfg = write_config(
        tmp_path,
        {"local": local_driver(tmp_path / "data"), "gone": local_driver(tmp_path / "missing")},
        {"docs": ds("local"), "broken": ds("gone"), "later": {"driver": "local", "sync": "manual"}},
    )
    with Daemon(cfg) as daemon:
        poll(lambda: (sample(scrape(daemon), "bucketsync_runs_total", dataset="docs", status="ok") or 0) >= 1,
             what="a run")  # fmt: skip
        m = scrape(daemon)
        text = daemon.get("/metrics").text
        assert daemon.stop() == 0
    build = m["bucketsync_build_info"]
    ((labels, value),) = build.items()
    assert value == 1 and dict(labels)["version"] and re.match(r"^3\.\d+\.\d+", dict(labels)["python"])
    assert "process_cpu_seconds_total" in m and "process_resident_memory_bytes" in m
    assert "python_info" in m
    # readiness per dataset
    assert sample(m, "bucketsync_dataset_ready", dataset="docs") == 1
    assert sample(m, "bucketsync_dataset_ready", dataset="broken") == 0
    # counters exist at 0 before anything happened to them
    for name in ("docs", "broken", "later"):
        for status in ("ok", "failed", "aborted"):
            assert sample(m, "bucketsync_runs_total", dataset=name, status=status) is not None, (name, status)
        for change in ("added", "modified", "removed", "renamed"):
            assert sample(m, "bucketsync_items_total", dataset=name, change=change) is not None
        assert sample(m, "bucketsync_outbox_backlog", dataset=name) == 0
    assert sample(m, "bucketsync_runs_total", dataset="later", status="ok") == 0
    assert sample(m, "bucketsync_gate_refusals_total", reason="read_only") == 0
    assert sample(m, "bucketsync_downstream_ops_total", op="put", result="ok") == 0
    # listing is not a change kind: its own counter
    assert not [k for k in m["bucketsync_items_total"] if ("change", "listed") in k]
    assert (sample(m, "bucketsync_listed_objects_total", dataset="docs") or 0) >= 2
    assert sample(m, "bucketsync_items_total", dataset="docs", change="added") == 2

    served = set(re.findall(r"^# TYPE (bucketsync_\w+) ", text, re.MULTILINE))
    section = (REPO / "README.md").read_text().split("### Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(bucketsync_\w+)", section))
    assert served == documented, f"served, not in README: {served - documented}; in README only: {documented - served}"
