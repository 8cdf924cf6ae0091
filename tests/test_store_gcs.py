"""GcsStore against a real fake-gcs-server, plus unit tests of its error translation.

fake-gcs-server has no auth, so it cannot produce 401/403 (or throttling, or 5xx):
those cases are tested by handing ``translate`` constructed aiohttp errors. Every
other test talks to the running server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import gcloud.aio.auth.token as gcloud_token
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

import bucketsync.core.retry
from bucketsync.config import GcpIntegration, Settings, load_settings
from bucketsync.core.errors import (
    AlreadyExists,
    BadEndpoint,
    ConfigError,
    NotFound,
    OrderError,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from bucketsync.core.model import CREATE, ObjectInfo, PutMode
from bucketsync.stores import PagedListing, Store, listing_pages, open_store, read_all
from bucketsync.stores.gcs import UPLOAD_CHUNK, GcsStore, endpoint, translate
from conformance import CHECKS, Check, Delegating, SlowFolders, check_missing_root
from emulators import free_port
from emulators.gcs import PREFIX, FakeGcs

MiB = 1 << 20


async def chunks_of(data: bytes, size: int = MiB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def listed(store: GcsStore, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix)]


async def raw_metadata(store: GcsStore, key: str) -> dict[str, Any]:
    """The object resource as the server has it, bypassing the store's mapping."""
    storage = await store._client()
    meta: dict[str, Any] = await storage.download_metadata(store.bucket, store.prefix + key)
    return meta


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


# --- the Store contract, end to end -------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check: Check, gcs_store: GcsStore) -> None:
    await check(gcs_store)


#: the listing checks that cross pages and parts
ACROSS_PARTS = [
    c
    for c in CHECKS
    if c.__name__
    in {"check_pagination", "check_list_sorted_awkward_keys", "check_list_prefix", "check_hidden_folder_not_listed"}
]
#: split points as a last run could leave them: on keys, between keys, past them, awkward ones
SPLITS = ["", "a", "a-c", "a/", "a/b", "a0", "page/", "page/015", "page/0155", "pagez", "z", "é", "\U0001f600"]


class SplitAt(Delegating):
    """A store whose ``list`` always goes through ``list_split`` with ``SPLITS``."""

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        inner = self.inner
        assert isinstance(inner, GcsStore)
        return inner.list_split(prefix, SPLITS)


@pytest.mark.parametrize("mode", ["sequential", "split"])
@pytest.mark.parametrize("check", ACROSS_PARTS, ids=lambda c: c.__name__)
async def test_conformance_listing_in_parts(check: Check, mode: str, fake_gcs: FakeGcs) -> None:
    """The listing checks one page after another (``list_concurrency = 1``), and cut at ``SPLITS``
    (startOffset/endOffset, pages of 3); the plain conformance run lists discovered parts in parallel."""
    store = GcsStore(
        fake_gcs.create_bucket(),
        PREFIX,
        endpoint_url=fake_gcs.url,
        page_size=3 if mode == "split" else 10,
        list_concurrency=1 if mode == "sequential" else 4,
    )
    try:
        await check(SplitAt(store) if mode == "split" else store)
    finally:
        await store.aclose()


async def test_an_initial_listing_goes_on_while_its_split_points_are_found(
    fake_gcs: FakeGcs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no split points, the first part pages on from the first page while the folders are
    listed for them, and is then cut at the first folder past what it has: every key once, in order."""
    store = GcsStore(fake_gcs.create_bucket(), PREFIX, endpoint_url=fake_gcs.url, page_size=3, list_concurrency=4)
    keys = [f"{folder}/{i}" for folder in "abcdefgh" for i in range(5)]
    asked: list[dict[str, str]] = []
    list_page, slow = store._list_page, SlowFolders(store._discover_splits)

    async def recorded(params: dict[str, str]) -> dict[str, Any]:
        asked.append(params)
        if "delimiter" not in params:
            await slow.page()
        return await list_page(params)

    try:
        for key in keys:
            await store.put(key, body(b"x"))
        monkeypatch.setattr(store, "_list_page", recorded)
        monkeypatch.setattr(store, "_discover_splits", slow.discover)
        assert await listed(store) == keys
        folders_from = ["delimiter" in p for p in asked].index(True)
        assert folders_from >= 4  # the first part went on with page tokens, not waiting for the folders
        first_part = [p for p in asked if "delimiter" not in p and "startOffset" not in p]
        assert all("endOffset" not in p for p in first_part)  # a page token keeps its request's bounds
        assert {p["startOffset"] for p in asked if "startOffset" in p} <= {f"{PREFIX}{f}/" for f in "defgh"}
    finally:
        await store.aclose()


async def test_offsets_bound_the_listing_on_the_server(fake_gcs: FakeGcs) -> None:
    """fake-gcs-server honours startOffset/endOffset: a part costs only its own pages."""
    store = GcsStore(fake_gcs.create_bucket(), PREFIX, endpoint_url=fake_gcs.url, page_size=100)
    try:
        for key in ("a", "b", "c", "d"):
            await store.put(key, body(b"x"))
        params = store._list_params(PREFIX, startOffset=f"{PREFIX}b", endOffset=f"{PREFIX}d")
        page = await store._list_page(params)
        assert [i["name"] for i in page["items"]] == [f"{PREFIX}b", f"{PREFIX}c"]
    finally:
        await store.aclose()


async def test_conformance_missing_root(fake_gcs: FakeGcs) -> None:
    store = GcsStore("no-such-bucket-here", PREFIX, endpoint_url=fake_gcs.url, page_size=10)
    try:
        await check_missing_root(store)
        with pytest.raises(NotFound, match="bucket 'no-such-bucket-here' does not exist"):
            await listed(store)
        await store.delete("x")  # idempotent, even here
    finally:
        await store.aclose()


# check_permission_denied is not run: fake-gcs-server has no auth and allows everything.
# The 401/403 mapping is covered by the translate() unit tests at the end of this file.


async def test_put_head_list_open_agree(gcs_store: GcsStore) -> None:
    put = await gcs_store.put("a/b.txt", body(b"hello"), content_type="text/plain")
    assert (put.key, put.size, put.etag) == ("a/b.txt", 5, md5_b64(b"hello"))
    assert await gcs_store.head("a/b.txt") == put
    assert [i async for i in gcs_store.list()] == [put]
    assert await read_all(gcs_store, "a/b.txt") == b"hello"
    meta = await raw_metadata(gcs_store, "a/b.txt")
    assert meta["name"] == PREFIX + "a/b.txt"
    assert meta["contentType"] == "text/plain"
    assert put.version == str(meta["generation"])


async def test_list_pages_in_code_point_order_and_skips_non_items(fake_gcs: FakeGcs, gcs_store: GcsStore) -> None:
    keys = [f"k{i:02d}" for i in range(23)] + ["a-c", "a/b", "a0", "é", "z/\u4e2d", "\U0001f600"]
    for key in keys:
        await gcs_store.put(key, body(key.encode()))
    # Written around the store: a folder marker, the hidden folder, a key outside the prefix.
    root = GcsStore(gcs_store.bucket, "", endpoint_url=fake_gcs.url)
    try:
        for name in (PREFIX + "folder/", PREFIX + ".bucketsync/perm-test", "other/outside", PREFIX[:-1]):
            await root.put(name, body(b"x"))
    finally:
        await root.aclose()
    got = await listed(gcs_store)  # page_size=10: several pages
    assert got == sorted(keys)
    assert "a-c" < "a/b" < "a0"  # code-point order, as a bucket lists
    assert await listed(gcs_store, "k1") == [f"k1{i}" for i in range(10)]
    assert await listed(gcs_store, "nothing-here") == []


async def test_list_pages_are_the_servers_pages(fake_gcs: FakeGcs, gcs_store: GcsStore) -> None:
    """``list_pages`` (``PagedListing``, what a sync reads) hands over one list per objects.list page."""
    assert isinstance(gcs_store, PagedListing)
    keys = [f"k{i:02d}" for i in range(23)] + ["k05/"]  # a folder marker: on its page, not an item
    for key in keys:
        await gcs_store.put(key, body(key.encode()))
    gcs_store.list_concurrency = 1  # one page after another: the pages are the server's
    pages = [page async for page in listing_pages(gcs_store)]
    assert [len(p) for p in pages] == [9, 10, 4]  # k05/ is the first page's tenth name
    assert [i.key for p in pages for i in p] == sorted(k for k in keys if not k.endswith("/"))
    assert [i for p in pages for i in p] == [i async for i in gcs_store.list()]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["p/a", "p/c", "p/b"], "'p/b' after 'p/c'"),
        (["p/a", "p/a"], "'p/a' after 'p/a'"),
        (["p/a", "q/b"], "returned 'q/b', outside the prefix"),
    ],
)
async def test_a_page_out_of_order_or_outside_the_prefix_fails(
    gcs_store: GcsStore, monkeypatch: pytest.MonkeyPatch, names: list[str], message: str
) -> None:
    now = "2026-11-29T22:59:18.124913Z"

    async def page(params: dict[str, str]) -> dict[str, Any]:
        return {"items": [{"name": n, "size": "1", "updated": now, "md5Hash": "x", "generation": "1"} for n in names]}

    monkeypatch.setattr(gcs_store, "_list_page", page)
    gcs_store.prefix, gcs_store.list_concurrency = "p/", 1
    with pytest.raises((StorageError, OrderError), match=message):
        await listed(gcs_store)


async def test_empty_prefix_store_lists_the_whole_bucket(fake_gcs: FakeGcs) -> None:
    store = GcsStore(fake_gcs.create_bucket(), endpoint_url=fake_gcs.url, page_size=2)
    try:
        for key in ("b", "a", "c/d", "c/"):
            await store.put(key, body(b""))
        assert await listed(store) == ["a", "b", "c/d"]
        assert (await store.head("a")).size == 0
        assert await read_all(store, "a") == b""
    finally:
        await store.aclose()


async def test_generation_is_the_version_and_changes_on_overwrite(gcs_store: GcsStore) -> None:
    first = await gcs_store.put("k", body(b"same"))
    second = await gcs_store.put("k", body(b"same"))
    assert first.version and second.version
    assert first.version != second.version
    assert second.version == str((await raw_metadata(gcs_store, "k"))["generation"])
    # The etag names the content: rewriting the same bytes keeps it (renames match by it).
    assert first.etag == second.etag
    assert [i.version async for i in gcs_store.list()] == [second.version]


@pytest.mark.parametrize("mode", ["create", "if-match"])
async def test_retried_conditional_put_whose_first_attempt_landed(
    gcs_store: GcsStore, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The response to a landed write is lost; the retry's 412 must not turn it into a conflict."""
    monkeypatch.setattr(bucketsync.core.retry, "backoff", lambda *a, **k: 0.0)
    old = await gcs_store.put("k", body(b"old")) if mode == "if-match" else None
    put_mode = CREATE if old is None else PutMode.matching(old.etag or "")
    real = GcsStore._request
    lost: list[int] = []

    async def flaky(store: GcsStore, method: str, url: str, **kw: Any) -> Any:
        resp = await real(store, method, url, **kw)
        if method == "POST" and not lost:
            lost.append(resp.status)
            resp.release()
            raise aiohttp.ServerDisconnectedError()
        return resp

    monkeypatch.setattr(GcsStore, "_request", flaky)
    info = await gcs_store.put("k", body(b"new"), put_mode)
    assert lost == [200]
    assert info == await gcs_store.head("k")
    assert await read_all(gcs_store, "k") == b"new"
    # And a real conflict is still reported as one.
    lost.clear()
    with pytest.raises(AlreadyExists if old is None else PreconditionFailed):
        await gcs_store.put("k", body(b"other"), put_mode)


async def test_storage_class_is_applied(fake_gcs: FakeGcs) -> None:
    store = GcsStore(fake_gcs.create_bucket(), PREFIX, endpoint_url=fake_gcs.url, storage_class="NEARLINE")
    try:
        await store.put("k", body(b"x"))
        assert (await raw_metadata(store, "k"))["storageClass"] == "NEARLINE"
    finally:
        await store.aclose()


# --- large bodies: resumable, streamed ----------------------------------------------------------


class ChunkSpy:
    """Counts resumable chunk PUTs and remembers their sizes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        real = GcsStore._send_chunk

        async def spy(store: GcsStore, uri: str, data: bytes, *args: Any) -> Any:
            self.sizes.append(len(data))
            return await real(store, uri, data, *args)

        monkeypatch.setattr(GcsStore, "_send_chunk", spy)


async def test_large_put_is_a_resumable_upload_in_chunks(gcs_store: GcsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = ChunkSpy(monkeypatch)
    data = hashlib.sha256(b"seed").digest() * ((2 * UPLOAD_CHUNK + 12345) // 32 + 1)
    info = await gcs_store.put("big.bin", chunks_of(data, MiB + 7))
    assert spy.sizes == [UPLOAD_CHUNK, UPLOAD_CHUNK, len(data) - 2 * UPLOAD_CHUNK]
    assert (info.size, info.etag) == (len(data), md5_b64(data))
    assert await gcs_store.head("big.bin") == info
    assert [i async for i in gcs_store.list()] == [info]
    assert hashlib.md5(b"".join([c async for c in gcs_store.open("big.bin")])).digest() == hashlib.md5(data).digest()


async def test_body_of_exactly_one_chunk_is_a_single_upload(
    gcs_store: GcsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ChunkSpy(monkeypatch)
    data = b"\x01" * UPLOAD_CHUNK
    info = await gcs_store.put("k", chunks_of(data))
    assert spy.sizes == []
    assert info.size == UPLOAD_CHUNK


async def test_large_conditional_puts(gcs_store: GcsStore) -> None:
    data = b"\x02" * (UPLOAD_CHUNK + 1)
    first = await gcs_store.put("k", chunks_of(data), CREATE)
    with pytest.raises(AlreadyExists):
        await gcs_store.put("k", chunks_of(data), CREATE)
    second = await gcs_store.put("k", chunks_of(data), PutMode.matching(first.etag or ""))
    assert second.version != first.version
    with pytest.raises(PreconditionFailed):
        await gcs_store.put("k", chunks_of(data), PutMode.matching("stale"))


async def test_a_failing_body_abandons_the_upload(gcs_store: GcsStore) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"\x03" * (UPLOAD_CHUNK + 1)
        yield b"\x03" * UPLOAD_CHUNK
        raise OSError("source went away")

    with pytest.raises(OSError, match="source went away"):
        await gcs_store.put("k", broken())
    assert await listed(gcs_store) == []


# --- configuration, endpoint, credentials -------------------------------------------------------


async def test_gcs_config_works_through_settings_without_emulator_env(
    gcs_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    settings = Settings(integrations=gcs_config["integrations"], drivers={"photos": gcs_config["driver"]})
    store = open_store(settings.drivers["photos"], settings)
    try:
        assert isinstance(store, GcsStore)
        assert isinstance(store, Store)
        assert store.url == gcs_config["driver"]["url"]
        await store.put("x.jpg", body(b"jpeg"))
        assert [i.key async for i in store.list()] == ["x.jpg"]
    finally:
        await store.aclose()


def test_gcs_scheme_alias(fake_gcs: FakeGcs) -> None:
    settings = Settings(drivers={"d": {"url": "gcs://bkt/p", "endpoint_url": fake_gcs.url}})
    store = open_store(settings.drivers["d"], settings)
    assert isinstance(store, GcsStore)
    assert (store.bucket, store.prefix, store.url) == ("bkt", "p/", "gs://bkt/p/")


def test_endpoint_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert endpoint(None) == ("https://storage.googleapis.com", False)
    assert endpoint("http://127.0.0.1:4443/") == ("http://127.0.0.1:4443", True)  # no token over http
    assert endpoint("https://storage.example.internal") == ("https://storage.example.internal", False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9")
    assert endpoint(None) == ("http://127.0.0.1:9", True)
    assert endpoint("https://x.example") == ("https://x.example", False)  # the driver's setting wins


async def test_emulator_never_reads_credentials(fake_gcs: FakeGcs, tmp_path: Path) -> None:
    integ = GcpIntegration(kind="gcp", service_account_file=tmp_path / "missing.json")
    store = GcsStore(fake_gcs.create_bucket(), endpoint_url=fake_gcs.url, integration=integ, integration_name="g")
    try:
        assert await listed(store) == []
    finally:
        await store.aclose()


async def test_unusable_credentials_are_a_config_error(tmp_path: Path) -> None:
    secret = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----SECRETSECRET'
    cases = [
        (GcpIntegration(kind="gcp", service_account_file=tmp_path / "missing.json"), "service_account_file: .*missing"),
        (GcpIntegration(kind="gcp", service_account_json=secret), "not valid JSON"),
        (GcpIntegration(kind="gcp", service_account_json='{"no": "type"}'), "no 'type'"),
    ]
    for integ, message in cases:
        store = GcsStore("bkt", endpoint_url="https://127.0.0.1:9", integration=integ, integration_name="g")
        try:
            with pytest.raises(ConfigError, match=message) as exc:
                await store.head("k")
            assert "integrations.g" in str(exc.value)
            assert "SECRETSECRET" not in str(exc.value)
        finally:
            await store.aclose()


async def test_no_credentials_anywhere_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No integration key, no ADC file, no metadata server: a clear PermissionDenied, not a retry loop."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # an empty gcloud config folder
    # The metadata server's address is read at import; point it at a closed port.
    monkeypatch.setattr(gcloud_token, "GCE_ENDPOINT_TOKEN", f"http://127.0.0.1:{free_port()}/token")
    store = GcsStore("bkt", endpoint_url="https://127.0.0.1:9")
    try:
        with pytest.raises(PermissionDenied, match="no credentials") as exc:
            await store.head("k")
        assert "gs://bkt/" in str(exc.value)
    finally:
        await store.aclose()


def test_service_account_file_and_json_together_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[integrations.g]\nkind = "gcp"\nservice_account_file = "/a.json"\nservice_account_json = "{}"\n')
    with pytest.raises(ConfigError, match=r"integrations\.g: set service_account_file or .*not both"):
        load_settings(config)


async def test_unreachable_server_is_transient_after_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bucketsync.core.retry, "backoff", lambda *a, **k: 0.0)
    store = GcsStore("bkt", PREFIX, endpoint_url=f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(Transient, match="gs://bkt/some/prefix/"):
            await listed(store)
        with pytest.raises(Transient):
            await store.put("k", body(b"x"))
    finally:
        await store.aclose()


# --- error translation (unit: the emulator cannot produce these statuses) -----------------------

TOKEN = "ya29.super-secret-token"


def response_error(status: int, body: str = "") -> aiohttp.ClientResponseError:
    """An error shaped like gcloud-aio-auth raises it, whose request carries a bearer token."""
    info = aiohttp.RequestInfo(
        URL("https://storage.googleapis.com/storage/v1/b/bkt/o"),
        "GET",
        CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {TOKEN}"})),
        URL("https://storage.googleapis.com/storage/v1/b/bkt/o"),
    )
    return aiohttp.ClientResponseError(info, (), status=status, message=f"Reason: {body}")


@pytest.mark.parametrize(
    ("status", "create", "kind"),
    [
        (404, False, NotFound),
        (401, False, PermissionDenied),
        (403, False, PermissionDenied),
        (412, False, PreconditionFailed),
        (412, True, AlreadyExists),
        (409, True, AlreadyExists),
        (409, False, StorageError),
        (408, False, Transient),
        (429, False, Transient),
        (500, False, Transient),
        (502, False, Transient),
        (503, False, Transient),
        (504, False, Transient),
        (400, False, StorageError),
    ],
)
def test_translate_status(status: int, create: bool, kind: type[StorageError]) -> None:
    google = json.dumps({"error": {"code": status, "message": "sa@p.iam.gserviceaccount.com lacks access"}})
    err = translate(response_error(status, google), "put gs://bkt/p/k", key="k", create=create)
    assert type(err) is kind
    assert err.key == "k"
    assert "gs://bkt/p/k" in str(err)
    assert TOKEN not in str(err) and TOKEN not in repr(err)
    if kind in (NotFound, PermissionDenied, Transient, StorageError):
        assert "lacks access" in str(err)


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        aiohttp.ServerTimeoutError("read timed out"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("cut short"),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_translate_network_errors_are_transient(exc: BaseException) -> None:
    err = translate(exc, "list gs://bkt/")
    assert isinstance(err, Transient)
    assert "gs://bkt/" in str(err)


def test_translate_keeps_non_json_bodies_short() -> None:
    err = translate(response_error(502, "<html>" + "x" * 5000 + "</html>"), "head gs://bkt/k")
    assert isinstance(err, Transient)
    assert len(str(err)) < 400


# --- md5Hash values that look like weak ETags (issue 13 point 12) --------------------------------


def _body_whose_md5_starts_with_weak_prefix() -> bytes:
    """Bytes whose base64 MD5 begins with ``W/`` (about 1 in 4,096 bodies do)."""
    for n in range(1_000_000):
        data = f"body {n}".encode()
        if md5_b64(data).startswith("W/"):
            return data
    raise AssertionError("no such body in the first million")


def test_normalize_etag_strips_weak_prefix_only_from_http_etags() -> None:
    from bucketsync.core.model import normalize_etag

    value = "W/3fJ7aQ0b3v7cGm0t2m2R0Q=="
    assert normalize_etag(value, origin="hash") == value
    assert normalize_etag(f" {value}\n", origin="hash") == value
    assert normalize_etag('W/"abc"') == "abc"  # a real weak HTTP ETag
    assert normalize_etag('"abc"') == "abc"
    assert normalize_etag("", origin="hash") is None


async def test_md5_hash_starting_with_w_slash_is_kept_whole(gcs_store: GcsStore) -> None:
    data = _body_whose_md5_starts_with_weak_prefix()
    want = md5_b64(data)
    written = await gcs_store.put("weak.bin", body(data))
    assert written.etag == want
    assert (await gcs_store.head("weak.bin")).etag == want
    assert [(o.key, o.etag) async for o in gcs_store.list()] == [("weak.bin", want)]
    info, md5 = await gcs_store.content_md5("weak.bin")
    assert info.etag == want and md5 == hashlib.md5(data).digest()


# --- listing on the store's own session -----------------------------------------------------------


@asynccontextmanager
async def json_api(answer: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/storage/v1/b/{bucket}/o", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_listing_sends_the_token_and_reads_the_page() -> None:
    """objects.list goes on the store's session with the store's token (not through gcloud-aio)."""
    seen: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append({"auth": request.headers.get("Authorization", ""), **request.query})
        item = {
            "name": "p/a",
            "size": "3",
            "updated": "2026-11-29T22:59:18.124913Z",
            "md5Hash": "bWQ1",
            "generation": "7",
        }
        return web.json_response({"kind": "storage#objects", "items": [item]})

    class FixedToken:
        async def get(self) -> str:
            return TOKEN

    async with json_api(answer) as url:
        store = GcsStore("bkt", "p/", endpoint_url=url)
        store._session, store._token = aiohttp.ClientSession(), FixedToken()  # type: ignore[assignment]
        try:
            assert [(i.key, i.size, i.etag, i.version) async for i in store.list()] == [("a", 3, "bWQ1", "7")]
        finally:
            await store.aclose()
    assert seen == [
        {
            "auth": f"Bearer {TOKEN}",
            "prefix": "p/",
            "maxResults": "1000",
            "fields": "items(name,size,updated,md5Hash,etag,generation),nextPageToken",
        }
    ]


async def test_a_listing_that_is_not_json_is_a_bad_endpoint() -> None:
    async def login_page(request: web.Request) -> web.Response:
        return web.Response(text="<html>a login page</html>", content_type="text/html")

    async with json_api(login_page) as url:
        store = GcsStore("bkt", "p/", endpoint_url=url)
        try:
            with pytest.raises(BadEndpoint, match="does not answer as the GCS JSON API"):
                await listed(store)
        finally:
            await store.aclose()


async def test_listing_does_not_load_gcloud_aio(fake_gcs: FakeGcs) -> None:
    """gcloud-aio (and JWT and cryptography under it) is loaded for a token or the SDK's calls only."""
    bucket = fake_gcs.create_bucket()
    code = (
        "import asyncio, sys; from bucketsync.stores.gcs import GcsStore\n"
        "async def main():\n"
        f"    s = GcsStore({bucket!r}, endpoint_url={fake_gcs.url!r})\n"
        "    assert [i async for i in s.list()] == []\n"
        "    await s.aclose()\n"
        "asyncio.run(main()); print(sorted(m for m in sys.modules if m.startswith('gcloud')))"
    )
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
