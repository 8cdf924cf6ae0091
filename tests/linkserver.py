"""An https server on loopback for the link fetcher's tests: real TLS (a certificate made by
certs.py), served by aiohttp on a thread of its own so both async tests and daemon tests
(whose agent fetches from it) can use it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import TracebackType

from aiohttp import web

from bucketsync.config import AgentConfig
from bucketsync.server.tls import server_context
from certs import self_signed

BODY = b"the linked item's bytes\n" * 100
#: the name the fetch tests resolve (through their own resolver) to 127.0.0.1
NAME = "links.test"


class LinkServer:
    """Routes: ``/files/NAME`` (BODY), ``/big`` (Content-Length past the tests' cap),
    ``/chunked-big`` (no length, too many bytes), ``/slow`` (never answers), ``/to?url=U``
    (302 to U), ``/loop`` (302 to itself), ``/missing`` (404)."""

    def __init__(self, folder: Path) -> None:
        self.cert, self.key = self_signed(folder, ("localhost", NAME), stem="links-")
        self.port = 0
        self.hits: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-server", daemon=True)
        self._runner: web.AppRunner | None = None
        self._hang = asyncio.Event()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    async def _files(self, request: web.Request) -> web.Response:
        self.hits.append(request.host + request.path)  # the Host header: the URL's name, not the address
        return web.Response(body=BODY, content_type="text/plain")

    async def _big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000)

    async def _chunked_big(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(5):
            await resp.write(b"y" * 1000)
        await resp.write_eof()
        return resp

    async def _slow(self, request: web.Request) -> web.Response:
        await self._hang.wait()  # never set while the test runs: the fetcher's time cap ends it
        return web.Response(body=b"late")

    async def _to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])

    async def _loop_route(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/files/{name}", self._files)
        app.router.add_get("/big", self._big)
        app.router.add_get("/chunked-big", self._chunked_big)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/to", self._to)
        app.router.add_get("/loop", self._loop_route)
        ctx = server_context(AgentConfig(tls_cert_file=self.cert, tls_key_file=self.key))  # as the agent serves
        assert ctx is not None
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _stop(self) -> None:
        self._hang.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def __enter__(self) -> LinkServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
