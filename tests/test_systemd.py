"""The shipped systemd unit: it verifies, it is hardened to "OK", and what it promises holds.

``systemd-analyze`` must exist (``make test`` installs Debian's ``systemd`` package when it is
missing): a missing tool fails here instead of silently skipping.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bucketsync.config import load_settings
from e2e import Daemon, cli, describe, local_driver, poll, write_config, write_files

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "bucketsync.service"
MAX_EXPOSURE = 2.0


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: `make test` installs it (apt-get install systemd)"
    return tool


def _unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart= exists: point it at this checkout's bucketsync, nothing else changed.
    exe = Path(sys.executable).parent / "bucketsync"
    assert exe.exists(), exe
    unit = tmp_path / "bucketsync.service"
    unit.write_text(UNIT.read_text().replace("/opt/bucketsync/venv/bin/bucketsync", str(exe)))
    proc = subprocess.run([_analyze(), "verify", str(unit)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_unit_security_exposure_is_ok(tmp_path: Path) -> None:
    unit = tmp_path / "bucketsync.service"
    shutil.copy(UNIT, unit)
    proc = subprocess.run(
        [_analyze(), "security", "--offline=true", "--no-pager", str(unit)], capture_output=True, text=True, check=False
    )
    text = proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for bucketsync\.service: (\d+\.\d+) (\w+)", text)
    assert m, text
    assert float(m.group(1)) <= MAX_EXPOSURE, text
    assert m.group(2) == "OK", text


def test_unit_is_notify_with_watchdog_reload_credentials_and_the_asked_hardening() -> None:
    s = _unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] and s["NotifyAccess"] == ["main"]
    assert any(v.startswith("api_token:") for v in s["LoadCredential"])
    for key, want in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "NoNewPrivileges": "yes",
        "UMask": "0077",
    }.items():
        assert s.get(key, [None])[0] == want, key
    assert "@system-service" in s["SystemCallFilter"]
    for directory in ("StateDirectory", "CacheDirectory", "LogsDirectory"):
        assert s[directory] == ["bucketsync"]
    # The unit's paths match what it sets: the ledger in the state directory.
    env = dict(v.split("=", 1) for v in s["Environment"])
    assert env["BUCKETSYNC_AGENT__LEDGER"].startswith("/var/lib/bucketsync/")
    assert s["WorkingDirectory"] == ["/var/lib/bucketsync"]


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def _deny_write_execute() -> None:
    """In the child before exec: the kernel's MemoryDenyWriteExecute (prctl PR_SET_MDWE, Linux 6.3+),
    which systemd's MemoryDenyWriteExecute= also implements with seccomp."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed")


def _mdwe_supported() -> bool:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)",
        ],
        preexec_fn=_deny_write_execute,
        capture_output=True,
        check=False,
    )
    return proc.returncode != 0  # a writable+executable mapping must be refused


@pytest.mark.slow
def test_memory_deny_write_execute_holds_for_the_agent(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes is in the unit because the agent works without W+X memory:
    run it under the kernel's equivalent and exercise the HTTP server, a sync, the API and the CLI."""
    assert _mdwe_supported(), "this kernel does not enforce PR_SET_MDWE (needs Linux 6.3+)"
    data = tmp_path / "data"
    write_files(data, {"a.jpg": "a", "b/c.txt": "c"})
    cfg = write_config(tmp_path, {"local": local_driver(data)}, {"photos": {"driver": "local"}})
    with Daemon(cfg, preexec_fn=_deny_write_execute) as daemon:
        daemon.wait_ready()
        poll(lambda: daemon.api("GET", "/datasets/photos/items").body.get("items"), what="items")
        assert daemon.get("/metrics").status == 200

        # The poll loop (1 s interval) may be mid-run: a 409 run_in_progress means try again.
        def synced() -> dict[str, object] | None:
            r = daemon.api("POST", "/datasets/photos/sync", params={"wait": "true"})
            return r.body if r.status == 200 else None

        assert poll(synced, what="a sync through the API")["status"] == "ok"
        proc = cli(cfg, "status", "--json")
        assert proc.returncode == 0, describe(proc)
        assert daemon.stop() == 0, daemon.log
    assert "Traceback" not in daemon.log, daemon.log


def test_bare_credential_names_resolve_in_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_token").write_text("tok-from-systemd\n")
    (creds / "aws_secret").write_text("s3cr3t")
    cfg = write_config(
        tmp_path,
        {"s3": {"url": "s3://bucket/p/", "integration": "aws", "endpoint_url": "http://127.0.0.1:1"}},
        {"d": {"driver": "s3"}},
        {"aws": {"kind": "aws", "access_key_id": "AKIA", "secret_access_key_file": "aws_secret"}},
        agent={"api_token_file": "api_token"},
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings(cfg)
    assert settings.agent.token() == "tok-from-systemd"
    assert settings.integrations["aws"].secret("secret_access_key") == "s3cr3t"
    assert settings.agent.api_token_file == creds / "api_token"
    # Paths with a folder are paths, credentials directory or not.
    other = tmp_path / "elsewhere"
    other.write_text("x")
    monkeypatch.setenv("BUCKETSYNC_AGENT__API_TOKEN_FILE", str(other))
    assert load_settings(cfg).agent.token() == "x"
    # A missing credential names the file it looked for.
    monkeypatch.setenv("BUCKETSYNC_AGENT__API_TOKEN_FILE", "nope")
    with pytest.raises(Exception, match=re.escape(str(creds / "nope"))):
        load_settings(cfg).agent.token()
