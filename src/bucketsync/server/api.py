"""The HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and the JSON API under ``/api/v1``.

Errors are ``{"error": {"code", "message"}}`` with a status that says what kind of
wrong it is. Every ``/api/`` route wants ``Authorization: Bearer TOKEN`` when a
token is configured (compared in constant time); the health and metrics routes
stay open for probes and scrapers.

The routes live in ``server/routes/``, one module per capability, each with its rows of the
route table; what they share is ``server/http.py``. This module puts the table together: the
router and the OpenAPI document are both built from it.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from bucketsync.agent import Agent
from bucketsync.core.keys import KEY_PATTERN, MAX_KEY_BYTES
from bucketsync.downstream.ops import Downstream
from bucketsync.server.front import Heartbeat
from bucketsync.server.http import (
    AGENT,
    DOWNSTREAM,
    HEARTBEAT,
    MAX_ID,
    RELOAD,
    SPEC,
    STOP,
    TASKS,
    auth_middleware,
    errors_middleware,
)
from bucketsync.server.openapi import Param, Route, build_spec
from bucketsync.server.routes import datasets, enrich, events, folders, health, items, links, ops

__all__ = ["HEARTBEAT", "RELOAD", "ROUTES", "SPEC", "TASKS", "make_app"]

#: in the order the document lists them
ROUTES: list[Route] = [
    *health.ROUTES,
    *datasets.ROUTES,
    *folders.ROUTES,
    *links.ROUTES,
    *items.ROUTES,
    *enrich.ROUTES,
    *ops.ROUTES,
    *events.ROUTES,
]

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
