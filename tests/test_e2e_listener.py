"""The API listener end to end: tokens that are really tokens, and TLS (issue 13, points 1-3).

Real ``bucketsync run`` daemons, real HTTPS with a certificate made here, and the real CLI
as the daemon's client.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from certs import self_signed
from e2e import Daemon, cli, describe, local_driver, read_config, write_config, write_files
from emulators import free_port

TOKEN = "tok-9b2f-LISTENER-SECRET-77aa"


def config(tmp_path: Path, **agent: object) -> Path:
    folder = tmp_path / "storage"
    write_files(folder, {"a.txt": "a", "sub/b.txt": "b"})
    return write_config(
        tmp_path, {"main": local_driver(folder)}, {"docs": {"driver": "main", "sync": "manual"}}, agent=agent
    )


def assert_refused(cfg: Path, *expected: str) -> str:
    """``run`` exits 2 with a message naming ``expected``, and nothing listens."""
    port = int(read_config(cfg)["agent"]["listen"].rpartition(":")[2])
    proc = cli(cfg, "run", timeout=30)
    assert proc.returncode == 2, describe(proc)
    for text in expected:
        assert text in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    return proc.stderr


# ---------------------------------------------------------------------- point 1: empty tokens


@pytest.mark.parametrize("token", ["", " ", "\t \n"])
def test_an_empty_or_blank_token_is_no_token_beyond_loopback(tmp_path: Path, token: str) -> None:
    cfg = config(tmp_path, listen=f"0.0.0.0:{free_port()}", api_token=token)
    err = assert_refused(cfg, "agent.api_token", "empty")
    assert not (tmp_path / "var" / "ledger.db").exists(), "a refused start leaves no ledger"
    assert "agent.listen" in err


@pytest.mark.parametrize("content", ["", "   \n", "\n\n"])
def test_an_empty_token_file_is_no_token_beyond_loopback(tmp_path: Path, content: str) -> None:
    (tmp_path / "token").write_text(content)
    cfg = config(tmp_path, listen=f"0.0.0.0:{free_port()}", api_token_file=str(tmp_path / "token"))
    assert_refused(cfg, "agent.api_token_file", "empty")


def test_an_empty_token_on_loopback_does_not_lock_out_or_open_with_empty_bearer(tmp_path: Path) -> None:
    """On loopback an empty token means no auth, as documented, never a token that equals ''."""
    cfg = config(tmp_path, api_token="  ")
    with Daemon(cfg) as daemon:
        assert daemon.api("GET", "/datasets").status == 200
        assert daemon.api("GET", "/datasets", headers={"Authorization": "Bearer "}).status == 200


# ---------------------------------------------------------------------- point 3: TLS


def test_tls_listener_serves_https_and_the_cli_talks_to_it(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    cfg = config(tmp_path, listen=f"127.0.0.1:{free_port()}", api_token=TOKEN, tls_cert_file=cert, tls_key_file=key)
    with Daemon(cfg) as daemon:
        assert daemon.url.startswith("https://")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert daemon.get("/healthz").status == 200
        assert daemon.api("POST", "/datasets/docs/sync", params={"wait": "true"}, headers=auth).body["added"] == 2
        assert [d["dataset"] for d in daemon.api("GET", "/datasets", headers=auth).body["datasets"]] == ["docs"]
        # A client that does not trust the certificate is refused by TLS, not served.
        with pytest.raises(urllib.error.URLError) as exc:
            urllib.request.urlopen(daemon.url + "/healthz", timeout=5, context=ssl.create_default_context())
        assert isinstance(exc.value.reason, ssl.SSLCertVerificationError)
        # Plain HTTP on the TLS port gets no answer that a client could take for the API.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(daemon.url.replace("https://", "http://") + "/healthz", timeout=5).read()
        # The CLI reads the same config and talks HTTPS to the daemon.
        proc = cli(cfg, "sync", "docs", "--json")
        assert proc.returncode == 0, describe(proc) + daemon.log
        assert json.loads(proc.stdout)["status"] == "ok"
        proc = cli(cfg, "put", "docs", str(cert), "--key", "uploaded/cert.pem")
        assert proc.returncode == 0, describe(proc)
        assert (tmp_path / "storage" / "uploaded" / "cert.pem").read_bytes() == cert.read_bytes()
        started = [r for r in daemon.log_records() if r.get("event") == "agent started"]
        assert started and started[0]["tls"] is True
        assert not [r for r in daemon.log_records() if "plain HTTP" in str(r.get("event"))]


def test_a_token_over_plain_http_beyond_loopback_warns_loudly(tmp_path: Path) -> None:
    cfg = config(tmp_path, listen=f"0.0.0.0:{free_port()}", api_token=TOKEN)
    with Daemon(cfg) as daemon:
        warnings = [r for r in daemon.log_records() if "plain HTTP" in str(r.get("event"))]
        assert len(warnings) == 1 and warnings[0]["level"] == "warning", daemon.log
        assert "agent.tls_cert_file" in warnings[0]["event"]
        assert TOKEN not in daemon.log


def test_tls_config_errors_name_the_field(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    listen = f"127.0.0.1:{free_port()}"
    assert_refused(config(tmp_path, listen=listen, tls_cert_file=cert), "tls_cert_file", "tls_key_file", "together")
    assert_refused(config(tmp_path, listen=listen, tls_key_file=key), "tls_cert_file", "tls_key_file", "together")
    missing = tmp_path / "nope.pem"
    assert_refused(
        config(tmp_path, listen=listen, tls_cert_file=missing, tls_key_file=key), "agent.tls_cert_file", "nope.pem"
    )
    assert_refused(
        config(tmp_path, listen=listen, tls_cert_file=cert, tls_key_file=missing), "agent.tls_key_file", "nope.pem"
    )
    # Swapped: readable, but not a certificate and its key.
    assert_refused(config(tmp_path, listen=listen, tls_cert_file=key, tls_key_file=cert), "agent.tls_cert_file")
