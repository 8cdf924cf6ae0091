"""The downstream API end to end: a real ``bucketsync run`` daemon, real HTTP, real storage.

Every test runs on a local folder and on each cloud emulator (S3 on SeaweedFS, GCS on
fake-gcs-server, Azure on Azurite). Storage is checked directly, behind bucketsync's
back, through a store of our own (and, for local folders, through the file system):
what the API says must be what the bucket holds.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bucketsync.config import load_settings
from bucketsync.core.errors import NotFound
from bucketsync.core.model import OVERWRITE
from bucketsync.stores import Store, one_chunk, open_store, read_all
from e2e import Daemon, Response, cli, describe, local_driver, poll, write_config
from emulators import free_port

T = TypeVar("T")

KINDS = ["local", "s3", "gcs", "azure"]
TOKEN = "tok-6f1c9e2a-API-SECRET-d41d8cd98f00b204"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: integration fields whose values are secrets (invariant 9)
SECRET_FIELD = re.compile(r"secret|password|token|connection_string|account_key|private_key|credentials", re.I)


# ---------------------------------------------------------------------- HTTP


def http(
    base: str,
    method: str,
    path: str,
    *,
    data: bytes | None = None,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    context: ssl.SSLContext | None = None,
) -> Response:
    """One request; ``path`` is sent as given (already percent-encoded). Raises OSError if the
    connection breaks (a daemon that dies mid-request)."""
    hdrs: dict[str, str] = {}
    if json_body is not None:
        data = json.dumps(json_body).encode()
        hdrs["Content-Type"] = "application/json"
    elif data is not None:
        hdrs["Content-Type"] = "application/octet-stream"
    hdrs.update(headers or {})
    req = urllib.request.Request(base + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            status, raw, rh = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, raw, rh = exc.code, exc.read(), dict(exc.headers)
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw  # bytes: the content route, or a non-JSON error
    return Response(status, body, rh)


class Api:
    """Calls to one daemon with the token; remembers every response for the secret scan."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.seen: list[str] = []

    def __call__(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
    ) -> Response:
        """``path`` under ``/api/v1`` unless it starts with ``/healthz``, ``/readyz`` or ``/metrics``."""
        full = path if path.startswith(("/healthz", "/readyz", "/metrics")) else "/api/v1" + path
        hdrs = {**(AUTH if auth else {}), **(headers or {})}
        resp = http(
            self.daemon.url, method, full, data=data, json_body=json_body, headers=hdrs, context=self.daemon.ssl
        )
        raw = resp.body if isinstance(resp.body, bytes) else json.dumps(resp.body)
        self.seen.append(f"{resp.status} {resp.headers} {raw!r}")
        return resp

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``/metrics`` parsed: (sample name, sorted labels) -> value."""
        resp = self("GET", "/metrics", auth=False)
        assert resp.status == 200
        text = resp.body.decode() if isinstance(resp.body, bytes) else str(resp.body)
        self.seen.append(text)
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }


def concurrently(call: Callable[[T], Response], args: list[T]) -> list[Response]:
    """``call(arg)`` for every arg at once, from threads: requests that race in the daemon."""
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(call, args))


def item_path(dataset: str, key: str, suffix: str = "") -> str:
    return f"/datasets/{quote(dataset, safe='')}/items/{quote(key, safe='')}{suffix}"


def error_code(resp: Response) -> str:
    assert isinstance(resp.body, dict) and set(resp.body) == {"error"}, resp
    err = resp.body["error"]
    assert isinstance(err.get("message"), str) and err["message"], resp
    return str(err["code"])


# ---------------------------------------------------------------------- storage, behind bucketsync's back


class Storage:
    """A store of our own on one driver location, on a private event loop (the tests are sync)."""

    def __init__(self, config: Path, driver: str, folder: Path | None) -> None:
        self.folder = folder
        self._loop = asyncio.new_event_loop()
        settings = load_settings(config)

        async def _open() -> Store:
            return open_store(settings.drivers[driver], settings)

        self.store: Store = self._run(_open())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def keys(self) -> set[str]:
        async def _keys() -> set[str]:
            return {o.key async for o in self.store.list()}

        return self._run(_keys())

    def read(self, key: str) -> bytes | None:
        try:
            return self._run(read_all(self.store, key))
        except NotFound:
            return None

    def exists(self, key: str) -> bool:
        try:
            self._run(self.store.head(key))
        except NotFound:
            return False
        return True

    def write(self, key: str, data: bytes) -> None:
        """A foreign writer: for a folder, plain file I/O; for a bucket, an unconditional put."""
        if self.folder is not None:
            path = self.folder.joinpath(*key.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self._run(self.store.put(key, one_chunk(data), OVERWRITE))

    def files(self) -> set[str]:
        """Local folders only: every file outside the hidden folder, by relative path."""
        assert self.folder is not None
        return {
            p.relative_to(self.folder).as_posix()
            for p in self.folder.rglob("*")
            if p.is_file() and not p.relative_to(self.folder).as_posix().startswith(".bucketsync/")
        }

    def close(self) -> None:
        self._run(self.store.aclose())
        self._loop.close()


# ---------------------------------------------------------------------- the harness


class Harness:
    """Locations, configs, daemons and storage views for one test on one kind of driver.

    Cloud locations are disjoint sub-prefixes of the emulator fixture's fresh location.
    """

    def __init__(self, kind: str, tmp: Path, cloud: dict[str, Any] | None) -> None:
        self.kind = kind
        self.tmp = tmp
        self.integrations: dict[str, Any] = dict(cloud["integrations"]) if cloud else {}
        self._base: dict[str, Any] | None = dict(cloud["driver"]) if cloud else None
        self._daemons: list[Daemon] = []
        self._storages: list[Storage] = []
        self.folders: dict[str, Path] = {}

    @property
    def secrets(self) -> list[str]:
        out = [TOKEN]
        for integ in self.integrations.values():
            out += [str(v) for k, v in integ.items() if SECRET_FIELD.search(k) and isinstance(v, str) and v]
        return out

    def driver(self, name: str, **options: Any) -> dict[str, Any]:
        if self._base is None:
            self.folders[name] = folder = self.tmp / "storage" / name
            folder.mkdir(parents=True, exist_ok=True)
            return local_driver(folder, **options)
        return {**self._base, "url": self._base["url"].rstrip("/") + f"/{name}/", **options}

    def config(
        self,
        drivers: Mapping[str, Mapping[str, Any]],
        datasets: Mapping[str, Mapping[str, Any]],
        *,
        token: str | None = TOKEN,
        agent: Mapping[str, Any] | None = None,
    ) -> Path:
        """``drivers``: name -> driver options; every dataset is ``manual`` unless it says otherwise."""
        return write_config(
            self.tmp,
            {name: self.driver(name, **opts) for name, opts in drivers.items()},
            {name: {"sync": "manual", **ds} for name, ds in datasets.items()},
            integrations=self.integrations,
            agent={"api_token": token, **(agent or {})},
        )

    def storage(self, config: Path, driver: str) -> Storage:
        s = Storage(config, driver, self.folders.get(driver))
        self._storages.append(s)
        return s

    def daemon(self, config: Path, env: Mapping[str, str] | None = None) -> tuple[Daemon, Api]:
        d = Daemon(config, env=env)
        self._daemons.append(d)
        d.start()
        api = Api(d)
        poll(lambda: api("GET", "/readyz", auth=False).status == 200, what="/readyz 200", timeout=30)
        return d, api

    def assert_no_secrets(self, daemon: Daemon, api: Api) -> None:
        """Invariant 9: the token and the cloud secrets are in no log line, response or metric."""
        api.metrics()
        haystacks = {"the daemon's log": daemon.log, "API responses and /metrics": "\n".join(api.seen)}
        for secret in self.secrets:
            for where, text in haystacks.items():
                assert secret not in text, f"a secret ({secret[:4]}...) appears in {where}"

    def close(self) -> None:
        for d in self._daemons:
            d.close()
        for s in self._storages:
            s.close()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def h(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> Iterator[Harness]:
    cloud = None if kind == "local" else request.getfixturevalue(f"{kind}_config")
    harness = Harness(kind, tmp_path, cloud)
    try:
        yield harness
    finally:
        harness.close()


# ---------------------------------------------------------------------- auth


API_ROUTES = [
    ("GET", "/datasets"),
    ("GET", "/datasets/docs/items"),
    ("POST", "/datasets/docs/sync?wait=true"),
    ("GET", "/datasets/docs/runs"),
    ("GET", "/datasets/docs/runs/1"),
    ("GET", "/datasets/docs/items/a%2Fb.txt"),
    ("GET", "/datasets/docs/items/a%2Fb.txt/content"),
    ("POST", "/datasets/docs/items/a%2Fb.txt/restore"),
    ("PUT", "/datasets/docs/items/a%2Fb.txt"),
    ("PATCH", "/datasets/docs/items/a%2Fb.txt"),
    ("DELETE", "/datasets/docs/items/a%2Fb.txt"),
    ("GET", "/ops"),
    ("GET", "/ops/1"),
    ("GET", "/openapi.json"),
    ("GET", "/no-such-route"),
]
WRONG_AUTH = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": ""},
    {"X-Api-Token": TOKEN},
]


def test_every_api_route_wants_the_token_and_probes_stay_open_openapi_and_ops(h: Harness) -> None:
    # 0.0.0.0 is allowed because a token is set.
    cfg = h.config({"main": {}}, {"docs": {"driver": "main"}}, agent={"listen": f"0.0.0.0:{free_port()}"})
    storage = h.storage(cfg, "main")
    daemon, api = h.daemon(cfg)
    for method, path in API_ROUTES:
        for headers in WRONG_AUTH:
            body = b"payload" if method == "PUT" else b'{"metadata": {"a": "b"}}' if method == "PATCH" else None
            resp = api(method, path, data=body, headers=headers, auth=False)
            assert resp.status == 401, (method, path, headers, resp)
            assert error_code(resp) == "unauthorized"
            assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer"), resp.headers
            assert resp.headers.get("Content-Type", "").startswith("application/json")
        # ?token= in the URL is no way in either.
        sep = "&" if "?" in path else "?"
        assert api(method, f"{path}{sep}token={TOKEN}", auth=False).status == 401
    # The scheme name is case-insensitive (RFC 7235); the token is not.
    for scheme in ("bearer", "BEARER", "BeArEr"):
        assert api("GET", "/datasets", headers={"Authorization": f"{scheme} {TOKEN}"}, auth=False).status == 200
        assert api("GET", "/datasets", headers={"Authorization": f"{scheme} {TOKEN.upper()}"}, auth=False).status == 401
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert api("GET", open_path, auth=False).status == 200, open_path
    assert api("GET", "/datasets").status == 200
    assert api("GET", "/no-such-route").status == 404  # with the token: an honest 404, as JSON
    # Nothing the refused requests asked for happened.
    assert storage.keys() == set()
    ops = api("GET", "/ops")
    assert ops.status == 200 and ops.body["ops"] == []
    assert api("GET", "/datasets/docs/runs").body["runs"] == []
    check_openapi_and_ops(api)
    h.assert_no_secrets(daemon, api)


def check_openapi_and_ops(api: Api) -> None:
    """The OpenAPI document lists the documented routes; ``/ops`` shows state and attempts."""
    resp = api("GET", "/openapi.json")
    assert resp.status == 200 and isinstance(resp.body, dict)
    spec = resp.body
    assert str(spec["openapi"]).startswith("3.")
    documented = {
        "/api/v1/datasets": {"get"},
        "/api/v1/datasets/{ds}/items": {"get"},
        "/api/v1/datasets/{ds}/items/{key}": {"get", "put", "patch", "delete"},
        "/api/v1/datasets/{ds}/items/{key}/content": {"get"},
        "/api/v1/datasets/{ds}/items/{key}/restore": {"post"},
        "/api/v1/datasets/{ds}/sync": {"post"},
        "/api/v1/datasets/{ds}/runs": {"get"},
        "/api/v1/datasets/{ds}/runs/{run}": {"get"},
        "/api/v1/ops": {"get"},
        "/api/v1/ops/{op}": {"get"},
    }
    for path, methods in documented.items():
        assert path in spec["paths"], path
        assert methods <= set(spec["paths"][path]), (path, sorted(spec["paths"][path]))
    assert "bearer" in spec["components"]["securitySchemes"]

    assert api("PUT", item_path("docs", "one.txt"), data=b"1").status == 201
    assert api("PUT", item_path("docs", "one.txt"), data=b"2").status == 409
    ops = api("GET", "/ops")
    assert ops.status == 200
    assert ops.body["backlog"] == 0
    rows = ops.body["ops"]
    assert [(o["kind"], o["key"], o["state"]) for o in rows] == [("put", "one.txt", "done")]
    assert all(isinstance(o["attempts"], int) and o["attempts"] >= 1 for o in rows)
    one = api("GET", f"/ops/{rows[0]['id']}")
    assert one.status == 200 and one.body["state"] == "done" and one.body["attempts"] == rows[0]["attempts"]
    assert api("GET", "/ops?state=pending").body["ops"] == []
    assert error_code(api("GET", "/ops?state=bogus")) == "invalid_parameter"
    assert error_code(api("GET", "/ops/999999")) == "not_found"
    assert error_code(api("GET", "/ops/abc")) == "invalid_parameter"


def test_a_public_listen_address_without_a_token_refuses_to_start(h: Harness) -> None:
    port = free_port()
    cfg = h.config({"main": {}}, {"docs": {"driver": "main"}}, token=None, agent={"listen": f"0.0.0.0:{port}"})
    proc = cli(cfg, "run", timeout=30)
    assert proc.returncode == 2, describe(proc)
    assert "agent.listen" in proc.stderr and "token" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # nothing listens


# ---------------------------------------------------------------------- put


def test_put_get_content_overwrite_and_conflicts(h: Harness) -> None:
    cfg = h.config({"main": {}}, {"docs": {"driver": "main"}})
    storage = h.storage(cfg, "main")
    daemon, api = h.daemon(cfg)
    bodies = {
        "reports/2024/q1.csv": b"a,b\n1,2\n",
        "données/日本語 ü.txt": "héllo wörld".encode(),
        "big/blob.bin": bytes(range(256)) * (3 * 4096) + b"!",  # 3 MiB + 1: streamed, not buffered
        "odd/a+b c?d#e%f&g=h;i.txt": b"reserved characters",
        "photo/content": b"a key that looks like the content route",
        "photo/restore": b"a key that looks like the restore route",
    }
    created: dict[str, dict[str, Any]] = {}
    for key, data in bodies.items():
        resp = api("PUT", item_path("docs", key), data=data)
        assert resp.status == 201, resp
        assert resp.body["result"] == "created"
        item = resp.body["item"]
        assert (item["key"], item["size"], item["state"]) == (key, len(data), "live")
        assert resp.body["op"]["state"] == "done" and resp.body["op"]["kind"] == "put"
        created[key] = item
        assert storage.read(key) == data  # really in storage
        if storage.folder is not None:
            assert storage.folder.joinpath(*key.split("/")).read_bytes() == data

        got = api("GET", item_path("docs", key))
        assert got.status == 200 and got.body == item
        content = api("GET", item_path("docs", key, "/content"))
        assert content.status == 200 and content.body == data
        if item["etag"]:
            assert content.headers.get("ETag") == f'"{item["etag"]}"'
    assert storage.keys() == set(bodies)
    if storage.folder is not None:
        assert storage.files() == set(bodies)
    listed = api("GET", "/datasets/docs/items").body["items"]
    assert [i["key"] for i in listed] == sorted(bodies)

    # A second create-only PUT: 409, storage unchanged.
    key = "reports/2024/q1.csv"
    resp = api("PUT", item_path("docs", key), data=b"something else")
    assert resp.status == 409 and error_code(resp) == "already_exists"
    assert storage.read(key) == bodies[key]
    assert api("GET", item_path("docs", key)).body == created[key]

    # ?overwrite=true: 200, same item, new bytes.
    resp = api("PUT", item_path("docs", key) + "?overwrite=true", data=b"v2,v2,v2\n")
    assert resp.status == 200 and resp.body["result"] == "overwritten", resp
    assert resp.body["item"]["id"] == created[key]["id"]
    assert resp.body["item"]["size"] == len(b"v2,v2,v2\n")
    assert storage.read(key) == b"v2,v2,v2\n"
    assert api("GET", item_path("docs", key, "/content")).body == b"v2,v2,v2\n"

    # Changed in storage behind bucketsync's back: the overwrite is refused (invariant 7).
    storage.write(key, b"foreign version, written directly")
    resp = api("PUT", item_path("docs", key) + "?overwrite=true", data=b"v3")
    assert resp.status == 412 and error_code(resp) == "precondition_failed", resp
    assert storage.read(key) == b"foreign version, written directly"
    assert storage.keys() == set(bodies)
    failed = api("GET", "/ops?state=failed").body["ops"]
    assert [(o["key"], o["error_code"]) for o in failed] in ([], [(key, "precondition_failed")])

    # Concurrent create-only PUTs of one new key: exactly one wins, the others get 409.
    racers = {f"racer {i}".encode(): None for i in range(6)}
    results = concurrently(lambda data: api("PUT", item_path("docs", "race.txt"), data=data), list(racers))
    statuses = sorted(r.status for r in results)
    assert statuses == [201] + [409] * 5, [(r.status, r.body) for r in results]
    winner = next(r for r in results if r.status == 201)
    assert storage.read("race.txt") == api("GET", item_path("docs", "race.txt", "/content")).body
    assert winner.body["item"]["size"] == len(storage.read("race.txt") or b"")

    # The content type given is the one served.
    resp = api("PUT", item_path("docs", "pic.dat"), data=b"\x89PNG", headers={"Content-Type": "image/png"})
    assert resp.status == 201 and resp.body["item"]["content_type"] == "image/png", resp
    content = api("GET", item_path("docs", "pic.dat", "/content"))
    assert content.headers["Content-Type"].startswith("image/png") and content.body == b"\x89PNG"

    assert error_code(api("PUT", item_path("docs", "x") + "?overwrite=maybe", data=b"x")) == "invalid_parameter"
    assert not storage.exists("x")
    h.assert_no_secrets(daemon, api)


def test_content_honours_range_and_head(h: Harness) -> None:
    """Issue 13.23: 206 with Content-Range by a ranged read from storage, 416 past the end, HEAD with no body."""
    cfg = h.config({"main": {}}, {"docs": {"driver": "main"}})
    _daemon, api = h.daemon(cfg)
    data = bytes(range(256)) * 8 + b"end"  # 2,051 bytes
    path = item_path("docs", "video/clip.bin")
    item = api("PUT", path, data=data).body["item"]
    content = path + "/content"

    head = api("HEAD", content)
    assert head.status == 200 and head.body in (b"", ""), head
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Accept-Ranges"] == "bytes"
    if item["etag"]:
        assert head.headers["ETag"] == f'"{item["etag"]}"'

    full = api("GET", content)
    assert full.status == 200 and full.body == data and full.headers["Accept-Ranges"] == "bytes"
    for header, start, end in (
        ("bytes=0-0", 0, 0),
        ("bytes=10-19", 10, 19),
        ("bytes=2000-", 2000, len(data) - 1),
        ("bytes=-3", len(data) - 3, len(data) - 1),
        ("bytes=2048-999999", 2048, len(data) - 1),
        ("bytes=-99999", 0, len(data) - 1),
    ):
        resp = api("GET", content, headers={"Range": header})
        assert resp.status == 206, (header, resp.status)
        assert resp.body == data[start : end + 1], header
        assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}", (header, resp.headers)
        assert resp.headers["Content-Length"] == str(end - start + 1)
    for header in (f"bytes={len(data)}-", "bytes=99999-100000", "bytes=-0"):
        resp = api("GET", content, headers={"Range": header})
        assert resp.status == 416 and error_code(resp) == "range_not_satisfiable", (header, resp)
        assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    # Headers we do not serve as a range (other units, several ranges, nonsense): the whole object.
    for header in ("items=0-1", "bytes=0-1,5-6", "bytes=9-3", "bytes=abc"):
        resp = api("GET", content, headers={"Range": header})
        assert resp.status == 200 and resp.body == data, header
    assert api("HEAD", item_path("docs", "missing", "/content")).status == 404


@pytest.mark.parametrize("kind", ["local"])
def test_every_parameter_is_validated_with_a_4xx_naming_it(h: Harness) -> None:
    """Issue 13.6: ids beyond SQLite's range, non-ASCII or garbage cursors, bad names: 400, never 500."""
    cfg = h.config({"main": {}}, {"docs": {"driver": "main"}})
    daemon, api = h.daemon(cfg)
    for k in ("a", "b", "c"):
        assert api("PUT", item_path("docs", k), data=b"x").status == 201
    cases = {
        "/ops/9223372036854775808": "op",
        "/ops/29743298472398472398472394872398472398": "op",
        "/ops/0": "op",
        "/ops/-1": "op",
        "/ops/%C3%A9": "op",
        "/datasets/docs/runs/9223372036854775808": "run",
        "/datasets/docs/runs/1e3": "run",
        "/datasets/docs/items?cursor=%C3%A9t%C3%A9": "cursor",
        "/datasets/docs/items?cursor=a": "cursor",
        "/datasets/docs/items?cursor=%2F%2F%2F%2F": "cursor",
        "/datasets/docs/items?meta.bad%22name=x": "meta.",
        "/datasets/docs/items?limit=99999999999999999999999": "limit",
        "/datasets/docs/items?limit=x": "limit",
        "/datasets/docs/runs?limit=0": "limit",
        "/ops?limit=1001": "limit",
        "/ops?state=x": "state",
        "/datasets/docs/sync?wait=perhaps": "wait",
    }
    for path, name in cases.items():
        method = "POST" if "/sync" in path else "GET"
        resp = api(method, path)
        assert resp.status == 400 and error_code(resp) == "invalid_parameter", (path, resp)
        assert name in resp.body["error"]["message"], (path, resp.body)
    assert api("GET", "/ops/9223372036854775807").status == 404
    assert api("GET", "/datasets/docs/runs/9223372036854775807").status == 404
    # A well-formed cursor we did not hand out just positions the page.
    page = api("GET", "/datasets/docs/items?limit=1")
    assert [i["key"] for i in page.body["items"]] == ["a"]
    nxt = api("GET", "/datasets/docs/items?limit=5&cursor=" + page.body["next_cursor"])
    assert [i["key"] for i in nxt.body["items"]] == ["b", "c"] and nxt.body["next_cursor"] is None
    assert api("GET", "/datasets/docs/items?cursor=_w").status == 200  # b"\xff": not UTF-8, still a position
    # Undeclared methods: 405 with Allow.
    for method in ("TRACE", "OPTIONS", "PUT"):
        resp = api(method, "/datasets")
        assert resp.status == 405 and "GET" in resp.headers.get("Allow", ""), (method, resp)
    assert "Traceback" not in daemon.log


# ---------------------------------------------------------------------- bad input

BAD_KEYS = {
    "..%2Fetc%2Fpasswd": "../etc/passwd",
    "a%2F..%2F..%2Fescape": "a/../../escape",
    "%2Fleading": "/leading",
    "a%00b": "a\x00b",
    "k" * 1025: "k" * 1025,
    ".bucketsync%2Fx": ".bucketsync/x",
    "trailing%2F": "trailing/",
    "a%2F%2Fb": "a//b",
    "a%2F.%2Fb": "a/./b",
}


def test_bad_keys_unknown_datasets_and_metadata(h: Harness) -> None:
    cfg = h.config({"main": {}}, {"docs": {"driver": "main"}})
    storage = h.storage(cfg, "main")
    daemon, api = h.daemon(cfg)
    base = "/datasets/docs/items/"
    for encoded in BAD_KEYS:
        for method, body in (("PUT", b"evil"), ("PUT?overwrite=true", b"evil"), ("GET", None), ("DELETE", None)):
            verb, _, query = method.partition("?")
            resp = api(verb, base + encoded + (f"?{query}" if query else ""), data=body)
            assert resp.status == 400 and error_code(resp) == "invalid_key", (method, encoded, resp)
        resp = api("PATCH", base + encoded, json_body={"metadata": {"a": "b"}})
        assert resp.status == 400 and error_code(resp) == "invalid_key", (encoded, resp)
    # Nothing reached storage, nothing was queued.
    assert storage.keys() == set()
    for raw in BAD_KEYS.values():
        if raw.startswith(".bucketsync/"):
            assert not storage.exists(raw)
    if storage.folder is not None:
        assert storage.files() == set()
        assert not (storage.folder.parent / "etc").exists() and not (storage.folder.parent / "escape").exists()
        assert not (storage.folder / ".bucketsync" / "x").exists()
    assert api("GET", "/ops").body["ops"] == []

    # Unknown dataset: 404 naming the known ones.
    for method, path in (
        ("GET", "/datasets/nope/items"),
        ("PUT", "/datasets/nope/items/a.txt"),
        ("DELETE", "/datasets/nope/items/a.txt"),
        ("POST", "/datasets/nope/sync"),
        ("GET", "/datasets/nope/runs"),
    ):
        resp = api(method, path, data=b"x" if method == "PUT" else None)
        assert resp.status == 404 and error_code(resp) == "not_found", (method, path, resp)
        assert "docs" in resp.body["error"]["message"]
    assert api("GET", item_path("docs", "missing.txt")).status == 404
    assert api("GET", item_path("docs", "missing.txt", "/content")).status == 404
    assert api("DELETE", item_path("docs", "missing.txt")).status == 404
    assert api("POST", item_path("docs", "missing.txt", "/restore")).status == 404
    assert api("PATCH", item_path("docs", "missing.txt"), json_body={"metadata": {"a": "b"}}).status == 404
    assert error_code(api("GET", "/datasets/docs/items?limit=0")) == "invalid_parameter"
    assert error_code(api("GET", "/datasets/docs/items?bogus=1")) == "invalid_parameter"
    assert error_code(api("GET", "/datasets/docs/items?state=dead")) == "invalid_parameter"

    # Metadata: bad bodies are 400 and change nothing.
    for key, data in (("red.txt", b"r"), ("blue.txt", b"b")):
        assert api("PUT", item_path("docs", key), data=data).status == 201
    path = item_path("docs", "red.txt")
    for bad in (
        b"not json",
        b"",
        b"[]",
        b'"metadata"',
        b'{"metadata": 1}',
        b'{"metadata": []}',
        b'{"metadata": {}, "size": 3}',
        b'{"size": 3}',
        b'{"metadata": {"bad name": "x"}}',
        b'{"metadata": {"": "x"}}',
        b'{"metadata": {"k": [1, 2]}}',
        b'{"metadata": {"k": {"nested": true}}}',
    ):
        resp = api("PATCH", path, data=bad, headers={"Content-Type": "application/json"})
        assert resp.status == 400, (bad, resp)
        assert error_code(resp) in ("invalid_json", "invalid_request", "invalid_metadata"), (bad, resp)
    assert api("GET", path).body["metadata"] == {}

    resp = api("PATCH", path, json_body={"metadata": {"color": "red", "n": 3, "tag": "x"}})
    assert resp.status == 200 and resp.body["result"] == "updated", resp
    assert resp.body["item"]["metadata"] == {"color": "red", "n": 3, "tag": "x"}
    resp = api("PATCH", path, json_body={"metadata": {"tag": None, "shape": "round"}})
    assert resp.body["item"]["metadata"] == {"color": "red", "n": 3, "shape": "round"}
    assert api("GET", path).body["metadata"] == {"color": "red", "n": 3, "shape": "round"}
    assert api("PATCH", item_path("docs", "blue.txt"), json_body={"metadata": {"color": "blue"}}).status == 200

    def keys(query: str) -> list[str]:
        resp = api("GET", "/datasets/docs/items" + query)
        assert resp.status == 200, resp
        return [i["key"] for i in resp.body["items"]]

    assert keys("?meta.color=red") == ["red.txt"]
    assert keys("?meta.color=blue") == ["blue.txt"]
    assert keys("?meta.color=green") == []
    assert keys("?meta.color=red&meta.shape=round") == ["red.txt"]
    assert keys("?meta.color=red&meta.shape=square") == []
    assert keys("") == ["blue.txt", "red.txt"]
    assert storage.read("red.txt") == b"r"  # metadata never touches the object
    h.assert_no_secrets(daemon, api)


#: keys with control characters: buckets hold them and sync indexes them, so the API must reach them
CONTROL_KEYS = ["nl\nx", "esc\x1b[31mred", "a/\n/b", "cr\rx", "x\r\n", "tab\tand\x7fdel", "\x01"]


@pytest.mark.parametrize("kind", ["local", "s3"])  # GCS forbids CR and LF in object names
def test_keys_with_control_characters_are_addressable(h: Harness) -> None:
    """Issue 15: every key sync can index is addressable through the API, percent-encoded."""
    cfg = h.config({"main": {}}, {"docs": {"driver": "main"}})
    storage = h.storage(cfg, "main")
    storage.write("synced\x1b[0m.txt", b"written behind our back")  # indexed by sync, then addressed
    _daemon, api = h.daemon(cfg)
    run = api("POST", "/datasets/docs/sync?wait=true")
    assert run.status == 200 and run.body["added"] == 1, run
    wrong = []
    for key in [*CONTROL_KEYS, "synced\x1b[0m.txt"]:
        data = key.encode()
        if key != "synced\x1b[0m.txt":
            resp = api("PUT", item_path("docs", key), data=data)
            if resp.status != 201:
                wrong.append(f"PUT {key!r} -> {resp.status} {resp.body!r}")
                continue
        else:
            data = b"written behind our back"
        checks = [
            ("GET", item_path("docs", key), None, 200),
            ("GET", item_path("docs", key, "/content"), None, 200),
            ("PATCH", item_path("docs", key), {"metadata": {"seen": True}}, 200),
            ("DELETE", item_path("docs", key), None, 200),
            ("POST", item_path("docs", key, "/restore"), None, 200),
        ]
        for method, path, body, want in checks:
            resp = api(method, path, json_body=body)
            if resp.status != want:
                wrong.append(f"{method} {key!r} -> {resp.status} {resp.body!r}")
        got = api("GET", item_path("docs", key))
        if got.status == 200 and (got.body["key"], got.body["metadata"]) != (key, {"seen": True}):
            wrong.append(f"GET {key!r} -> {got.body!r}")
        if storage.read(key) != data:
            wrong.append(f"storage holds {storage.read(key)!r} under {key!r}")
    assert wrong == [], "\n".join(wrong)
    listed = {i["key"] for i in api("GET", "/datasets/docs/items?limit=1000").body["items"]}
    assert listed == {*CONTROL_KEYS, "synced\x1b[0m.txt"}


@pytest.mark.parametrize("kind", ["s3"])  # a folder cannot hold a file zz and a file zz/content
def test_one_key_is_one_path_segment(h: Harness) -> None:
    """Issue 16: a key's '/' travels as %2F, so .../items/KEY/content is never ambiguous."""
    cfg = h.config({"main": {}}, {"docs": {"driver": "main"}})
    storage = h.storage(cfg, "main")
    _daemon, api = h.daemon(cfg)
    assert api("PUT", "/datasets/docs/items/zz", data=b"the zz object").status == 201
    # A raw '/' after the key is a sub-resource, never part of the key: PUT has no such route.
    resp = api("PUT", "/datasets/docs/items/zz/content", data=b"would have been key zz/content")
    assert resp.status == 405 and error_code(resp) == "method_not_allowed", resp
    assert "GET" in resp.headers.get("Allow", ""), resp.headers
    assert storage.keys() == {"zz"}
    # Encoded, the same characters are one key, with its own content.
    assert api("PUT", "/datasets/docs/items/zz%2Fcontent", data=b"key zz/content").status == 201
    assert storage.keys() == {"zz", "zz/content"}
    assert api("GET", "/datasets/docs/items/zz/content").body == b"the zz object"
    assert api("GET", "/datasets/docs/items/zz%2Fcontent/content").body == b"key zz/content"
    assert api("GET", "/datasets/docs/items/zz%2Fcontent").body["key"] == "zz/content"
    assert api("GET", "/datasets/docs/items/zz%2Frestore").status == 404
    assert api("POST", "/datasets/docs/items/zz%2Fcontent/restore").body["result"] == "unchanged"
    # Any raw '/' inside what would be the key: not the key, so no route.
    assert api("GET", "/datasets/docs/items/a/b").status == 404
    assert api("DELETE", "/datasets/docs/items/zz/content").status == 405
    assert storage.keys() == {"zz", "zz/content"}


# ---------------------------------------------------------------------- delete


def test_delete_tombstones_without_allow_delete_and_deletes_with_it(h: Harness) -> None:
    cfg = h.config(
        {"keep": {}, "del": {"allow_delete": True}},
        {"docs": {"driver": "keep"}, "scratch": {"driver": "del"}},
    )
    keep, scratch = h.storage(cfg, "keep"), h.storage(cfg, "del")
    daemon, api = h.daemon(cfg)

    # allow_delete = false: a tombstone; the object stays (invariant 3).
    key = "notes/t.txt"
    assert api("PUT", item_path("docs", key), data=b"keep my bytes").status == 201
    assert api("PUT", item_path("docs", "other.txt"), data=b"o").status == 201
    resp = api("DELETE", item_path("docs", key))
    assert resp.status == 200, resp
    assert resp.body["result"] == "tombstoned"
    assert resp.body["item"]["state"] == "tombstone"
    assert keep.read(key) == b"keep my bytes"

    def listing(dataset: str, state: str | None = None) -> list[str]:
        r = api("GET", f"/datasets/{dataset}/items" + (f"?state={state}" if state else ""))
        assert r.status == 200, r
        return [i["key"] for i in r.body["items"]]

    assert listing("docs") == ["other.txt"]
    assert listing("docs", "tombstone") == [key]
    assert listing("docs", "all") == [key, "other.txt"]
    assert api("GET", item_path("docs", key)).body["state"] == "tombstone"
    assert api("GET", item_path("docs", key, "/content")).status == 404

    # Upstream sync never brings it back, even when the object changes meanwhile.
    for change in (None, b"changed behind our back"):
        if change is not None:
            keep.write(key, change)
        run = api("POST", "/datasets/docs/sync?wait=true")
        assert run.status == 200 and run.body["status"] == "ok", run
        assert run.body["added"] == 0 and run.body["removed"] == 0
        assert api("GET", item_path("docs", key)).body["state"] == "tombstone"
        assert listing("docs") == ["other.txt"]
    assert keep.read(key) == b"changed behind our back"

    # Only an explicit restore does.
    resp = api("POST", item_path("docs", key, "/restore"))
    assert resp.status == 200 and resp.body["result"] == "restored", resp
    assert resp.body["item"]["state"] == "live"
    assert listing("docs") == [key, "other.txt"]
    assert api("GET", item_path("docs", key, "/content")).body == b"changed behind our back"
    assert api("POST", item_path("docs", key, "/restore")).body["result"] == "unchanged"

    # allow_delete = true: the object is deleted and the item is gone.
    for k, data in (("gone.txt", b"bye"), ("stays.txt", b"hi"), ("theirs.txt", b"ours")):
        assert api("PUT", item_path("scratch", k), data=data).status == 201
    resp = api("DELETE", item_path("scratch", "gone.txt"))
    assert resp.status == 200 and resp.body["result"] == "deleted", resp
    assert resp.body["op"]["state"] == "done"
    assert not scratch.exists("gone.txt")
    assert api("GET", item_path("scratch", "gone.txt")).status == 404
    assert "gone.txt" not in listing("scratch", "all")
    assert api("DELETE", item_path("scratch", "gone.txt")).status == 404

    # ... but never an object that changed since it was indexed.
    scratch.write("theirs.txt", b"changed by somebody else")
    resp = api("DELETE", item_path("scratch", "theirs.txt"))
    assert resp.status == 412 and error_code(resp) == "precondition_failed", resp
    assert scratch.read("theirs.txt") == b"changed by somebody else"
    assert api("GET", item_path("scratch", "theirs.txt")).body["state"] == "live"
    assert scratch.keys() == {"stays.txt", "theirs.txt"}
    if scratch.folder is not None:
        assert scratch.files() == {"stays.txt", "theirs.txt"}
    h.assert_no_secrets(daemon, api)


# ---------------------------------------------------------------------- read_only, quota, metrics


def test_read_only_quota_and_metrics(h: Harness) -> None:
    cfg = h.config(
        {"ro": {"allow_delete": True}, "q": {}, "r": {}},
        {
            "frozen": {"driver": "ro", "read_only": True},
            "capped": {"driver": "q", "quota": 3},
            "race": {"driver": "r", "quota": 2},
        },
    )
    ro, q, r = h.storage(cfg, "ro"), h.storage(cfg, "q"), h.storage(cfg, "r")
    ro.write("r.txt", b"read me")
    daemon, api = h.daemon(cfg)
    assert api("POST", "/datasets/frozen/sync?wait=true").body["added"] == 1

    # read_only: PUT and DELETE are 403 read_only; storage untouched.
    for method, path, kw in (
        ("PUT", item_path("frozen", "new.txt"), {"data": b"x"}),
        ("PUT", item_path("frozen", "r.txt") + "?overwrite=true", {"data": b"x"}),
        ("DELETE", item_path("frozen", "r.txt"), {}),
    ):
        resp = api(method, path, **kw)
        assert resp.status == 403 and error_code(resp) == "read_only", (method, path, resp)
    # ... but user metadata is catalog-only, so PATCH works on a read-only dataset (issue 13.24).
    resp = api("PATCH", item_path("frozen", "r.txt"), json_body={"metadata": {"label": "cat", "score": 0.9}})
    assert resp.status == 200 and resp.body["result"] == "updated", resp
    assert resp.body["op"] is None  # no storage operation
    assert ro.keys() == {"r.txt"}
    assert ro.read("r.txt") == b"read me"
    item = api("GET", item_path("frozen", "r.txt")).body
    assert item["state"] == "live" and item["metadata"] == {"label": "cat", "score": 0.9}
    assert api("POST", "/datasets/frozen/sync?wait=true").body["status"] == "ok"
    assert api("GET", item_path("frozen", "r.txt")).body["metadata"] == {"label": "cat", "score": 0.9}

    # quota = 3: two PUTs, then an upstream sync over four more objects adds one and says so.
    for k in ("a", "b"):
        assert api("PUT", item_path("capped", k), data=k.encode()).status == 201
    for k in ("c1", "c2", "c3", "c4"):
        q.write(k, b"foreign")
    run = api("POST", "/datasets/capped/sync?wait=true")
    assert run.status == 200, run
    assert run.body["added"] == 1
    assert run.body["error"] is not None and "quota" in run.body["error"], run.body
    live = [i["key"] for i in api("GET", "/datasets/capped/items").body["items"]]
    assert len(live) == 3 and {"a", "b"} <= set(live)
    resp = api("PUT", item_path("capped", "d"), data=b"d")
    assert resp.status == 403 and error_code(resp) == "quota", resp
    assert "quota" in resp.body["error"]["message"]
    assert not q.exists("d")
    assert api("PUT", item_path("capped", "a") + "?overwrite=true", data=b"A").status == 200  # not a new item
    assert q.read("a") == b"A"

    # Six new keys PUT at once into room for two: the quota still holds.
    results = concurrently(lambda k: api("PUT", item_path("race", k), data=k.encode()), [f"k{i}" for i in range(6)])
    assert sorted(x.status for x in results) == [201, 201, 403, 403, 403, 403], [(x.status, x.body) for x in results]
    assert all(error_code(x) == "quota" for x in results if x.status == 403)
    won = {x.body["item"]["key"] for x in results if x.status == 201}
    assert r.keys() == won
    assert {i["key"] for i in api("GET", "/datasets/race/items").body["items"]} == won

    # Metrics after all that.
    m = api.metrics()

    def value(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("bucketsync_downstream_ops_total", op="put", result="ok") >= 3
    assert value("bucketsync_gate_refusals_total", reason="read_only") >= 3
    assert value("bucketsync_gate_refusals_total", reason="quota") >= 1
    backlog = {dict(labels)["dataset"]: v for (name, labels), v in m.items() if name == "bucketsync_outbox_backlog"}
    assert backlog and set(backlog.values()) == {0}, backlog  # one series per dataset
    assert value("bucketsync_quota_skipped_total", dataset="capped") == 3
    h.assert_no_secrets(daemon, api)


@pytest.mark.parametrize("kind", ["local"])
def test_item_gauge_follows_downstream_changes(h: Harness) -> None:
    """``bucketsync_dataset_items`` says how many items a dataset has; users change that too."""
    cfg = h.config({"keep": {}}, {"docs": {"driver": "keep"}})
    _daemon, api = h.daemon(cfg)
    for k in ("1", "2", "3"):
        assert api("PUT", item_path("docs", k), data=b"x").status == 201
    assert api("DELETE", item_path("docs", "3")).body["result"] == "tombstoned"

    def gauge(state: str) -> float | None:
        return api.metrics().get(("bucketsync_dataset_items", (("dataset", "docs"), ("state", state))))

    counts = api("GET", "/datasets").body["datasets"][0]["items"]
    assert counts == {"live": 2, "tombstone": 1}
    assert (gauge("live"), gauge("tombstone")) == (2, 1)
    assert api.metrics().get(("bucketsync_tombstones_total", (("dataset", "docs"),))) == 1


# ---------------------------------------------------------------------- crash recovery (invariant 8)


def _op_for(api: Api, key: str) -> dict[str, Any]:
    ops = [o for o in api("GET", "/ops").body["ops"] if o["key"] == key]
    assert len(ops) == 1, ops
    op: dict[str, Any] = ops[0]
    return op


@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("point", ["outbox.after_storage", "outbox.before_storage"])
def test_put_survives_a_crash_at_a_failpoint(h: Harness, point: str) -> None:
    cfg = h.config({"main": {}}, {"docs": {"driver": "main"}})
    storage = h.storage(cfg, "main")
    key, data = "crash/put.bin", b"crash-test payload " * 100
    daemon, api = h.daemon(cfg, env={"BUCKETSYNC_FAILPOINT": point})
    with pytest.raises(OSError):
        api("PUT", item_path("docs", key), data=data)
    assert daemon.wait(20) == 137, daemon.log
    assert f"failpoint {point}" in daemon.log
    assert storage.read(key) == (data if point == "outbox.after_storage" else None)

    daemon, api = h.daemon(cfg)  # no failpoint: the restart finishes the op
    op = poll(
        lambda: o if (o := _op_for(api, key))["state"] != "pending" else None,
        timeout=30,
        what="the put op to settle after the restart",
    )
    assert op["state"] == "done", op
    assert op["attempts"] == 2
    assert storage.keys() == {key}
    assert storage.read(key) == data
    rows = api("GET", "/datasets/docs/items?state=all").body["items"]
    assert [(i["key"], i["size"], i["state"]) for i in rows] == [(key, len(data), "live")]
    assert api("GET", item_path("docs", key, "/content")).body == data
    assert list((h.tmp / "var" / "staging").glob("*")) == []  # the staged body is cleaned up
    # A run afterwards finds the object already indexed: nothing added, no duplicate.
    run = api("POST", "/datasets/docs/sync?wait=true").body
    assert (run["status"], run["added"], run["modified"], run["unchanged"]) == ("ok", 0, 0, 1), run
    h.assert_no_secrets(daemon, api)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_delete_survives_a_crash_after_storage(h: Harness) -> None:
    cfg = h.config({"del": {"allow_delete": True}}, {"docs": {"driver": "del"}})
    storage = h.storage(cfg, "del")
    storage.write("doomed.txt", b"doomed")
    storage.write("kept.txt", b"kept")
    daemon, api = h.daemon(cfg, env={"BUCKETSYNC_FAILPOINT": "outbox.after_storage"})
    assert api("POST", "/datasets/docs/sync?wait=true").body["added"] == 2
    with pytest.raises(OSError):
        api("DELETE", item_path("docs", "doomed.txt"))
    assert daemon.wait(20) == 137, daemon.log
    assert not storage.exists("doomed.txt")  # storage saw the delete, the ledger did not

    daemon, api = h.daemon(cfg)
    op = poll(
        lambda: o if (o := _op_for(api, "doomed.txt"))["state"] != "pending" else None,
        timeout=30,
        what="the delete op to settle after the restart",
    )
    assert op["state"] == "done" and op["kind"] == "delete", op
    assert api("GET", item_path("docs", "doomed.txt")).status == 404
    assert [i["key"] for i in api("GET", "/datasets/docs/items?state=all").body["items"]] == ["kept.txt"]
    assert storage.keys() == {"kept.txt"}
    h.assert_no_secrets(daemon, api)
