"""Real storage servers for the tests: started by the suite itself on 127.0.0.1.

Each cloud has a module here with session-scoped fixtures. A missing emulator is a
test *failure* (``EmulatorMissing``), never a skip: CI must run all of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class EmulatorMissing(RuntimeError):
    """An emulator binary is not installed; the message says how to install it."""


#: Under pytest-xdist each worker takes ports from its own block below Linux's ephemeral range
#: (32768+), so two workers never hand out the same port, nor one the kernel gives a client.
_PORT_BLOCK = 1500
_PORT_BASE = 20000
_next_port: list[int] = []


def free_port() -> int:
    """A port nothing listens on now: the kernel's pick, or, under xdist, the worker's block."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port
    first = _PORT_BASE + (int(worker[2:]) % 8) * _PORT_BLOCK
    if not _next_port:
        _next_port.append(first)
    for _ in range(_PORT_BLOCK):
        port = _next_port[0]
        _next_port[0] = first + (port + 1 - first) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + _PORT_BLOCK - 1} for xdist worker {worker}")


def venv_bin(name: str) -> str:
    """A console script installed next to the running interpreter (e.g. ``weed``)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise EmulatorMissing(f"{name!r} is not installed; run the README's test command (make test)")
    return found


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def start(
    argv: Sequence[str], port: int, *, env: dict[str, str] | None = None, what: str, log: Path
) -> subprocess.Popen[bytes]:
    """Start a server in its own process group, logging to ``log``, and wait for its port."""
    with open(log, "wb") as out:  # the child keeps its own handle
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        wait_for_port(port, proc, what=what)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; log: {log.read_text(errors='replace')[-2000:]}") from None
    return proc


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL after ``grace`` (some servers ignore TERM)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass
