"""``bucketsync doctor``: a real CLI run against real configs, storage, ports and clocks."""

from __future__ import annotations

import email.utils
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from e2e import Daemon, cli, describe, local_driver, write_config, write_files


def doctor(cfg: Path | None, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    proc = cli(cfg, "doctor", "--json", *args, env=env)
    return proc.returncode, json.loads(proc.stdout)


def by_check(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in report["checks"]}


def test_a_good_local_config_passes_every_check(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a"})
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"photos": {"driver": "local"}})
    code, report = doctor(cfg)
    assert code == 0 and report["ok"], report
    checks = by_check(report)
    assert set(checks) == {"config", "driver local", "clock local", "ledger", "listen"}
    assert "does not exist yet" in checks["ledger"]["detail"]
    assert not (tmp_path / "var" / "ledger.db").exists(), "doctor must not create the ledger"
    # The human report says the same in lines.
    proc = cli(cfg, "doctor")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("all checks passed"), describe(proc)


def test_a_broken_config_is_reported_not_crashed_on(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[datasets.photos]\ndriver = "nope"\ninterval = "5x"\n')
    code, report = doctor(cfg)
    assert code == 1
    (check,) = report["checks"]
    assert check["check"] == "config" and check["status"] == "FAIL"
    assert "datasets.photos.interval" in check["detail"]


def test_missing_permissions_busy_port_and_unwritable_ledger_fail(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"  # the driver root does not exist: list fails
    ledger_dir = tmp_path / "a-file"  # the ledger's folder cannot be made: a file is in the way
    ledger_dir.write_text("not a folder")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(
            tmp_path,
            {"local": local_driver(missing)},
            {"photos": {"driver": "local"}},
            agent={"listen": f"127.0.0.1:{port}", "ledger": str(ledger_dir / "sub" / "l.db")},
        )
        code, report = doctor(cfg)
    assert code == 1
    checks = by_check(report)
    # A folder that is not there is named as such, not as a missing permission.
    assert checks["driver local"]["status"] == "FAIL"
    assert "list: bucket or folder not found" in checks["driver local"]["detail"]
    assert checks["listen"]["status"] == "FAIL" and "in use" in checks["listen"]["detail"]
    assert checks["ledger"]["status"] == "FAIL" and "not a writable folder" in checks["ledger"]["detail"]


def test_ledger_in_use_by_the_agent_is_fine_and_migrated(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.txt": "a"})
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"photos": {"driver": "local"}})
    with Daemon(cfg) as daemon:
        daemon.wait_ready()
        code, report = doctor(cfg)
        assert daemon.stop() == 0
    assert code == 0, report
    checks = by_check(report)
    assert "migrated, in use by the agent" in checks["ledger"]["detail"]
    assert "served by the agent" in checks["listen"]["detail"]


class _DateServer(BaseHTTPRequestHandler):
    skew = 0.0

    def date_time_string(self, timestamp: float | None = None) -> str:
        return email.utils.formatdate(time.time() + self.skew, usegmt=True)  # the Date header send_response adds

    def _answer(self) -> None:
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = do_PUT = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def skewed_storage() -> Iterator[str]:
    """An HTTP endpoint whose clock is an hour ahead, answering 403 to everything."""
    handler = type("Skewed", (_DateServer,), {"skew": 3600.0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_clock_skew_against_the_storage_date_header_fails(tmp_path: Path, skewed_storage: str) -> None:
    cfg = write_config(
        tmp_path,
        {"s3": {"url": "s3://bucket/p/", "endpoint_url": skewed_storage}},
        {"d": {"driver": "s3"}},
    )
    code, report = doctor(cfg, env={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert code == 1
    clock = by_check(report)["clock s3"]
    assert clock["status"] == "FAIL" and "behind" in clock["detail"], clock
    assert by_check(report)["driver s3"]["status"] == "FAIL"


def test_probe_and_clock_pass_against_a_real_s3_server(tmp_path: Path, s3_config: dict[str, Any]) -> None:
    cfg = write_config(tmp_path, {"s3": s3_config["driver"]}, {"d": {"driver": "s3"}}, s3_config["integrations"])
    code, report = doctor(cfg)
    assert code == 0, report
    checks = by_check(report)
    assert checks["driver s3"]["status"] == "ok"
    assert checks["clock s3"]["status"] == "ok" and "limit 60s" in checks["clock s3"]["detail"]
