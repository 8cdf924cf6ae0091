"""Datasets: the list, runtime datasets (clone, merge), dataset metadata, indexes, runs and syncs."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from aiohttp import web

from bucketsync.agent import datasets_status
from bucketsync.catalog import datasets as catalog_datasets
from bucketsync.catalog import items as catalog_items
from bucketsync.catalog import query, runtime
from bucketsync.core.errors import InvalidFilter
from bucketsync.ledger.leases import FENCE
from bucketsync.server import schemas
from bucketsync.server.http import (
    DS_PATH,
    STOP,
    TASKS,
    ApiError,
    agent_of,
    any_dataset,
    bool_param,
    id_param,
    int_param,
    is_runtime,
    json_body,
    ledger_ds,
    query_flag,
    query_limit,
    synced_dataset,
    text_param,
)
from bucketsync.server.openapi import API, LEDGER, STORAGE, Param, Route, schema_ref


async def list_datasets(request: web.Request) -> web.Response:
    agent = agent_of(request)
    unknown = set(request.query) - {"filter", "sort"}
    if unknown:
        raise ApiError(400, "invalid_parameter", f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    assert agent.ledger is not None
    described = await agent.ledger.described()  # one read (or none, if nothing changed) per request
    clones = described[1]
    names = [*agent.settings.datasets, *clones]
    raw_filter, sort = text_param(request, "filter"), text_param(request, "sort")
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
    name = await any_dataset(request)
    if not is_runtime(request, name):
        raise ApiError(403, "synced_dataset", f"{name!r} is configured: remove it from the config file and reload")
    ledger = agent_of(request).ledger
    assert ledger is not None
    n = await ledger.drop_runtime(name)
    return web.json_response({"dataset": name, "deleted": True, "items": max(n, 0)})


async def merge_datasets(request: web.Request) -> web.Response:
    """A runtime dataset of pointer items to several datasets' items, conflicts as asked."""
    body = await json_body(request, '{"name": "...", "sources": ["a", "b"], "on_conflict": "folder"}')
    if set(body) != {"name", "sources", "on_conflict"}:
        raise ApiError(400, "invalid_request", 'the body must be {"name": ..., "sources": [...], "on_conflict": ...}')
    try:
        out = await runtime.merge(agent_of(request), body["name"], body["sources"], body["on_conflict"])
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    return web.json_response(out, status=201)


async def clone_dataset(request: web.Request) -> web.Response:
    """A runtime dataset of pointer items to this (synced) dataset's items: one ledger statement."""
    source = synced_dataset(request)
    body = await json_body(request, '{"name": "...", "with_metadata": true, "filter": {...}}')
    if "name" not in body or set(body) - {"name", "with_metadata", "filter"}:
        raise ApiError(400, "invalid_request", 'the body must be {"name": ..., "with_metadata": bool, "filter": {...}}')
    with_meta = body.get("with_metadata", False)
    if not isinstance(with_meta, bool):
        raise ApiError(400, "invalid_request", '"with_metadata" must be true or false')
    try:
        out = await runtime.clone(agent_of(request), source, body["name"], with_meta, body.get("filter"))
    except ValueError as exc:
        if isinstance(exc, InvalidFilter):
            raise
        raise ApiError(400, "invalid_request", str(exc)) from None
    return web.json_response(out, status=201)


async def patch_dataset(request: web.Request) -> web.Response:
    name = await any_dataset(request)
    ledger = agent_of(request).ledger
    assert ledger is not None
    body = await json_body(request, '{"metadata": {...}}')
    if set(body) != {"metadata"}:
        raise ApiError(400, "invalid_request", 'the body must be {"metadata": {...}}')
    try:
        patch = catalog_datasets.check_patch(body["metadata"])
    except ValueError as exc:
        raise ApiError(400, "invalid_metadata", str(exc)) from None
    meta = await ledger.merge_dataset_meta(await ledger_ds(request, name), patch)
    return web.json_response({"dataset": name, "metadata": meta})


async def list_indexes(request: web.Request) -> web.Response:
    ledger = agent_of(request).ledger
    assert ledger is not None
    synced_dataset(request)
    ds_id = await ledger_ds(request, request.match_info["ds"])
    return web.json_response({"indexes": await catalog_items.indexed_fields(ledger, ds_id)})


async def create_index(request: web.Request) -> web.Response:
    """Index a field of the dataset (a partial index over its rows)."""
    ledger = agent_of(request).ledger
    assert ledger is not None
    synced_dataset(request)
    body = await json_body(request, '{"field": "metadata.NAME"}')
    if set(body) != {"field"}:
        raise ApiError(400, "invalid_request", 'the body must be {"field": "metadata.NAME"} (or a system field)')
    ds_id = await ledger_ds(request, request.match_info["ds"])
    created = await catalog_items.ensure_index(ledger, ds_id, body["field"])
    return web.json_response(
        {"field": body["field"], "created": created, "indexes": await catalog_items.indexed_fields(ledger, ds_id)},
        status=201 if created else 200,
    )


async def start_sync(request: web.Request) -> web.Response:
    name = synced_dataset(request)
    loop = agent_of(request).loop(name)
    dry_run, force, wait = bool_param(request, "dry_run"), bool_param(request, "force"), bool_param(request, "wait")
    if loop.busy:
        raise ApiError(409, "run_in_progress", f"dataset {name!r} has a run in progress (run {loop.current_run})")
    fence = None
    if (keeper := agent_of(request).leases) is not None and (fence := keeper.fence(name)) is None:
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
    name = synced_dataset(request)
    ledger = agent_of(request).ledger
    assert ledger is not None
    limit = int_param(request, "limit", 20, 1, 1000)
    runs = await ledger.runs(await ledger_ds(request, name), limit=limit)
    loop = agent_of(request).loops.get(name)
    return web.json_response({"runs": [_with_live(r.as_json(), loop) for r in runs]})


async def get_run(request: web.Request) -> web.Response:
    name = synced_dataset(request)
    ledger = agent_of(request).ledger
    assert ledger is not None
    run_id = id_param(request, "run")
    run = await ledger.run(run_id)
    if run is None or run.dataset != name:
        raise ApiError(404, "not_found", f"dataset {name!r} has no run {run_id}")
    return web.json_response(_with_live(run.as_json(), agent_of(request).loops.get(name)))


def _with_live(run: dict[str, Any], loop: Any) -> dict[str, Any]:
    """A running run's counts from memory: fresher than the last committed batch."""
    if loop is not None and loop.current_run == run["id"] and loop.progress is not None:
        run |= loop.progress.as_dict()
    return run


ROUTES: list[Route] = [
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
        DS_PATH,
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
        f"{DS_PATH}/clone",
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
        DS_PATH,
        patch_dataset,
        "merge the dataset's user metadata (null removes a name); catalog-only, never storage",
        {200: schemas.DatasetMetadata},
        errors=LEDGER,
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.MetadataPatch)}}},
    ),
    Route(
        "GET",
        f"{DS_PATH}/indexes",
        list_indexes,
        "the fields the dataset has an index on",
        {200: schemas.IndexList},
    ),
    Route(
        "POST",
        f"{DS_PATH}/indexes",
        create_index,
        "index a field (metadata.NAME or a system field) for fast filters and sorts; 201 when new",
        {201: schemas.IndexCreated, 200: schemas.IndexCreated},
        errors=LEDGER,
        body={"required": True, "content": {"application/json": {"schema": schema_ref(schemas.IndexRequest)}}},
    ),
    Route(
        "POST",
        f"{DS_PATH}/sync",
        start_sync,
        "start an upstream run now",
        {202: schemas.RunStarted, 200: schemas.RunResult},
        errors=(409, *STORAGE, *LEDGER),
        params=(
            query_flag("dry_run", "report what a run would do; changes nothing"),
            query_flag("force", "pass the mass-delete guard"),
            query_flag("wait", "answer when the run has finished"),
        ),
    ),
    Route(
        "GET",
        f"{DS_PATH}/runs",
        list_runs,
        "run history, newest first",
        {200: schemas.RunList},
        params=(query_limit(20),),
    ),
    Route("GET", f"{DS_PATH}/runs/{{run}}", get_run, "one run, with live counts while it runs", {200: schemas.Run}),
]
