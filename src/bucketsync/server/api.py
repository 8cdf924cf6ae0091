"""The HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and the JSON API under ``/api/v1``.

Errors are ``{"error": {"code", "message"}}`` with a status that says what kind of
wrong it is. Every ``/api/`` route wants ``Authorization: Bearer TOKEN`` when a
token is configured (compared in constant time); the health and metrics routes
stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import re
from typing import Any, Protocol

import structlog
from aiohttp import web

from bucketsync import metrics
from bucketsync.agent import Agent, datasets_status
from bucketsync.catalog import datasets as catalog_datasets
from bucketsync.catalog import folders, imports, links, moves, query, runtime
from bucketsync.catalog import items as catalog_items
from bucketsync.core import ranges
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
from bucketsync.core.keys import KEY_PATTERN, MAX_KEY_BYTES, check_key
from bucketsync.core.model import Item, ItemState, OpState
from bucketsync.downstream import opsctl
from bucketsync.downstream.ops import Downstream
from bucketsync.enrich import Deliveries, EnrichQueue
from bucketsync.enrich.thumbs import MIME as THUMB_MIME
from bucketsync.ledger.leases import FENCE
from bucketsync.server import schemas
from bucketsync.server.front import Heartbeat
from bucketsync.server.openapi import API, LEDGER, STORAGE, Handler, Param, Route, build_spec, schema_ref
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


# -- helpers -------------------------------------------------------------------

_EVENTS = f"{API}/events/"


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT]


def _dataset(request: web.Request) -> str:
    name = request.match_info["ds"]
    _agent(request).settings.dataset(name)  # ConfigError -> 404 naming the known datasets
    return name


async def _any_dataset(request: web.Request) -> str:
    """A configured dataset or a runtime one (a clone), for the routes that work on both:
    reads, metadata, deletes (a clone's delete unlinks its pointer only)."""
    name = request.match_info["ds"]
    await runtime.kind_of(_agent(request), name)  # ConfigError -> 404 when it is neither
    return name


def _runtime(request: web.Request, name: str) -> bool:
    return name not in _agent(request).settings.datasets


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


#: SQLite's integers are signed 64-bit: a larger id can name nothing
MAX_ID = 2**63 - 1


def _id(request: web.Request, name: str) -> int:
    """A path id: a positive integer SQLite can hold, else 400 naming the parameter."""
    raw = request.match_info[name]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_ID:
        raise ApiError(400, "invalid_parameter", f"{name} id must be an integer from 1 to {MAX_ID}, not {raw!r}")
    return int(raw)


def _text(request: web.Request, name: str, default: str = "") -> str:
    """A free-text query parameter; bytes that were not UTF-8 are refused, not passed to SQL."""
    raw = request.query.get(name, default)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in raw):
        raise ApiError(400, "invalid_parameter", f"query parameter {name!r} is not valid UTF-8")
    return raw


#: what a cursor looks like (unpadded URL-safe base64); the document declares it
CURSOR_PATTERN = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$"
_CURSOR = re.compile(CURSOR_PATTERN)


async def _ledger_ds(request: web.Request, name: str) -> int:
    ledger = _agent(request).ledger
    assert ledger is not None
    return await ledger.dataset_id(name)


# -- health and metrics ----------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """Served here only under TLS; otherwise the front door answers it off the loop (server/front.py)."""
    status, doc = request.app[HEARTBEAT].liveness()
    return web.json_response(doc, status=status)


async def readyz(request: web.Request) -> web.Response:
    """503 while a dataset cannot be synced (or the ledger cannot be written)."""
    agent = _agent(request)
    # "datasets" names the datasets that are not ready (with why); "detail" says, for every
    # dataset, whether it is ready, whether storage takes its writes, and whether the guard stopped it.
    detail = {name: agent.health(name) for name in agent.settings.datasets}
    if (unready := agent.unready()) is not None:
        return web.json_response(unready | {"detail": detail}, status=503)
    return web.json_response({"status": "ready", "datasets": {}, "detail": detail})


async def metrics_handler(request: web.Request) -> web.Response:
    resp = web.Response(body=metrics.render())
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    return resp


# -- datasets, items, runs ---------------------------------------------------------


async def list_datasets(request: web.Request) -> web.Response:
    agent = _agent(request)
    unknown = set(request.query) - {"filter", "sort"}
    if unknown:
        raise ApiError(400, "invalid_parameter", f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    assert agent.ledger is not None
    described = await agent.ledger.described()  # one read (or none, if nothing changed) per request
    clones = described[1]
    names = [*agent.settings.datasets, *clones]
    raw_filter, sort = _text(request, "filter"), _text(request, "sort")
    if raw_filter or sort:
        flt = query.parse_filter(raw_filter) if raw_filter else None
        names = await catalog_datasets.matching(agent.ledger, flt, sort or None, names)
    synced = [n for n in names if n not in clones]
    rows = {
        r["dataset"]: r for r in await datasets_status(agent.settings, agent.ledger, agent.loops, synced, described)
    }
    for status in rows.values():
        status.update(agent.live_status(status["dataset"]))
    rows |= {r["dataset"]: r for r in await runtime.runtime_status(agent, [n for n in names if n in clones])}
    return web.json_response({"datasets": [rows[n] for n in names]})


async def delete_dataset(request: web.Request) -> web.Response:
    """A runtime dataset goes with its catalog only; a configured one is removed from the config."""
    name = await _any_dataset(request)
    if not _runtime(request, name):
        raise ApiError(403, "synced_dataset", f"{name!r} is configured: remove it from the config file and reload")
    ledger = _agent(request).ledger
    assert ledger is not None
    n = await ledger.drop_runtime(name)
    return web.json_response({"dataset": name, "deleted": True, "items": max(n, 0)})


async def merge_datasets(request: web.Request) -> web.Response:
    """A runtime dataset of pointer items to several datasets' items, conflicts as asked."""
    body = await _json_body(request, '{"name": "...", "sources": ["a", "b"], "on_conflict": "folder"}')
    if set(body) != {"name", "sources", "on_conflict"}:
        raise ApiError(400, "invalid_request", 'the body must be {"name": ..., "sources": [...], "on_conflict": ...}')
    try:
        out = await runtime.merge(_agent(request), body["name"], body["sources"], body["on_conflict"])
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    return web.json_response(out, status=201)


async def clone_dataset(request: web.Request) -> web.Response:
    """A runtime dataset of pointer items to this (synced) dataset's items: one ledger statement."""
    source = _dataset(request)
    body = await _json_body(request, '{"name": "...", "with_metadata": true, "filter": {...}}')
    if "name" not in body or set(body) - {"name", "with_metadata", "filter"}:
        raise ApiError(400, "invalid_request", 'the body must be {"name": ..., "with_metadata": bool, "filter": {...}}')
    with_meta = body.get("with_metadata", False)
    if not isinstance(with_meta, bool):
        raise ApiError(400, "invalid_request", '"with_metadata" must be true or false')
    try:
        out = await runtime.clone(_agent(request), source, body["name"], with_meta, body.get("filter"))
    except ValueError as exc:
        if isinstance(exc, InvalidFilter):
            raise
        raise ApiError(400, "invalid_request", str(exc)) from None
    return web.json_response(out, status=201)


async def patch_dataset(request: web.Request) -> web.Response:
    name = await _any_dataset(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    body = await _json_body(request, '{"metadata": {...}}')
    if set(body) != {"metadata"}:
        raise ApiError(400, "invalid_request", 'the body must be {"metadata": {...}}')
    try:
        patch = catalog_datasets.check_patch(body["metadata"])
    except ValueError as exc:
        raise ApiError(400, "invalid_metadata", str(exc)) from None
    meta = await ledger.merge_dataset_meta(await _ledger_ds(request, name), patch)
    return web.json_response({"dataset": name, "metadata": meta})


async def list_items(request: web.Request) -> web.Response:
    name = await _any_dataset(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    raw_state = request.query.get("state", "live")
    if raw_state not in ("live", "tombstone", "all"):
        raise ApiError(400, "invalid_parameter", "query parameter 'state' must be live, tombstone or all")
    meta = {k[5:]: v for k, v in request.query.items() if k.startswith("meta.")}
    system = {k[7:]: v for k, v in request.query.items() if k.startswith("system.")}
    known = {"prefix", "limit", "cursor", "state", "filter", "sort"}
    unknown = set(request.query) - known - {f"meta.{k}" for k in meta} - {f"system.{k}" for k in system}
    if unknown:
        raise ApiError(400, "invalid_parameter", f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    for prefix, names in (("meta", meta), ("system", system)):
        for field_name in names:
            if not query.META_NAME.match(field_name):
                raise ApiError(
                    400,
                    "invalid_parameter",
                    f"query parameter '{prefix}.{field_name}': {field_name!r} is no metadata name",
                )
            _text(request, f"{prefix}.{field_name}")
    cursor = request.query.get("cursor")
    if cursor is not None and not _CURSOR.match(cursor):
        raise ApiError(400, "invalid_parameter", "query parameter 'cursor' is not one this API handed out")
    raw_filter = _text(request, "filter")
    q = catalog_items.Query(
        filter=query.parse_filter(raw_filter) if raw_filter else None,
        sort=query.parse_sort(_text(request, "sort")),
        cursor=cursor,
        limit=_int(request, "limit", 100, 1, 1000),
        state=None if raw_state == "all" else raw_state,
        prefix=_text(request, "prefix"),
        meta=meta,
        system=system,
    )
    items, next_cursor = await catalog_items.page(ledger, await _ledger_ds(request, name), q)
    return web.json_response({"items": await _with_system(request, name, items), "next_cursor": next_cursor})


async def list_folders(request: web.Request) -> web.Response:
    """The sub-folders of ``parent`` with item counts and sizes, from the ledger alone."""
    name = await _any_dataset(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    unknown = set(request.query) - {"parent", "state"}
    if unknown:
        raise ApiError(400, "invalid_parameter", f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    state = request.query.get("state", "live")
    if state not in ("live", "tombstone"):
        raise ApiError(400, "invalid_parameter", "query parameter 'state' must be live or tombstone")
    parent = folders.parent_of(_text(request, "parent"))
    found = await folders.listing(ledger, await _ledger_ds(request, name), parent, state)
    return web.json_response(found.as_json())


async def create_folder(request: web.Request) -> web.Response:
    name = await _any_dataset(request)
    body = await _json_body(request, '{"path": "a/b"}')
    if set(body) != {"path"} or not isinstance(body["path"], str):
        raise ApiError(400, "invalid_request", 'the body must be {"path": "a/b"}')
    check_key(body["path"])  # the key rules: "a/b", no trailing '/'
    out = await folders.create_folder(_agent(request), name, body["path"])
    return web.json_response(out, status=201 if out["created"] else 200)


async def delete_folder(request: web.Request) -> web.Response:
    name = await _any_dataset(request)
    folder = folders.parent_of(request.match_info["path"])
    if not folder:
        raise ApiError(400, "invalid_key", "the top of a dataset is not a folder to delete")
    out = await folders.drop_folder(_agent(request), name, folder, force=_bool(request, "force"))
    return web.json_response(out.as_json(), status=202 if out.ops else 200)


async def move_items(request: web.Request) -> web.Response:
    """Move items (a key list, or every live item a filter matches) into a folder."""
    name = await _any_dataset(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    body = await _json_body(request, '{"to": "folder/", "keys": [...]} or {"to": ..., "filter": {...}}')
    if "to" not in body or set(body) - {"to", "keys", "filter"} or ("keys" in body) == ("filter" in body):
        raise ApiError(400, "invalid_request", 'the body must be {"to": "folder/"} and one of "keys" or "filter"')
    if not isinstance(body["to"], str):
        raise ApiError(400, "invalid_request", '"to" must be a folder path')
    if body["to"]:
        check_key(body["to"])  # the key rules: "a/b", no trailing '/'
    folder = folders.parent_of(body["to"])
    if "keys" in body:
        keys = body["keys"]
        if (
            not isinstance(keys, list)
            or not keys
            or len(keys) > moves.MAX_MOVE
            or not all(isinstance(k, str) for k in keys)
        ):
            raise ApiError(400, "invalid_request", f'"keys" must be a list of 1 to {moves.MAX_MOVE} keys')
        keys = [check_key(k) for k in keys]
    else:
        if not isinstance(body["filter"], dict):
            raise ApiError(400, "invalid_request", '"filter" must be a catalog filter object ({} matches every item)')
        q = catalog_items.Query(filter=body["filter"], limit=moves.MAX_MOVE)
        found, more = await catalog_items.page(ledger, await _ledger_ds(request, name), q)
        if more is not None:
            raise ApiError(400, "too_many_items", f"the filter matches more than {moves.MAX_MOVE} items; narrow it")
        keys = [i.key for i in found]
    results = await moves.move(_agent(request), request.app[DOWNSTREAM], name, keys, folder)
    return web.json_response({"to": folder, "results": [r.as_json() for r in results]})


async def list_indexes(request: web.Request) -> web.Response:
    ledger = _agent(request).ledger
    assert ledger is not None
    _dataset(request)
    ds_id = await _ledger_ds(request, request.match_info["ds"])
    return web.json_response({"indexes": await catalog_items.indexed_fields(ledger, ds_id)})


async def create_index(request: web.Request) -> web.Response:
    """Index a field of the dataset (a partial index over its rows)."""
    ledger = _agent(request).ledger
    assert ledger is not None
    _dataset(request)
    body = await _json_body(request, '{"field": "metadata.NAME"}')
    if set(body) != {"field"}:
        raise ApiError(400, "invalid_request", 'the body must be {"field": "metadata.NAME"} (or a system field)')
    ds_id = await _ledger_ds(request, request.match_info["ds"])
    created = await catalog_items.ensure_index(ledger, ds_id, body["field"])
    return web.json_response(
        {"field": body["field"], "created": created, "indexes": await catalog_items.indexed_fields(ledger, ds_id)},
        status=201 if created else 200,
    )


async def _json_body(request: web.Request, shape: str) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "invalid_json", f"the body must be JSON: {shape}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", f"the body must be a JSON object: {shape}")
    return body


async def start_sync(request: web.Request) -> web.Response:
    name = _dataset(request)
    loop = _agent(request).loop(name)
    dry_run, force, wait = _bool(request, "dry_run"), _bool(request, "force"), _bool(request, "wait")
    if loop.busy:
        raise ApiError(409, "run_in_progress", f"dataset {name!r} has a run in progress (run {loop.current_run})")
    fence = None
    if (keeper := _agent(request).leases) is not None and (fence := keeper.fence(name)) is None:
        owner = (await keeper.leases.owners()).get(name, (None, 0, False))[0]
        raise ApiError(
            409,
            "not_owner",
            f"dataset {name!r} is synced by agent {owner or '(none yet)'}, not this one ({keeper.agent}); "
            "ask that agent to sync it",
        )
    started: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
    ctx = contextvars.copy_context()
    ctx.run(FENCE.set, fence)  # on a shared ledger, the run's writes are fenced by this agent's lease
    task = asyncio.create_task(
        loop.run_once(dry_run=dry_run, force=force, stop=request.app[STOP], started=started), context=ctx
    )
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
    run_id = _id(request, "run")
    run = await ledger.run(run_id)
    if run is None or run.dataset != name:
        raise ApiError(404, "not_found", f"dataset {name!r} has no run {run_id}")
    return web.json_response(_with_live(run.as_json(), _agent(request).loops.get(name)))


def _with_live(run: dict[str, Any], loop: Any) -> dict[str, Any]:
    """A running run's counts from memory: fresher than the last committed batch."""
    if loop is not None and loop.current_run == run["id"] and loop.progress is not None:
        run |= loop.progress.as_dict()
    return run


# -- linked items and CSV import (catalog/links.py, catalog/imports.py) -----------------


async def create_link(request: web.Request) -> web.Response:
    """A linked item: its binary stays at ``ref``; nothing is written to storage."""
    name = _dataset(request)
    body = await _json_body(request, '{"name": "a/b.jpg", "ref": "https://...", "mimetype": ..., "metadata": {...}}')
    if not {"name", "ref"} <= set(body) or set(body) - {"name", "ref", "mimetype", "metadata"}:
        raise ApiError(400, "invalid_request", 'the body must be {"name": ..., "ref": ..., "mimetype"?, "metadata"?}')
    try:
        link = links.Link(
            body["ref"], links.check_mimetype(body.get("mimetype")), links.check_metadata(body.get("metadata"))
        )
        result, item = await links.create(_agent(request), name, body["name"], link)
    except ValueError as exc:
        if isinstance(exc, InvalidKey):
            raise
        raise ApiError(400, "invalid_request", str(exc)) from None
    return web.json_response({"result": result, "item": item}, status=201 if result == "created" else 200)


async def import_csv(request: web.Request) -> web.StreamResponse:
    """Stream a CSV in, stream one NDJSON line per row out, then the report."""
    name = _dataset(request)
    csv_name = _text(request, "name")
    if not csv_name:
        raise ApiError(
            400, "invalid_parameter", "query parameter 'name' (the CSV's file name, e.g. cats.csv) is required"
        )
    try:
        job = imports.Import(_agent(request), request.app[DOWNSTREAM], name, csv_name)
        await job.start(request.content.iter_chunked(1 << 16))  # the header: a bad one is a 400, nothing done
    except ValueError as exc:
        if isinstance(exc, InvalidKey):
            raise
        raise ApiError(400, "invalid_csv", str(exc)) from None
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    async for batch in job.batches():
        await resp.write("".join(_line(r.as_json()) for r in batch).encode())
    await resp.write(_line({"report": job.report.as_json()}).encode())
    await resp.write_eof()
    return resp


def _line(doc: dict[str, Any]) -> str:
    import json

    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"


# -- one item -------------------------------------------------------------------------


def _key(request: web.Request) -> str:
    # The route matched one raw path segment, so a key's '/' arrived as %2F (see docs/api.md).
    return check_key(request.match_info["key"])  # InvalidKey -> 400, before anything is touched


async def get_item(request: web.Request) -> web.Response:
    name, key = await _any_dataset(request), _key(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    item = await ledger.item(await _ledger_ds(request, name), key)
    if item is None:
        raise ApiError(404, "not_found", f"dataset {name!r} has no item {key!r}")
    return web.json_response((await _with_system(request, name, [item]))[0])


async def _with_system(request: web.Request, dataset: str, items: list[Item]) -> list[dict[str, Any]]:
    """Items as JSON, with their system metadata (``system``) when the dataset enriches: an item of a
    dataset that does not looks exactly as it did before enrichment existed."""
    agent = _agent(request)
    assert agent.ledger is not None
    if dataset not in agent.settings.datasets or not agent.settings.enriches(dataset):  # clones: never
        return [i.as_json(full=True) for i in items]
    found = await EnrichQueue(agent.ledger).of_items([i.id for i in items])
    out = []
    for item in items:
        row = item.as_json(full=True)
        enr = found.get(item.id)
        row["system"] = enr.as_json() if enr is not None else None
        out.append(row)
    return out


async def get_thumbnail(request: web.Request) -> web.StreamResponse:
    """The item's thumbnail, from the hidden folder in storage or from the local cache."""
    name, key, item = await _live_item(request)
    agent = _agent(request)
    assert agent.ledger is not None
    enr = (await EnrichQueue(agent.ledger).of_items([item.id])).get(item.id)
    if enr is None or enr.thumbnail is None:
        state = "not enriched" if enr is None else f"enrichment {enr.state}" + (f": {enr.error}" if enr.error else "")
        raise ApiError(404, "no_thumbnail", f"item {key!r} of dataset {name!r} has no thumbnail ({state})")
    ctype = THUMB_MIME["webp"] if enr.thumbnail.endswith(".webp") else THUMB_MIME["jpeg"]
    headers = {"Content-Type": ctype, "Cache-Control": "private, max-age=300"}
    if enr.local:
        path = agent.enricher.cache_dir(name) / enr.thumbnail
        try:
            body = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise ApiError(404, "no_thumbnail", f"the cached thumbnail of {key!r} is missing; re-run enrich") from None
        return web.Response(body=body, headers=headers)
    store = agent.stores[agent.settings.datasets[name].driver]
    body = b"".join([chunk async for chunk in store.open(enr.thumbnail)])
    return web.Response(body=body, headers=headers)


async def enrich_status(request: web.Request) -> web.Response:
    name = _dataset(request)
    agent = _agent(request)
    assert agent.ledger is not None
    counts = await EnrichQueue(agent.ledger).counts(await _ledger_ds(request, name))
    return web.json_response({"dataset": name, "enabled": agent.settings.enriches(name), **counts})


async def start_enrich(request: web.Request) -> web.Response:
    """Queue items again: ``mode`` missing (backfill, the default), failed, or all."""
    name = _dataset(request)
    agent = _agent(request)
    assert agent.ledger is not None
    mode = request.query.get("mode", "missing")
    if mode not in ("missing", "failed", "all"):
        raise ApiError(400, "invalid_parameter", "query parameter 'mode' must be missing, failed or all")
    if not agent.settings.enriches(name):
        raise ApiError(
            409, "enrich_disabled", f"dataset {name!r} does not enrich: set enrich.enabled or datasets.{name}.enrich"
        )
    queue = EnrichQueue(agent.ledger)
    ds_id = await _ledger_ds(request, name)
    queued = await queue.requeue(ds_id, mode)
    agent.enricher.wake.set()
    counts = await queue.counts(ds_id)
    return web.json_response({"dataset": name, "enabled": True, **counts, "queued": queued})


async def list_deliveries(request: web.Request) -> web.Response:
    agent = _agent(request)
    assert agent.ledger is not None
    state = request.query.get("state")
    if state is not None and state not in ("pending", "done", "dead"):
        raise ApiError(400, "invalid_parameter", "query parameter 'state' must be pending, done or dead")
    dataset = request.query.get("dataset")
    if dataset is not None:
        agent.settings.dataset(dataset)
    store = Deliveries(agent.ledger)
    found = await store.list(state=state, dataset=dataset, limit=_int(request, "limit", 100, 1, 1000))
    return web.json_response({"deliveries": [d.as_json() for d in found], "counts": await store.counts()})


async def _live_item(request: web.Request) -> tuple[str, str, Item]:
    name, key = await _any_dataset(request), _key(request)
    ledger = _agent(request).ledger
    assert ledger is not None
    item = await ledger.item(await _ledger_ds(request, name), key)
    if item is None or item.state is not ItemState.LIVE:
        raise ApiError(404, "not_found", f"dataset {name!r} has no live item {key!r}")
    return name, key, item


def _content_headers(key: str, item: Item) -> dict[str, str]:
    headers = {"Accept-Ranges": "bytes", "Content-Type": item.content_type or _guess_type(key)}
    if item.etag:
        headers["ETag"] = f'"{item.etag}"'
    return headers


async def head_content(request: web.Request) -> web.StreamResponse:
    """The content's headers without the body: size, type, etag, and that ranges work."""
    name, key, item = await _live_item(request)
    if (
        await _link_ref(request, name, item) is not None
    ):  # what a linked item's target holds is known only by fetching it
        resp = web.StreamResponse(headers={"Content-Type": item.content_type or _guess_type(key)})
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    resp = web.StreamResponse(headers=_content_headers(key, item))
    resp.content_length = item.size
    await resp.prepare(request)
    await resp.write_eof()
    return resp


async def get_content(request: web.Request) -> web.StreamResponse:
    """Stream the object; a single ``Range: bytes=...`` is served as 206 by a ranged read."""
    name, key, item = await _live_item(request)
    if (ref := await _link_ref(request, name, item)) is not None:
        return await _link_content(request, key, item, ref)
    headers = _content_headers(key, item)
    wanted = ranges.parse(request.headers.get("Range"), item.size)
    if isinstance(wanted, ranges.Unsatisfiable):
        raise RangeNotSatisfiable(item.size)
    store, key = await _content_source(request, name, key, item)
    if wanted is None:
        resp = web.StreamResponse(headers=headers)
        chunks = store.open(key)
    else:
        start, length = wanted
        resp = web.StreamResponse(status=206, headers=headers)
        resp.headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{item.size}"
        resp.content_length = length
        chunks = store.open(key, offset=start, length=length)
    first = await anext(chunks, b"")  # NotFound surfaces here, before the headers go out
    await resp.prepare(request)
    await resp.write(first)
    async for chunk in chunks:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def _link_ref(request: web.Request, name: str, item: Item) -> str | None:
    """The target of a linked item, or of the linked item a pointer item points at; None otherwise."""
    if item.ref is not None:
        return item.ref
    if not _runtime(request, name):
        return None
    ledger = _agent(request).ledger
    assert ledger is not None
    return await ledger.pointed_ref(item.id)


async def _link_content(request: web.Request, key: str, item: Item, ref: str) -> web.StreamResponse:
    """Stream a linked item's target (whole: a Range is ignored). A refusal (FetchRefused) comes
    before the headers go out; a failure mid-body (past max_bytes, too slow) aborts the response."""
    resp: web.StreamResponse | None = None
    try:
        async with links.open_target(_agent(request), ref) as target:
            ctype = item.content_type or target.content_type or _guess_type(key)
            resp = web.StreamResponse(headers={"Content-Type": ctype})
            if target.length is not None:
                resp.content_length = target.length
            first = await anext(target.chunks, b"")
            await resp.prepare(request)
            await resp.write(first)
            async for chunk in target.chunks:
                await resp.write(chunk)
            await resp.write_eof()
            return resp
    except FetchRefused as exc:
        if resp is None or not resp.prepared:
            raise  # a 4xx/5xx naming the reason
        # Past the headers: the client must not take a cut-off body for the whole one.
        log.warning("linked content cut off", key=key, reason=exc.reason, error=str(exc))
        if request.transport is not None:
            request.transport.close()
        return resp


async def _content_source(request: web.Request, name: str, key: str, item: Item) -> tuple[Any, str]:
    """Where an item's bytes are: its dataset's driver, or for a pointer item (clone, merge)
    the source item's driver under its current key (nothing was copied)."""
    agent = _agent(request)
    if not _runtime(request, name):
        return agent.stores[agent.settings.datasets[name].driver], key
    assert agent.ledger is not None
    found = await agent.ledger.pointed(item.id)
    if found is None or found[0] not in agent.settings.datasets:
        raise ApiError(404, "orphaned", f"the source object of {key!r} in {name!r} is gone")
    return agent.stores[agent.settings.datasets[found[0]].driver], found[1]


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
    name, key = await _any_dataset(request), _key(request)
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "invalid_json", 'the body must be JSON: {"metadata": {...}}') from None
    if not isinstance(body, dict) or set(body) != {"metadata"} or not isinstance(body["metadata"], dict):
        raise ApiError(400, "invalid_request", 'the body must be {"metadata": {...}}; system metadata is read-only')
    try:
        if _runtime(request, name):  # a clone owns its items' metadata (copied on write at clone time)
            return web.json_response(await _patch_pointer(request, name, key, body["metadata"]))
        out = await request.app[DOWNSTREAM].patch_meta(name, key, body["metadata"])
    except ValueError as exc:
        raise ApiError(400, "invalid_metadata", str(exc)) from None
    return web.json_response(out.as_json())


async def _patch_pointer(request: web.Request, name: str, key: str, patch: Any) -> dict[str, Any]:
    ledger = _agent(request).ledger
    assert ledger is not None
    catalog_datasets.check_patch(patch)
    ds_id = await _ledger_ds(request, name)
    item = await ledger.item(ds_id, key)
    if item is None:
        raise ApiError(404, "not_found", f"dataset {name!r} has no item {key!r}")
    await ledger.merge_meta(item.id, patch)
    return {"result": "updated", "item": (await ledger.item(ds_id, key) or item).as_json(full=True), "op": None}


async def delete_item(request: web.Request) -> web.Response:
    name, key = await _any_dataset(request), _key(request)
    if _runtime(request, name):
        ledger = _agent(request).ledger
        assert ledger is not None
        item = await ledger.item(await _ledger_ds(request, name), key)
        if item is None:
            raise ApiError(404, "not_found", f"dataset {name!r} has no item {key!r}")
        return web.json_response(await runtime.unlink_pointer(_agent(request), name, item))
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
        raise ApiError(400, "invalid_parameter", f"query parameter 'state' must be one of {', '.join(OpState)}")
    ops = await ledger.ops(state=OpState(raw) if raw else None, limit=_int(request, "limit", 100, 1, 1000))
    return web.json_response({"ops": [o.as_json() for o in ops], "backlog": await ledger.backlog()})


async def get_op(request: web.Request) -> web.Response:
    ledger = _agent(request).ledger
    assert ledger is not None
    op = await ledger.op(_id(request, "op"))
    if op is None:
        raise ApiError(404, "not_found", "no such op")
    return web.json_response(op.as_json())


async def reload_config(request: web.Request) -> web.Response:
    reload = request.app.get(RELOAD)
    if reload is None:
        raise ApiError(503, "unavailable", "this server cannot reload its configuration")
    if request.app[STOP].is_set():
        raise ApiError(503, "stopping", "the agent is stopping; nothing reloaded")
    try:
        plan = await reload()
    except ConfigError as exc:
        raise ApiError(400, "invalid_config", f"{exc}; the running configuration stays") from None
    return web.json_response(plan.as_json())


async def retry_op(request: web.Request) -> web.Response:
    agent = _agent(request)
    assert agent.ledger is not None
    op = await opsctl.retry(agent.ledger, agent.outbox, _id(request, "op"))
    return web.json_response(op.as_json())


async def cancel_op(request: web.Request) -> web.Response:
    agent = _agent(request)
    assert agent.ledger is not None
    op = await opsctl.cancel(agent.ledger, agent.outbox, _id(request, "op"))
    return web.json_response(op.as_json())


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[SPEC])


# -- the route table: the router and the OpenAPI document are both built from it ------------

PATH_PARAMS = {
    "ds": Param("ds", "path", {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]{0,63}$"}, "a dataset's name"),
    "key": Param(
        "key",
        "path",
        {"type": "string", "minLength": 1, "maxLength": MAX_KEY_BYTES, "pattern": KEY_PATTERN},
        "the item's key as one path segment: percent-encoded, '/' as %2F. At most 1,024 bytes of UTF-8; "
        "no NUL, no empty, '.' or '..' segment, no leading or trailing '/', not in .bucketsync/",
    ),
    "run": Param("run", "path", {"type": "integer", "minimum": 1, "maximum": MAX_ID}, "a run's id"),
    "op": Param("op", "path", {"type": "integer", "minimum": 1, "maximum": MAX_ID}, "an op's id"),
    "path": Param(
        "path",
        "path",
        {"type": "string", "minLength": 1, "maxLength": MAX_KEY_BYTES, "pattern": KEY_PATTERN},
        "a folder's path as one path segment ('/' as %2F), with or without its trailing '/'",
    ),
}


def _path_params(datasets: list[str]) -> dict[str, Param]:
    """The document describes this agent: ``ds`` is one of its datasets (a fuzzer then hits real ones)."""
    if not datasets:
        return PATH_PARAMS
    ds = Param("ds", "path", {"type": "string", "enum": datasets}, "a dataset's name")
    return {**PATH_PARAMS, "ds": ds}


def _flag(name: str, description: str) -> Param:
    return Param(name, "query", {"type": "boolean"}, description)


def _limit(default: int) -> Param:
    return Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000, "default": default})


# -- events posted by storage (the webhook source) ---------------------------------------


async def post_s3_events(request: web.Request) -> web.Response:
    return await _accept_events(request, "s3", webhook.s3_events)


async def post_gcs_events(request: web.Request) -> web.Response:
    return await _accept_events(request, "gs", webhook.gcs_events)


async def _accept_events(request: web.Request, scheme: str, parse: Any) -> web.Response:
    """Parse, write to the dataset's durable inbox in one transaction, answer 202: accepted means kept."""
    agent = _agent(request)
    name = _dataset(request)
    ds = agent.settings.datasets[name]
    driver = agent.settings.drivers[ds.driver]
    _check_secret(request, driver.events.shared_secret() if driver.events is not None else None)
    if ds.sync != "events" or driver.event_source() != "webhook":
        raise ApiError(
            409,
            "not_webhook_dataset",
            f'dataset {name!r} does not take posted events: set sync = "events" on it and '
            f'source = "webhook" in [drivers.{ds.driver}.events]',
        )
    loc = driver.location
    if loc.scheme != scheme:
        other = "gcs" if loc.scheme == "gs" else "s3"
        raise ApiError(
            400,
            "wrong_event_format",
            f"dataset {name!r} is on {loc.scheme}:// storage: post its events to {API}/events/{other}/{name}",
        )
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "invalid_json", "the body must be JSON") from None
    try:
        events, ignored = parse(body, loc)
    except webhook.BadPayload as exc:
        raise ApiError(400, "invalid_event", str(exc)) from None
    if events:
        assert agent.ledger is not None
        await agent.ledger.inbox_put(await agent.ledger.dataset_id(name), webhook.to_inbox(events))
        agent.inbox(name).set()
    return web.json_response({"accepted": len(events), "ignored": ignored}, status=202)


def _check_secret(request: web.Request, secret: str | None) -> None:
    """The shared secret, when sent, must be the driver's; without it the bearer token (checked by the
    middleware) is needed, or, on an open loopback API, nothing unless the driver has a secret."""
    given = request.headers.get(webhook.SECRET_HEADER)
    if given is not None:
        if secret is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode()):
            raise ApiError(401, "unauthorized", f"wrong {webhook.SECRET_HEADER} for this dataset's driver")
    elif secret is not None and _agent(request).settings.agent.token() is None:
        raise ApiError(401, "unauthorized", f"this dataset's driver wants its shared secret in {webhook.SECRET_HEADER}")


_DS = f"{API}/datasets/{{ds}}"
_ITEM = f"{_DS}/items/{{key}}"
_CONTENT_HEADERS = {
    "ETag": {"schema": {"type": "string"}},
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
}
_OUTCOME_ERRORS = (403, 409, 412, *STORAGE, *LEDGER)

ROUTES: list[Route] = [
    Route("GET", "/healthz", healthz, "liveness", {200: None}),
    Route("GET", "/readyz", readyz, "readiness", {200: None}),
    Route("GET", "/metrics", metrics_handler, "Prometheus metrics", {200: None}),
    Route(
        "GET",
        f"{API}/datasets",
        list_datasets,
        "every dataset: item counts, last run, readiness, user metadata; filter (the catalog's JSON filter "
        "over name, created and metadata.NAME) and sort (FIELD or -FIELD) choose and order them",
        {200: schemas.DatasetList},
        params=(
            Param("filter", "query", {"type": "string"}, 'a JSON filter, e.g. {"metadata.team": "vision"}'),
            Param(
                "sort",
                "query",
                {"type": "string", "pattern": query.sort_pattern(query.DATASET_FIELDS)},
                "name, created or metadata.NAME; -FIELD descending (default: config order)",
            ),
        ),
    ),
    Route(
        "DELETE",
        _DS,
        delete_dataset,
        "delete a clone or merge: its catalog only, never storage (403 synced_dataset for a configured one)",
        {200: schemas.DatasetDeleted},
        errors=(403, *LEDGER),
    ),
    Route(
        "POST",
        f"{API}/datasets/merge",
        merge_datasets,
        "create a runtime dataset (kind merge) of pointer items to the live items of several synced datasets; "
        "a key in more than one: on_conflict folder (each source under a folder of its name), suffix "
        "(later ones renamed stem~SOURCE.ext) or merge (one item, metadata merged, later sources win)",
        {201: schemas.Merged},
        errors=(409, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.MergeRequest)}}},
    ),
    Route(
        "POST",
        f"{_DS}/clone",
        clone_dataset,
        "create a runtime dataset (kind clone) of pointer items to this dataset's live items (all, or those "
        "filter matches): same driver, same keys, nothing copied in storage; metadata copied if asked, then "
        "the clone's own. Never synced; deleting in it unlinks pointers only",
        {201: schemas.Cloned},
        errors=(409, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.CloneRequest)}}},
    ),
    Route(
        "PATCH",
        _DS,
        patch_dataset,
        "merge the dataset's user metadata (null removes a name); catalog-only, never storage",
        {200: schemas.DatasetMetadata},
        errors=LEDGER,
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.MetadataPatch)}}},
    ),
    Route(
        "GET",
        f"{_DS}/items",
        list_items,
        "a page of items, by key unless sort says otherwise; filter is the catalog's JSON filter language "
        "(docs/catalog.md); meta.NAME=VALUE query parameters also filter on user metadata (as text)",
        {200: schemas.ItemPage},
        params=(
            Param("prefix", "query", {"type": "string"}, "only keys that start with this"),
            _limit(100),
            Param("cursor", "query", {"type": "string", "pattern": CURSOR_PATTERN}, "next_cursor of the last page"),
            Param("state", "query", {"type": "string", "enum": ["live", "tombstone", "all"], "default": "live"}),
            Param(
                "filter",
                "query",
                {"type": "string"},
                'a JSON filter, e.g. {"size": {"$gt": 1024}, "metadata.camera": "x100"}; '
                "400 invalid_filter names the offending part",
            ),
            Param(
                "sort",
                "query",
                {"type": "string", "pattern": query.sort_pattern()},
                "FIELD or -FIELD (descending); key breaks ties; a cursor belongs to its sort",
            ),
        ),
    ),
    Route(
        "GET",
        f"{_DS}/folders",
        list_folders,
        "the sub-folders of parent (derived from keys) with their item counts and bytes, and the totals of "
        "the items directly in parent; answered from the ledger, never from storage",
        {200: schemas.FolderListing},
        params=(
            Param("parent", "query", {"type": "string"}, "a folder path (a/b or a/b/); empty: the top"),
            Param("state", "query", {"type": "string", "enum": ["live", "tombstone"], "default": "live"}),
        ),
    ),
    Route(
        "POST",
        f"{_DS}/folders",
        create_folder,
        "create an empty folder: persisted in a clone's or merge's catalog (201, 200 if it existed); refused "
        "(403 empty_folders_unsupported) in a synced dataset, whose bucket has no folders, only keys",
        {201: schemas.FolderCreated, 200: schemas.FolderCreated},
        errors=(403, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.FolderCreate)}}},
    ),
    Route(
        "DELETE",
        f"{_DS}/folders/{{path}}",
        delete_folder,
        "delete every live item under the folder through the gate, as one operation: the mass-delete guard "
        "counts them together (force=true passes it); tombstoned without allow_delete, else one delete op "
        "per item queued in one transaction (202)",
        {200: schemas.FolderDeleted, 202: schemas.FolderDeleted},
        errors=(403, *LEDGER),
        params=(_flag("force", "pass the mass-delete guard"),),
    ),
    Route(
        "POST",
        f"{_DS}/move",
        move_items,
        "move items (keys, or every item a filter matches) into a folder: in a synced dataset a copy, then a "
        "delete of the old object through the gate (403 move_needs_allow_delete without allow_delete); the "
        "item keeps its id and metadata",
        {200: schemas.MoveResults},
        errors=(403, *STORAGE, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.MoveRequest)}}},
    ),
    Route(
        "GET",
        f"{_DS}/indexes",
        list_indexes,
        "the fields the dataset has an index on",
        {200: schemas.IndexList},
    ),
    Route(
        "POST",
        f"{_DS}/indexes",
        create_index,
        "index a field (metadata.NAME or a system field) for fast filters and sorts; 201 when new",
        {201: schemas.IndexCreated, 200: schemas.IndexCreated},
        errors=LEDGER,
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.IndexRequest)}}},
    ),
    Route(
        "POST",
        f"{_DS}/links",
        create_link,
        "create a linked item: its binary stays at ref (https://..., or s3:// gs:// az:// held by a configured "
        "driver), nothing is written to storage; GET .../content fetches it SSRF-safely ([links]). 200 exists "
        "when the key already links to the same ref",
        {201: schemas.LinkCreated, 200: schemas.LinkCreated},
        errors=(403, 409, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.LinkRequest)}}},
    ),
    Route(
        "POST",
        f"{_DS}/import",
        import_csv,
        "import a CSV (columns url, name, action link|upload, mimetype, item_metadata, item_description) into "
        "the folder named after it; streamed both ways: one NDJSON line per row (created, exists, failed with "
        "a reason), then a line with the report. Importing the same CSV again creates nothing",
        {200: None},
        errors=LEDGER,
        ok_media="application/x-ndjson",
        params=(
            Param("name", "query", {"type": "string", "minLength": 1}, "the CSV's file name: its stem is the folder"),
        ),
        body={"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}},
    ),
    Route(
        "POST",
        f"{_DS}/sync",
        start_sync,
        "start an upstream run now",
        {202: schemas.RunStarted, 200: schemas.RunResult},
        errors=(409, *STORAGE, *LEDGER),
        params=(
            _flag("dry_run", "report what a run would do; changes nothing"),
            _flag("force", "pass the mass-delete guard"),
            _flag("wait", "answer when the run has finished"),
        ),
    ),
    Route("GET", f"{_DS}/runs", list_runs, "run history, newest first", {200: schemas.RunList}, params=(_limit(20),)),
    Route("GET", f"{_DS}/runs/{{run}}", get_run, "one run, with live counts while it runs", {200: schemas.Run}),
    Route("GET", _ITEM, get_item, "one item with all its metadata", {200: schemas.Item}),
    Route(
        "PUT",
        _ITEM,
        put_item,
        "write the body to storage under the key, then index it; create-only unless overwrite=true "
        "(then conditional on the known etag)",
        {201: schemas.Outcome, 200: schemas.Outcome, 202: schemas.Outcome},
        errors=_OUTCOME_ERRORS,
        params=(_flag("overwrite", "replace an existing item if it is unchanged in storage"),),
        body={
            "required": False,  # no body is an empty object, as an empty file is
            "description": "the object's bytes; Content-Type is stored as the item's content type",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
    ),
    Route(
        "PATCH",
        _ITEM,
        patch_item,
        "merge user metadata (null removes a name); allowed on read-only datasets: metadata is catalog-only",
        {200: schemas.Outcome},
        errors=(413, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.MetadataPatch)}}},
    ),
    Route(
        "DELETE",
        _ITEM,
        delete_item,
        "through the gate: deleted in storage when the driver allows deletes, else tombstoned",
        {200: schemas.Outcome, 202: schemas.Outcome},
        errors=_OUTCOME_ERRORS,
    ),
    Route(
        "GET",
        f"{_ITEM}/content",
        get_content,
        "stream the object from storage; one Range: bytes=... gives 206 (416 when past the end). A linked "
        "item's target is fetched SSRF-safely and streamed whole: 403 fetch_refused naming the reason, 502 "
        "fetch_failed or fetch_too_large, 504 fetch_too_slow",
        {200: None, 206: None},
        errors=(403, 416, *STORAGE, 504),
        ok_media="*/*",
        ok_headers=_CONTENT_HEADERS,
        params=(
            Param(
                "Range",
                "header",
                {"type": "string"},
                "one byte range: bytes=A-B, bytes=A- or bytes=-N; any other value is ignored (the whole object)",
            ),
        ),
    ),
    Route(
        "HEAD",
        f"{_ITEM}/content",
        head_content,
        "the content's headers: Content-Length, ETag, Accept-Ranges",
        {200: None},
        ok_media="*/*",
        ok_headers={**_CONTENT_HEADERS, "Content-Length": {"schema": {"type": "integer"}}},
    ),
    Route(
        "POST",
        f"{_ITEM}/restore",
        restore_item,
        "bring a tombstoned item back",
        {200: schemas.Outcome},
        errors=(403, *LEDGER),
    ),
    Route(
        "GET",
        f"{API}/ops",
        list_ops,
        "outbox ops and the backlog",
        {200: schemas.OpList},
        params=(Param("state", "query", {"type": "string", "enum": [str(s) for s in OpState]}), _limit(100)),
    ),
    Route("GET", f"{API}/ops/{{op}}", get_op, "one op: state, attempts, error", {200: schemas.Op}),
    Route(
        "POST",
        f"{API}/ops/{{op}}/retry",
        retry_op,
        "queue a failed op again (a put needs its staged body still on disk); 409 op_not_failed or staged_body_missing",
        {200: schemas.Op},
        errors=(409, *LEDGER),
    ),
    Route(
        "POST",
        f"{API}/ops/{{op}}/cancel",
        cancel_op,
        "cancel a pending or failed op and drop its staged body; storage is not touched; 409 op_running or op_settled",
        {200: schemas.Op},
        errors=(409, *LEDGER),
    ),
    Route(
        "POST",
        f"{API}/events/s3/{{ds}}",
        post_s3_events,
        "S3 event records (MinIO, Ceph RGW) for a webhook dataset: kept in its durable inbox, applied within "
        f"about a second; the API token or the driver's shared secret in {webhook.SECRET_HEADER}",
        {202: schemas.Accepted},
        errors=(400, 409, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.S3Notification)}}},
    ),
    Route(
        "POST",
        f"{API}/events/gcs/{{ds}}",
        post_gcs_events,
        "a Pub/Sub push of a Cloud Storage notification (JSON_API_V1) for a webhook dataset: kept in its "
        f"durable inbox; the API token or the driver's shared secret in {webhook.SECRET_HEADER}",
        {202: schemas.Accepted},
        errors=(400, 409, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.PubSubPush)}}},
    ),
    Route(
        "GET",
        f"{_ITEM}/thumbnail",
        get_thumbnail,
        "the item's thumbnail (JPEG or WebP, upright); 404 no_thumbnail while enrichment is pending or failed",
        {200: None},
        errors=STORAGE,
        ok_media="image/*",
    ),
    Route(
        "GET",
        f"{_DS}/enrich",
        enrich_status,
        "enrichment of the dataset's items: how many are pending, done, failed",
        {200: schemas.EnrichStatus},
    ),
    Route(
        "POST",
        f"{_DS}/enrich",
        start_enrich,
        "queue items for enrichment: mode=missing (backfill), failed (re-run failures) or all",
        {200: schemas.EnrichStatus},
        errors=(409, *LEDGER),
        params=(
            Param("mode", "query", {"type": "string", "enum": ["missing", "failed", "all"], "default": "missing"}),
        ),
    ),
    Route(
        "GET",
        f"{API}/triggers/deliveries",
        list_deliveries,
        "trigger deliveries, newest first: pending (retrying), done, dead (dead-lettered)",
        {200: schemas.DeliveryList},
        params=(
            Param("state", "query", {"type": "string", "enum": ["pending", "done", "dead"]}),
            Param("dataset", "query", {"type": "string"}),
            _limit(100),
        ),
    ),
    Route("GET", f"{API}/openapi.json", openapi, "this document", {200: schemas.OpenApiDocument}),
    Route(
        "POST",
        f"{API}/reload",
        reload_config,
        "re-read the config file, as SIGHUP does: added datasets start, removed ones stop (catalog kept), "
        "changed ones restart; 400 invalid_config leaves the running configuration as it is",
        {200: schemas.ReloadPlan},
        errors=(503,),
    ),
]


def make_app(agent: Agent, stop: asyncio.Event, routes: list[Route] | None = None) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware(agent.settings.agent.token())],
        client_max_size=1024**2,
    )
    app[AGENT] = agent
    app[STOP] = stop
    app[TASKS] = set()
    app[DOWNSTREAM] = Downstream(agent, agent.outbox)
    app[HEARTBEAT] = Heartbeat()
    table = ROUTES if routes is None else routes
    app[SPEC] = build_spec(table, _path_params(sorted(agent.settings.datasets)))
    for route in table:
        # GET routes answer HEAD only where the table says so (HEAD .../content).
        app.router.add_route(route.method, route.aiohttp_path(), route.handler)
    return app
