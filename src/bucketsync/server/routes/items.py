"""One item: read, write through downstream, metadata, delete and restore, and its content (ranged,
from its driver, through a pointer, or fetched for a linked item)."""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from bucketsync.catalog import datasets as catalog_datasets
from bucketsync.catalog import items as catalog_items
from bucketsync.catalog import links, query, runtime
from bucketsync.core import ranges
from bucketsync.core.errors import FetchRefused
from bucketsync.core.model import Item, ItemState
from bucketsync.enrich import EnrichQueue
from bucketsync.server import schemas
from bucketsync.server.http import (
    CURSOR,
    CURSOR_PATTERN,
    DOWNSTREAM,
    DS_PATH,
    ITEM_PATH,
    ApiError,
    RangeNotSatisfiable,
    agent_of,
    any_dataset,
    bool_param,
    guess_type,
    int_param,
    is_runtime,
    item_key,
    ledger_ds,
    query_flag,
    query_limit,
    synced_dataset,
    text_param,
)
from bucketsync.server.openapi import LEDGER, STORAGE, Param, Route, schema_ref

log = structlog.get_logger("bucketsync.api")


async def list_items(request: web.Request) -> web.Response:
    name = await any_dataset(request)
    ledger = agent_of(request).ledger
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
            text_param(request, f"{prefix}.{field_name}")
    cursor = request.query.get("cursor")
    if cursor is not None and not CURSOR.match(cursor):
        raise ApiError(400, "invalid_parameter", "query parameter 'cursor' is not one this API handed out")
    raw_filter = text_param(request, "filter")
    q = catalog_items.Query(
        filter=query.parse_filter(raw_filter) if raw_filter else None,
        sort=query.parse_sort(text_param(request, "sort")),
        cursor=cursor,
        limit=int_param(request, "limit", 100, 1, 1000),
        state=None if raw_state == "all" else raw_state,
        prefix=text_param(request, "prefix"),
        meta=meta,
        system=system,
    )
    items, next_cursor = await catalog_items.page(ledger, await ledger_ds(request, name), q)
    return web.json_response({"items": await _with_system(request, name, items), "next_cursor": next_cursor})


async def get_item(request: web.Request) -> web.Response:
    name, key = await any_dataset(request), item_key(request)
    ledger = agent_of(request).ledger
    assert ledger is not None
    item = await ledger.item(await ledger_ds(request, name), key)
    if item is None:
        raise ApiError(404, "not_found", f"dataset {name!r} has no item {key!r}")
    return web.json_response((await _with_system(request, name, [item]))[0])


async def _with_system(request: web.Request, dataset: str, items: list[Item]) -> list[dict[str, Any]]:
    """Items as JSON, with their system metadata (``system``) when the dataset enriches: an item of a
    dataset that does not looks exactly as it did before enrichment existed."""
    agent = agent_of(request)
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


async def put_item(request: web.Request) -> web.Response:
    name, key = synced_dataset(request), item_key(request)
    overwrite = bool_param(request, "overwrite")
    ctype = request.headers.get("Content-Type")
    if ctype is None or ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        ctype = guess_type(key)  # curl's default for --data-binary says nothing about the file
    out = await request.app[DOWNSTREAM].put(
        name, key, request.content.iter_chunked(1 << 20), overwrite=overwrite, content_type=ctype
    )
    status = {"created": 201, "overwritten": 200, "pending": 202}[out.result]
    return web.json_response(out.as_json(), status=status)


async def patch_item(request: web.Request) -> web.Response:
    name, key = await any_dataset(request), item_key(request)
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "invalid_json", 'the body must be JSON: {"metadata": {...}}') from None
    if not isinstance(body, dict) or set(body) != {"metadata"} or not isinstance(body["metadata"], dict):
        raise ApiError(400, "invalid_request", 'the body must be {"metadata": {...}}; system metadata is read-only')
    try:
        if is_runtime(request, name):  # a clone owns its items' metadata (copied on write at clone time)
            return web.json_response(await _patch_pointer(request, name, key, body["metadata"]))
        out = await request.app[DOWNSTREAM].patch_meta(name, key, body["metadata"])
    except ValueError as exc:
        raise ApiError(400, "invalid_metadata", str(exc)) from None
    return web.json_response(out.as_json())


async def _patch_pointer(request: web.Request, name: str, key: str, patch: Any) -> dict[str, Any]:
    ledger = agent_of(request).ledger
    assert ledger is not None
    catalog_datasets.check_patch(patch)
    ds_id = await ledger_ds(request, name)
    item = await ledger.item(ds_id, key)
    if item is None:
        raise ApiError(404, "not_found", f"dataset {name!r} has no item {key!r}")
    await ledger.merge_meta(item.id, patch)
    return {"result": "updated", "item": (await ledger.item(ds_id, key) or item).as_json(full=True), "op": None}


async def delete_item(request: web.Request) -> web.Response:
    name, key = await any_dataset(request), item_key(request)
    if is_runtime(request, name):
        ledger = agent_of(request).ledger
        assert ledger is not None
        item = await ledger.item(await ledger_ds(request, name), key)
        if item is None:
            raise ApiError(404, "not_found", f"dataset {name!r} has no item {key!r}")
        return web.json_response(await runtime.unlink_pointer(agent_of(request), name, item))
    out = await request.app[DOWNSTREAM].delete(name, key)
    return web.json_response(out.as_json(), status=202 if out.result == "pending" else 200)


async def restore_item(request: web.Request) -> web.Response:
    name, key = synced_dataset(request), item_key(request)
    out = await request.app[DOWNSTREAM].restore(name, key)
    return web.json_response(out.as_json())


async def live_item(request: web.Request) -> tuple[str, str, Item]:
    name, key = await any_dataset(request), item_key(request)
    ledger = agent_of(request).ledger
    assert ledger is not None
    item = await ledger.item(await ledger_ds(request, name), key)
    if item is None or item.state is not ItemState.LIVE:
        raise ApiError(404, "not_found", f"dataset {name!r} has no live item {key!r}")
    return name, key, item


def _content_headers(key: str, item: Item) -> dict[str, str]:
    headers = {"Accept-Ranges": "bytes", "Content-Type": item.content_type or guess_type(key)}
    if item.etag:
        headers["ETag"] = f'"{item.etag}"'
    return headers


async def head_content(request: web.Request) -> web.StreamResponse:
    """The content's headers without the body: size, type, etag, and that ranges work."""
    name, key, item = await live_item(request)
    if (
        await _link_ref(request, name, item) is not None
    ):  # what a linked item's target holds is known only by fetching it
        resp = web.StreamResponse(headers={"Content-Type": item.content_type or guess_type(key)})
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
    name, key, item = await live_item(request)
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
    if not is_runtime(request, name):
        return None
    ledger = agent_of(request).ledger
    assert ledger is not None
    return await ledger.pointed_ref(item.id)


async def _link_content(request: web.Request, key: str, item: Item, ref: str) -> web.StreamResponse:
    """Stream a linked item's target (whole: a Range is ignored). A refusal (FetchRefused) comes
    before the headers go out; a failure mid-body (past max_bytes, too slow) aborts the response."""
    resp: web.StreamResponse | None = None
    try:
        async with links.open_target(agent_of(request), ref) as target:
            ctype = item.content_type or target.content_type or guess_type(key)
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
    agent = agent_of(request)
    if not is_runtime(request, name):
        return agent.stores[agent.settings.datasets[name].driver], key
    assert agent.ledger is not None
    found = await agent.ledger.pointed(item.id)
    if found is None or found[0] not in agent.settings.datasets:
        raise ApiError(404, "orphaned", f"the source object of {key!r} in {name!r} is gone")
    return agent.stores[agent.settings.datasets[found[0]].driver], found[1]


_CONTENT_HEADERS = {
    "ETag": {"schema": {"type": "string"}},
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
}


_OUTCOME_ERRORS = (403, 409, 412, *STORAGE, *LEDGER)


ROUTES: list[Route] = [
    Route(
        "GET",
        f"{DS_PATH}/items",
        list_items,
        "a page of items, by key unless sort says otherwise; filter is the catalog's JSON filter language "
        "(docs/catalog.md); meta.NAME=VALUE query parameters also filter on user metadata (as text)",
        {200: schemas.ItemPage},
        params=(
            Param("prefix", "query", {"type": "string"}, "only keys that start with this"),
            query_limit(100),
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
    Route("GET", ITEM_PATH, get_item, "one item with all its metadata", {200: schemas.Item}),
    Route(
        "PUT",
        ITEM_PATH,
        put_item,
        "write the body to storage under the key, then index it; create-only unless overwrite=true "
        "(then conditional on the known etag)",
        {201: schemas.Outcome, 200: schemas.Outcome, 202: schemas.Outcome},
        errors=_OUTCOME_ERRORS,
        params=(query_flag("overwrite", "replace an existing item if it is unchanged in storage"),),
        body={
            "required": False,  # no body is an empty object, as an empty file is
            "description": "the object's bytes; Content-Type is stored as the item's content type",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
    ),
    Route(
        "PATCH",
        ITEM_PATH,
        patch_item,
        "merge user metadata (null removes a name); allowed on read-only datasets: metadata is catalog-only",
        {200: schemas.Outcome},
        errors=(413, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.MetadataPatch)}}},
    ),
    Route(
        "DELETE",
        ITEM_PATH,
        delete_item,
        "through the gate: deleted in storage when the driver allows deletes, else tombstoned",
        {200: schemas.Outcome, 202: schemas.Outcome},
        errors=_OUTCOME_ERRORS,
    ),
    Route(
        "GET",
        f"{ITEM_PATH}/content",
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
        f"{ITEM_PATH}/content",
        head_content,
        "the content's headers: Content-Length, ETag, Accept-Ranges",
        {200: None},
        ok_media="*/*",
        ok_headers={**_CONTENT_HEADERS, "Content-Length": {"schema": {"type": "integer"}}},
    ),
    Route(
        "POST",
        f"{ITEM_PATH}/restore",
        restore_item,
        "bring a tombstoned item back",
        {200: schemas.Outcome},
        errors=(403, *LEDGER),
    ),
]
