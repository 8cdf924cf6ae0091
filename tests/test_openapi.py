"""The OpenAPI document and the router come from one route table and cannot drift apart."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from bucketsync.agent import Agent
from bucketsync.config import Settings
from bucketsync.core import ranges
from bucketsync.core.keys import KEY_PATTERN, key_problem
from bucketsync.server.api import SPEC, make_app


def _app_and_spec(tmp_path: Path) -> tuple[set[tuple[str, str]], dict[str, Any]]:
    settings = Settings(
        agent={"ledger": tmp_path / "ledger.db"},
        drivers={"d": {"url": "mem://openapi"}},
        datasets={"docs": {"driver": "d"}, "more": {"driver": "d"}},
    )
    app = make_app(Agent(settings), asyncio.Event())
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter", "")
        routes.add((route.method, re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)))
    spec = app[SPEC]
    return routes, spec


def test_every_api_route_is_documented_and_nothing_else(tmp_path: Path) -> None:
    routes, spec = _app_and_spec(tmp_path)
    served = {(m, p) for m, p in routes if p.startswith("/api/")}
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert served == documented


def test_every_response_is_typed_and_every_route_declares_auth_and_not_found(tmp_path: Path) -> None:
    _, spec = _app_and_spec(tmp_path)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            statuses = set(op["responses"])
            assert {"400", "401", "404"} <= statuses, (method, path, statuses)
            for status, resp in op["responses"].items():
                for media, body in resp.get("content", {}).items():
                    schema = body["schema"]
                    assert schema != {"type": "object"}, (method, path, status)
                    assert "$ref" in schema or schema.get("format") == "binary", (method, path, status, media)
                if status.startswith(("4", "5")):
                    assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert spec["paths"]["/api/v1/datasets/{ds}/items"]["get"]["parameters"][0]["schema"]["enum"] == ["docs", "more"]
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', str(spec).replace("'", '"')))
    assert refs <= set(spec["components"]["schemas"]), refs - set(spec["components"]["schemas"])


def test_the_documented_key_pattern_is_the_key_rule() -> None:
    for key in ("a", "a/b", "esc\x1b", "nl\n", "..a", "a..", "a/.b", ".bucketsyncx"):
        assert key_problem(key) is None and re.match(KEY_PATTERN, key), key
    for key in ("", "/a", "a/", "a//b", "a/../b", "..", ".bucketsync", ".bucketsync/x", "a\x00"):
        assert key_problem(key) is not None and not re.match(KEY_PATTERN, key), key


def test_range_header_parsing() -> None:
    assert ranges.parse(None, 10) is None
    assert ranges.parse("bytes=0-0", 10) == (0, 1)
    assert ranges.parse("bytes=2-", 10) == (2, 8)
    assert ranges.parse("bytes=-3", 10) == (7, 3)
    assert ranges.parse("bytes=-30", 10) == (0, 10)
    assert ranges.parse("bytes=5-500", 10) == (5, 5)
    assert ranges.parse(" bytes = 1 - 2 ", 10) == (1, 2)
    for unsatisfiable in ("bytes=10-", "bytes=10-20", "bytes=-0"):
        assert isinstance(ranges.parse(unsatisfiable, 10), ranges.Unsatisfiable), unsatisfiable
    assert isinstance(ranges.parse("bytes=0-", 0), ranges.Unsatisfiable)
    for ignored in ("bytes=5-1", "bytes=0-1,3-4", "items=0-1", "bytes=", "bytes=-", "bytes=a-b", "bytes=\u0661-\u0662"):
        assert ranges.parse(ignored, 10) is None, ignored
