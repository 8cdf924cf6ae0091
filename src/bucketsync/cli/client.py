"""A small client for a running agent's HTTP API: the CLI goes through it while a
daemon holds the ledger's lock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp

from bucketsync.config import Settings
from bucketsync.core.errors import BucketsyncError
from bucketsync.server.tls import client_context


class ApiCallFailed(BucketsyncError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def agent_url(settings: Settings) -> str:
    """The local agent's base URL (``http(s)://HOST:PORT``) from ``agent.listen`` and its TLS settings."""
    conf = settings.agent
    host = conf.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"  # a wildcard listen address is reachable on loopback
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if conf.tls_cert_file is not None else "http"
    return f"{scheme}://{host}:{conf.port}"


async def probe_health(settings: Settings, path: str, timeout: float) -> tuple[bool, str]:
    """(healthy?, one line): GET ``path`` on the local agent; 200 is healthy."""
    status, line = await _get(settings, path, timeout)
    return status == 200, line


async def answers(settings: Settings, timeout: float) -> bool:
    """Whether the local agent's API answers at all (any HTTP status)."""
    return (await _get(settings, "/healthz", timeout))[0] is not None


async def _get(settings: Settings, path: str, timeout: float) -> tuple[int | None, str]:
    """(status, or None without an answer; one line): GET ``path`` on the local agent."""
    url = agent_url(settings) + path
    ssl_ctx = client_context(settings.agent)
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout),
                connector=aiohttp.TCPConnector(ssl=ssl_ctx if ssl_ctx is not None else True),
            ) as session,
            session.get(url) as resp,
        ):
            body = await resp.text()
            return resp.status, f"{url}: {resp.status} {body.strip()[:300]}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, f"{url}: no answer ({type(exc).__name__}: {exc})"


class AgentClient:
    def __init__(self, settings: Settings) -> None:
        conf = settings.agent
        self._ssl = client_context(conf)
        self.base = agent_url(settings) + "/api/v1"
        token = conf.token()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=None),
            connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self._session is not None
        try:
            async with self._session.request(method, self.base + path, **kwargs) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status >= 400:
                    err = body.get("error", {}) if isinstance(body, dict) else {}
                    raise ApiCallFailed(resp.status, err.get("code", "error"), err.get("message", resp.reason or ""))
                return body
        except aiohttp.ClientConnectionError as exc:
            raise BucketsyncError(
                f"the agent holds the ledger lock but its API at {self.base} does not answer: {exc}"
            ) from None

    async def lines(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """A streamed NDJSON answer, one object per line as it arrives (``POST .../import``)."""
        assert self._session is not None
        try:
            async with self._session.request(method, self.base + path, **kwargs) as resp:
                if resp.status >= 400:
                    try:
                        body = await resp.json(content_type=None)
                    except ValueError:
                        body = None
                    err = body.get("error", {}) if isinstance(body, dict) else {}
                    raise ApiCallFailed(resp.status, err.get("code", "error"), err.get("message", resp.reason or ""))
                async for raw in resp.content:
                    if raw.strip():
                        yield json.loads(raw)
        except aiohttp.ClientConnectionError as exc:
            raise BucketsyncError(f"the agent's API at {self.base} stopped answering: {exc}") from None
