"""Linked items (catalog/links.py) and CSV import (catalog/imports.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bucketsync.catalog import imports, links
from bucketsync.core.errors import InvalidKey
from bucketsync.server import schemas
from bucketsync.server.http import DOWNSTREAM, DS_PATH, ApiError, agent_of, json_body, synced_dataset, text_param
from bucketsync.server.openapi import LEDGER, Param, Route, schema_ref


async def create_link(request: web.Request) -> web.Response:
    """A linked item: its binary stays at ``ref``; nothing is written to storage."""
    name = synced_dataset(request)
    body = await json_body(request, '{"name": "a/b.jpg", "ref": "https://...", "mimetype": ..., "metadata": {...}}')
    if not {"name", "ref"} <= set(body) or set(body) - {"name", "ref", "mimetype", "metadata"}:
        raise ApiError(400, "invalid_request", 'the body must be {"name": ..., "ref": ..., "mimetype"?, "metadata"?}')
    try:
        link = links.Link(
            body["ref"], links.check_mimetype(body.get("mimetype")), links.check_metadata(body.get("metadata"))
        )
        result, item = await links.create(agent_of(request), name, body["name"], link)
    except ValueError as exc:
        if isinstance(exc, InvalidKey):
            raise
        raise ApiError(400, "invalid_request", str(exc)) from None
    return web.json_response({"result": result, "item": item}, status=201 if result == "created" else 200)


async def import_csv(request: web.Request) -> web.StreamResponse:
    """Stream a CSV in, stream one NDJSON line per row out, then the report."""
    name = synced_dataset(request)
    csv_name = text_param(request, "name")
    if not csv_name:
        raise ApiError(
            400, "invalid_parameter", "query parameter 'name' (the CSV's file name, e.g. cats.csv) is required"
        )
    try:
        job = imports.Import(agent_of(request), request.app[DOWNSTREAM], name, csv_name)
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


ROUTES: list[Route] = [
    Route(
        "POST",
        f"{DS_PATH}/links",
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
        f"{DS_PATH}/import",
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
]
