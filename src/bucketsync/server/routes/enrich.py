"""Enrichment: thumbnails, the queue's state and backfills, and trigger deliveries."""

from __future__ import annotations

import asyncio

from aiohttp import web

from bucketsync.enrich import Deliveries, EnrichQueue
from bucketsync.enrich.thumbs import MIME as THUMB_MIME
from bucketsync.server import schemas
from bucketsync.server.http import (
    DS_PATH,
    ITEM_PATH,
    ApiError,
    agent_of,
    int_param,
    ledger_ds,
    query_limit,
    synced_dataset,
)
from bucketsync.server.openapi import API, LEDGER, STORAGE, Param, Route
from bucketsync.server.routes.items import live_item


async def get_thumbnail(request: web.Request) -> web.StreamResponse:
    """The item's thumbnail, from the hidden folder in storage or from the local cache."""
    name, key, item = await live_item(request)
    agent = agent_of(request)
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
    name = synced_dataset(request)
    agent = agent_of(request)
    assert agent.ledger is not None
    counts = await EnrichQueue(agent.ledger).counts(await ledger_ds(request, name))
    return web.json_response({"dataset": name, "enabled": agent.settings.enriches(name), **counts})


async def start_enrich(request: web.Request) -> web.Response:
    """Queue items again: ``mode`` missing (backfill, the default), failed, or all."""
    name = synced_dataset(request)
    agent = agent_of(request)
    assert agent.ledger is not None
    mode = request.query.get("mode", "missing")
    if mode not in ("missing", "failed", "all"):
        raise ApiError(400, "invalid_parameter", "query parameter 'mode' must be missing, failed or all")
    if not agent.settings.enriches(name):
        raise ApiError(
            409, "enrich_disabled", f"dataset {name!r} does not enrich: set enrich.enabled or datasets.{name}.enrich"
        )
    queue = EnrichQueue(agent.ledger)
    ds_id = await ledger_ds(request, name)
    queued = await queue.requeue(ds_id, mode)
    agent.enricher.wake.set()
    counts = await queue.counts(ds_id)
    return web.json_response({"dataset": name, "enabled": True, **counts, "queued": queued})


async def list_deliveries(request: web.Request) -> web.Response:
    agent = agent_of(request)
    assert agent.ledger is not None
    state = request.query.get("state")
    if state is not None and state not in ("pending", "done", "dead"):
        raise ApiError(400, "invalid_parameter", "query parameter 'state' must be pending, done or dead")
    dataset = request.query.get("dataset")
    if dataset is not None:
        agent.settings.dataset(dataset)
    store = Deliveries(agent.ledger)
    found = await store.list(state=state, dataset=dataset, limit=int_param(request, "limit", 100, 1, 1000))
    return web.json_response({"deliveries": [d.as_json() for d in found], "counts": await store.counts()})


ROUTES: list[Route] = [
    Route(
        "GET",
        f"{ITEM_PATH}/thumbnail",
        get_thumbnail,
        "the item's thumbnail (JPEG or WebP, upright); 404 no_thumbnail while enrichment is pending or failed",
        {200: None},
        errors=STORAGE,
        ok_media="image/*",
    ),
    Route(
        "GET",
        f"{DS_PATH}/enrich",
        enrich_status,
        "enrichment of the dataset's items: how many are pending, done, failed",
        {200: schemas.EnrichStatus},
    ),
    Route(
        "POST",
        f"{DS_PATH}/enrich",
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
            query_limit(100),
        ),
    ),
]
