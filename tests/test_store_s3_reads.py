"""The S3 store's lean reads: ``open`` signs its own GETs (``stores/sigv4.py``) instead of the SDK.

What must hold: the signature is botocore's (SeaweedFS checks it; the conformance suite in
test_store_s3.py reads every object through this path on SeaweedFS and moto); the credentials
are the client's, refreshed as the SDK refreshes them; and an error answer becomes the same
bucketsync error, with the same message, as through the SDK. Faults a real server cannot be made
to show (a body cut short, a 503, a redirect) come from a scripted HTTP server on a socket.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import botocore.auth
import pytest
from aiobotocore.credentials import AioRefreshableCredentials
from aiobotocore.session import AioSession
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from bucketsync.core.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
    Unreachable,
)
from bucketsync.core.model import CREATE, OVERWRITE, PutMode
from bucketsync.stores import one_chunk, read_all
from bucketsync.stores.s3 import LEAN_PUT_MAX, BucketNotFound, S3Store
from bucketsync.stores.s3_lean import Target
from bucketsync.stores.sigv4 import Signer, encode_key, encode_query
from emulators import free_port
from emulators.s3 import PREFIX, S3Emulator

# --- the signature ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("token", [None, "FQoGZXIvYXdzEJr//////////wEaDEXAMPLE+token="])
@pytest.mark.parametrize(
    ("host", "key", "headers"),
    [
        ("127.0.0.1:8333", "bkt/some/prefix/k.jpg", {"range": "bytes=0-2047"}),
        ("bkt.s3.eu-west-1.amazonaws.com", "a b/c+d/100%/~x/日本.png", {"range": "bytes=10-", "if-match": '"e1"'}),
        ("s3.amazonaws.com", "my.dotted.bucket/q?x=1&y=2#frag", {}),
    ],
)
def test_signature_is_botocores(
    monkeypatch: pytest.MonkeyPatch, host: str, key: str, headers: dict[str, str], token: str | None, method: str
) -> None:
    when = dt.datetime(2026, 11, 29, 23, 59, 58)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when)
    path = "/" + encode_key(key)
    request = AWSRequest(method=method, url=f"http://{host}{path}", headers=dict(headers))
    botocore.auth.S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalr/SECRET", token), "s3", "eu-west-1").add_auth(request)
    ours = Signer("eu-west-1").sign(
        host, path, headers, "AKIDEXAMPLE", "wJalr/SECRET", token, when.replace(tzinfo=dt.UTC).timestamp(), method
    )
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]


@pytest.mark.parametrize("headers", [{}, {"content-type": "image/jpeg", "if-none-match": "*"}])
def test_a_put_signature_is_botocores(monkeypatch: pytest.MonkeyPatch, headers: dict[str, str]) -> None:
    """A PUT signs the SHA-256 of its body (botocore does so over plain HTTP, and may over TLS)."""
    when = dt.datetime(2026, 11, 29, 23, 59, 58)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when)
    body = b"\xff\xd8 a thumbnail" * 100
    path = "/bkt/" + encode_key(".bucketsync/thumbnails/a b.jpg.1234.jpg")
    request = AWSRequest(method="PUT", url=f"http://127.0.0.1:8333{path}", headers=dict(headers), data=body)
    botocore.auth.S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalr/SECRET"), "s3", "us-east-1").add_auth(request)
    payload = hashlib.sha256(body).hexdigest()
    ours = Signer("us-east-1").sign(
        "127.0.0.1:8333", path, headers, "AKIDEXAMPLE", "wJalr/SECRET", None,
        when.replace(tzinfo=dt.UTC).timestamp(), "PUT", payload,
    )  # fmt: skip
    assert request.headers["X-Amz-Content-SHA256"] == payload
    assert ours["authorization"] == request.headers["Authorization"]


@pytest.mark.parametrize(
    "params",
    [
        {"list-type": "2", "encoding-type": "url", "max-keys": "1000", "prefix": "images/2020/01/", "delimiter": "/"},
        {"list-type": "2", "prefix": "a b/c+d/100%/~x/日本", "start-after": "a b/c+d/100%/~x/日本/z&y=1"},
        {"list-type": "2", "continuation-token": "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="},
    ],
)
def test_a_listing_signature_is_botocores(monkeypatch: pytest.MonkeyPatch, params: dict[str, str]) -> None:
    """A lean listing signs its query string; botocore signs the same request the same way."""
    when = dt.datetime(2026, 11, 29, 23, 59, 58)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when)
    query = encode_query(params)
    request = AWSRequest(method="GET", url=f"http://127.0.0.1:8333/bkt?{query}")
    botocore.auth.S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalr/SECRET"), "s3", "us-east-1").add_auth(request)
    ours = Signer("us-east-1").sign(
        "127.0.0.1:8333", "/bkt", {}, "AKIDEXAMPLE", "wJalr/SECRET", None,
        when.replace(tzinfo=dt.UTC).timestamp(), query=query,
    )  # fmt: skip
    assert ours["authorization"] == request.headers["Authorization"]


def test_signing_key_is_cached_per_day_and_secret() -> None:
    signer = Signer("us-east-1")
    first = signer.signing_key("s1", "20261129")
    assert signer.signing_key("s1", "20261129") is first
    assert signer.signing_key("s1", "20261130") != first
    assert signer.signing_key("s2", "20261130") != signer.signing_key("s1", "20261130")


# --- on a real server ----------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["seaweedfs", "moto_s3"])
async def test_reads_skip_the_sdk(server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    emulator: S3Emulator = request.getfixturevalue(server)
    store = emulator.store(emulator.new_bucket())
    try:
        data = bytes(range(256)) * 100
        await store.put("dir/a b+c.bin", one_chunk(data))
        client = await store._get_client()

        async def no_sdk_gets(**kwargs: Any) -> Any:
            raise AssertionError(f"read through the SDK: {kwargs}")

        monkeypatch.setattr(client, "get_object", no_sdk_gets)
        assert await read_all(store, "dir/a b+c.bin") == data
        assert b"".join([c async for c in store.open("dir/a b+c.bin", 300, 2048)]) == data[300:2348]
        with pytest.raises(NotFound):
            await read_all(store, "missing")
        assert store.lean_get
    finally:
        await store.aclose()


@pytest.mark.parametrize("server", ["seaweedfs", "moto_s3"])
async def test_listings_skip_the_sdk_and_its_presigning(
    server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page of a listing, flat or folder by folder, in parallel or not, is a lean request:
    neither the SDK's list call nor its presigner (after the one probe that finds the endpoint)."""
    emulator: S3Emulator = request.getfixturevalue(server)
    bucket = emulator.new_bucket()
    keys = sorted(f"{d}/{n} x+y%.txt" for d in ("a", "a b", "b/c") for n in range(7))
    client = emulator.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=b"x")
    for width in (1, 4):
        store = emulator.store(bucket, page_size=3, list_concurrency=width)
        try:
            await store._lean_target()  # the one presigned probe
            sdk = await store._get_client()

            async def no_sdk(*args: Any, **kwargs: Any) -> Any:
                raise AssertionError(f"listed through the SDK: {args} {kwargs}")

            monkeypatch.setattr(sdk, "list_objects_v2", no_sdk)
            monkeypatch.setattr(sdk, "generate_presigned_url", no_sdk)
            assert [i.key async for i in store.list()] == keys
            assert [i.key async for i in store.list("a")] == [k for k in keys if k.startswith("a")]
            assert store.lean_get
        finally:
            await store.aclose()


@pytest.mark.parametrize("server", ["seaweedfs", "moto_s3"])
async def test_heads_skip_the_sdk_and_say_what_it_says(
    server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEAD (after every put, and for each event's check) is a lean request too; its answer is the
    SDK's: the same size, modified time and etag, the same NotFound."""
    emulator: S3Emulator = request.getfixturevalue(server)
    bucket = emulator.new_bucket()
    sdk = emulator.store(bucket, lean_get=False)
    store = emulator.store(bucket)
    try:
        await sdk.put("dir/a b+c.bin", one_chunk(b"x" * 5000))
        want = await sdk.head("dir/a b+c.bin")
        with pytest.raises(NotFound) as sdk_missing:
            await sdk.head("missing")
        client = await store._get_client()

        async def no_sdk_heads(**kwargs: Any) -> Any:
            raise AssertionError(f"HEAD through the SDK: {kwargs}")

        monkeypatch.setattr(client, "head_object", no_sdk_heads)
        assert await store.head("dir/a b+c.bin") == want
        with pytest.raises(NotFound) as lean_missing:
            await store.head("missing")
        assert str(lean_missing.value) == str(sdk_missing.value)
        written = await store.put("dir/new", one_chunk(b"y" * 10))  # the put's own HEAD is lean
        assert written.size == 10 and written.etag == (await sdk.head("dir/new")).etag
        assert store.lean_get
    finally:
        await sdk.aclose()
        await store.aclose()


@pytest.mark.parametrize("server", ["seaweedfs", "moto_s3"])
async def test_small_puts_skip_the_sdk_conditions_included(
    server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single PutObject is a lean request with the SDK's headers: content type, create-only and
    if-match conditions (enforced by the server: the same errors as through the SDK)."""
    emulator: S3Emulator = request.getfixturevalue(server)
    store = emulator.store(emulator.new_bucket())
    try:
        client = await store._get_client()

        async def no_sdk_puts(**kwargs: Any) -> Any:
            raise AssertionError(f"PutObject through the SDK: {kwargs}")

        monkeypatch.setattr(client, "put_object", no_sdk_puts)
        info = await store.put("t/a b.jpg", one_chunk(b"thumb"), OVERWRITE, "image/jpeg")
        assert info.etag == hashlib.md5(b"thumb").hexdigest() and info.size == 5
        assert await read_all(store, "t/a b.jpg") == b"thumb"
        head = await client.head_object(Bucket=store.bucket, Key=store.prefix + "t/a b.jpg")
        assert head["ContentType"] == "image/jpeg"
        with pytest.raises(AlreadyExists):
            await store.put("t/a b.jpg", one_chunk(b"again"), CREATE)
        with pytest.raises(PreconditionFailed):
            await store.put("t/a b.jpg", one_chunk(b"again"), PutMode.matching("0" * 32))
        changed = await store.put("t/a b.jpg", one_chunk(b"again"), PutMode.matching(str(info.etag)))
        assert changed.etag == hashlib.md5(b"again").hexdigest()
        assert store.lean_get
        # A body above LEAN_PUT_MAX (hashed on the event loop) goes through the SDK, as before.
        monkeypatch.undo()
        big = b"z" * (LEAN_PUT_MAX + 1)
        sdk_puts: list[str] = []
        real_put = client.put_object

        async def counted(**kwargs: Any) -> Any:
            sdk_puts.append(kwargs["Key"])
            return await real_put(**kwargs)

        monkeypatch.setattr(client, "put_object", counted)
        assert (await store.put("t/big", one_chunk(big))).size == len(big)
        assert sdk_puts == [store.prefix + "t/big"]
    finally:
        await store.aclose()


@pytest.mark.parametrize("server", ["seaweedfs", "moto_s3"])
async def test_a_put_in_the_hidden_folder_asks_no_head(
    server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put's HEAD learns what a listing will report; no listing reports the hidden folder, so a
    thumbnail costs one request. Elsewhere the HEAD stays, and its answer is what put returns."""
    emulator: S3Emulator = request.getfixturevalue(server)
    store = emulator.store(emulator.new_bucket())
    heads: list[str] = []
    real_head = store.head

    async def counted(key: str) -> Any:
        heads.append(key)
        return await real_head(key)

    monkeypatch.setattr(store, "head", counted)
    try:
        thumb = await store.put(".bucketsync/thumbnails/a.jpg.0123.jpg", one_chunk(b"thumb"), OVERWRITE, "image/jpeg")
        assert heads == []
        assert (thumb.size, thumb.etag) == (5, hashlib.md5(b"thumb").hexdigest())
        item = await store.put("a.jpg", one_chunk(b"image"))
        assert heads == ["a.jpg"]
        assert item == await real_head("a.jpg")
    finally:
        await store.aclose()


async def test_credentials_are_the_clients_and_refresh(seaweedfs: S3Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default-chain credentials that expire: each lean read asks them first, so an expired set is
    refreshed before it signs (SeaweedFS rejects the stale keys, accepts both fresh identities)."""
    assert seaweedfs.readonly is not None
    identities = [(seaweedfs.access_key_id, seaweedfs.secret_access_key), seaweedfs.readonly]
    refreshed: list[str] = []
    now = dt.datetime.now(dt.UTC)

    async def refresh() -> dict[str, Any]:
        key, secret = identities[len(refreshed) % 2]
        refreshed.append(key)
        return {
            "access_key": key,
            "secret_key": secret,
            "token": None,
            "expiry_time": (now + dt.timedelta(hours=1)).isoformat(),
        }

    stale = {"access_key": "stale", "secret_key": "stale", "token": None, "expiry_time": now.isoformat()}
    creds = AioRefreshableCredentials.create_from_metadata(stale, refresh, "test-refresh")

    async def chain(self: AioSession) -> AioRefreshableCredentials:
        return creds

    monkeypatch.setattr(AioSession, "get_credentials", chain)
    bucket = seaweedfs.new_bucket()
    seaweedfs.client().put_object(Bucket=bucket, Key=f"{PREFIX}k", Body=b"fresh")
    store = S3Store(bucket, PREFIX, endpoint_url=seaweedfs.endpoint_url, attempts=1)
    try:
        assert await read_all(store, "k") == b"fresh"
        assert refreshed == [seaweedfs.access_key_id]
        creds._expiry_time = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)  # the SDK's own clock says so
        assert await read_all(store, "k") == b"fresh"
        assert refreshed == [seaweedfs.access_key_id, seaweedfs.readonly[0]]
        assert store.lean_get
    finally:
        await store.aclose()


# --- faults, from a scripted server -----------------------------------------------------------------


def answer(status: int, body: bytes = b"", *, length: int | None = None, close: bool = False, **headers: str) -> bytes:
    """One raw HTTP/1.1 response; ``length`` claims a Content-Length other than the body's."""
    reason = {200: "OK", 206: "Partial Content"}.get(status, "Whatever")
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body) if length is None else length}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error(status: int, code: str, message: str = "it says so") -> bytes:
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return answer(status, body.encode(), Content_Type="application/xml")


@dataclass
class Scripted:
    """Answers each request with the next scripted response (the SDK's too), recording the requests.
    A response is closed after if it says so, or when it claims more bytes than it sends."""

    answers: list[bytes]
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while self.answers:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                line, *rest = head.split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (r.partition(":") for r in rest if r)}
                self.requests.append({"line": line, **headers})
                raw = self.answers.pop(0)
                writer.write(raw)
                await writer.drain()
                top, _, body = raw.partition(b"\r\n\r\n")
                claimed = int(top.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                if b"Connection: close" in top or claimed != len(body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def sdk(self, i: int) -> bool:
        return "botocore" in self.requests[i].get("user-agent", "").lower()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[Scripted]]]:
    """Starts a scripted server per call (on a free port of its own); all are closed after the test."""
    servers: list[asyncio.Server] = []

    async def serve(*answers: bytes) -> Scripted:
        script = Scripted(list(answers))
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        servers.append(server)
        script.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return script

    yield serve
    for server in servers:
        server.close()


def fake_store(script: Scripted, **kwargs: Any) -> S3Store:
    return S3Store(
        "bkt", "p/", endpoint_url=script.url, access_key_id="AK", secret_access_key="SK", retry_base=0.001, **kwargs
    )


async def test_a_body_cut_short_resumes_pinned_to_its_etag(scripted: Any) -> None:
    data = bytes(range(256)) * 40
    script = await scripted(
        answer(200, data[:4000], length=len(data), ETag='"v1"'),
        answer(206, data[4000:], ETag='"v1"', Content_Range=f"bytes 4000-{len(data) - 1}/{len(data)}"),
    )
    store = fake_store(script)
    try:
        assert await read_all(store, "k") == data
    finally:
        await store.aclose()
    assert [r["line"] for r in script.requests] == ["GET /bkt/p/k HTTP/1.1"] * 2
    assert "range" not in script.requests[0] and script.requests[1]["range"] == "bytes=4000-"
    assert script.requests[1]["if-match"] == '"v1"'
    assert not script.sdk(0) and not script.sdk(1)


async def test_a_503_is_retried(scripted: Any) -> None:
    script = await scripted(error(503, "SlowDown"), answer(206, b"head", ETag='"v1"'))
    store = fake_store(script)
    try:
        assert b"".join([c async for c in store.open("k", 0, 4)]) == b"head"
    finally:
        await store.aclose()
    assert [r["range"] for r in script.requests] == ["bytes=0-3", "bytes=0-3"]


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (error(404, "NoSuchKey", "The specified key does not exist."), NotFound),
        (error(404, "NoSuchBucket"), BucketNotFound),
        (answer(404), NotFound),
        (error(403, "AccessDenied", "Access Denied"), PermissionDenied),
        (error(403, "SignatureDoesNotMatch"), PermissionDenied),
        (error(400, "ExpiredToken", "The provided token has expired."), PermissionDenied),
        (error(416, "InvalidRange", "The requested range is not satisfiable"), StorageError),
        (
            error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold"),
            StorageError,
        ),
        (error(503, "SlowDown", "Please reduce your request rate."), Transient),
        (error(500, "InternalError", "We encountered an internal error &amp; are sorry"), Transient),
    ],
    ids=lambda v: v if isinstance(v, type) else None,
)
async def test_errors_are_the_sdks(scripted: Any, raw: bytes, kind: type[StorageError]) -> None:
    """The same answer read lean and through the SDK: the same error class and message."""
    script = await scripted(raw, raw)
    raised: list[StorageError] = []
    for lean in (True, False):
        store = fake_store(script, lean_get=lean, attempts=1)
        try:
            with pytest.raises(kind) as exc:
                await read_all(store, "k")
            raised.append(exc.value)
        finally:
            await store.aclose()
    assert not script.sdk(0) and script.sdk(1)
    lean_exc, sdk_exc = raised
    assert type(lean_exc) is type(sdk_exc) and str(lean_exc) == str(sdk_exc)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [(answer(404), NotFound), (answer(403), PermissionDenied), (answer(503), Transient)],
    ids=lambda v: v if isinstance(v, type) else None,
)
async def test_head_errors_are_the_sdks(scripted: Any, raw: bytes, kind: type[StorageError]) -> None:
    """A HEAD's answer has no body to name the error: lean and SDK make the same one of the status."""
    script = await scripted(raw, raw)
    raised: list[StorageError] = []
    for lean in (True, False):
        store = fake_store(script, lean_get=lean, attempts=1)
        try:
            with pytest.raises(kind) as exc:
                await store.head("k")
            raised.append(exc.value)
        finally:
            await store.aclose()
    assert script.requests[0]["line"] == "HEAD /bkt/p/k HTTP/1.1" and not script.sdk(0) and script.sdk(1)
    assert str(raised[0]) == str(raised[1])


async def test_a_head_answered_400_goes_to_the_sdk(scripted: Any) -> None:
    """AWS answers a HEAD sent to the wrong region with a bare 400 (no body to say so): the SDK,
    which finds the bucket's region, takes HEADs over from then on."""
    modified = "Sun, 29 Nov 2026 23:00:00 GMT"
    script = await scripted(answer(400, close=True), answer(200, ETag='"v1"', Last_Modified=modified))
    store = fake_store(script)
    try:
        assert (await store.head("k")).etag == "v1"
        assert not store.lean_get
    finally:
        await store.aclose()
    assert [script.sdk(i) for i in range(2)] == [False, True]


async def test_a_head_without_the_headers_it_needs_asks_the_sdk(scripted: Any) -> None:
    modified = "Sun, 29 Nov 2026 23:00:00 GMT"
    script = await scripted(
        answer(200, ETag='"v1"', close=True),  # no Last-Modified: not an answer to trust
        answer(200, ETag='"v1"', Last_Modified=modified),
    )
    store = fake_store(script)
    try:
        info = await store.head("k")
    finally:
        await store.aclose()
    assert (info.size, info.etag, info.modified) == (0, "v1", dt.datetime(2026, 11, 29, 23, tzinfo=dt.UTC).timestamp())
    assert [script.sdk(i) for i in range(2)] == [False, True]


async def test_a_redirect_hands_reads_to_the_sdk(scripted: Any) -> None:
    """A bucket in another region answers 301: the SDK, which follows such answers, reads from then on."""
    script = await scripted(error(301, "PermanentRedirect"), answer(200, b"data", ETag='"v1"'), answer(200, b"data"))
    store = fake_store(script)
    try:
        assert await read_all(store, "k") == b"data"
        assert not store.lean_get
        assert await read_all(store, "k") == b"data"
    finally:
        await store.aclose()
    assert [script.sdk(i) for i in range(3)] == [False, True, True]


async def test_an_unreachable_endpoint_is_unreachable() -> None:
    """Nothing listens: ``Unreachable`` (not retried as a hiccup), lean or through the SDK."""
    for lean in (True, False):
        store = S3Store(
            "bkt", "p/", endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="AK",
            secret_access_key="SK", attempts=1, lean_get=lean,
        )  # fmt: skip
        try:
            with pytest.raises(Unreachable):
                await read_all(store, "k")
        finally:
            await store.aclose()


@pytest.mark.parametrize(
    ("url", "want"),
    [
        (
            "http://127.0.0.1:8333/bkt/bucketsync-where-reads-go?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AK%2F20261129%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261129T194233Z"
            "&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=75",
            ("http://127.0.0.1:8333", "127.0.0.1:8333", "/bkt/", "us-east-1"),
        ),
        (
            "https://bkt.s3.amazonaws.com:443/bucketsync-where-reads-go?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AK%2F20261129%2Feu-west-1%2Fs3%2Faws4_request&X-Amz-Signature=6d",
            ("https://bkt.s3.amazonaws.com:443", "bkt.s3.amazonaws.com", "/", "eu-west-1"),
        ),
        # another algorithm, another key layout, a query of its own: not what sigv4 signs
        ("https://h/bucketsync-where-reads-go?X-Amz-Algorithm=AWS4-ECDSA-P256-SHA256&X-Amz-Credential=a/b/c/d/e", None),
        ("https://h/other?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK/d/r/s3/aws4_request", None),
        (
            "https://h/bucketsync-where-reads-go?x-id=GetObject&X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AK/d/r/s3/aws4_request",
            None,
        ),
        ("https://h/bucketsync-where-reads-go?Signature=abc&AWSAccessKeyId=AK&Expires=1", None),
    ],
)
def test_where_reads_go_is_learned_from_a_presigned_url(url: str, want: tuple[str, str, str, str] | None) -> None:
    target = Target.from_presigned(url)
    got = None if target is None else (target.origin, target.host, target.path, target.signer.region)
    assert got == want


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:8333",
        "http://127.0.0.1:8333/",
        "http://minio.internal",
        "http://minio.internal:80",
        "https://minio.example.com:443",
        "https://minio.example.com:9000/",
        "https://gw.example.com/s3",
        "https://gw.example.com/s3/",
    ],
)
@pytest.mark.parametrize(("bucket", "region"), [("bkt", "us-east-1"), ("my.data-2", "eu-west-1")])
async def test_an_endpoints_target_is_what_botocore_presigns(endpoint: str, bucket: str, region: str) -> None:
    """Where a store with an endpoint and keys sends lean requests, worked out without botocore,
    is where botocore's own presigned URL points, signed for the same region and service."""
    store = S3Store(bucket, PREFIX, endpoint_url=endpoint, region=region, access_key_id="AK", secret_access_key="SK")
    try:
        static = store._static_target()
        assert static is not None and store._keys() == ("AK", "SK", None)
        client = await store._get_client()
        url = await client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "bucketsync-where-reads-go"}, ExpiresIn=60
        )
        learned = Target.from_presigned(url)
        assert learned is not None
        fields = ("origin", "host", "path", "proxy", "proxy_auth")
        assert [getattr(static, f) for f in fields] == [getattr(learned, f) for f in fields]
        assert (static.signer.region, static.signer.service) == (learned.signer.region, learned.signer.service)
    finally:
        await store.aclose()


def test_only_a_store_of_its_own_endpoint_and_keys_skips_the_probe() -> None:
    """Without an endpoint (AWS: its endpoint rules), keys (the default chain) or with a profile
    (whose config may say more), where requests go is still learned from botocore."""
    keys = {"access_key_id": "AK", "secret_access_key": "SK"}
    assert S3Store("bkt", endpoint_url="http://h:1", **keys)._static_target() is not None
    assert S3Store("bkt", **keys)._static_target() is None
    assert S3Store("bkt", endpoint_url="http://h:1")._static_target() is None
    assert S3Store("bkt", endpoint_url="http://h:1", profile="p", **keys)._static_target() is None
    assert S3Store("Bkt_old", endpoint_url="http://h:1", **keys)._static_target() is None  # not a DNS name
    assert S3Store("bkt", endpoint_url="http://u:p@h:1", **keys)._static_target() is None


def test_a_sync_of_an_endpoint_with_keys_never_loads_botocore(seaweedfs: S3Emulator, tmp_path: Any) -> None:
    """A real `bucketsync sync` process (list, index, commit) on SeaweedFS, then a read and a small
    write through the same store: botocore is never imported, so never a client (0.35 s of CPU)."""
    bucket = seaweedfs.new_bucket()
    client = seaweedfs.client()
    for n in range(5):
        client.put_object(Bucket=bucket, Key=f"{PREFIX}d{n % 2}/k{n}", Body=b"x" * n)
    script = f"""
import asyncio, sys
from bucketsync.cli.main import main
from bucketsync.stores import one_chunk, read_all
from bucketsync.stores.s3 import S3Store

try:
    main(["-c", {str(tmp_path / "c.toml")!r}, "sync", "ds"])
except SystemExit as exc:
    assert not exc.code, exc.code

async def more() -> None:
    store = S3Store({bucket!r}, {PREFIX!r}, endpoint_url={seaweedfs.endpoint_url!r},
                    access_key_id={seaweedfs.access_key_id!r}, secret_access_key={seaweedfs.secret_access_key!r})
    try:
        assert await read_all(store, "d1/k3") == b"xxx"
        await store.put("new", one_chunk(b"written"))
        assert (await store.head("new")).size == 7
    finally:
        await store.aclose()

asyncio.run(more())
print(sorted(m for m in sys.modules if m.split(".")[0] in ("botocore", "aiobotocore")))
"""
    (tmp_path / "c.toml").write_text(
        f"""[agent]
ledger = "{tmp_path / "l.db"}"

[integrations.s]
kind = "aws"
access_key_id = "{seaweedfs.access_key_id}"
secret_access_key = "{seaweedfs.secret_access_key}"

[drivers.d]
url = "s3://{bucket}/{PREFIX}"
endpoint_url = "{seaweedfs.endpoint_url}"
integration = "s"

[datasets.ds]
driver = "d"
sync = "manual"
"""
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "listed 5, added 5" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"
