"""Events posted by storage (the webhook source): parsed, kept in the dataset's inbox, answered 202."""

from __future__ import annotations

import hmac
from typing import Any

import structlog
from aiohttp import web

from bucketsync import metrics
from bucketsync.server import schemas
from bucketsync.server.http import ApiError, agent_of, synced_dataset
from bucketsync.server.openapi import API, LEDGER, Route, schema_ref
from bucketsync.upstream.events import webhook

log = structlog.get_logger("bucketsync.api")


async def post_s3_events(request: web.Request) -> web.Response:
    return await _accept_events(request, "s3", webhook.s3_events)


async def post_gcs_events(request: web.Request) -> web.Response:
    return await _accept_events(request, "gs", webhook.gcs_events)


async def _accept_events(request: web.Request, scheme: str, parse: Any) -> web.Response:
    """Parse, write to the dataset's durable inbox in one transaction, answer 202: accepted means kept."""
    agent = agent_of(request)
    name = synced_dataset(request)
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
    if not events:
        return web.json_response({"accepted": 0, "ignored": ignored}, status=202)
    assert agent.ledger is not None and driver.events is not None
    ds_id = await agent.ledger.dataset_id(name)
    if await agent.ledger.inbox_put(ds_id, webhook.to_inbox(events), cap=driver.events.inbox_max):
        agent.inbox(name).set()
        if name in agent.inbox_full:
            agent.inbox_full.discard(name)
            log.info("event inbox takes events again", dataset=name)
        return web.json_response({"accepted": len(events), "ignored": ignored}, status=202)
    # Full: keeping more would grow the ledger without bound while nothing drains it. What the
    # events said is in storage, so a listing finds it: ask for one, count them, keep nothing.
    metrics.EVENTS_DROPPED.labels(name, "inbox_full").inc(len(events))
    if name not in agent.inbox_full:  # once per episode, not once per post
        agent.inbox_full.add(name)
        log.warning(
            "event inbox full: events are counted, not kept, and a reconcile listing is requested",
            dataset=name,
            inbox_max=driver.events.inbox_max,
        )
    if (loop := agent.loops.get(name)) is not None:
        loop.wake.set()
    return web.json_response({"accepted": 0, "ignored": ignored, "deferred": len(events)}, status=202)


def _check_secret(request: web.Request, secret: str | None) -> None:
    """The shared secret, when sent, must be the driver's; without it the bearer token (checked by the
    middleware) is needed, or, on an open loopback API, nothing unless the driver has a secret."""
    given = request.headers.get(webhook.SECRET_HEADER)
    if given is not None:
        if secret is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode()):
            raise ApiError(401, "unauthorized", f"wrong {webhook.SECRET_HEADER} for this dataset's driver")
    elif secret is not None and agent_of(request).settings.agent.token() is None:
        raise ApiError(401, "unauthorized", f"this dataset's driver wants its shared secret in {webhook.SECRET_HEADER}")


ROUTES: list[Route] = [
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
]
