"""The listener's front door: liveness and metrics answered off the event loop.

Sync runs and the API share one event loop, and a saturated loop delays every
request it serves, a liveness probe included: a probe that times out restarts an
agent that is merely busy. So a thread accepts the connections and peeks at each
request line without consuming it. ``GET /healthz`` and ``GET /metrics`` are
answered there, by the thread; every other connection is handed to the event loop,
whose aiohttp server reads it from its first byte as if it had accepted it.

Liveness stays honest: the loop ticks a ``Heartbeat``, and ``/healthz`` answers 503
once the loop has been silent for ``STALL_S`` (stuck, not busy). The route stays in
the API too, with the same answer, for TLS listeners: there the request line is
encrypted, so aiohttp's own listener serves everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from bucketsync import metrics

log = structlog.get_logger("bucketsync.access")

#: The loop's silence after which /healthz says it is stuck. A busy loop still ticks
#: every few hundred milliseconds; 30 s of silence is a hang, worth a restart.
STALL_S = 30.0
TICK_S = 1.0
#: A request line longer than this, or slower to arrive, goes to aiohttp, which has
#: its own limits and error answers.
PEEK_BYTES = 2048
PEEK_DEADLINE_S = 2.0
HEADERS_MAX = 32768
#: Connections being peeked at once; the rest wait in the kernel's accept queue.
PEEKERS = 4

FAST_PATHS = frozenset({b"/healthz", b"/metrics"})


class Heartbeat:
    """When the event loop last ran a tick; read from the front's threads."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)

    def liveness(self) -> tuple[int, dict[str, Any]]:
        silent = time.monotonic() - self.at
        if silent > STALL_S:
            return 503, {"status": "stalled", "loop_silent_seconds": round(silent, 1)}
        return 200, {"status": "ok"}


def fast_path(request_line: bytes) -> bytes | None:
    """The path a request line asks for, if the front answers it itself (GET or HEAD)."""
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD") or not parts[2].startswith(b"HTTP/1."):
        return None
    path = parts[1].split(b"?", 1)[0]
    return path if path in FAST_PATHS else None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, as aiohttp would open it (reuse-address, IPv4 or IPv6)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


class Front:
    """Accepts on ``sock`` in a thread; answers the fast paths, hands the rest to ``factory`` on ``loop``."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.Protocol],
        heartbeat: Heartbeat,
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._factory = factory
        self._heartbeat = heartbeat
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(PEEKERS, thread_name_prefix="http-front")
        self._thread = threading.Thread(target=self._accept, name="http-front-accept", daemon=True)
        self._adopting: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        self._sock.settimeout(0.5)  # the accept loop notices close() within this
        self._thread.start()

    def close(self) -> None:
        """Stop accepting; connections already handed to the loop are aiohttp's to close."""
        self._closed.set()
        self._thread.join()
        self._sock.close()
        self._pool.shutdown(wait=True)

    # -- the accept thread and its peekers ---------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed.is_set():
                    return
                log.warning("accept failed", error=str(exc))
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            self._pool.submit(self._route, conn)

    def _route(self, conn: socket.socket) -> None:
        try:
            path = fast_path(_peek_request_line(conn))
            if path is None:
                self._hand_over(conn)
            else:
                self._answer(conn, path)
        except Exception:
            log.debug("front: connection dropped", exc_info=True)
            conn.close()

    def _hand_over(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        conn.setblocking(False)
        try:
            self._loop.call_soon_threadsafe(self._adopt, conn)
        except RuntimeError:  # the loop is closing: nobody left to serve it
            conn.close()

    def _adopt(self, conn: socket.socket) -> None:
        """On the loop: aiohttp serves the connection from its first byte."""
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
        self._adopting.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._adopting.discard(t)
            if not t.cancelled() and t.exception() is not None:
                conn.close()

        task.add_done_callback(done)

    def _answer(self, conn: socket.socket, path: bytes) -> None:
        """Read the request's headers (so closing sends no reset), answer, close."""
        started = time.monotonic()
        head = _read_head(conn)
        if head is None:
            conn.close()
            return
        if path == b"/healthz":
            status, doc = self._heartbeat.liveness()
            body, ctype = json.dumps(doc).encode(), "application/json; charset=utf-8"
        else:
            status, body, ctype = 200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8"
        reason = "OK" if status == 200 else "Service Unavailable"
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "",
            "",
        ]
        payload = "\r\n".join(lines).encode() + (b"" if head.startswith(b"HEAD ") else body)
        conn.settimeout(PEEK_DEADLINE_S)
        remote = _peer(conn)
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
        finally:
            conn.close()
        # The same fields as aiohttp's access log (logs.AccessLog), and where it was served.
        log.debug(
            "request",
            method=head.split(b" ", 1)[0].decode(),
            path=path.decode(),
            status=status,
            bytes=len(payload),
            seconds=round(time.monotonic() - started, 4),
            remote=remote,
            front=True,
        )


def _peer(conn: socket.socket) -> str | None:
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return None


def _peek_request_line(conn: socket.socket) -> bytes:
    """The first line of the request, left unread in the socket; b"" if it does not come in time."""
    deadline = time.monotonic() + PEEK_DEADLINE_S
    seen = b""
    while b"\r\n" not in seen and len(seen) < PEEK_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b""
        conn.settimeout(remaining)
        try:
            data = conn.recv(PEEK_BYTES, socket.MSG_PEEK)
        except TimeoutError:
            return b""
        if not data:
            return b""
        if len(data) == len(seen):
            time.sleep(0.005)  # a partial line: peeking again returns at once until more arrives
        seen = data
    return seen.split(b"\r\n", 1)[0] if b"\r\n" in seen else b""


def _read_head(conn: socket.socket) -> bytes | None:
    """Consume the request up to the end of its headers; None if it never ends in time."""
    deadline = time.monotonic() + PEEK_DEADLINE_S
    data = b""
    while b"\r\n\r\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or len(data) > HEADERS_MAX:
            return None
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            return None
        if not chunk:
            return None
        data += chunk
    return data
