"""Liveness, readiness, metrics and the API's own document: what probes and scrapers read."""

from __future__ import annotations

from aiohttp import web

from bucketsync import metrics
from bucketsync.server import schemas
from bucketsync.server.http import HEARTBEAT, SPEC, agent_of
from bucketsync.server.openapi import API, Route


async def healthz(request: web.Request) -> web.Response:
    """Served here only under TLS; otherwise the front door answers it off the loop (server/front.py)."""
    status, doc = request.app[HEARTBEAT].liveness()
    return web.json_response(doc, status=status)


async def readyz(request: web.Request) -> web.Response:
    """503 while a dataset cannot be synced (or the ledger cannot be written)."""
    agent = agent_of(request)
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


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[SPEC])


ROUTES: list[Route] = [
    Route("GET", "/healthz", healthz, "liveness", {200: None}),
    Route("GET", "/readyz", readyz, "readiness", {200: None}),
    Route("GET", "/metrics", metrics_handler, "Prometheus metrics", {200: None}),
    Route("GET", f"{API}/openapi.json", openapi, "this document", {200: schemas.OpenApiDocument}),
]
