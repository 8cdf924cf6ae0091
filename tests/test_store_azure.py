"""AzureStore: the conformance suite on Azurite, plus what only Azure shows.

Azurite enforces shared keys and SAS permissions, so wrong-key and read-only tests
run on it. Throttling (503 ServerBusy) and other statuses Azurite never sends come
from a tiny in-process aiohttp server that speaks just enough of the Blob REST API.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
import traceback
import types
import unicodedata
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseTimeoutError,
)
from azure.storage.blob import StandardBlobTier
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

import bucketsync.stores.azure as azure_mod
import emulators.azure
from bucketsync.config import AzureIntegration, DriverConfig, Settings
from bucketsync.core.errors import (
    AlreadyExists,
    ConfigError,
    NotFound,
    NotSupported,
    OrderError,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from bucketsync.core.model import CREATE, ObjectInfo, PutMode
from bucketsync.stores import one_chunk, open_store, read_all
from bucketsync.stores.azure import AzureStore, CodePointOrder, credentials, open_azure, translate
from conformance import CHECKS, Check, check_missing_root, check_permission_denied, list_keys, listing
from emulators import EmulatorMissing, free_port
from emulators.azure import ACCOUNT, ACCOUNT_KEY, PREFIX, Azurite, make_store

MiB = 1 << 20


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def everything_about(exc: BaseException) -> str:
    """All the text an exception can end up as: message, repr, and a formatted traceback."""
    return "\n".join([str(exc), repr(exc), "".join(traceback.format_exception(exc))])


# --- the Store contract on Azurite ----------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check: Check, azure_store: AzureStore) -> None:
    assert azure_store.lean  # lists and reads with its own signed requests (azure_lean)
    await check(azure_store)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_conformance_through_the_sdk(check: Check, azurite: Azurite, azure_container: str) -> None:
    """The SDK path stays the fallback (token credentials) and the reference."""
    store = make_store(azurite, azure_container, lean=False)
    try:
        await check(store)
    finally:
        await store.aclose()


async def test_conformance_permission_denied(azure_store: AzureStore, azure_readonly_store: AzureStore) -> None:
    await azure_store.put("existing", one_chunk(b"readable through the SAS"))
    await check_permission_denied(azure_readonly_store)
    assert await read_all(azure_readonly_store, "existing") == b"readable through the SAS"
    assert await list_keys(azure_readonly_store) == ["existing"]
    with pytest.raises(PermissionDenied, match="AuthorizationPermissionMismatch"):
        await azure_readonly_store.delete("existing")


async def test_conformance_missing_container(azurite: Azurite) -> None:
    store = make_store(azurite, "no-such-container")
    try:
        await check_missing_root(store)
        with pytest.raises(NotFound, match="the container does not exist") as exc:
            await listing(store)
        assert "az://devstoreaccount1/no-such-container/some/prefix/" in str(exc.value)
        await store.delete("x")  # idempotent, even here
    finally:
        await store.aclose()


# --- listing order ------------------------------------------------------------------------------

ORDER_KEYS = [
    "a-c",
    "a/b",
    "a0",
    "a b",
    "a%20b",
    "a+b",
    "a#b",
    unicodedata.normalize("NFC", "é"),
    unicodedata.normalize("NFD", "é"),
    "e",
    "z",
    "\u00ff",
    "\u4e2d/\u6587",
    "\ue000",  # private use: above the surrogates in UTF-16, below U+10000 in code points
    "\uff01",
    "\ufffd",
    "\U00010000",
    "\U0001f600",
    "\U0001f600/\uff01",
    "\U0001f600/\U0001f601",
    "\U0001f600/a",
    "x\U00020000y\uff01",
    "x\U00020000y\U00020000",
    "x\U00020000y",
    "x\uffee",
]


async def test_listing_is_code_point_order_though_azurite_sends_utf16_order(
    azurite: Azurite, azure_store: AzureStore
) -> None:
    for key in ORDER_KEYS:
        await azure_store.put(key, one_chunk(key.encode()))
    # What the server sends: UTF-16 code-unit order (so does Azure itself), which differs.
    raw = [b.name[len(PREFIX) :] for b in azurite.container(azure_store.container).list_blobs(name_starts_with=PREFIX)]
    assert raw == sorted(ORDER_KEYS, key=lambda k: k.encode("utf-16-be"))
    assert raw != sorted(ORDER_KEYS)
    # What the store yields, over pages of 10 and of 3: code-point order.
    assert await list_keys(azure_store) == sorted(ORDER_KEYS)
    azure_store.page_size = 3
    assert await list_keys(azure_store) == sorted(ORDER_KEYS)
    assert await list_keys(azure_store, "\U0001f600/") == sorted(k for k in ORDER_KEYS if k.startswith("\U0001f600/"))
    assert await list_keys(azure_store, "x") == sorted(k for k in ORDER_KEYS if k.startswith("x"))


async def test_listing_skips_folder_markers_hidden_folder_and_neighbours(
    azurite: Azurite, azure_store: AzureStore
) -> None:
    await azure_store.put("item", one_chunk(b"i"))
    raw = azurite.container(azure_store.container)
    for name in (PREFIX + "folder/", PREFIX + ".bucketsync/perm-test", PREFIX[:-1], "some/prefix0", "other/x"):
        raw.upload_blob(name, b"written around the store")
    assert await list_keys(azure_store) == ["item"]
    infos = await listing(azure_store)
    assert infos == [await azure_store.head("item")]


def _info(key: str) -> ObjectInfo:
    return ObjectInfo(key, 1, 1.0, "e")


def _reorder(keys: list[str], limit: int = 1000) -> list[str]:
    order = CodePointOrder("az://a/c/", limit)
    out = [i.key for k in keys for i in order.push(k, _info(k))]
    return out + [i.key for i in order.finish()]


ALPHABET = ["a", "z", "/", "é", "\u4e2d", "\ud7ff", "\ue000", "\uff01", "\uffee", "\U00010000", "\U0001f600"]


@settings(max_examples=300, deadline=None)
@given(st.sets(st.text(st.sampled_from(ALPHABET), min_size=1, max_size=5), max_size=40))
def test_code_point_order_from_utf16_or_code_point_input(keys: set[str]) -> None:
    utf16 = sorted(keys, key=lambda k: k.encode("utf-16-be"))
    assert _reorder(utf16) == sorted(keys)
    assert _reorder(sorted(keys)) == sorted(keys)  # a server that already sends code-point order


def test_code_point_order_holds_only_what_it_must() -> None:
    order = CodePointOrder("az://a/c/")
    assert [i.key for i in order.push("a", _info("a"))] == ["a"]
    assert list(order.push("b\U0001f600", _info("b\U0001f600"))) == []  # a U+E000.. key under "b" may follow
    assert [i.key for i in order.push("b\uff01", _info("b\uff01"))] == ["b\uff01"]
    assert [i.key for i in order.push("c", _info("c"))] == ["b\U0001f600", "c"]  # left "b": released
    assert list(order.push("d", None)) == []  # a non-item moves the position but is not yielded
    assert list(order.finish()) == []


def test_code_point_order_is_bounded() -> None:
    keys = sorted((f"p/\U0001f600{i:03d}" for i in range(20)), key=lambda k: k.encode("utf-16-be"))
    with pytest.raises(OrderError, match="more than 10 keys held back under 'p/'"):
        _reorder(keys, limit=10)


@pytest.mark.parametrize(
    "keys",
    [
        ["Path A", "Path A/dat1", "Path A-B"],  # a hierarchical-namespace account lists folder by folder
        ["b", "a"],
        ["a", "a"],
    ],
)
def test_code_point_order_rejects_other_orders(keys: list[str]) -> None:
    with pytest.raises(OrderError, match="not in key order"):
        _reorder(keys)


# --- puts: blocks, tiers, conditions --------------------------------------------------------------


async def test_block_upload_of_a_multi_block_body(azurite: Azurite, azure_container: str) -> None:
    store = make_store(azurite, azure_container, block_size=256 * 1024, max_concurrency=3)
    try:
        data = random.Random(7).randbytes(5 * MiB + 12345)
        put = await store.put("big/blob.bin", chunks_of(data, 300_001), content_type="application/x-test")
        assert (put.key, put.size) == ("big/blob.bin", len(data))
        assert await store.head("big/blob.bin") == put
        assert await listing(store) == [put]
        assert await read_all(store, "big/blob.bin") == data

        blob = azurite.container(azure_container).get_blob_client(PREFIX + "big/blob.bin")
        committed, uncommitted = blob.get_block_list("all")
        assert len(committed) == -(-len(data) // (256 * 1024)) == 21 and not uncommitted
        props = blob.get_blob_properties()
        assert props.content_settings.content_type == "application/x-test"
        assert bytes(props.content_settings.content_md5 or b"") == hashlib.md5(data).digest()

        # Conditions hold for block uploads too (they are on the final commit).
        with pytest.raises(AlreadyExists):
            await store.put("big/blob.bin", chunks_of(data, MiB), CREATE)
        with pytest.raises(PreconditionFailed):
            await store.put("big/blob.bin", chunks_of(data, MiB), PutMode.matching("0x1234"))
        # ... and are checked before any block is sent, not only by the final commit.
        assert blob.get_block_list("uncommitted") == ([], [])
        again = await store.put("big/blob.bin", chunks_of(data[::-1], MiB), PutMode.matching(put.etag or ""))
        assert again.etag != put.etag
        assert await read_all(store, "big/blob.bin") == data[::-1]
    finally:
        await store.aclose()


async def test_block_upload_beyond_the_block_limit_commits_nothing(
    azurite: Azurite, azure_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(azure_mod, "MAX_BLOCKS", 3)
    store = make_store(azurite, azure_container, block_size=1024)
    try:
        with pytest.raises(StorageError, match="more than 3 blocks"):
            await store.put("too-big", chunks_of(b"x" * 5000, 700))
        with pytest.raises(NotFound):
            await store.head("too-big")
    finally:
        await store.aclose()


async def test_body_of_exactly_one_block_is_a_single_put(azurite: Azurite, azure_container: str) -> None:
    store = make_store(azurite, azure_container, block_size=4096)
    try:
        await store.put("one", chunks_of(b"y" * 4096, 1000))
        blob = azurite.container(azure_container).get_blob_client(PREFIX + "one")
        assert blob.get_block_list("all") == ([], [])  # Put Blob: no blocks were staged
        assert await read_all(store, "one") == b"y" * 4096
    finally:
        await store.aclose()


@pytest.mark.parametrize("block_size", [MiB, 1024], ids=["single", "blocks"])
async def test_storage_class_is_the_access_tier(azurite: Azurite, azure_container: str, block_size: int) -> None:
    driver = DriverConfig(url=f"az://{ACCOUNT}/{azure_container}/t/", storage_class="cool")
    integration = AzureIntegration(kind="azure", connection_string=SecretStr(azurite.connection_string))
    store = open_azure(driver.location, driver, integration, block_size=block_size)
    try:
        assert store.tier == StandardBlobTier.COOL
        await store.put("k", one_chunk(b"z" * 3000))
        props = azurite.container(azure_container).get_blob_client("t/k").get_blob_properties()
        assert props.blob_tier == "Cool"
    finally:
        await store.aclose()


def test_unknown_storage_class_is_a_config_error() -> None:
    driver = DriverConfig(url="az://acct/c/", storage_class="GLACIER")
    with pytest.raises(ConfigError, match="'GLACIER' is not an Azure access tier"):
        open_azure(driver.location, driver, AzureIntegration(kind="azure", account_key=SecretStr("a2V5")))


async def test_archived_blob_cannot_be_read(azurite: Azurite, azure_store: AzureStore) -> None:
    await azure_store.put("cold", one_chunk(b"c"))
    azurite.container(azure_store.container).get_blob_client(PREFIX + "cold").set_standard_blob_tier("Archive")
    with pytest.raises(NotSupported, match="Archive tier"):
        await read_all(azure_store, "cold")
    assert (await azure_store.head("cold")).size == 1  # still listed and described


async def test_delete_refuses_to_take_snapshots_along(azurite: Azurite, azure_store: AzureStore) -> None:
    await azure_store.put("snap", one_chunk(b"s"))
    azurite.container(azure_store.container).get_blob_client(PREFIX + "snap").create_snapshot()
    with pytest.raises(StorageError, match="has snapshots") as exc:
        await azure_store.delete("snap")
    assert type(exc.value) is StorageError
    assert await read_all(azure_store, "snap") == b"s"


async def test_retried_conditional_put_whose_first_attempt_landed(
    azure_store: AzureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create-only put whose response is lost and retried finds its own blob (by MD5), not AlreadyExists."""
    real_call = azure_store._call
    lost: list[str] = []

    async def lose_first_write_response(action: str, key: str | None, call: Callable[[], Any]) -> Any:
        result = await real_call(action, key, call)
        if action == "write" and not lost:
            lost.append(key or "")
            raise Transient("the response was lost", key=key)
        return result

    monkeypatch.setattr(azure_store, "_call", lose_first_write_response)
    put = await azure_store.put("landed", one_chunk(b"mine"), CREATE)
    assert lost == ["landed"]
    assert put == await azure_store.head("landed")
    # Someone else's bytes are still a conflict.
    lost.clear()
    with pytest.raises(AlreadyExists):
        await azure_store.put("landed", one_chunk(b"other"), CREATE)


async def test_open_streams_ranges_pinned_to_the_first_etag(azurite: Azurite, azure_container: str) -> None:
    """Through the SDK (a token credential, or lean requests off); lean reads: test_store_azure_lean.py."""
    azure_store = make_store(azurite, azure_container, lean=False)
    data = random.Random(3).randbytes(azure_mod.FIRST_READ + azure_mod.READ_CHUNK + 10)
    await azure_store.put("ranged", chunks_of(data, MiB))
    chunks = [len(c) async for c in azure_store.open("ranged")]
    assert chunks == [azure_mod.FIRST_READ, azure_mod.READ_CHUNK, 10]

    it = azure_store.open("ranged")
    assert len(await anext(it)) == azure_mod.FIRST_READ
    await azure_store.put("ranged", one_chunk(b"rewritten while being read"))
    with pytest.raises(PreconditionFailed):
        await anext(it)
    await azure_store.aclose()


# --- credentials, endpoints, secrets --------------------------------------------------------------


async def test_store_from_azure_config(azure_config: dict[str, Any]) -> None:
    """The fixture's plain-string config goes through Settings and the registry to a working store."""
    cfg = Settings(integrations=azure_config["integrations"], drivers={"d": azure_config["driver"]})
    store = open_store(cfg.drivers["d"], cfg)
    try:
        assert isinstance(store, AzureStore)
        assert store.url == azure_config["driver"]["url"]
        await store.put("via-config", one_chunk(b"ok"))
        assert await list_keys(store) == ["via-config"]
    finally:
        await store.aclose()


async def test_account_key_and_azure_scheme_with_endpoint_url(azurite: Azurite, azure_container: str) -> None:
    driver = DriverConfig(url=f"azure://{ACCOUNT}/{azure_container}/k/", endpoint_url=azurite.endpoint)
    store = open_azure(driver.location, driver, AzureIntegration(kind="azure", account_key=SecretStr(ACCOUNT_KEY)))
    try:
        assert store.url == f"az://{ACCOUNT}/{azure_container}/k/"
        await store.put("x", one_chunk(b"by account key"))
        assert await list_keys(store) == ["x"]
    finally:
        await store.aclose()


async def test_sas_token_with_leading_question_mark(azurite: Azurite, azure_store: AzureStore) -> None:
    await azure_store.put("r", one_chunk(b"r"))
    sas = "?" + azurite.read_only_sas(azure_store.container)
    driver = DriverConfig(url=f"az://{ACCOUNT}/{azure_store.container}/{PREFIX}", endpoint_url=azurite.endpoint)
    store = open_azure(driver.location, driver, AzureIntegration(kind="azure", sas_token=SecretStr(sas)))
    try:
        assert await list_keys(store) == ["r"]
    finally:
        await store.aclose()


def test_credential_resolution(tmp_path: Any) -> None:
    loc_driver = DriverConfig(url="az://acct/c/p/")
    loc = loc_driver.location
    conn = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn"
    url, cred, owned = credentials(loc, loc_driver, AzureIntegration(kind="azure", connection_string=SecretStr(conn)))
    assert (url, type(cred), owned) == ("https://acct.blob.core.chinacloudapi.cn", AzureNamedKeyCredential, False)

    # endpoint_url wins over the connection string's endpoint
    pinned = DriverConfig(url="az://acct/c/", endpoint_url="http://127.0.0.1:1/acct")
    conn = "AccountName=acct;AccountKey=a2V5;BlobEndpoint=http://elsewhere/acct"
    assert credentials(loc, pinned, AzureIntegration(kind="azure", connection_string=SecretStr(conn)))[0] == (
        "http://127.0.0.1:1/acct"
    )
    # a SAS connection string, read from a *_file
    path = tmp_path / "conn"
    path.write_text("BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=1&sig=abc\n")
    url, cred, _ = credentials(loc, loc_driver, AzureIntegration(kind="azure", connection_string_file=path))
    assert url == "https://acct.blob.core.windows.net/" and isinstance(cred, AzureSasCredential)
    assert cred.signature == "sv=1&sig=abc"

    url, cred, _ = credentials(loc, loc_driver, AzureIntegration(kind="azure", sas_token=SecretStr("?sv=1&sig=x")))
    assert url == "https://acct.blob.core.windows.net" and isinstance(cred, AzureSasCredential)
    assert cred.signature == "sv=1&sig=x"


@pytest.mark.parametrize(
    ("integration", "message"),
    [
        (
            AzureIntegration(kind="azure", account_key=SecretStr("k"), sas_token=SecretStr("s")),
            "set only one of connection_string, account_key, sas_token",
        ),
        (
            AzureIntegration(kind="azure", connection_string=SecretStr("AccountName=other;AccountKey=SECRETKEY")),
            "is for account 'other' but the driver URL",
        ),
        (AzureIntegration(kind="azure", connection_string=SecretStr("AccountName=acct")), "neither AccountKey"),
        (AzureIntegration(kind="azure", connection_string=SecretStr("garbage SECRETKEY")), "malformed"),
        (AzureIntegration(kind="azure", connection_string=SecretStr("UseDevelopmentStorage=true")), "not supported"),
        (AzureIntegration(kind="azure", sas_token=SecretStr("  ")), "sas_token is empty"),
    ],
)
def test_bad_credentials_are_config_errors(integration: AzureIntegration, message: str) -> None:
    driver = DriverConfig(url="az://acct/c/")
    with pytest.raises(ConfigError, match=message) as exc:
        open_azure(driver.location, driver, integration)
    assert "SECRETKEY" not in everything_about(exc.value)


async def test_default_azure_credential_is_used_and_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[bool] = []

    class FakeDefaultAzureCredential:
        async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise ClientAuthenticationError("no credential in this test")

        async def close(self) -> None:
            closed.append(True)

    fake = types.ModuleType("azure.identity.aio")
    fake.DefaultAzureCredential = FakeDefaultAzureCredential  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "azure.identity.aio", fake)
    driver = DriverConfig(url="az://acct/c/", endpoint_url=f"https://127.0.0.1:{free_port()}")
    store = open_azure(driver.location, driver, AzureIntegration(kind="azure"), retry_attempts=1)
    with pytest.raises(PermissionDenied, match="no usable Azure credential"):
        await store.head("k")
    await store.aclose()
    assert closed == [True]


def test_token_credentials_need_https() -> None:
    driver = DriverConfig(url="az://acct/c/", endpoint_url="http://127.0.0.1:10000/acct")
    with pytest.raises(ConfigError, match="needs an https:// endpoint"):
        open_azure(driver.location, driver, None)


@pytest.mark.parametrize("integration", [None, AzureIntegration(kind="azure")])
def test_no_credentials_without_azure_identity(
    integration: AzureIntegration | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # as if not installed
    driver = DriverConfig(url="az://acct/c/")
    with pytest.raises(ConfigError, match=r"set connection_string, account_key or sas_token .* azure-identity"):
        open_azure(driver.location, driver, integration)


async def test_wrong_account_key_is_permission_denied_and_never_quoted(azurite: Azurite, azure_container: str) -> None:
    wrong_key = "WRONG" + ACCOUNT_KEY[5:]
    driver = DriverConfig(url=f"az://{ACCOUNT}/{azure_container}/p/")
    conn = azurite.connection_string.replace(ACCOUNT_KEY, wrong_key)
    store = open_azure(driver.location, driver, AzureIntegration(kind="azure", connection_string=SecretStr(conn)))
    try:
        for op in (lambda: listing(store), lambda: store.head("k"), lambda: store.put("k", one_chunk(b"x"))):
            with pytest.raises(PermissionDenied, match=r"HTTP 403") as exc:
                await op()
            text = everything_about(exc.value)
            assert wrong_key not in text and conn not in text
            assert f"az://{ACCOUNT}/{azure_container}/p/" in str(exc.value)
            assert exc.value.__cause__ is None and exc.value.__context__ is None
        assert wrong_key not in repr(store) and wrong_key not in store.url
    finally:
        await store.aclose()


async def test_sas_token_never_in_errors_or_logs(
    azurite: Azurite, azure_readonly_store: AzureStore, caplog: pytest.LogCaptureFixture
) -> None:
    sas = azurite.read_only_sas(azure_readonly_store.container)
    sig = next(p for p in sas.split("&") if p.startswith("sig=")).removeprefix("sig=")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PermissionDenied) as denied:
        await azure_readonly_store.put("k", one_chunk(b"x"))
    assert sig not in everything_about(denied.value)

    # Nothing listens here: a connection error, whose SDK text names the request.
    driver = DriverConfig(url=f"az://{ACCOUNT}/c/", endpoint_url=f"http://127.0.0.1:{free_port()}/{ACCOUNT}")
    integration = AzureIntegration(kind="azure", sas_token=SecretStr(sas))
    store = open_azure(driver.location, driver, integration, retry_attempts=2, retry_base=0.001)
    try:
        with pytest.raises(Transient) as refused:
            await listing(store)
    finally:
        await store.aclose()
    assert sig not in everything_about(refused.value)
    assert caplog.records, "the SDK logs requests at DEBUG; the point is that they are redacted"
    assert sig not in caplog.text and sas not in caplog.text


# --- error translation ----------------------------------------------------------------------------


@asynccontextmanager
async def fake_azure(responses: list[tuple[int, str]]) -> AsyncIterator[tuple[str, list[str]]]:
    """A Blob endpoint answering each request with the next (status, error code); the last one repeats."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs}")
        status, code = responses[min(len(seen), len(responses)) - 1]
        body = None
        if request.method != "HEAD":
            body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>m</Message></Error>'
        return web.Response(status=status, text=body, content_type="application/xml", headers={"x-ms-error-code": code})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/{ACCOUNT}", seen
    finally:
        await runner.cleanup()


def fake_store(url: str, **options: Any) -> AzureStore:
    credential = AzureNamedKeyCredential(ACCOUNT, ACCOUNT_KEY)
    options.setdefault("retry_base", 0.001)
    return AzureStore(ACCOUNT, "c", "p/", account_url=url, credential=credential, **options)


async def test_server_busy_is_transient_and_retried_by_us_only() -> None:
    async with fake_azure([(503, "ServerBusy")]) as (url, seen):
        # One lister: with more, the first page and the top folder level are asked for at once.
        store = fake_store(url, retry_attempts=3, list_concurrency=1)
        try:
            with pytest.raises(Transient, match=r"HTTP 503 ServerBusy") as exc:
                await listing(store)
            assert "az://devstoreaccount1/c/p/" in str(exc.value)
        finally:
            await store.aclose()
    assert len(seen) == 3, f"exactly our 3 attempts, no SDK retries underneath: {seen}"


async def test_transient_errors_then_a_real_answer() -> None:
    async with fake_azure([(503, "ServerBusy"), (500, "InternalError"), (404, "BlobNotFound")]) as (url, seen):
        store = fake_store(url)
        try:
            with pytest.raises(NotFound, match="p/missing"):
                await store.head("missing")
        finally:
            await store.aclose()
    assert len(seen) == 3


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (503, "ServerBusy", Transient),
        (500, "OperationTimedOut", Transient),
        (429, "TooManyRequests", Transient),
        (502, "", Transient),
        (404, "BlobNotFound", NotFound),
        (404, "ContainerNotFound", NotFound),
        (403, "AuthorizationPermissionMismatch", PermissionDenied),
        (403, "AuthenticationFailed", PermissionDenied),
        (401, "InvalidAuthenticationInfo", PermissionDenied),
        (412, "ConditionNotMet", PreconditionFailed),
        (412, "LeaseIdMissing", StorageError),
        (409, "BlobAlreadyExists", AlreadyExists),
        (409, "BlobArchived", NotSupported),
        (400, "InvalidInput", StorageError),
    ],
)
async def test_translate_statuses(status: int, code: str, kind: type[StorageError]) -> None:
    async with fake_azure([(status, code)]) as (url, seen):
        store = fake_store(url, retry_attempts=1)
        try:
            with pytest.raises(StorageError) as exc:
                await read_all(store, "k")
        finally:
            await store.aclose()
    assert type(exc.value) is kind, f"{status} {code}: {exc.value!r}"
    assert f"HTTP {status}" in str(exc.value) and "az://devstoreaccount1/c/p/k" in str(exc.value)
    assert exc.value.key == "k"
    assert len(seen) == 1


@pytest.mark.parametrize(
    "exc",
    [
        ServiceRequestError("Cannot connect to host acct.blob.core.windows.net:443 /c/k?sv=1&sig=SECRET"),
        ServiceResponseTimeoutError("read timed out for https://acct.blob.core.windows.net/c/k?sig=SECRET"),
        HttpResponseError("body cut short"),  # no status: IncompleteReadError & co
        ConnectionResetError("reset by peer"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_translate_network_errors_are_transient_and_scrubbed(exc: BaseException) -> None:
    error = translate(exc, "read", "az://acct/c/k", "k")
    assert isinstance(error, Transient) and error.key == "k"
    assert "SECRET" not in str(error) and "az://acct/c/k" in str(error)


def test_translate_a_token_credential_that_found_nothing() -> None:
    """DefaultAzureCredential's failure has no HTTP status: it is a permission problem, not a transient one."""
    error = translate(
        ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token"), "list", "az://a/c/"
    )
    assert isinstance(error, PermissionDenied)
    assert "no usable Azure credential" in str(error) and "DefaultAzureCredential failed" in str(error)


def test_missing_azurite_is_a_failure_naming_the_install_command(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulators.azure, "AZURITE_BIN", tmp_path / "nowhere" / "azurite-blob")
    with pytest.raises(EmulatorMissing, match=r"npm ci --prefix tests/azurite"):
        emulators.azure._azurite_argv(free_port(), str(tmp_path))
