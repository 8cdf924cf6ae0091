"""Read-only sources, end to end: a real daemon over storage it may read but not write.

Two real unprivileged cases: SeaweedFS with a ``["Read", "List"]`` identity, and a
local folder owned by root served by a daemon running as uid 65534 (``setpriv``):
the tests run as root, where file modes stop nothing, so the uid must be real.
Such a dataset is catalogued. A writable one is "downstream unavailable": its writes
are refused up front with a 403 that says storage denied them, and status,
``/readyz`` and ``/metrics`` say so. A read-only one is simply ready.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e import (
    _STARTED,
    CLI,
    Daemon,
    clean_env,
    cli,
    describe,
    items,
    one_json,
    poll,
    write_config,
    write_files,
)
from emulators.s3 import PREFIX, REGION, S3Emulator

NOBODY = 65534


def raw(daemon: Daemon, method: str, path: str, data: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """An API call with a raw body: (status, JSON body)."""
    req = urllib.request.Request(daemon.url + "/api/v1" + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def item_path(dataset: str, key: str) -> str:
    return f"/datasets/{quote(dataset, safe='')}/items/{quote(key, safe='')}"


def gauges(daemon: Daemon, name: str) -> dict[str, float]:
    """One per-dataset gauge from ``/metrics``: dataset -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(daemon.get("/metrics").text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["dataset"]] = s.value
    return out


def test_a_read_only_identity_catalogues_and_refuses_writes_up_front(tmp_path: Path, seaweedfs: S3Emulator) -> None:
    assert seaweedfs.readonly is not None
    bucket = seaweedfs.new_bucket()
    seaweedfs.client().put_object(Bucket=bucket, Key=f"{PREFIX}photo.jpg", Body=b"jpeg bytes")
    seaweedfs.client().put_object(Bucket=bucket, Key=f"{PREFIX}doc/readme.txt", Body=b"hello")
    key_id, secret = seaweedfs.readonly
    driver = {"url": f"s3://{bucket}/{PREFIX}", "integration": "reader", "endpoint_url": seaweedfs.endpoint_url,
              "region": REGION}  # fmt: skip
    cfg = write_config(
        tmp_path,
        {"ro": driver, "ro_deleting": {**driver, "allow_delete": True}},
        {
            "writable": {"driver": "ro"},
            "readonly": {"driver": "ro", "read_only": True},
            "deleting": {"driver": "ro_deleting"},
        },
        integrations={"reader": {"kind": "aws", "access_key_id": key_id, "secret_access_key": secret}},
    )
    with Daemon(cfg) as daemon:
        ready = daemon.wait_ready(timeout=30).body
        assert ready["status"] == "ready"
        detail = ready["detail"]
        assert detail["readonly"]["downstream"] == "available"
        assert detail["writable"]["downstream"] == "unavailable", (detail, daemon.log)
        assert "put: permission denied" in detail["writable"]["downstream_reason"]
        assert detail["deleting"]["downstream"] == "unavailable"
        # every dataset is catalogued, the writable ones too
        for name in ("writable", "readonly", "deleting"):
            got = poll(lambda n=name: items(cfg, n) if len(items(cfg, n)) == 2 else None, what=f"{name} synced")
            assert sorted(i["key"] for i in got) == ["doc/readme.txt", "photo.jpg"]

        # A write is refused up front with a 403 saying storage denied it; nothing reaches storage.
        status, body = raw(daemon, "PUT", item_path("writable", "new.txt"), b"never stored")
        assert status == 403, body
        assert body["error"]["code"] == "storage_denied_writes"
        assert "storage denied writes" in body["error"]["message"]
        assert "put" in body["error"]["message"]
        # a delete that would reach storage (allow_delete) is refused the same way
        status, body = raw(daemon, "DELETE", item_path("deleting", "photo.jpg"))
        assert status == 403 and body["error"]["code"] == "storage_denied_writes", body
        # without allow_delete, a delete is a tombstone: catalog only, so it still works
        status, body = raw(daemon, "DELETE", item_path("writable", "photo.jpg"))
        assert status == 200 and body["result"] == "tombstoned", body
        # the read-only dataset refuses as it always did
        status, body = raw(daemon, "PUT", item_path("readonly", "new.txt"), b"x")
        assert status == 403 and body["error"]["code"] == "read_only", body
        keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert sorted(keys) == [f"{PREFIX}doc/readme.txt", f"{PREFIX}photo.jpg"]
        ops = daemon.api("GET", "/ops").body
        assert ops["ops"] == [], "a refused write never became an op"

        # status (through the daemon), /datasets and /metrics say the same
        proc = cli(cfg, "status", "--json")
        rows = {r["dataset"]: r for r in one_json(proc)["datasets"]}
        assert rows["writable"]["ready"] is True and rows["writable"]["downstream"] == "unavailable"
        assert rows["readonly"]["downstream"] == "available"
        human = cli(cfg, "status")
        assert human.returncode == 0, describe(human)
        assert "downstream unavailable: put: permission denied" in human.stdout
        assert gauges(daemon, "bucketsync_downstream_available") == {"writable": 0, "readonly": 1, "deleting": 0}
        assert gauges(daemon, "bucketsync_dataset_ready") == {"writable": 1, "readonly": 1, "deleting": 1}
        refusals = [r for r in daemon.log_records() if r.get("event") == "refused by the gate"]
        assert {r["reason"] for r in refusals} == {"storage_denied_writes", "read_only"}
        assert not [r for r in daemon.log_records() if r.get("level") == "error"], daemon.log


def test_check_names_what_the_driver_needs(tmp_path: Path, seaweedfs: S3Emulator) -> None:
    assert seaweedfs.readonly is not None
    bucket = seaweedfs.new_bucket()
    seaweedfs.client().put_object(Bucket=bucket, Key=f"{PREFIX}a.txt", Body=b"a")
    key_id, secret = seaweedfs.readonly
    driver = {"url": f"s3://{bucket}/{PREFIX}", "integration": "reader", "endpoint_url": seaweedfs.endpoint_url,
              "region": REGION}  # fmt: skip
    cfg = write_config(
        tmp_path,
        {"for_reading": driver, "for_writing": driver, "missing": {**driver, "url": "s3://bs-nope-nope/x/"}},
        {"catalog": {"driver": "for_reading", "read_only": True}, "inbox": {"driver": "for_writing"}},
        integrations={"reader": {"kind": "aws", "access_key_id": key_id, "secret_access_key": secret}},
    )
    ok = cli(cfg, "check", "for_reading")
    assert ok.returncode == 0, describe(ok)
    lines = ok.stdout.splitlines()
    assert lines[:4] == [
        "list    ok",
        "put     not required (the dataset is read-only)",
        "get     ok",
        "delete  not required (allow_delete is off: deletes through bucketsync make tombstones)",
    ]
    assert "all required permissions present (list, get)" in ok.stdout

    denied = cli(cfg, "check", "for_writing", "--json")
    assert denied.returncode == 1, describe(denied)
    out = one_json(denied)
    assert out["upstream_ok"] is True and out["downstream_ok"] is False
    assert out["permissions"]["put"]["status"] == "denied"
    assert out["permissions"]["delete"] == {
        "ok": True, "status": "not_required", "required": False,
        "error": "allow_delete is off: deletes through bucketsync make tombstones",
    }  # fmt: skip

    missing = cli(cfg, "check", "missing")
    assert missing.returncode == 1
    assert "list    bucket or folder not found" in missing.stdout
    assert "cannot be synced: list: bucket or folder not found" in missing.stderr
    assert "lacks permission" not in missing.stdout + missing.stderr


# ---------------------------------------------------------------------- a real non-root uid


class NobodyDaemon(Daemon):
    """The daemon run as uid/gid 65534 with no supplementary groups."""

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> Daemon:
        assert self.config is not None
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                *CLI, "-c", os.fspath(self.config), "run"]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=clean_env(self.env), cwd=self.cwd, start_new_session=True,
            )  # fmt: skip
        _STARTED.append(self.proc)
        if wait:
            self.wait_healthy(timeout)
        return self


@pytest.fixture
def nobody_home(tmp_path: Path) -> Path:
    """A folder uid 65534 can reach (tmp_path's parents may be private to root)."""
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="bucketsync-nobody-", dir="/tmp"))
    home.chmod(0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_a_root_owned_folder_under_a_non_root_uid(nobody_home: Path) -> None:
    assert os.geteuid() == 0, "this test sets up root-owned files for an unprivileged daemon"
    data = nobody_home / "data"  # root's, 0755: uid 65534 may list and read, not write
    write_files(data, {"a.txt": "a", "sub/b.txt": "bb"})
    state = nobody_home / "state"  # the daemon's own: ledger and staging
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    cfg = write_config(
        nobody_home,
        {"folder": {"url": data.as_uri()}},
        {"writable": {"driver": "folder"}, "readonly": {"driver": "folder", "read_only": True}},
        agent={"ledger": str(state / "ledger.db"), "reprobe_interval": "300ms"},
    )
    cfg.chmod(0o644)
    with NobodyDaemon(cfg) as daemon:
        ready = daemon.wait_ready(timeout=30).body
        assert ready["detail"]["readonly"]["downstream"] == "available"
        assert ready["detail"]["writable"]["downstream"] == "unavailable"
        assert "put: permission denied" in ready["detail"]["writable"]["downstream_reason"]
        for name in ("writable", "readonly"):
            poll(lambda n=name: len(items(cfg, n)) == 2, what=f"{name} synced as uid 65534")
        status, body = raw(daemon, "PUT", item_path("writable", "new.txt"), b"x")
        assert status == 403 and body["error"]["code"] == "storage_denied_writes", body
        assert not (data / "new.txt").exists()
        assert not (data / ".bucketsync").exists(), "the probe could not, and did not, write"
        assert gauges(daemon, "bucketsync_downstream_available") == {"writable": 0, "readonly": 1}
        pid_uid = os.stat(f"/proc/{daemon.pid}").st_uid
        assert pid_uid == NOBODY, "the daemon really runs unprivileged"

        # Writes granted later: the next probe finds them, and writes go through.
        os.chown(data, NOBODY, NOBODY)
        poll(
            lambda: daemon.get("/readyz").body["detail"]["writable"]["downstream"] == "available",
            what="downstream available after a re-probe",
        )
        status, body = raw(daemon, "PUT", item_path("writable", "new.txt"), b"now it works")
        assert status == 201, body
        assert (data / "new.txt").read_bytes() == b"now it works"
        assert gauges(daemon, "bucketsync_downstream_available") == {"writable": 1, "readonly": 1}
