"""The outbox's ops (list, retry, cancel) and the config reload."""

from __future__ import annotations

from aiohttp import web

from bucketsync.core.errors import ConfigError
from bucketsync.core.model import OpState
from bucketsync.downstream import opsctl
from bucketsync.server import schemas
from bucketsync.server.http import RELOAD, STOP, ApiError, agent_of, id_param, int_param, query_limit
from bucketsync.server.openapi import API, LEDGER, Param, Route


async def list_ops(request: web.Request) -> web.Response:
    ledger = agent_of(request).ledger
    assert ledger is not None
    raw = request.query.get("state")
    if raw is not None and raw not in {str(s) for s in OpState}:
        raise ApiError(400, "invalid_parameter", f"query parameter 'state' must be one of {', '.join(OpState)}")
    ops = await ledger.ops(state=OpState(raw) if raw else None, limit=int_param(request, "limit", 100, 1, 1000))
    return web.json_response({"ops": [o.as_json() for o in ops], "backlog": await ledger.backlog()})


async def get_op(request: web.Request) -> web.Response:
    ledger = agent_of(request).ledger
    assert ledger is not None
    op = await ledger.op(id_param(request, "op"))
    if op is None:
        raise ApiError(404, "not_found", "no such op")
    return web.json_response(op.as_json())


async def retry_op(request: web.Request) -> web.Response:
    agent = agent_of(request)
    assert agent.ledger is not None
    op = await opsctl.retry(agent.ledger, agent.outbox, id_param(request, "op"))
    return web.json_response(op.as_json())


async def cancel_op(request: web.Request) -> web.Response:
    agent = agent_of(request)
    assert agent.ledger is not None
    op = await opsctl.cancel(agent.ledger, agent.outbox, id_param(request, "op"))
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


ROUTES: list[Route] = [
    Route(
        "GET",
        f"{API}/ops",
        list_ops,
        "outbox ops and the backlog",
        {200: schemas.OpList},
        params=(Param("state", "query", {"type": "string", "enum": [str(s) for s in OpState]}), query_limit(100)),
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
        f"{API}/reload",
        reload_config,
        "re-read the config file, as SIGHUP does: added datasets start, removed ones stop (catalog kept), "
        "changed ones restart; 400 invalid_config leaves the running configuration as it is",
        {200: schemas.ReloadPlan},
        errors=(503,),
    ),
]
