"""The listener's front door (server/front.py): /healthz and /metrics are answered by a
thread, so a busy event loop cannot delay a liveness probe; every other request reaches
aiohttp on the loop unchanged, keep-alive included."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from pathlib import Path

from aiohttp import web

from bucketsync.server import front
from e2e import Daemon, local_driver, write_config, write_files


def test_fast_path_takes_only_get_or_head_of_the_two_paths() -> None:
    assert front.fast_path(b"GET /healthz HTTP/1.1") == b"/healthz"
    assert front.fast_path(b"HEAD /metrics?x=1 HTTP/1.0") == b"/metrics"
    for line in (
        b"POST /healthz HTTP/1.1",
        b"GET /healthz/ HTTP/1.1",
        b"GET /readyz HTTP/1.1",
        b"GET /api/v1/datasets HTTP/1.1",
        b"GET /healthz",
        b"GET /healthz HTTP/2",
        b"",
    ):
        assert front.fast_path(line) is None, line


def test_a_loop_silent_past_the_stall_bound_is_not_alive() -> None:
    beat = front.Heartbeat()
    assert beat.liveness() == (200, {"status": "ok"})
    beat.at = time.monotonic() - front.STALL_S - 1
    status, doc = beat.liveness()
    assert status == 503 and doc["status"] == "stalled" and doc["loop_silent_seconds"] > front.STALL_S


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


async def test_healthz_is_answered_while_the_loop_is_blocked() -> None:
    """The loop is held by CPU work (time.sleep on the loop); a probe sent meanwhile is
    answered before the work ends, and an API request waits for the loop as it must."""
    loop = asyncio.get_running_loop()
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": "loop"})

    app.router.add_get("/api/v1/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = front.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    door = front.Front(sock, loop, runner.server, front.Heartbeat())  # type: ignore[arg-type]
    door.start()
    blocked = threading.Event()
    answers: list[tuple[str, bool]] = []  # (path, was the loop still blocked when the answer came)

    def probe(path: str) -> None:
        blocked.wait()
        status, _, _ = _get(port, path)
        answers.append((f"{path} {status}", blocked.is_set()))

    threads = [threading.Thread(target=probe, args=(p,)) for p in ("/healthz", "/metrics", "/api/v1/hello")]
    try:
        for t in threads:
            t.start()
        blocked.set()
        deadline = time.monotonic() + 10
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # noqa: ASYNC251 - the point: the loop is held until both fast paths answered
        blocked.clear()
        await asyncio.to_thread(lambda: [t.join(10) for t in threads])
    finally:
        await asyncio.to_thread(door.close)
        await runner.cleanup()
    assert sorted(answers) == [("/api/v1/hello 200", False), ("/healthz 200", True), ("/metrics 200", True)]


def test_a_daemon_behind_the_front_door(tmp_path: Path) -> None:
    write_files(tmp_path / "data", {"a.jpg": "1"})
    cfg = write_config(tmp_path, {"local": local_driver(tmp_path / "data")}, {"photos": {"driver": "local"}})
    with Daemon(cfg) as daemon:
        port = int(daemon.url.rsplit(":", 1)[1])
        status, body, headers = _get(port, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert headers["content-type"].startswith("application/json")
        status, body, headers = _get(port, "/healthz", "HEAD")
        assert (status, body, headers["content-length"]) == (200, b"", str(len(b'{"status": "ok"}')))
        status, body, headers = _get(port, "/metrics")
        assert status == 200 and b"bucketsync_build_info" in body
        assert headers["content-type"].startswith("text/plain; version=0.0.4")

        # Everything else is aiohttp's, on one kept-alive connection.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(3):
                conn.request("GET", "/api/v1/datasets")
                resp = conn.getresponse()
                assert resp.status == 200 and "photos" in resp.read().decode()
            conn.request("GET", "/readyz")
            assert conn.getresponse().read()
        finally:
            conn.close()

        # A request line that arrives in pieces, and a client silent past the peek deadline.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /heal")
            time.sleep(0.2)
            s.sendall(b"thz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            time.sleep(front.PEEK_DEADLINE_S + 0.5)
            s.sendall(b"GET /api/v1/datasets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
