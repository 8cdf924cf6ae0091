"""schemathesis against a real daemon, driven by the daemon's own ``/api/v1/openapi.json``.

Checks on (all of them, positive mode): no 5xx, every response matches its declared status,
content type, headers and schema, every undeclared method answers 405 with ``Allow``, auth
is not ignored, and no schema-valid request is rejected. Two passes, each bounded by a
number of examples per operation (about half a minute each on this machine):

- ``frozen``: a read-only local dataset seeded with files, with the key pinned to a real
  item, so content, ranges, HEAD, metadata, restore and the read-only refusals run on
  real paths;
- ``scratch``: a writable in-memory dataset with deletes allowed, with generated keys, so
  PUT, DELETE and restore create and remove real items.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from e2e import Daemon, describe, local_driver, toml_value, write_config, write_files

TOKEN = "tok-fuzz-0c4e8d1b-SECRET"
SEEDED = {"photos/cat.jpg": b"\xff\xd8\xff" + bytes(range(256)) * 4, "notes/a b.txt": "hello", "c.csv": "a,b\n1,2\n"}
#: statuses that say "the state does not allow this", not "the request is invalid"
STATE_CONFLICTS = ["409", "412", "416"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    folder = tmp_path / "storage"
    write_files(folder, SEEDED)
    cfg = write_config(
        tmp_path,
        {"disk": local_driver(folder), "mem": {"url": f"mem://fuzz-{tmp_path.name}", "allow_delete": True}},
        {
            "frozen": {"driver": "disk", "read_only": True, "sync": "manual"},
            "scratch": {"driver": "mem", "sync": "manual", "quota": 100_000},
        },
        agent={"api_token": TOKEN},
    )
    d = Daemon(cfg).start()
    d.wait_ready(timeout=30)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert d.api("POST", "/datasets/frozen/sync", params={"wait": "true"}, headers=auth).body["added"] == len(SEEDED)
    for key in ("seed-1", "seed-2"):
        assert d.request("PUT", f"/api/v1/datasets/scratch/items/{key}", headers=auth, json_body="x").status == 201
    yield d
    d.close()


def run_schemathesis(
    base: str, spec_url: str, tmp_path: Path, name: str, parameters: dict[str, str], examples: int, mode: str = "all"
) -> str:
    """Run the schemathesis CLI with every check on; AssertionError with its report if anything failed."""
    config = tmp_path / f"schemathesis-{name}.toml"
    lines = [
        f"base-url = {toml_value(base)}",
        f"headers = {{ Authorization = {toml_value('Bearer ' + TOKEN)} }}",
        "request-timeout = 30.0",
        "",
        "[checks.positive_data_acceptance]",
        f"expected-statuses = {toml_value(['2xx', '401', '403', '404', *STATE_CONFLICTS])}",
        "",
        "[parameters]",
        *(f"{toml_value(k)} = {toml_value(v)}" for k, v in parameters.items()),
    ]
    config.write_text("\n".join(lines) + "\n")
    argv = [
        *(sys.executable, "-m", "schemathesis.cli"),
        "--config-file",
        str(config),
        "run",
        spec_url,
        "--checks",
        "all",
        "--mode",
        mode,
        "--max-examples",
        str(examples),
        "--generation-database",
        "none",
        "--seed",
        "13",
        "--no-color",
        # Not fuzzed: clone and merge create datasets the document's enum of dataset names
        # cannot know (every later request on one is "schema-violating" yet valid), and move's
        # and clone's bodies carry a catalog filter, a language JSON Schema cannot state. They
        # are tested end to end in test_e2e_catalog.py, the filter's grammar in test_catalog_query.py.
        # Not fuzzed either: a link's ref is valid only if the config's drivers hold it or [links]
        # lets its address be fetched, and an import's body is a CSV checked row by row; both
        # are tested end to end in test_e2e_links.py, their checks in test_fetch.py and test_imports.py.
        "--exclude-path-regex",
        "/(clone|move|merge|links|import)$",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, describe(proc)
    return proc.stdout


def schemathesis(
    daemon: Daemon, tmp_path: Path, name: str, parameters: dict[str, str], examples: int, mode: str
) -> str:
    try:
        spec = daemon.url + "/api/v1/openapi.json"
        out = run_schemathesis(daemon.url, spec, tmp_path, name, parameters, examples, mode)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- daemon log (tail) ---\n{daemon.log[-5000:]}") from None
    # Our handlers never failed (aiohttp's own parser may log the malformed requests it answers 400).
    assert '"event": "request failed"' not in daemon.log, daemon.log[-5000:]
    return out


#: A filter is a JSON document in a string (its grammar is tested in test_catalog_query.py), and
#: a cursor belongs to its sort: generated ones would be refused as they should. This filter is
#: valid for items and datasets alike, and the default sort lets generated cursors position a page.
CATALOG_PINS = {"query.filter": '{"metadata.x": {"$exists": false}}', "query.sort": ""}


def test_fuzz_read_only_dataset_on_real_items(daemon: Daemon, tmp_path: Path) -> None:
    # Pinned parameters replace what the negative mode generates, so this pass is positive only.
    pins = {"path.ds": "frozen", "path.key": "photos/cat.jpg", **CATALOG_PINS}
    schemathesis(daemon, tmp_path, "frozen", pins, examples=10, mode="positive")


def test_fuzz_every_dataset_with_generated_keys_and_invalid_input(daemon: Daemon, tmp_path: Path) -> None:
    # ds is an enum of the agent's datasets in its own document: no pin needed.
    schemathesis(daemon, tmp_path, "all", CATALOG_PINS, examples=10, mode="all")


class _Broken(BaseHTTPRequestHandler):
    """An API whose one route answers 500: the fuzz harness must fail on it."""

    SPEC = {
        "openapi": "3.1.0",
        "info": {"title": "broken", "version": "1"},
        "paths": {"/boom": {"get": {"responses": {"200": {"description": "never"}}}}},
    }

    def do_GET(self) -> None:
        status, body = (200, self.SPEC) if self.path == "/openapi.json" else (500, {"error": "boom"})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_the_harness_fails_on_a_500(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(AssertionError, match=r"(?i)server error"):
            run_schemathesis(url, url + "/openapi.json", tmp_path, "broken", {}, examples=5)
    finally:
        server.shutdown()
        server.server_close()
