"""Folders, derived from keys: listing, empty folders of runtime datasets, folder deletes and moves."""

from __future__ import annotations

from aiohttp import web

from bucketsync.catalog import folders, moves
from bucketsync.catalog import items as catalog_items
from bucketsync.core.keys import check_key
from bucketsync.server import schemas
from bucketsync.server.http import (
    DOWNSTREAM,
    DS_PATH,
    ApiError,
    agent_of,
    any_dataset,
    bool_param,
    json_body,
    ledger_ds,
    query_flag,
    text_param,
)
from bucketsync.server.openapi import LEDGER, STORAGE, Param, Route, schema_ref


async def list_folders(request: web.Request) -> web.Response:
    """The sub-folders of ``parent`` with item counts and sizes, from the ledger alone."""
    name = await any_dataset(request)
    ledger = agent_of(request).ledger
    assert ledger is not None
    unknown = set(request.query) - {"parent", "state"}
    if unknown:
        raise ApiError(400, "invalid_parameter", f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    state = request.query.get("state", "live")
    if state not in ("live", "tombstone"):
        raise ApiError(400, "invalid_parameter", "query parameter 'state' must be live or tombstone")
    parent = folders.parent_of(text_param(request, "parent"))
    found = await folders.listing(ledger, await ledger_ds(request, name), parent, state)
    return web.json_response(found.as_json())


async def create_folder(request: web.Request) -> web.Response:
    name = await any_dataset(request)
    body = await json_body(request, '{"path": "a/b"}')
    if set(body) != {"path"} or not isinstance(body["path"], str):
        raise ApiError(400, "invalid_request", 'the body must be {"path": "a/b"}')
    check_key(body["path"])  # the key rules: "a/b", no trailing '/'
    out = await folders.create_folder(agent_of(request), name, body["path"])
    return web.json_response(out, status=201 if out["created"] else 200)


async def delete_folder(request: web.Request) -> web.Response:
    name = await any_dataset(request)
    folder = folders.parent_of(request.match_info["path"])
    if not folder:
        raise ApiError(400, "invalid_key", "the top of a dataset is not a folder to delete")
    out = await folders.drop_folder(agent_of(request), name, folder, force=bool_param(request, "force"))
    return web.json_response(out.as_json(), status=202 if out.ops else 200)


async def move_items(request: web.Request) -> web.Response:
    """Move items (a key list, or every live item a filter matches) into a folder."""
    name = await any_dataset(request)
    ledger = agent_of(request).ledger
    assert ledger is not None
    body = await json_body(request, '{"to": "folder/", "keys": [...]} or {"to": ..., "filter": {...}}')
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
        found, more = await catalog_items.page(ledger, await ledger_ds(request, name), q)
        if more is not None:
            raise ApiError(400, "too_many_items", f"the filter matches more than {moves.MAX_MOVE} items; narrow it")
        keys = [i.key for i in found]
    results = await moves.move(agent_of(request), request.app[DOWNSTREAM], name, keys, folder)
    return web.json_response({"to": folder, "results": [r.as_json() for r in results]})


ROUTES: list[Route] = [
    Route(
        "GET",
        f"{DS_PATH}/folders",
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
        f"{DS_PATH}/folders",
        create_folder,
        "create an empty folder: persisted in a clone's or merge's catalog (201, 200 if it existed); refused "
        "(403 empty_folders_unsupported) in a synced dataset, whose bucket has no folders, only keys",
        {201: schemas.FolderCreated, 200: schemas.FolderCreated},
        errors=(403, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.FolderCreate)}}},
    ),
    Route(
        "DELETE",
        f"{DS_PATH}/folders/{{path}}",
        delete_folder,
        "delete every live item under the folder through the gate, as one operation: the mass-delete guard "
        "counts them together (force=true passes it); tombstoned without allow_delete, else one delete op "
        "per item queued in one transaction (202)",
        {200: schemas.FolderDeleted, 202: schemas.FolderDeleted},
        errors=(403, *LEDGER),
        params=(query_flag("force", "pass the mass-delete guard"),),
    ),
    Route(
        "POST",
        f"{DS_PATH}/move",
        move_items,
        "move items (keys, or every item a filter matches) into a folder: in a synced dataset a copy, then a "
        "delete of the old object through the gate (403 move_needs_allow_delete without allow_delete); the "
        "item keeps its id and metadata",
        {200: schemas.MoveResults},
        errors=(403, *STORAGE, *LEDGER),
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.MoveRequest)}}},
    ),
]
