"""A real ``bucketsync run`` daemon on a PostgreSQL ledger (the suite's own server): a sync and an API
put land in the database, the CLI's own agent beside the daemon is refused, the CLI reads the ledger
beside the daemon, and the password is in no log line."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from e2e import Daemon, cli, describe, local_driver, one_json, poll, write_config, write_files
from emulators.postgres import PostgresServer

PASSWORD = "pw-7d1e9b-NEVER-LOGGED"


def _put(daemon: Daemon, path: str, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(
        daemon.url + path, data=body, method="PUT", headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 201
        out: dict[str, Any] = json.loads(resp.read())
    return out


async def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_a_daemon_syncs_and_puts_on_a_postgresql_ledger(postgres_server: PostgresServer, tmp_path: Path) -> None:
    url = postgres_server.new_database()
    folder = tmp_path / "storage"
    write_files(folder, {"a/1.txt": "one", "a/2.txt": "two", "b.txt": "bee"})
    cfg = write_config(
        tmp_path,
        {"main": local_driver(folder)},
        {"docs": {"driver": "main", "sync": "manual"}},
        agent={"ledger": url, "state_dir": str(tmp_path / "state")},
    )
    env = {"BUCKETSYNC_LEDGER_PASSWORD": PASSWORD}  # trust auth ignores it; it must still never show
    with Daemon(cfg, env=env) as daemon:
        poll(lambda: daemon.get("/readyz").status == 200, what="/readyz 200", timeout=30)
        run = daemon.api("POST", "/datasets/docs/sync?wait=true")
        assert run.status == 200, run
        assert run.body["added"] == 3, run.body

        put = _put(daemon, "/api/v1/datasets/docs/items/c%2Fnew.txt", b"fresh")
        assert put["result"] == "created" and put["op"]["state"] == "done", put
        assert (folder / "c" / "new.txt").read_bytes() == b"fresh"

        # What the daemon answers is what the database holds.
        rows = await _rows(url, "SELECT key, size, state FROM items ORDER BY key")
        assert rows == [("a/1.txt", 3, "live"), ("a/2.txt", 3, "live"), ("b.txt", 3, "live"), ("c/new.txt", 5, "live")]
        listed = daemon.api("GET", "/datasets/docs/items")
        assert [i["key"] for i in listed.body["items"]] == [r[0] for r in rows]
        assert any((tmp_path / "state" / "staging").iterdir()) is False, "the staged body is gone after the put"

        # The CLI reads the ledger beside the daemon. Its sync opens an agent of its own, which the
        # database's lock refuses (LedgerLocked): the run is asked of the daemon instead.
        items = cli(cfg, "items", "docs", "--json", env=env)
        assert items.returncode == 0, describe(items)
        assert len(items.stdout.splitlines()) == 4
        second = one_json(cli(cfg, "sync", "docs", "--json", env=env))
        assert (second["run"], second["status"], second["unchanged"]) == (2, "ok", 4), second
        assert daemon.api("GET", "/datasets/docs/runs").body["runs"][0]["id"] == 2

        # The CLI finds the daemon through the database's one-agent lock, as through SQLite's
        # file lock: a command that needs a daemon goes to it (it said none was running).
        reload = cli(cfg, "reload", env=env)
        assert reload.returncode == 0, describe(reload)
    gone = cli(cfg, "reload", env=env)
    assert gone.returncode != 0 and "no agent is running" in gone.stderr, describe(gone)
    assert PASSWORD not in daemon.log
