"""What every route shares: the app's keys, the one mapping from errors to HTTP, the token check,
and the readers of path and query parameters (each answers 400 naming the parameter)."""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import Any, Protocol

import structlog
from aiohttp import web

from bucketsync.agent import Agent
from bucketsync.catalog import runtime
from bucketsync.core.errors import (
    AlreadyExists,
    BucketsyncError,
    ConfigError,
    DiskFull,
    FetchRefused,
    FileFolderConflict,
    InvalidFilter,
    InvalidKey,
    KeyFiltered,
    KeyNotStorable,
    LedgerError,
    NotFound,
    OpStateError,
    PermissionDenied,
    PreconditionFailed,
    Refused,
    StorageError,
    Transient,
)
from bucketsync.core.keys import check_key
from bucketsync.downstream.ops import Downstream
from bucketsync.server.front import Heartbeat
from bucketsync.server.openapi import API, Handler, Param
from bucketsync.upstream.events import webhook

log = structlog.get_logger("bucketsync.api")


AGENT: web.AppKey[Agent] = web.AppKey("agent", Agent)
STOP: web.AppKey[asyncio.Event] = web.AppKey("stop", asyncio.Event)
TASKS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("tasks", set[asyncio.Task[Any]])
DOWNSTREAM: web.AppKey[Downstream] = web.AppKey("downstream", Downstream)
SPEC: web.AppKey[dict[str, Any]] = web.AppKey("spec", dict[str, Any])
HEARTBEAT: web.AppKey[Heartbeat] = web.AppKey("heartbeat", Heartbeat)


class Reloader(Protocol):
    """The supervisor's reload: re-read the config file and apply it (see reload.py)."""

    async def __call__(self) -> Any: ...


RELOAD: web.AppKey[Reloader] = web.AppKey("reload", Reloader)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class RangeNotSatisfiable(ApiError):
    def __init__(self, size: int) -> None:
        super().__init__(416, "range_not_satisfiable", f"the Range header asks for bytes beyond the item's {size}")
        self.size = size


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


# The one mapping from our error hierarchy to HTTP.
_STATUS: list[tuple[type[BaseException], int, str]] = [
    (InvalidFilter, 400, "invalid_filter"),
    (KeyFiltered, 400, "key_filtered"),
    (InvalidKey, 400, "invalid_key"),
    (KeyNotStorable, 400, "key_not_storable"),
    (FileFolderConflict, 409, "file_folder_conflict"),
    (DiskFull, 507, "disk_full"),
    (LedgerError, 503, "ledger_unavailable"),
    (ConfigError, 404, "not_found"),
    (NotFound, 404, "not_found"),
    (AlreadyExists, 409, "already_exists"),
    (PreconditionFailed, 412, "precondition_failed"),
    (PermissionDenied, 502, "storage_permission_denied"),
    (Transient, 503, "storage_unavailable"),
    (StorageError, 502, "storage_error"),
]


#: a server-side fetch that failed rather than being refused by the policy (403 fetch_refused)
_FETCH_STATUS: dict[str, tuple[int, str]] = {
    "too_large": (502, "fetch_too_large"),
    "too_slow": (504, "fetch_too_slow"),
    "dns": (502, "fetch_failed"),
    "upstream": (502, "fetch_failed"),
}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RangeNotSatisfiable as exc:
        resp = error_response(exc.status, exc.code, exc.message)
        resp.headers["Content-Range"] = f"bytes */{exc.size}"
        return resp
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except Refused as exc:
        return error_response(403, exc.reason, str(exc))
    except FetchRefused as exc:
        status, code = _FETCH_STATUS.get(exc.reason, (403, "fetch_refused"))
        return error_response(status, code, str(exc))
    except OpStateError as exc:
        return error_response(404 if exc.code == "op_not_found" else 409, exc.code, str(exc))
    except BucketsyncError as exc:
        for cls, status, code in _STATUS:
            if isinstance(exc, cls):
                return error_response(status, code, str(exc))
        return error_response(500, "internal", str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/"):
            resp = error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
            if "Allow" in exc.headers:  # 405 says what is allowed
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        raise
    except Exception as exc:
        if isinstance(exc, ConnectionError) and _client_gone(request):
            # The client hung up mid-response: nothing is wrong here and nobody is left to
            # answer. 499 (as nginx says it) goes to the access log only.
            log.debug("client closed the connection", method=request.method, path=request.path)
            return web.Response(status=499, reason="Client Closed Request")
        log.exception("request failed", method=request.method, path=request.path)
        return error_response(500, "internal", "internal error; see the agent's log")


def _client_gone(request: web.Request) -> bool:
    """Whether the client's connection is closed (so a ConnectionError is its hang-up, not ours)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def bearer_ok(header: str, token: str) -> bool:
    """``Authorization: Bearer TOKEN``; the scheme is case-insensitive (RFC 7235), the token
    is compared in constant time."""
    scheme, _, given = header.partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    same = hmac.compare_digest(given.strip(" ").encode("utf-8", "surrogateescape"), token.encode())
    return ok_scheme and same


_EVENTS = f"{API}/events/"
#: the paths of one dataset and of one item in it (a key is one percent-encoded segment)
DS_PATH = f"{API}/datasets/{{ds}}"
ITEM_PATH = f"{DS_PATH}/items/{{key}}"


def auth_middleware(token: str | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        # An event poster may prove itself with its driver's shared secret instead (the handler checks it).
        by_secret = request.path.startswith(_EVENTS) and webhook.SECRET_HEADER in request.headers
        guarded = token is not None and request.path.startswith("/api/") and not by_secret
        if guarded and not bearer_ok(request.headers.get("Authorization", ""), token or ""):
            resp = error_response(401, "unauthorized", "missing or wrong bearer token")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="bucketsync"'
            return resp
        return await handler(request)

    return check


def agent_of(request: web.Request) -> Agent:
    return request.app[AGENT]


def synced_dataset(request: web.Request) -> str:
    name = request.match_info["ds"]
    agent_of(request).settings.dataset(name)  # ConfigError -> 404 naming the known datasets
    return name


async def any_dataset(request: web.Request) -> str:
    """A configured dataset or a runtime one (a clone), for the routes that work on both:
    reads, metadata, deletes (a clone's delete unlinks its pointer only)."""
    name = request.match_info["ds"]
    await runtime.kind_of(agent_of(request), name)  # ConfigError -> 404 when it is neither
    return name


def is_runtime(request: web.Request, name: str) -> bool:
    return name not in agent_of(request).settings.datasets


def bool_param(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no", ""):
        return False
    raise ApiError(400, "invalid_parameter", f"query parameter {name!r} must be true or false, not {raw!r}")


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"query parameter {name!r} must be an integer") from None
    if not lo <= value <= hi:
        raise ApiError(400, "invalid_parameter", f"query parameter {name!r} must be between {lo} and {hi}")
    return value


#: SQLite's integers are signed 64-bit: a larger id can name nothing
MAX_ID = 2**63 - 1


def id_param(request: web.Request, name: str) -> int:
    """A path id: a positive integer SQLite can hold, else 400 naming the parameter."""
    raw = request.match_info[name]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_ID:
        raise ApiError(400, "invalid_parameter", f"{name} id must be an integer from 1 to {MAX_ID}, not {raw!r}")
    return int(raw)


def text_param(request: web.Request, name: str, default: str = "") -> str:
    """A free-text query parameter; bytes that were not UTF-8 are refused, not passed to SQL."""
    raw = request.query.get(name, default)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in raw):
        raise ApiError(400, "invalid_parameter", f"query parameter {name!r} is not valid UTF-8")
    return raw


#: what a cursor looks like (unpadded URL-safe base64); the document declares it
CURSOR_PATTERN = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$"


CURSOR = re.compile(CURSOR_PATTERN)


async def ledger_ds(request: web.Request, name: str) -> int:
    ledger = agent_of(request).ledger
    assert ledger is not None
    return await ledger.dataset_id(name)


async def json_body(request: web.Request, shape: str) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "invalid_json", f"the body must be JSON: {shape}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", f"the body must be a JSON object: {shape}")
    return body


def item_key(request: web.Request) -> str:
    # The route matched one raw path segment, so a key's '/' arrived as %2F (see docs/api.md).
    return check_key(request.match_info["key"])  # InvalidKey -> 400, before anything is touched


def query_flag(name: str, description: str) -> Param:
    return Param(name, "query", {"type": "boolean"}, description)


def query_limit(default: int) -> Param:
    return Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000, "default": default})


def guess_type(key: str) -> str:
    import mimetypes

    return mimetypes.guess_type(key)[0] or "application/octet-stream"
