"""Reloading the config: the pure plan, then SIGHUP and ``bucketsync reload`` on a real daemon.

The daemon tests check what an operator sees: datasets added in the file start
syncing, removed ones stop with their catalog kept in the ledger, changed ones
restart with the new settings, the others keep running with no run interrupted,
and an invalid file is logged and ignored while the old config keeps running.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.config import load_settings
from bucketsync.daemon.reload import apply, driver_fingerprints, plan
from e2e import (
    Daemon,
    cli,
    describe,
    ledger_of,
    local_driver,
    many_files,
    one_json,
    poll,
    query_ledger,
    write_config,
    write_files,
)

# -- the plan ----------------------------------------------------------------------------


def _cfg(tmp_path: Path, datasets: dict[str, Any], **kw: Any) -> Path:
    folders = {name: tmp_path / name for name in ("a", "b", "c")}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    drivers = {name: local_driver(folder) for name, folder in folders.items()}
    return write_config(tmp_path, drivers, datasets, agent={"listen": "127.0.0.1:9999"}, **kw)


def test_plan_sorts_datasets_into_added_removed_changed_unchanged(tmp_path: Path) -> None:
    old = load_settings(_cfg(tmp_path, {"keep": {"driver": "a"}, "gone": {"driver": "b"}, "edit": {"driver": "c"}}))
    new = load_settings(
        _cfg(tmp_path, {"keep": {"driver": "a"}, "edit": {"driver": "c", "interval": "5s"}, "new": {"driver": "b"}})
    )
    p = plan(old, new)
    assert (p.added, p.removed, p.changed, p.unchanged) == (("new",), ("gone",), ("edit",), ("keep",))
    assert p.needs_restart == ()
    assert p.summary() == "added new; removed gone; changed edit; 1 untouched"


def test_a_changed_driver_or_secret_file_changes_its_datasets(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("one")
    integ = {"aws": {"kind": "aws", "access_key_id": "AKIA1", "secret_access_key_file": str(secret)}}
    s3 = {"url": "s3://bucket/p/", "integration": "aws", "endpoint_url": "http://127.0.0.1:1"}
    cfg = write_config(
        tmp_path, {"s3": s3, "local": local_driver(tmp_path)}, {"x": {"driver": "s3"}, "y": {"driver": "local"}}, integ
    )
    old = load_settings(cfg)
    running = driver_fingerprints(old)  # taken when the stores were opened
    assert plan(old, load_settings(cfg), running).changed == ()
    secret.write_text("two")  # a rotated credential: same path, new content
    p = plan(old, load_settings(cfg), running)
    assert p.changed == ("x",) and p.unchanged == ("y",)
    cfg2 = write_config(
        tmp_path,
        {"s3": {**s3, "region": "eu-west-1"}, "local": local_driver(tmp_path)},
        {"x": {"driver": "s3"}, "y": {"driver": "local"}},
        integ,
        name="b.toml",
    )
    assert plan(load_settings(cfg), load_settings(cfg2)).changed == ("x",)


def test_agent_changes_need_a_restart_and_say_so(tmp_path: Path) -> None:
    old = load_settings(_cfg(tmp_path, {"keep": {"driver": "a"}}))
    new = load_settings(
        write_config(
            tmp_path,
            {"a": local_driver(tmp_path / "a")},
            {"keep": {"driver": "a"}},
            agent={"listen": "127.0.0.1:9998", "log_level": "debug"},
            name="n.toml",
        )
    )
    p = plan(old, new)
    assert set(p.needs_restart) == {"agent.listen", "agent.log_level"}
    assert p.unchanged == ("keep",)


# -- a real daemon ---------------------------------------------------------------------------


def _runs(ledger: Path, dataset: str) -> list[tuple[int, str, str | None]]:
    return [
        (r[0], r[1], r[2])
        for r in query_ledger(
            ledger,
            "SELECT r.id, r.status, r.error FROM runs r JOIN datasets d ON d.id = r.dataset_id WHERE d.name = ? "
            "ORDER BY r.id",
            (dataset,),
        )
    ]


def _items(ledger: Path, dataset: str) -> set[str]:
    rows = query_ledger(
        ledger,
        "SELECT i.key FROM items i JOIN datasets d ON d.id = i.dataset_id WHERE d.name = ? AND i.state = 'live'",
        (dataset,),
    )
    return {r[0] for r in rows}


class _Runner:
    """Records what ``apply`` starts and stops instead of running datasets."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []

    def start(self, name: str) -> None:
        self.started.append(name)

    async def stop(self, name: str) -> None:
        self.stopped.append(name)


async def test_a_dataset_a_reload_starts_is_built_like_one_at_start(tmp_path: Path) -> None:
    """Same pacer, same no-change log level, not ready until probed, its series at 0; a removed
    dataset's readiness series go."""
    before = _cfg(tmp_path, {"one": {"driver": "a"}, "two": {"driver": "b"}})
    old = load_settings(before)
    old = old.model_copy(update={"agent": old.agent.model_copy(update={"no_change_log_level": "debug"})})
    async with Agent(old) as agent:
        metrics.init(old.datasets)
        new = load_settings(_cfg(tmp_path, {"one": {"driver": "a", "sync": "events"}, "three": {"driver": "c"}}))
        runner = _Runner()
        await apply(agent, runner, new, driver_fingerprints(old))
        assert runner.started == ["three", "one"] and runner.stopped == ["two", "one"]
        loop = agent.loops["three"]
        assert loop.pacer is agent.pacer is agent.loops["one"].pacer
        assert loop.no_change_log_level == "debug"  # the running [agent] section, as at start
        assert agent.not_ready["three"] == "permission probe not run yet"
        text = metrics.render().decode()
        assert 'bucketsync_dataset_ready{dataset="three"} 0.0' in text
        assert 'bucketsync_runs_total{dataset="three",status="aborted"} 0.0' in text
        assert 'bucketsync_dataset_ready{dataset="two"}' not in text
        assert 'bucketsync_guard_blocked{dataset="two"}' not in text
        # Event series exist only where events can come: "one" is in events mode now, "three" polls.
        assert 'bucketsync_events_received_total{dataset="one"} 0.0' in text
        assert 'bucketsync_event_latency_seconds_count{dataset="one"} 0.0' in text
        assert 'bucketsync_events_received_total{dataset="three"}' not in text
        assert 'bucketsync_lease_changes_total{dataset="three"' not in text  # a ledger of its own: no leases


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sighup", "cli"])
def test_reload_starts_stops_restarts_and_leaves_the_rest_running(tmp_path: Path, how: str) -> None:
    big, small, other = tmp_path / "big", tmp_path / "small", tmp_path / "other"
    total = len(many_files(big, folders=2000, per_folder=10, links=True))  # a run of several batches
    write_files(small, {"a.jpg": "a", "b.txt": "b"})
    write_files(other, {"x.txt": "x"})
    drivers = {"big": local_driver(big), "small": local_driver(small), "other": local_driver(other)}
    before = {
        "keep": {"driver": "big", "interval": "1h"},  # one long first run, then quiet
        "gone": {"driver": "other"},
        "edit": {"driver": "small"},
    }
    cfg = write_config(tmp_path, drivers, before)
    listen = (tmp_path / "bucketsync.toml").read_text().split('listen = "')[1].split('"')[0]
    ledger = ledger_of(cfg)
    with Daemon(cfg) as daemon:
        poll(lambda: _items(ledger, "gone") == {"x.txt"}, what="gone synced")
        poll(lambda: _items(ledger, "edit") == {"a.jpg", "b.txt"}, what="edit synced")
        poll(lambda: 0 < len(_items(ledger, "keep")) < total, interval=0.002, what="keep's run half-way")

        after = {
            "keep": before["keep"],
            "edit": {"driver": "small", "include": ["*.jpg"]},
            "added": {"driver": "other"},
        }
        write_config(tmp_path, drivers, after, agent={"listen": listen})
        if how == "sighup":
            daemon.send(signal.SIGHUP)
            poll(lambda: daemon.events("configuration reloaded"), what="the reload")
            done = daemon.events("configuration reloaded")[0]
        else:
            proc = cli(cfg, "reload", "--json")
            assert proc.returncode == 0, describe(proc)
            done = one_json(proc)
        assert done["added"] == ["added"] and done["removed"] == ["gone"]
        assert done["changed"] == ["edit"] and done["unchanged"] == ["keep"]
        gone_runs = _runs(ledger, "gone")  # a reload returns once the removed dataset has stopped

        # added: starts and syncs. changed: restarts with the new include filter.
        poll(lambda: _items(ledger, "added") == {"x.txt"}, what="the added dataset synced")
        poll(lambda: _items(ledger, "edit") == {"a.jpg"}, what="edit synced with its new include")
        # untouched: its run in progress went on to the end, not interrupted, and is its only run.
        poll(lambda: _runs(ledger, "keep") and _runs(ledger, "keep")[-1][1] == "ok", what="keep's run finished")
        assert [s for _, s, _ in _runs(ledger, "keep")] == ["ok"], _runs(ledger, "keep")
        assert len(_items(ledger, "keep")) == total
        # removed: no more runs, catalog kept, gone from the API.
        assert _items(ledger, "gone") == {"x.txt"}
        assert _runs(ledger, "gone") == gone_runs
        names = {d["dataset"] for d in daemon.api("GET", "/datasets").body["datasets"]}
        assert names == {"keep", "edit", "added"}
        assert daemon.api("GET", "/datasets/gone/items").status == 404
        assert daemon.get("/readyz").status == 200
        metrics = daemon.get("/metrics").text
        assert 'bucketsync_dataset_interval_seconds{dataset="added"}' in metrics
        assert 'bucketsync_dataset_interval_seconds{dataset="gone"}' not in metrics
        assert daemon.stop() == 0, daemon.log
    failed = [r for d in ("keep", "edit", "added") for r in _runs(ledger, d) if r[1] not in ("ok", "running")]
    assert not [r for r in failed if "interrupted" not in (r[2] or "")], failed
    assert "Traceback" not in daemon.log


@pytest.mark.slow
def test_an_invalid_new_config_is_logged_and_ignored(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_files(data, {"a.txt": "a"})
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {"photos": {"driver": "local"}})
    good = cfg.read_text()
    ledger = ledger_of(cfg)
    with Daemon(cfg) as daemon:
        poll(lambda: _items(ledger, "photos") == {"a.txt"}, what="first sync")
        cfg.write_text(good.replace('interval = "1s"', 'interval = "5x"'))
        daemon.send(signal.SIGHUP)
        refused = poll(lambda: daemon.events("reload refused: the new configuration is invalid; the running one stays"))
        assert "datasets.photos.interval" in refused[0]["error"]
        assert daemon.running
        # Through the API: 400 naming the field. (`bucketsync reload` reads the same file
        # first, so it stops at the same error with exit 2 before asking the agent.)
        resp = daemon.api("POST", "/reload")
        assert resp.status == 400 and resp.body["error"]["code"] == "invalid_config", resp
        assert "datasets.photos.interval" in resp.body["error"]["message"]
        assert "running configuration stays" in resp.body["error"]["message"]
        proc = cli(cfg, "reload")
        assert proc.returncode == 2 and "datasets.photos.interval" in proc.stderr, describe(proc)
        # Broken TOML too.
        cfg.write_text(good + "\n[datasets.broken\n")
        daemon.send(signal.SIGHUP)
        poll(lambda: len(daemon.events("reload refused: the new configuration is invalid; the running one stays")) >= 3)
        # The old config keeps running: new files still arrive.
        write_files(data, {"b.txt": "b"})
        poll(lambda: _items(ledger, "photos") == {"a.txt", "b.txt"}, what="sync goes on after the refused reloads")
        assert daemon.get("/readyz").status == 200
        assert daemon.stop() == 0, daemon.log


def test_reload_without_a_running_agent_says_so(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "d")}, {"photos": {"driver": "local"}})
    proc = cli(cfg, "reload")
    assert proc.returncode == 1, describe(proc)
    assert "no agent is running" in proc.stderr
