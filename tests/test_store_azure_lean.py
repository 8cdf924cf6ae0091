"""The Azure store's lean path: List Blobs and Get Blob signed by ``stores/sharedkey.py`` (or a SAS)
and read by ``stores/azure_lean.py`` instead of the SDK.

What must hold: the signature is the SDK's (Azurite checks it; the conformance suite in
test_store_azure.py runs on both paths); both paths give the same ``ObjectInfo`` for the same
blobs, awkward names included; the page scan reads what ``xml.etree`` reads; an error answer
becomes the same bucketsync error through either path; a body cut short resumes pinned to its
ETag. Faults Azurite cannot be made to show come from a scripted HTTP server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import gzip
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.rest import HttpRequest
from azure.storage.blob import ContentSettings
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy
from azure.storage.blob.aio import BlobClient, ContainerClient
from hypothesis import given, settings
from hypothesis import strategies as st

from bucketsync.core.errors import (
    BadEndpoint,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from bucketsync.core.model import ObjectInfo
from bucketsync.stores import one_chunk, read_all
from bucketsync.stores.azure import AzureStore, CodePointOrder
from bucketsync.stores.azure_lean import API_VERSION, parse_page, scan_page, timestamp
from bucketsync.stores.sharedkey import SharedKey, encode_name
from conformance import AWKWARD_KEYS, listing
from emulators.azure import ACCOUNT, ACCOUNT_KEY, PREFIX, Azurite, make_store
from test_store_azure import ORDER_KEYS, fake_azure, fake_store
from test_store_s3_reads import Scripted, answer


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Scripted]]]:
    """A scripted HTTP server per call (test_store_s3_reads.py's), on a free port; closed after the test."""
    servers: list[asyncio.Server] = []

    async def start(*answers: bytes) -> Scripted:
        script = Scripted(list(answers))
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        servers.append(server)
        script.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/{ACCOUNT}"
        return script

    yield start
    for server in servers:
        server.close()


# --- the signature ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "query", "headers"),
    [
        ("/devstoreaccount1/c", {"restype": "container", "comp": "list", "maxresults": "1000"}, {}),
        (
            "/c",
            {"restype": "container", "comp": "list", "prefix": "a b/100%/日本", "marker": "2!8!x&y=z+w"},
            {},
        ),
        ("/devstoreaccount1/c/" + encode_name("a b/c+d/100%/~x/日本.png"), {}, {"x-ms-range": "bytes=10-"}),
        ("/c/" + encode_name("q?x=1&y=2#frag"), {}, {"x-ms-range": "bytes=0-2047", "if-match": '"0x8D1"'}),
    ],
)
def test_signature_is_the_sdks(path: str, query: dict[str, str], headers: dict[str, str]) -> None:
    signed = {**headers, "x-ms-date": "Sun, 29 Nov 2026 23:59:58 GMT", "x-ms-version": "2026-10-06"}
    qs = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
    request = HttpRequest("GET", f"https://acct.blob.core.windows.net{path}{'?' if qs else ''}{qs}", headers=signed)
    SharedKeyCredentialPolicy(ACCOUNT, ACCOUNT_KEY).on_request(PipelineRequest(request, PipelineContext(None)))
    assert SharedKey(ACCOUNT, ACCOUNT_KEY).sign(path, query, signed) == request.headers["Authorization"]


def test_the_key_is_never_shown() -> None:
    assert ACCOUNT_KEY not in repr(SharedKey(ACCOUNT, ACCOUNT_KEY))


# --- the page scan ------------------------------------------------------------------------------

_BLOB = (
    "<Blob><Name{enc}>{name}</Name>{before}<Properties><Creation-Time>Sun, 29 Nov 2026 22:50:51 GMT</Creation-Time>"
    "<Last-Modified>{modified}</Last-Modified><Etag>{etag}</Etag>{between}<Content-Length>{size}</Content-Length>"
    "<Content-Type>application/octet-stream</Content-Type><Content-MD5>SfaKXIST7CwL9ImCHCH8Ow==</Content-MD5>"
    "<BlobType>BlockBlob</BlobType><AccessTier>Hot</AccessTier></Properties><OrMetadata /></Blob>"
)


def page(blobs: list[dict[str, str]], marker: str = "") -> bytes:
    defaults = {
        "enc": "",
        "before": "",
        "between": "",
        "modified": "Sun, 29 Nov 2026 22:50:51 GMT",
        "etag": "0x1D56C9B8B09FDB0",
        "size": "2",
    }
    body = "".join(_BLOB.format(**(defaults | b)) for b in blobs)
    nxt = f"<NextMarker>{marker}</NextMarker>" if marker else "<NextMarker/>"
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?><EnumerationResults '
        'ServiceEndpoint="http://127.0.0.1:1/devstoreaccount1" ContainerName="c"><Prefix/><Marker/>'
        f"<MaxResults>5</MaxResults><Blobs>{body}</Blobs>{nxt}</EnumerationResults>"
    ).encode()


VERSION = "2026-11-29T22:50:51.1234567Z"
WHEN = float(dt.datetime(2026, 11, 29, 22, 50, 51, tzinfo=dt.UTC).timestamp())  # the pages' Last-Modified
ETAG = "0x1D56C9B8B09FDB0"
PAGES = {
    "plain": page([{"name": "a b"}, {"name": "a%20b", "size": "12345678901"}], "a%20b"),
    "escaped": page([{"name": "lt&lt;gt&gt;&amp;amp &#x1F600; &#233;"}, {"name": "q&quot;&apos;"}], "m&amp;n"),
    # names with characters XML cannot carry come percent-encoded
    "encoded": page(
        [{"name": "ctl%01x%EF%BF%BE", "enc": ' Encoded="true"'}, {"name": "%41", "enc": ' Encoded="false"'}]
    ),
    "versioned": page(
        [
            {
                "name": "v",
                "before": f"<VersionId>{VERSION}</VersionId><IsCurrentVersion>true</IsCurrentVersion>",
            }
        ]
    ),
    # a hierarchical-namespace account puts Owner, Group, ResourceType... between Etag and Content-Length
    "hns": page([{"name": "h", "between": "<Owner>$superuser</Owner><ResourceType>file</ResourceType><Expiry />"}]),
    "quoted etag": page([{"name": "e", "etag": "&quot;0x8D1&quot;"}]),
    "another day": page([{"name": "d", "modified": "Thu, 01 Jan 1970 00:00:01 GMT"}]),
    "empty": page([]),
}


@pytest.mark.parametrize("raw", PAGES.values(), ids=PAGES.keys())
def test_scan_reads_what_the_xml_parser_reads(raw: bytes) -> None:
    scanned = scan_page(raw)
    assert scanned == parse_page(raw)
    # and so does the scan of the same page pretty-printed (which it hands to the parser)
    assert scan_page(raw.replace(b"><", b">\n  <")) == scanned


def test_scan_decodes_names_versions_and_etags() -> None:
    assert scan_page(PAGES["escaped"]) == (
        [
            ("lt<gt>&amp \U0001f600 é", 2, WHEN, "0x1D56C9B8B09FDB0", None),
            ("q\"'", 2, WHEN, "0x1D56C9B8B09FDB0", None),
        ],
        "m&n",
    )
    assert [e[0] for e in scan_page(PAGES["encoded"])[0]] == ["ctl\x01x\ufffe", "%41"]
    assert scan_page(PAGES["versioned"])[0][0][4] == VERSION
    assert scan_page(PAGES["quoted etag"])[0][0][3] == "0x8D1"
    assert scan_page(PAGES["plain"]) == (
        [
            ("a b", 2, WHEN, "0x1D56C9B8B09FDB0", None),
            ("a%20b", 12345678901, WHEN, "0x1D56C9B8B09FDB0", None),
        ],
        "a%20b",
    )
    assert scan_page(PAGES["empty"]) == ([], None)


@pytest.mark.parametrize("raw", [b"<html>nope</html>", b"not xml", b"<Error><Code>X</Code></Error>"])
def test_not_a_listing_is_unreadable(raw: bytes) -> None:
    with pytest.raises(ValueError):
        scan_page(raw)


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1)))
def test_timestamps_are_the_sdks(when: dt.datetime) -> None:
    text = email.utils.format_datetime(when.replace(microsecond=0, tzinfo=dt.UTC), usegmt=True)
    # the SDK's deserializer: email.utils.parsedate_tz, then a datetime in UTC
    parsed = email.utils.parsedate_tz(text)
    assert parsed is not None
    assert timestamp(text) == email.utils.mktime_tz(parsed)


ALPHABET = ["a", "z", "/", "é", "\u4e2d", "\ue000", "\uff01", "\U00010000", "\U0001f600"]


@settings(max_examples=200, deadline=None)
@given(st.sets(st.text(st.sampled_from(ALPHABET), min_size=1, max_size=4), max_size=30), st.integers(1, 7))
def test_code_point_order_a_page_at_a_time(keys: set[str], size: int) -> None:
    """``CodePointOrder.page`` (the lean listing's) releases what ``push`` key by key would."""
    utf16 = sorted(keys, key=lambda k: k.encode("utf-16-be"))
    order = CodePointOrder("az://a/c/")
    out: list[str] = []
    for i in range(0, len(utf16), size):
        out += [info.key for info in order.page([(k, ObjectInfo(k, 1, 0.0, "e")) for k in utf16[i : i + size]])]
    out += [info.key for info in order.finish()]
    assert out == sorted(keys)


# --- on Azurite: both paths, the same answers ----------------------------------------------------

#: the conformance suite's awkward keys, the order test's (characters above U+FFFF, U+E000..U+FFFF),
#: control characters Azurite can list (it fails on U+0001 through the SDK as well), a folder marker
#: and an empty-folder marker inside a folder, and the hidden folder
AWKWARD = [*AWKWARD_KEYS, *ORDER_KEYS, "tab\tx", "del\x7fx", "dir/", "dir/sub/", "dir/sub/x", ".bucketsync/t.jpg"]


@pytest.fixture
async def both_paths(azurite: Azurite, azure_container: str) -> AsyncIterator[tuple[AzureStore, AzureStore]]:
    lean, sdk = make_store(azurite, azure_container, page_size=7), make_store(azurite, azure_container, lean=False)
    assert lean.lean and not sdk.lean
    try:
        yield lean, sdk
    finally:
        await lean.aclose()
        await sdk.aclose()


async def test_both_paths_list_and_read_the_same(
    both_paths: tuple[AzureStore, AzureStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    lean, sdk = both_paths
    unique = list(dict.fromkeys(AWKWARD))
    for key in unique:
        await sdk.put(key, one_chunk(f"content of {key}".encode()))
    reference = await listing(sdk)
    assert [i.key for i in reference] == sorted(k for k in unique if not k.endswith("/") and ".bucketsync" not in k)

    def no_sdk(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("listed or read through the SDK")

    monkeypatch.setattr(ContainerClient, "list_blobs", no_sdk)
    monkeypatch.setattr(BlobClient, "download_blob", no_sdk)
    assert await listing(lean) == reference
    pages = [p async for p in lean.list_pages()]
    assert [i for p in pages for i in p] == reference and len(pages) > 3
    for prefix in ("a", "dir/", "\U0001f600/", "x"):
        assert await listing(lean, prefix) == [i for i in reference if i.key.startswith(prefix)]
    for info in reference:
        assert await read_all(lean, info.key) == f"content of {info.key}".encode()
        assert b"".join([c async for c in lean.open(info.key, 3, 4)]) == f"content of {info.key}".encode()[3:7]


async def test_a_sas_signs_lean_requests(azurite: Azurite, azure_container: str) -> None:
    store = make_store(azurite, azure_container)
    await store.put("a b/c", one_chunk(b"abc"))
    await store.aclose()
    sas = AzureSasCredential(azurite.read_only_sas(azure_container))
    ro = AzureStore(ACCOUNT, azure_container, PREFIX, account_url=azurite.endpoint, credential=sas, retry_base=0.01)
    try:
        assert ro.lean
        assert [i.key for i in await listing(ro)] == ["a b/c"]
        assert await read_all(ro, "a b/c") == b"abc"
        with pytest.raises(NotFound):
            await read_all(ro, "missing")
    finally:
        await ro.aclose()


async def test_a_wrong_key_is_permission_denied_on_both_paths(azurite: Azurite, azure_container: str) -> None:
    wrong = AzureNamedKeyCredential(ACCOUNT, "d3Jvbmcga2V5")
    for lean in (True, False):
        store = AzureStore(ACCOUNT, azure_container, PREFIX, account_url=azurite.endpoint, credential=wrong, lean=lean)
        try:
            with pytest.raises(PermissionDenied, match=r"AuthorizationFailure|AuthenticationFailed"):
                await listing(store)
        finally:
            await store.aclose()


def test_token_credentials_stay_with_the_sdk() -> None:
    class Token:
        async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise AssertionError("never asked")

    store = AzureStore(ACCOUNT, "c", "", account_url="https://a.blob.core.windows.net", credential=Token())  # type: ignore[arg-type]
    assert not store.lean


# --- error answers: the same error through either path --------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (403, "AuthorizationPermissionMismatch", PermissionDenied),
        (404, "ContainerNotFound", NotFound),
        (503, "ServerBusy", Transient),
        (500, "InternalError", Transient),
        (404, "", BadEndpoint),
        (400, "InvalidQueryParameterValue", StorageError),
    ],
)
async def test_listing_errors_are_the_sdks(status: int, code: str, kind: type[StorageError]) -> None:
    raised: list[StorageError] = []
    for lean in (True, False):
        async with fake_azure([(status, code)]) as (url, seen):
            # One lister: with more, the first page and the top folder level are asked for at
            # once, and the server would count both (tests/test_store_azure_parallel.py).
            store = fake_store(url, retry_attempts=2, lean=lean, list_concurrency=1)
            try:
                with pytest.raises(StorageError) as exc:
                    await listing(store)
            finally:
                await store.aclose()
        raised.append(exc.value)
        assert len(seen) == (2 if kind is Transient else 1), seen
    assert [type(e) for e in raised] == [kind, kind]
    assert str(raised[0]) == str(raised[1])


async def test_an_unreadable_listing_is_a_bad_endpoint(serve: Callable[..., Awaitable[Scripted]]) -> None:
    script = await serve(answer(200, b"<html>a login page</html>", Content_Type="text/html"))
    store = fake_store(script.url)
    try:
        with pytest.raises(BadEndpoint, match="unreadable List Blobs answer"):
            await listing(store)
    finally:
        await store.aclose()


# --- lean reads: resumed, pinned to the ETag --------------------------------------------------------


async def test_a_body_cut_short_resumes_pinned_to_its_etag(serve: Callable[..., Awaitable[Scripted]]) -> None:
    data = random.Random(5).randbytes(10_000)
    script = await serve(
        answer(200, data[:4000], length=len(data), ETag='"0x8D1"'),
        answer(206, data[4000:], ETag='"0x8D1"', Content_Range=f"bytes 4000-{len(data) - 1}/{len(data)}"),
    )
    store = fake_store(script.url)
    try:
        assert await read_all(store, "k") == data
    finally:
        await store.aclose()
    assert [r["line"] for r in script.requests] == [f"GET /{ACCOUNT}/c/p/k HTTP/1.1"] * 2
    assert "x-ms-range" not in script.requests[0] and script.requests[1]["x-ms-range"] == "bytes=4000-"
    assert script.requests[1]["if-match"] == '"0x8D1"'
    assert script.requests[0]["authorization"].startswith(f"SharedKey {ACCOUNT}:")


async def test_a_blob_rewritten_before_the_resume_fails_the_read(serve: Callable[..., Awaitable[Scripted]]) -> None:
    script = await serve(
        answer(206, b"x" * 100, length=1000, ETag='"0x8D1"'),
        answer(412, b"", x_ms_error_code="ConditionNotMet"),
    )
    store = fake_store(script.url)
    try:
        it = store.open("k", 0, 1000)
        assert await anext(it) == b"x" * 100
        with pytest.raises(PreconditionFailed, match="changed in storage"):
            await anext(it)
    finally:
        await store.aclose()
    assert script.requests[0]["x-ms-range"] == "bytes=0-999"
    assert script.requests[1]["x-ms-range"] == "bytes=100-999" and script.requests[1]["if-match"] == '"0x8D1"'


async def test_a_range_of_an_empty_blob_is_no_bytes(azure_store: AzureStore) -> None:
    await azure_store.put("empty", one_chunk(b""))
    assert azure_store.lean
    assert [c async for c in azure_store.open("empty", 0, 10)] == []
    assert await read_all(azure_store, "empty") == b""


async def test_a_gzip_encoded_blob_reads_as_stored(azurite: Azurite, azure_store: AzureStore) -> None:
    """The stored bytes, as the listing's size counts them (no transfer decoding of Content-Encoding)."""
    stored = gzip.compress(b"hello " * 1000)
    azurite.container(azure_store.container).upload_blob(
        PREFIX + "z.txt", stored, content_settings=ContentSettings(content_encoding="gzip")
    )
    assert [(i.key, i.size) for i in await listing(azure_store)] == [("z.txt", len(stored))]
    assert await read_all(azure_store, "z.txt") == stored


def test_the_api_version_is_one_the_sdk_supports() -> None:
    from azure.storage.blob._serialize import _SUPPORTED_API_VERSIONS

    assert API_VERSION in _SUPPORTED_API_VERSIONS


def test_lean_listing_and_reads_do_not_load_the_sdk() -> None:
    """The SDK's import is most of an Azure driver's start-up; only SDK calls (writes, head) load it."""
    code = (
        "import sys; import bucketsync.stores.azure as a; from bucketsync.config import DriverConfig;"
        f"d = DriverConfig(url='az://{ACCOUNT}/c/', endpoint_url='http://127.0.0.1:1/{ACCOUNT}');"
        "from bucketsync.config import AzureIntegration; from pydantic import SecretStr;"
        f"s = a.open_azure(d.location, d, AzureIntegration(kind='azure', account_key=SecretStr('{ACCOUNT_KEY}')));"
        "s._rest(); assert s.lean; print(sorted(m for m in sys.modules if m.startswith('azure.storage')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


async def test_reads_reuse_their_connection() -> None:
    """A body read to its end gives its connection back to the pool: the next read needs no new one."""
    peers: list[Any] = []

    async def blob(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(body=b"data" * 1000, headers={"ETag": '"0x8D1"'})

    app = web.Application()
    app.router.add_get("/{tail:.*}", blob)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    store = fake_store(f"http://127.0.0.1:{port}/{ACCOUNT}")
    try:
        for key in ("a", "b", "c"):
            assert await read_all(store, key) == b"data" * 1000
    finally:
        await store.aclose()
        await runner.cleanup()
    assert len(peers) == 3 and len(set(peers)) == 1, peers
