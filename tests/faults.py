"""A fault-injecting HTTP/1.1 proxy for tests and benchmarks: real TCP, real resets.

``FaultProxy`` listens on 127.0.0.1 in front of one emulator port. It reads each
request off the client connection (head and body, ``Content-Length`` or chunked),
decides what to do with it, and then:

- ``PASS``: forwards it and relays the response;
- ``LOST_REPLY``: forwards it, reads the *whole* response (so the server has
  done the work), then resets the client connection (RST, not FIN) without
  relaying a byte: the write happened, the client never hears of it;
- ``DROP``: resets the client connection before anything is forwarded;
- ``ERROR``: answers ``503 Service Unavailable`` itself, forwarding nothing;
- ``STALL``: forwards it, relays the response head and half the body, then
  goes silent for ``stall`` seconds before relaying the rest.

What happens to a request comes from explicit ``Rule`` s (first match with
uses left wins) and otherwise from a seeded random schedule (``rate`` and the
``actions`` to pick from, for the ``methods`` given), so a failing run can be
replayed with its seed. ``stats`` counts what was done, per action.

It speaks just enough HTTP for the SDKs we use: keep-alive, ``Expect:
100-continue`` (answered by the proxy itself), chunked bodies both ways, HEAD
and bodiless statuses. Usable from pytest (``async with FaultProxy(...)``) and
from scripts under bench/.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

HEAD_LIMIT = 64 * 1024


class Action(enum.StrEnum):
    PASS = "pass"
    LOST_REPLY = "lost_reply"
    DROP = "drop"
    ERROR = "error"
    STALL = "stall"


@dataclass
class Request:
    """One request as the proxy read it (the body is kept whole: tests send small ones)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass
class Rule:
    """Do ``action`` to requests matching ``method`` (any if None) and containing ``path`` in their
    target or body (any if None), ``times`` times (forever if None); ``stall`` is seconds for STALL."""

    action: Action
    method: str | None = None
    path: str | None = None
    times: int | None = 1
    stall: float = 65.0
    matches: Callable[[Request], bool] | None = None
    used: int = 0

    def applies(self, req: Request) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        if self.method is not None and req.method != self.method:
            return False
        if self.path is not None and self.path not in req.target and self.path.encode() not in req.body:
            return False  # GCS names the object in a multipart body, not in the URL
        return self.matches is None or self.matches(req)


@dataclass
class Decision:
    action: Action
    stall: float = 0.0


class _Closed(Exception):
    """The client (or the server) hung up between requests."""


@dataclass
class FaultProxy:
    upstream_port: int
    upstream_host: str = "127.0.0.1"
    rules: list[Rule] = field(default_factory=list)
    rate: float = 0.0
    actions: tuple[Action, ...] = (Action.LOST_REPLY,)
    methods: frozenset[str] = frozenset({"PUT", "POST", "DELETE"})
    seed: int = 0
    stall: float = 65.0
    stats: Counter[str] = field(default_factory=Counter)
    port: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._release = asyncio.Event()
        self.enabled = True
        #: responses being held back right now by STALL
        self.stalling = 0

    # -- lifecycle

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening, end stalls, abort every connection, and wait for the handlers.

        Handlers are not cancelled: asyncio (3.11) logs a cancelled connection callback
        as an error. Aborted sockets end their reads instead.
        """
        if self._server is not None:
            self._server.close()
        self._release.set()
        for transport in list(self._transports):
            transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        """End every stall now, with a reset (as a server that gives up would)."""
        self._release.set()

    def add(self, *rules: Rule) -> None:
        self.rules.extend(rules)

    # -- deciding

    def decide(self, req: Request) -> Decision:
        if not self.enabled:
            return Decision(Action.PASS)
        for rule in self.rules:
            if rule.applies(req):
                rule.used += 1
                return Decision(rule.action, rule.stall)
        if req.method in self.methods and self.rate > 0 and self._rng.random() < self.rate:
            return Decision(self._rng.choice(self.actions), self.stall)
        return Decision(Action.PASS)

    # -- serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._transports.add(writer.transport)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    req = await _read_request(reader, writer)
                except (_Closed, ConnectionError, asyncio.IncompleteReadError):
                    return
                decision = self.decide(req)
                self.stats[decision.action] += 1
                if decision.action is Action.DROP:
                    _reset(writer)
                    return
                if decision.action is Action.ERROR:
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 0\r\n\r\n")
                    await writer.drain()
                    continue
                if upstream is None:
                    upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
                    self._transports.add(upstream[1].transport)
                up_reader, up_writer = upstream
                up_writer.write(req.raw_head + req.body)
                await up_writer.drain()
                head, status, resp_headers = await _read_response_head(up_reader)
                body = await _read_body(up_reader, req.method, status, resp_headers)
                if decision.action is Action.LOST_REPLY:
                    _reset(writer)
                    return
                if decision.action is Action.STALL:
                    # Mid-response: the head and half the body, then silence. A response
                    # with no body stalls before its head (it would be complete otherwise).
                    half = len(body) // 2
                    if half:
                        writer.write(head + body[:half])
                        await writer.drain()
                        head, body = b"", body[half:]
                    self.stalling += 1
                    try:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._release.wait(), decision.stall)
                    finally:
                        self.stalling -= 1
                    if self._release.is_set():
                        _reset(writer)
                        return
                writer.write(head + body)
                await writer.drain()
                if _wants_close(req.headers) or _wants_close(resp_headers) or (body and _unframed(resp_headers)):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            return
        finally:
            self._tasks.discard(task)
            self._transports.discard(writer.transport)
            if upstream is not None:
                self._transports.discard(upstream[1].transport)
                upstream[1].close()
            with contextlib.suppress(Exception):
                writer.close()


# -- HTTP framing ----------------------------------------------------------------------------------


def _parse_headers(lines: Iterable[bytes]) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        out.append((name.strip(), value.strip()))
    return out


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _unframed(headers: list[tuple[str, str]]) -> bool:
    """A response body that ran until the server closed: that upstream connection is done."""
    return _get(headers, "content-length") is None and _get(headers, "transfer-encoding") is None


def _wants_close(headers: list[tuple[str, str]]) -> bool:
    return (_get(headers, "connection") or "").lower() == "close"


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise _Closed from None
        raise


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
    raw = await _read_head(reader)
    lines = raw[:-4].split(b"\r\n")
    method, target, _version = lines[0].decode("latin-1").split(" ", 2)
    headers = _parse_headers(lines[1:])
    if (_get(headers, "expect") or "").lower() == "100-continue":
        # Answer it here: the body then follows at once, and the server sees a plain request.
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        headers = [(k, v) for k, v in headers if k.lower() != "expect"]
        raw = lines[0] + b"\r\n" + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers) + b"\r\n"
    body = await _read_framed(reader, headers, none_means_empty=True)
    return Request(method, target, headers, body, raw)


async def _read_framed(
    reader: asyncio.StreamReader, headers: list[tuple[str, str]], *, none_means_empty: bool
) -> bytes:
    """A body framed by Content-Length or chunked encoding, returned raw (chunk framing kept)."""
    if "chunked" in (_get(headers, "transfer-encoding") or "").lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = await reader.readuntil(b"\r\n")
                    out += line
                    if line == b"\r\n":
                        return bytes(out)
            out += await reader.readexactly(size + 2)
    length = _get(headers, "content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if none_means_empty:
        return b""
    return await reader.read()  # until the server closes


async def _read_response_head(reader: asyncio.StreamReader) -> tuple[bytes, int, list[tuple[str, str]]]:
    while True:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        if status == 100:
            continue  # we answered Expect ourselves; never relay a second 100
        return raw, status, _parse_headers(lines[1:])


async def _read_body(reader: asyncio.StreamReader, method: str, status: int, headers: list[tuple[str, str]]) -> bytes:
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    return await _read_framed(reader, headers, none_means_empty=False)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER on, timeout 0. The client sees ECONNRESET, not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
