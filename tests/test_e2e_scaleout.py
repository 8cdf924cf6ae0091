"""Three real agents on one PostgreSQL ledger, 12 datasets on the local store, a 3 s lease.

An audit trigger (installed by the test, in the database) records for every write to items and
runs which agent wrote (its connection's application_name) and who held the dataset's lease
in that transaction. Every dataset is written only by its lease's owner, through the whole
test: while the agents divide the datasets, when one is killed (``kill -9``: its datasets move
to the others), and when one is paused (SIGSTOP) past its lease and resumed (SIGCONT): its
late writes are refused, so the audit never shows a non-owner's write. Puts through every
agent, owner or not, land exactly once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from bucketsync.ledger.ledger import Ledger
from e2e import Daemon, free_port, local_driver, poll, write_config, write_files
from emulators.postgres import PostgresServer

NAMES = [f"ds{i:02}" for i in range(12)]
LEASE = 3.0

AUDIT = """
CREATE TABLE audit (writer TEXT, owner TEXT, dataset TEXT, tbl TEXT, at TIMESTAMPTZ DEFAULT clock_timestamp());
CREATE FUNCTION audit_writes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit (writer, owner, dataset, tbl)
        SELECT DISTINCT current_setting('application_name'), l.owner, d.name, TG_TABLE_NAME
        FROM new_rows n JOIN datasets d ON d.id = n.dataset_id LEFT JOIN leases l ON l.dataset = d.name;
    RETURN NULL;
END $$;
CREATE TRIGGER audit_items_insert AFTER INSERT ON items REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_writes();
CREATE TRIGGER audit_items_update AFTER UPDATE ON items REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_writes();
CREATE TRIGGER audit_runs_insert AFTER INSERT ON runs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_writes();
CREATE TRIGGER audit_runs_update AFTER UPDATE ON runs REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION audit_writes();
"""


async def _fetch(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return asyncio.run(_fetch(url, sql, *args))


def owners(url: str) -> dict[str, str | None]:
    """dataset -> its owner while its lease is unexpired (None: free or expired)."""
    got = rows(url, "SELECT dataset, CASE WHEN expires > clock_timestamp() THEN owner END FROM leases")
    return {str(d): o for d, o in got}


def held(url: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for dataset, owner in owners(url).items():
        if owner is not None:
            out.setdefault(owner, set()).add(dataset)
    return out


def divided(url: str, agents: list[str], share: int) -> dict[str, set[str]] | None:
    """The owners when the given agents hold every dataset, ``share`` each; else None."""
    now = held(url)
    ok = sorted(now) == sorted(agents) and all(len(now[a]) == share for a in agents)
    return now if ok and sum(len(v) for v in now.values()) == len(NAMES) else None


def synced_since(url: str, datasets: set[str], run_after: int) -> bool:
    """Every one of ``datasets`` has an ok run with an id above ``run_after``."""
    got = rows(
        url,
        "SELECT count(DISTINCT d.name) FROM runs r JOIN datasets d ON d.id = r.dataset_id "
        "WHERE r.status = 'ok' AND r.id > $1 AND d.name = ANY($2::text[])",
        run_after,
        sorted(datasets),
    )
    return got[0][0] == len(datasets)


def last_run(url: str) -> int:
    return int(rows(url, "SELECT coalesce(max(id), 0) FROM runs")[0][0])


def put(daemon: Daemon, dataset: str, key: str, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{daemon.url}/api/v1/datasets/{dataset}/items/{key}",
        data=body,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 201
        out: dict[str, Any] = json.loads(resp.read())
    return out


async def _prepare(url: str) -> None:
    """The schema, and the audit in it before any agent writes."""
    schema = await Ledger.open(url)
    await schema.close()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(AUDIT)
    finally:
        await conn.close()


def test_three_agents_share_twelve_datasets_by_leases(postgres_server: PostgresServer, tmp_path: Path) -> None:
    url = postgres_server.new_database()
    asyncio.run(_prepare(url))

    stores = {name: tmp_path / "store" / name for name in NAMES}
    for name, folder in stores.items():
        write_files(folder, {"a.txt": name, "b/c.txt": "c"})
    cfg = write_config(
        tmp_path,
        {f"d{name}": local_driver(folder) for name, folder in stores.items()},
        {name: {"driver": f"d{name}", "interval": 1.0} for name in NAMES},
        agent={"ledger": url, "state_dir": str(tmp_path / "state"), "lease_seconds": LEASE},
    )
    ids = [f"agent{i}" for i in range(3)]
    daemons = []
    for agent_id in ids:
        listen = f"127.0.0.1:{free_port()}"
        env = {
            "BUCKETSYNC_AGENT__LISTEN": listen,
            "BUCKETSYNC_AGENT__ID": agent_id,
            "BUCKETSYNC_AGENT__LEDGER": f"{url}?application_name={agent_id}",
        }
        daemons.append(Daemon(cfg, env=env, listen=listen, log_path=tmp_path / f"{agent_id}.log"))
    try:
        for d in daemons:
            d.start()
        # The first agent takes every dataset; as the others join it releases its surplus.
        owned = poll(lambda: divided(url, ids, 4), what="4 datasets per agent", timeout=30)
        assert poll(lambda: synced_since(url, set(NAMES), 0) or None, what="every dataset synced")
        theirs = sorted(owned[ids[1]])[0]
        refused = daemons[0].api("POST", f"/datasets/{theirs}/sync")
        assert refused.status == 409 and refused.body["error"]["code"] == "not_owner", refused
        assert ids[1] in refused.body["error"]["message"]

        # Puts through every agent, to datasets each may or may not own, land once.
        for i, d in enumerate(daemons):
            for name in ("ds00", "ds05", "ds11"):
                out = put(d, name, f"via{i}.txt", f"{name}-{i}".encode())
                assert out["op"]["state"] == "done", out
        for name in ("ds00", "ds05", "ds11"):
            assert sorted(p.name for p in stores[name].iterdir() if not p.name.startswith(".")) == [
                "a.txt",
                "b",
                "via0.txt",
                "via1.txt",
                "via2.txt",
            ]
        ops = rows(url, "SELECT state, count(*) FROM ops GROUP BY state")
        assert ops == [("done", 9)], ops

        # kill -9: the dead agent's datasets move to the other two (6 each), and sync there.
        dead, paused, other = daemons
        mark = last_run(url)
        dead.kill()
        owned = poll(lambda: divided(url, ids[1:], 6), what="6 datasets per live agent", timeout=30)
        moved = owned[ids[1]] | owned[ids[2]]
        assert poll(lambda: synced_since(url, moved, mark) or None, what="the moved datasets synced again")

        # SIGSTOP an owner past its lease: the other takes everything; after SIGCONT the paused
        # agent's late writes are refused (the audit below), then it rejoins the fair share.
        stopped = owned[ids[1]]
        paused.send(signal.SIGSTOP)
        try:
            poll(lambda: divided(url, ids[2:], 12), what="the paused agent's datasets moved", timeout=30)
        finally:
            paused.send(signal.SIGCONT)
        poll(lambda: divided(url, ids[1:], 6), what="the resumed agent rejoined", timeout=30)
        assert "lease lost" in paused.log
        mark = last_run(url)
        assert poll(lambda: synced_since(url, set(NAMES), mark) or None, what="every dataset synced again")
        out = put(other, sorted(stopped)[0], "late.txt", b"late")
        assert out["op"]["state"] == "done"
        assert rows(url, "SELECT count(*) FROM ops WHERE state = 'done'") == [(10,)]
    finally:
        for d in daemons:
            d.close()

    # The whole test: every write to a dataset's items and runs came from its lease's owner.
    strays = rows(url, "SELECT writer, owner, dataset, tbl FROM audit WHERE owner IS DISTINCT FROM writer")
    assert strays == [], strays
    writers = {w for (w,) in rows(url, "SELECT DISTINCT writer FROM audit")}
    assert writers == set(ids)
