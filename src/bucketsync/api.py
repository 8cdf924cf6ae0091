"""The HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and the JSON API under ``/api/v1``.

Errors are ``{"error": {"code", "message"}}`` with a status that says what kind of
wrong it is. Every ``/api/`` route wants ``Authorization: Bearer TOKEN`` when a
token is configured (compared in constant time); the health and metrics routes
stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from bucketsync import metrics, opsctl
from bucketsync.agent import Agent, dataset_status
from bucketsync.downstream import Downstream
from bucketsync.errors import (
    AlreadyExists,
    BucketsyncError,
    ConfigError,
    DiskFull,
    FileFolderConflict,
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
from bucketsync.keys import check_key
from bucketsync.model import ItemState, OpState

log = structlog.get_logger("bucketsync.api")
AGENT: web.AppKey[Agent] = web.AppKey("agent", Agent)
STOP: web.AppKey[asyncio.Event] = web.AppKey("stop", asyncio.Event)
TASKS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("tasks", set[asyncio.Task[Any]])
DOWNSTREAM: web.AppKey[Downstream] = web.AppKey("downstream", Downstream)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


# The one mapping from our error hierarchy to HTTP.
_STATUS: list[tuple[type[BaseException], int, str]] = [
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


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except Refused as exc:
        return error_response(403, exc.reason, str(exc))
    except OpStateError as exc:
        return error_response(404 if exc.code == "op_not_found" else 409, exc.code, str(exc))
    except BucketsyncError as exc:
        for cls, status, code in _STATUS:
            if isinstance(exc, cls):
                return error_response(status, code, str(exc))
        return error_response(500, "internal", str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/"):
            return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
        raise
    except Exception:
        log.exception("request failed", method=request.method, path=request.path)
        return error_response(500, "internal", "internal error; see the agent's log")


def auth_middleware(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path.startswith("/api/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "unauthorized", "missing or wrong bearer token")
        return await handler(request)

    return check


# -- helpers -------------------------------------------------------------------


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT]


def _dataset(request: web.Request) -> str:
    name = request.match_info["ds"]
    _agent(request).settings.dataset(name)  # ConfigError -> 404 naming the known datasets
    return name


def _bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no", ""):
        return False
    raise ApiError(400, "invalid_parameter", f"query parameter {name!r} must be true or false, not {raw!r}")


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
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


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid_parameter", "cursor is not one this API handed out") from None


async def _ledger_ds(request: web.Request, name: str) -> int:
    ledger = _agent(request).ledger
    assert ledger is not None
    return await ledger.dataset_id(name)


# -- health and metrics ----------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    agent = _agent(request)
    if (unready := agent.unready()) is not None:
        return web.json_response(unready, status=503)
    return web.json_response({"status": "ready"})


async def metrics_handler(request: web.Request) -> web.Response:
    resp = web.Response(body=metrics.render())
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp


# -- datasets, items, runs ---------------------------------------------------------


async def list_datasets(request: web.Request) -> web.Response:
    agent = _agent(request)
    out = []
    for name in agent.settings.datasets:
        status = await dataset_status(agent.settings, agent.ledger, name, agent.loops.get(name))
        status["ready"] = name not in agent.not_ready
        status["not_ready_reason"] = agent.not_ready.get(name)
        out.append(status)
    return web.json_response({"datasets": out})


async def list_items(request: web.Request) -> web.Response:
    name = _dataset(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    limit = _int(request, "limit", 100, 1, 1000)
    raw_state = request.query.get("state", "live")
    if raw_state not in ("live", "tombstone", "all"):
        raise ApiError(400, "invalid_parameter", "state must be live, tombstone or all")
    state = None if raw_state == "all" else ItemState(raw_state)
    cursor = request.query.get("cursor")
    meta = {k[5:]: v for k, v in request.query.items() if k.startswith("meta.")}
    unknown = set(request.query) - {"prefix", "limit", "cursor", "state"} - {f"meta.{k}" for k in meta}
    if unknown:
        raise ApiError(400, "invalid_parameter", f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    items = await ledger.items(
        await _ledger_ds(request, name),
        prefix=request.query.get("prefix", ""),
        after=decode_cursor(cursor) if cursor else None,
        limit=limit + 1,
        state=state,
        meta=meta,
    )
    more = len(items) > limit
    items = items[:limit]
    return web.json_response(
        {
            "items": [i.as_json(full=True) for i in items],
            "next_cursor": encode_cursor(items[-1].key) if more and items else None,
        }
    )


async def start_sync(request: web.Request) -> web.Response:
    name = _dataset(request)
    loop = _agent(request).loop(name)
    dry_run, force, wait = _bool(request, "dry_run"), _bool(request, "force"), _bool(request, "wait")
    if loop.busy:
        raise ApiError(409, "run_in_progress", f"dataset {name!r} has a run in progress (run {loop.current_run})")
    started: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(loop.run_once(dry_run=dry_run, force=force, stop=request.app[STOP], started=started))
    request.app[TASKS].add(task)
    task.add_done_callback(request.app[TASKS].discard)
    if wait or dry_run:
        result = await asyncio.shield(task)
        return web.json_response(result.as_json())
    await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
    if task.done() and not started.done():
        task.result()  # raises what went wrong before the run began
    return web.json_response({"dataset": name, "run": started.result(), "status": "running"}, status=202)


async def list_runs(request: web.Request) -> web.Response:
    name = _dataset(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    limit = _int(request, "limit", 20, 1, 1000)
    runs = await ledger.runs(await _ledger_ds(request, name), limit=limit)
    loop = _agent(request).loops.get(name)
    return web.json_response({"runs": [_with_live(r.as_json(), loop) for r in runs]})


async def get_run(request: web.Request) -> web.Response:
    name = _dataset(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    try:
        run_id = int(request.match_info["run"])
    except ValueError:
        raise ApiError(400, "invalid_parameter", "run id must be an integer") from None
    run = await ledger.run(run_id)
    if run is None or run.dataset != name:
        raise ApiError(404, "not_found", f"dataset {name!r} has no run {run_id}")
    return web.json_response(_with_live(run.as_json(), _agent(request).loops.get(name)))


def _with_live(run: dict[str, Any], loop: Any) -> dict[str, Any]:
    """A running run's counts from memory: fresher than the last committed batch."""
    if loop is not None and loop.current_run == run["id"] and loop.progress is not None:
        run |= loop.progress.as_dict()
    return run


# -- one item -------------------------------------------------------------------------


def _key(request: web.Request) -> str:
    return check_key(request.match_info["key"])  # InvalidKey -> 400, before anything is touched


async def get_item(request: web.Request) -> web.Response:
    name, key = _dataset(request), _key(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    item = await ledger.item(await _ledger_ds(request, name), key)
    if item is None:
        raise ApiError(404, "not_found", f"dataset {name!r} has no item {key!r}")
    return web.json_response(item.as_json(full=True))


async def get_content(request: web.Request) -> web.StreamResponse:
    name, key = _dataset(request), _key(request)
    agent = _agent(request)
    assert agent.ledger is not None
    item = await agent.ledger.item(await _ledger_ds(request, name), key)
    if item is None or item.state is not ItemState.LIVE:
        raise ApiError(404, "not_found", f"dataset {name!r} has no live item {key!r}")
    store = agent.stores[agent.settings.datasets[name].driver]
    chunks = store.open(key)
    first = await anext(chunks, b"")  # NotFound surfaces here, before the headers go out
    resp = web.StreamResponse()
    resp.content_type = item.content_type or _guess_type(key)
    if item.etag:
        resp.headers["ETag"] = f'"{item.etag}"'
    await resp.prepare(request)
    await resp.write(first)
    async for chunk in chunks:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


def _guess_type(key: str) -> str:
    import mimetypes

    return mimetypes.guess_type(key)[0] or "application/octet-stream"


async def put_item(request: web.Request) -> web.Response:
    name, key = _dataset(request), _key(request)
    overwrite = _bool(request, "overwrite")
    ctype = request.headers.get("Content-Type")
    if ctype is None or ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        ctype = _guess_type(key)  # curl's default for --data-binary says nothing about the file
    out = await request.app[DOWNSTREAM].put(
        name, key, request.content.iter_chunked(1 << 20), overwrite=overwrite, content_type=ctype
    )
    status = {"created": 201, "overwritten": 200, "pending": 202}[out.result]
    return web.json_response(out.as_json(), status=status)


async def patch_item(request: web.Request) -> web.Response:
    name, key = _dataset(request), _key(request)
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "invalid_json", 'the body must be JSON: {"metadata": {...}}') from None
    if not isinstance(body, dict) or set(body) != {"metadata"} or not isinstance(body["metadata"], dict):
        raise ApiError(400, "invalid_request", 'the body must be {"metadata": {...}}; system metadata is read-only')
    try:
        out = await request.app[DOWNSTREAM].patch_meta(name, key, body["metadata"])
    except ValueError as exc:
        raise ApiError(400, "invalid_metadata", str(exc)) from None
    return web.json_response(out.as_json())


async def delete_item(request: web.Request) -> web.Response:
    name, key = _dataset(request), _key(request)
    out = await request.app[DOWNSTREAM].delete(name, key)
    return web.json_response(out.as_json(), status=202 if out.result == "pending" else 200)


async def restore_item(request: web.Request) -> web.Response:
    name, key = _dataset(request), _key(request)
    out = await request.app[DOWNSTREAM].restore(name, key)
    return web.json_response(out.as_json())


async def list_ops(request: web.Request) -> web.Response:
    ledger = _agent(request).ledger
    assert ledger is not None
    raw = request.query.get("state")
    if raw is not None and raw not in {str(s) for s in OpState}:
        raise ApiError(400, "invalid_parameter", f"state must be one of {', '.join(OpState)}")
    ops = await ledger.ops(state=OpState(raw) if raw else None, limit=_int(request, "limit", 100, 1, 1000))
    return web.json_response({"ops": [o.as_json() for o in ops], "backlog": await ledger.backlog()})


def _op_id(request: web.Request) -> int:
    raw = request.match_info["op"]
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 2**63:
        raise ApiError(400, "invalid_parameter", "op id must be a positive integer")
    return int(raw)


async def get_op(request: web.Request) -> web.Response:
    ledger = _agent(request).ledger
    assert ledger is not None
    op = await ledger.op(_op_id(request))
    if op is None:
        raise ApiError(404, "not_found", "no such op")
    return web.json_response(op.as_json())


async def retry_op(request: web.Request) -> web.Response:
    agent = _agent(request)
    assert agent.ledger is not None
    op = await opsctl.retry(agent.ledger, agent.outbox, _op_id(request))
    return web.json_response(op.as_json())


async def cancel_op(request: web.Request) -> web.Response:
    agent = _agent(request)
    assert agent.ledger is not None
    op = await opsctl.cancel(agent.ledger, agent.outbox, _op_id(request))
    return web.json_response(op.as_json())


async def openapi(request: web.Request) -> web.Response:
    from bucketsync.openapi import SPEC

    return web.json_response(SPEC)


def make_app(agent: Agent, stop: asyncio.Event) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware(agent.settings.agent.token())],
        client_max_size=1024**2,
    )
    app[AGENT] = agent
    app[STOP] = stop
    app[TASKS] = set()
    app[DOWNSTREAM] = Downstream(agent, agent.outbox)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    v1 = "/api/v1"
    app.router.add_get(f"{v1}/datasets", list_datasets)
    app.router.add_get(f"{v1}/datasets/{{ds}}/items", list_items)
    app.router.add_post(f"{v1}/datasets/{{ds}}/sync", start_sync)
    app.router.add_get(f"{v1}/datasets/{{ds}}/runs", list_runs)
    app.router.add_get(f"{v1}/datasets/{{ds}}/runs/{{run}}", get_run)
    # Keys may contain '/'; encode it as %2F (routes match the raw path, so a key
    # ending in /content or /restore is unambiguous once encoded).
    item = f"{v1}/datasets/{{ds}}/items/{{key:[\\s\\S]+}}"  # any character, so check_key can refuse it
    app.router.add_get(f"{item}/content", get_content)
    app.router.add_post(f"{item}/restore", restore_item)
    app.router.add_get(item, get_item)
    app.router.add_put(item, put_item)
    app.router.add_patch(item, patch_item)
    app.router.add_delete(item, delete_item)
    app.router.add_get(f"{v1}/ops", list_ops)
    app.router.add_get(f"{v1}/ops/{{op}}", get_op)
    app.router.add_post(f"{v1}/ops/{{op}}/retry", retry_op)
    app.router.add_post(f"{v1}/ops/{{op}}/cancel", cancel_op)
    app.router.add_get(f"{v1}/openapi.json", openapi)
    return app
