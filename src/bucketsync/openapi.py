"""The OpenAPI 3.1 document served at ``/api/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from bucketsync import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = _json(_ref("Error"), "error")
_DS = {"name": "ds", "in": "path", "required": True, "schema": {"type": "string"}}
_KEY = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": "the item's key, URL-encoded ('/' as %2F); at most 1024 bytes, no '..' segments",
    "schema": {"type": "string"},
}
_OP = {"name": "op", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
_ERRORS = {"400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR}
# Writes to the ledger: 507 disk_full, 503 ledger_unavailable (see docs/operations.md).
_LEDGER_ERRORS = {"503": _ERR, "507": _ERR}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "bucketsync", "version": __version__},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        "required": ["code", "message"],
                    }
                },
            },
            "Item": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "key": {"type": "string"},
                    "size": {"type": "integer"},
                    "etag": {"type": ["string", "null"]},
                    "modified": {"type": "string", "format": "date-time"},
                    "state": {"enum": ["live", "tombstone"]},
                    "version": {"type": ["string", "null"]},
                    "content_type": {"type": ["string", "null"]},
                    "metadata": {"type": "object"},
                    "updated": {"type": ["string", "null"], "format": "date-time"},
                },
            },
            "Op": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "dataset": {"type": "string"},
                    "kind": {"enum": ["put", "delete"]},
                    "key": {"type": "string"},
                    "state": {"enum": ["pending", "done", "failed", "cancelled"]},
                    "attempts": {"type": "integer"},
                    "error": {"type": ["string", "null"]},
                    "error_code": {"type": ["string", "null"]},
                },
            },
            "Outcome": {
                "type": "object",
                "properties": {
                    "result": {
                        "enum": [
                            "created",
                            "overwritten",
                            "deleted",
                            "tombstoned",
                            "restored",
                            "unchanged",
                            "updated",
                            "pending",
                        ]
                    },
                    "item": {"oneOf": [_ref("Item"), {"type": "null"}]},
                    "op": {"oneOf": [_ref("Op"), {"type": "null"}]},
                },
            },
            "Run": {
                "type": "object",
                "properties": {
                    k: {"type": "integer"}
                    for k in ("id", "listed", "added", "modified", "removed", "renamed", "unchanged", "errors")
                }
                | {
                    "status": {"enum": ["running", "ok", "failed", "aborted", "partial"]},
                    "error": {"type": ["string", "null"]},
                    "gaps": {
                        "type": "array",
                        "description": "the parts of storage the run could not list (status partial); "
                        "their items kept their last known state",
                        "items": {
                            "type": "object",
                            "properties": {
                                "prefix": {"type": "string"},
                                "exact": {"type": "boolean", "description": "the gap is the one key prefix"},
                                "error": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/datasets": {
            "get": {
                "summary": "every dataset with item counts and its last run",
                "responses": {"200": _json({"type": "object"}, "datasets")},
            }
        },
        "/api/v1/datasets/{ds}/items": {
            "get": {
                "summary": "a page of items ordered by key; meta.NAME=VALUE filters on user metadata",
                "parameters": [
                    _DS,
                    {"name": "prefix", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    {"name": "state", "in": "query", "schema": {"enum": ["live", "tombstone", "all"]}},
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "items": {"type": "array", "items": _ref("Item")},
                                "next_cursor": {"type": ["string", "null"]},
                            },
                        },
                        "a page",
                    ),
                    **_ERRORS,
                },
            }
        },
        "/api/v1/datasets/{ds}/items/{key}": {
            "parameters": [_DS, _KEY],
            "get": {
                "summary": "one item with all its metadata",
                "responses": {"200": _json(_ref("Item"), "the item"), **_ERRORS},
            },
            "put": {
                "summary": "write the body to storage under the key, then index it; create-only unless overwrite=true (then conditional on the known etag)",
                "parameters": [{"name": "overwrite", "in": "query", "schema": {"type": "boolean"}}],
                "requestBody": {
                    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
                },
                "responses": {
                    "201": _json(_ref("Outcome"), "created"),
                    "200": _json(_ref("Outcome"), "overwritten"),
                    "202": _json(_ref("Outcome"), "accepted; the op is still pending"),
                    "409": _ERR,
                    "412": _ERR,
                    **_ERRORS,
                    **_LEDGER_ERRORS,
                },
            },
            "patch": {
                "summary": "merge user metadata (null removes a name); system metadata is read-only",
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"metadata": {"type": "object"}},
                                "required": ["metadata"],
                            }
                        }
                    }
                },
                "responses": {"200": _json(_ref("Outcome"), "updated"), **_ERRORS, **_LEDGER_ERRORS},
            },
            "delete": {
                "summary": "through the gate: deleted in storage when the driver allows deletes, else tombstoned",
                "responses": {"200": _json(_ref("Outcome"), "deleted or tombstoned"), "412": _ERR, **_ERRORS},
            },
        },
        "/api/v1/datasets/{ds}/items/{key}/content": {
            "parameters": [_DS, _KEY],
            "get": {
                "summary": "stream the object from storage",
                "responses": {"200": {"description": "the bytes"}, **_ERRORS},
            },
        },
        "/api/v1/datasets/{ds}/items/{key}/restore": {
            "parameters": [_DS, _KEY],
            "post": {
                "summary": "bring a tombstoned item back",
                "responses": {"200": _json(_ref("Outcome"), "restored"), **_ERRORS},
            },
        },
        "/api/v1/datasets/{ds}/sync": {
            "parameters": [_DS],
            "post": {
                "summary": "start an upstream run now",
                "parameters": [
                    {"name": n, "in": "query", "schema": {"type": "boolean"}} for n in ("dry_run", "force", "wait")
                ],
                "responses": {
                    "202": _json({"type": "object"}, "started"),
                    "200": _json({"type": "object"}, "finished (wait or dry_run)"),
                    "409": _ERR,
                    **_ERRORS,
                },
            },
        },
        "/api/v1/datasets/{ds}/runs": {
            "parameters": [_DS],
            "get": {
                "summary": "run history, newest first",
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"runs": {"type": "array", "items": _ref("Run")}}}, "runs"
                    ),
                    **_ERRORS,
                },
            },
        },
        "/api/v1/datasets/{ds}/runs/{run}": {
            "parameters": [_DS, {"name": "run", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "get": {
                "summary": "one run, with live counts while it runs",
                "responses": {"200": _json(_ref("Run"), "the run"), **_ERRORS},
            },
        },
        "/api/v1/ops": {
            "get": {
                "summary": "outbox ops and the backlog",
                "parameters": [
                    {"name": "state", "in": "query", "schema": {"enum": ["pending", "done", "failed", "cancelled"]}}
                ],
                "responses": {"200": _json({"type": "object"}, "ops"), **_ERRORS},
            }
        },
        "/api/v1/ops/{op}": {
            "parameters": [_OP],
            "get": {
                "summary": "one op: state, attempts, error",
                "responses": {"200": _json(_ref("Op"), "the op"), **_ERRORS},
            },
        },
        "/api/v1/ops/{op}/retry": {
            "parameters": [_OP],
            "post": {
                "summary": "queue a failed op again (a put needs its staged body still on disk)",
                "responses": {
                    "200": _json(_ref("Op"), "the op, pending again"),
                    "409": _json(_ref("Error"), "not failed (op_not_failed), or staged_body_missing"),
                    **_ERRORS,
                },
            },
        },
        "/api/v1/ops/{op}/cancel": {
            "parameters": [_OP],
            "post": {
                "summary": "cancel a pending or failed op and drop its staged body; storage is not touched",
                "responses": {
                    "200": _json(_ref("Op"), "the op, cancelled"),
                    "409": _json(_ref("Error"), "running now (op_running), or done/cancelled already (op_settled)"),
                    **_ERRORS,
                },
            },
        },
    },
}
