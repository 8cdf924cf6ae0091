"""sd_notify: the Notifier against real bound sockets, and a real daemon under a real NOTIFY_SOCKET.

The daemon tests bind the socket systemd would (a path, or an abstract name), start
``bucketsync run`` with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` set, and read what it
sends: READY=1 after /healthz answers and the first probes, STATUS= lines, WATCHDOG=1
pings, RELOADING=1 then READY=1 around a SIGHUP, STOPPING=1 at the end, in that order.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bucketsync.daemon.notify import Notifier, one_line, watchdog_interval
from e2e import Daemon, local_driver, poll, write_config, write_files


class Listener:
    """A bound AF_UNIX datagram socket, as systemd holds one; collects what arrives, in order."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append(fields)

    def states(self) -> list[str]:
        """The life-cycle messages in order (READY, RELOADING, STOPPING), without pings and status."""
        return [k for m in list(self.messages) for k in m if k in ("READY", "RELOADING", "STOPPING")]

    def with_key(self, key: str) -> list[dict[str, str]]:
        return [m for m in list(self.messages) if key in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[str, Listener]]:
    path = str(tmp_path / "notify.sock")
    listener = Listener(path)
    yield path, listener
    listener.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, Listener]]:
    name = f"bucketsync-test-{secrets.token_hex(6)}"
    listener = Listener(b"\0" + name.encode())
    yield "@" + name, listener
    listener.close()


# -- the Notifier on its own ----------------------------------------------------------


def test_notifier_sends_datagrams_to_a_path_socket(path_listener: tuple[str, Listener]) -> None:
    address, listener = path_listener
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("2 datasets,\nall ready")
    assert n.ping()
    assert n.stopping()
    poll(lambda: len(listener.messages) == 3, timeout=5, what="3 datagrams")
    assert listener.messages == [
        {"READY": "1", "STATUS": "2 datasets, all ready"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1"},
    ]
    n.close()


def test_notifier_speaks_to_abstract_namespace_sockets(abstract_listener: tuple[str, Listener]) -> None:
    address, listener = abstract_listener
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.reloading()
    poll(lambda: listener.messages, timeout=5, what="a datagram")
    msg = listener.messages[0]
    assert msg["RELOADING"] == "1" and msg["MONOTONIC_USEC"].isdigit()
    n.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog is None
    assert n.ready() is False and n.ping() is False
    # A socket that is gone (systemd restarted) is logged, never raised.
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert gone.status("x") is False


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_us() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None
    assert one_line("a\nb\r\n  c") == "a b c"


# -- a real daemon ------------------------------------------------------------------------


def _daemon_config(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_files(data, {"a.txt": "a", "b/c.txt": "c"})
    return write_config(tmp_path, {"local": local_driver(data)}, {"photos": {"driver": "local", "interval": "1s"}})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_daemon_lifecycle_messages_in_order(
    tmp_path: Path, kind: str, path_listener: tuple[str, Listener], abstract_listener: tuple[str, Listener]
) -> None:
    address, listener = path_listener if kind == "path" else abstract_listener
    cfg = _daemon_config(tmp_path)
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}  # pings every 0.2 s
    with Daemon(cfg, env=env) as daemon:
        poll(lambda: "READY" in listener.states(), what="READY=1")
        # READY comes after the HTTP server is up and the first probe has answered.
        assert daemon.get("/healthz").status == 200
        assert daemon.get("/readyz").status == 200
        ready = listener.with_key("READY")[0]
        assert ready["STATUS"].startswith("1 datasets, 1 ready"), ready
        poll(lambda: len(listener.with_key("WATCHDOG")) >= 3, what="three watchdog pings")
        assert all(m == {"WATCHDOG": "1"} for m in listener.with_key("WATCHDOG"))

        daemon.send(signal.SIGHUP)
        poll(lambda: listener.states().count("READY") == 2, what="READY=1 after the reload")
        assert daemon.running, daemon.log
        assert daemon.events("configuration reloaded"), daemon.log

        assert daemon.stop(signal.SIGTERM) == 0, daemon.log
    assert listener.states() == ["READY", "RELOADING", "READY", "STOPPING"]
    # STATUS lines are one line each and say what runs.
    statuses = [m["STATUS"] for m in listener.with_key("STATUS")]
    assert statuses and all("\n" not in s and "datasets" in s for s in statuses)
    assert not [r for r in daemon.log_records() if r.get("event") == "sd_notify failed"]


@pytest.mark.slow
def test_status_line_reports_last_runs_and_backlog(tmp_path: Path, path_listener: tuple[str, Listener]) -> None:
    address, listener = path_listener
    cfg = _daemon_config(tmp_path)
    with Daemon(cfg, env={"NOTIFY_SOCKET": address}) as daemon:
        poll(lambda: "READY" in listener.states(), what="READY=1")
        poll(lambda: daemon.api("GET", "/datasets/photos/runs").body["runs"], what="a first run")
        # A reload re-sends READY with a fresh STATUS: the run is in it.
        assert daemon.api("POST", "/reload").status == 200
        poll(lambda: listener.states().count("READY") == 2, what="READY=1 after the reload")
        status = listener.with_key("READY")[-1]["STATUS"]
        # One dataset: its last run is either done (ok) or the next one is under way.
        assert "last runs: ok 1;" in status or "last runs: running 1;" in status, status
        assert status.endswith("outbox backlog 0"), status
