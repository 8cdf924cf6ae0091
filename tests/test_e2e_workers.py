"""A real daemon with ``agent.sync_workers = 2``: its runs list and diff in two worker processes.

It runs as an unprivileged user over a folder with a sub-folder it may not read, so the
listing's gaps cross the pipe too; the workers end with the agent, also when it is killed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from e2e import NOBODY, Daemon, chown_tree, local_driver, poll, write_config, write_files

DATASET = "photos"


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


@pytest.mark.slow
def test_a_daemon_with_two_sync_workers(shared_dir: Path) -> None:
    data = shared_dir / "data"
    write_files(data, {"a/1.txt": "a1", "b/1.txt": "b1", "b/2.txt": "b2", "c/1.txt": "c1", "other/x": "x"})
    cfg = write_config(
        shared_dir,
        {"d": local_driver(data), "o": local_driver(data / "other")},
        {DATASET: {"driver": "d", "sync": "manual", "exclude": ["other/**"]}, "other": {"driver": "o"}},
        agent={"sync_workers": 2},
    )
    (shared_dir / "var").mkdir()
    chown_tree(shared_dir, NOBODY)
    with Daemon(cfg, run_as=NOBODY) as daemon:
        daemon.wait_ready()
        # they start beside the agent, not before it: ready once they have said so
        poll(lambda: "bucketsync_sync_workers 2.0" in daemon.get("/metrics").text or None, what="two workers")
        # the daemon runs under setpriv, which execs: the agent's pid is the daemon's
        workers = _children(daemon.pid)
        assert len(workers) == 2, workers
        first = daemon.api("POST", f"/datasets/{DATASET}/sync", params={"wait": "true"}).body
        assert (first["status"], first["added"]) == ("ok", 4), first

        (data / "b").chmod(0)  # the agent's user loses b/: a gap, listed by a worker
        (data / "c" / "1.txt").unlink()
        write_files(data, {"d/1.txt": "d1"})
        chown_tree(data / "d", NOBODY)
        run = daemon.api("POST", f"/datasets/{DATASET}/sync", params={"wait": "true"}).body
        assert run["status"] == "partial" and [g["prefix"] for g in run["gaps"]] == ["b/"], run
        assert (run["added"], run["removed"], run["unchanged"]) == (1, 1, 1), run
        assert "permission denied" in run["gaps"][0]["error"]
        items = daemon.api("GET", f"/datasets/{DATASET}/items").body["items"]
        assert {i["key"] for i in items} == {"a/1.txt", "b/1.txt", "b/2.txt", "d/1.txt"}
        other = poll(lambda: daemon.api("GET", "/datasets/other/items").body["items"] or None, what="other synced")
        assert [i["key"] for i in other] == ["x"], "the polled dataset synced through the workers too"
        assert daemon.stop() == 0
    for pid in workers:
        assert _gone(pid), f"worker {pid} outlived the agent"

    with Daemon(cfg, run_as=NOBODY) as daemon:  # killed outright: its workers see their pipe close and end
        orphans = poll(lambda: c if len(c := _children(daemon.pid)) == 2 else None, what="two workers")
        daemon.kill()
        for pid in orphans:
            poll(lambda pid=pid: _gone(pid) or None, what=f"worker {pid} ended after the agent was killed")


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].startswith("Z")
    return True
