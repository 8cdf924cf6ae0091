"""Routes as data, and the OpenAPI 3.1 document generated from them.

``make_app`` registers exactly the routes in its table and ``build_spec`` describes
exactly those routes, so the router and ``/api/v1/openapi.json`` cannot drift. Bodies
come from the pydantic models in schemas.py (``model_json_schema``); every route lists
every status it can answer with, each with a typed body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bucketsync import __version__
from bucketsync.server.schemas import MODELS, Error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
API = "/api/v1"


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "path" | "query"
    schema: Mapping[str, Any]
    description: str = ""


# What a status means on any route, for the document's descriptions.
_MEANING = {
    400: "a parameter, key or body is invalid (the error names it)",
    401: "missing or wrong bearer token",
    403: "refused by the gate (read_only, quota, allow_delete_off); nothing was touched",
    404: "no such dataset, item, run or op",
    405: "method not allowed on this path (see Allow)",
    409: "conflict: the key exists, or a run is in progress",
    412: "the object changed in storage since it was indexed",
    413: "the body is too large",
    416: "the range cannot be satisfied",
    502: "storage refused or failed",
    503: "storage or the ledger unavailable (storage_unavailable, ledger_unavailable); retry later",
    507: "the ledger's disk is full (disk_full); nothing was recorded",
}
#: every /api/ route can answer these (503: the ledger may be unavailable to any of them)
COMMON = (400, 401, 404, 503)
#: routes that reach storage can also answer these
STORAGE = (502, 503)
#: routes that write to the ledger can also answer these
LEDGER = (503, 507)


@dataclass(frozen=True)
class Route:
    """One method on one path: the handler and everything the document says about it.

    ``path`` is in OpenAPI form (``/api/v1/datasets/{ds}``); every ``{name}`` is one path
    segment (a ``/`` inside a value is sent as ``%2F``). ``ok`` maps success statuses to
    their body model (None: a non-JSON body, described by ``ok_media``).
    """

    method: str
    path: str
    handler: Handler
    summary: str
    ok: Mapping[int, type[BaseModel] | None]
    errors: tuple[int, ...] = ()
    params: tuple[Param, ...] = ()
    body: Mapping[str, Any] | None = None  # requestBody object
    ok_media: str = "application/json"
    ok_headers: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path_params(self) -> list[str]:
        return [seg[1:-1] for seg in self.path.split("/") if seg.startswith("{")]

    def aiohttp_path(self) -> str:
        """Each ``{name}`` matches exactly one raw segment (aiohttp matches the raw path, %2F stays inside)."""
        return "/".join(f"{{{seg[1:-1]}:[^/]+}}" if seg.startswith("{") else seg for seg in self.path.split("/"))


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _response(status: int, route: Route) -> dict[str, Any]:
    if status in route.ok:
        model = route.ok[status]
        out: dict[str, Any] = {"description": "success"}
        if model is not None:
            out["content"] = {"application/json": {"schema": schema_ref(model)}}
        else:
            out["content"] = {route.ok_media: {"schema": {"type": "string", "format": "binary"}}}
        if route.ok_headers:
            out["headers"] = dict(route.ok_headers)
        return out
    out = {"description": _MEANING.get(status, "error"), "content": {"application/json": {"schema": schema_ref(Error)}}}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
    return out


def _operation(route: Route, path_params: Mapping[str, Param]) -> dict[str, Any]:
    statuses = sorted({*route.ok, *COMMON, *route.errors})
    op: dict[str, Any] = {
        "operationId": route.handler.__name__,
        "summary": route.summary,
        "parameters": [_param(path_params[n], True) for n in route.path_params]
        + [_param(p, False) for p in route.params],
        "responses": {str(s): _response(s, route) for s in statuses},
    }
    if route.body is not None:
        op["requestBody"] = dict(route.body)
    return op


def _param(p: Param, required: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.name, "in": p.where, "required": required, "schema": dict(p.schema)}
    if p.description:
        out["description"] = p.description
    return out


def build_spec(routes: list[Route], path_params: Mapping[str, Param]) -> dict[str, Any]:
    _, defs = models_json_schema([(m, "serialization") for m in MODELS], ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not route.path.startswith(API):
            continue  # health and metrics are for probes and scrapers, outside the API
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, path_params)
    return {
        "openapi": "3.1.0",
        "info": {"title": "bucketsync", "version": __version__},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": defs.get("$defs", {}),
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
