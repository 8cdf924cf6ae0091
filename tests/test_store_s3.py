"""The S3 store: the conformance suite on SeaweedFS and on moto, plus what only S3 shows.

moto checks no signatures, so wrong-key and permission tests run on SeaweedFS, which
enforces keys and per-identity actions. Throttling, 5xx and broken pages cannot be
provoked on either server: those are unit tests against a stub client.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from bucketsync.config import AwsIntegration, DriverConfig, Settings
from bucketsync.core.errors import (
    AlreadyExists,
    ConfigError,
    NotFound,
    OrderError,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from bucketsync.core.model import CREATE, OVERWRITE, ObjectInfo, PutMode, normalize_etag
from bucketsync.stores import Store, one_chunk, open_store, read_all, s3_lean
from bucketsync.stores import s3 as s3_module
from bucketsync.stores.lean import unescape
from bucketsync.stores.s3 import S3Store, open_s3, translate
from bucketsync.stores.s3_lean import parse_list
from conformance import (
    CHECKS,
    Check,
    Delegating,
    SlowFolders,
    check_missing_root,
    check_permission_denied,
    list_keys,
)
from emulators.s3 import PREFIX, S3Emulator

MiB = 1 << 20

# The checks whose keys tell a flat listing from a folder-by-folder one.
LISTING_CHECKS = {
    "check_empty_listing",
    "check_list_sorted_awkward_keys",
    "check_unicode_forms_distinct",
    "check_list_code_point_order",
    "check_long_key",
    "check_pagination",
    "check_list_prefix",
    "check_hidden_folder_not_listed",
    "check_folder_marker",
}


async def chunks_of(data: bytes, size: int = MiB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# --- the Store contract on two servers ---------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_conformance_seaweedfs(check: Check, s3_store: S3Store) -> None:
    await check(s3_store)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_conformance_moto(check: Check, s3_moto_store: S3Store) -> None:
    await check(s3_moto_store)


@pytest.mark.parametrize("check", [c for c in CHECKS if c.__name__ in LISTING_CHECKS], ids=lambda c: c.__name__)
async def test_conformance_moto_folder_by_folder_sdk(check: Check, moto_s3: S3Emulator) -> None:
    """The listing checks once more on moto: folder by folder (as SeaweedFS is listed), which must
    be right on a server in S3 order too, and with botocore parsing the pages (the fallback of the
    fast path every other test uses)."""
    store = moto_s3.store(moto_s3.new_bucket(), page_size=10, listing="walk", fast_list=False)
    try:
        await check(store)
    finally:
        await store.aclose()


LISTING = [c for c in CHECKS if c.__name__ in LISTING_CHECKS]
#: the listing checks that cross pages and parts (the others list a handful of keys)
ACROSS_PARTS = [
    c
    for c in LISTING
    if c.__name__
    in {"check_pagination", "check_list_sorted_awkward_keys", "check_list_prefix", "check_hidden_folder_not_listed"}
]


@pytest.mark.parametrize("server", ["seaweedfs", "moto_s3"])
@pytest.mark.parametrize("check", ACROSS_PARTS, ids=lambda c: c.__name__)
async def test_conformance_listing_sequential(check: Check, server: str, request: pytest.FixtureRequest) -> None:
    """The listing checks with one list request at a time (``list_concurrency = 1``): every other
    conformance test lists in parallel parts (folders on SeaweedFS, discovered key ranges on moto)."""
    emulator: S3Emulator = request.getfixturevalue(server)
    store = emulator.store(emulator.new_bucket(), page_size=10, list_concurrency=1)
    try:
        await check(store)
    finally:
        await store.aclose()


#: split points as a last run could leave them: on keys, between keys, past them, awkward ones
SPLITS = ["", "a", "a-c", "a/", "a/b", "a0", "page/", "page/015", "page/0155", "pagez", "z", "é", "\U0001f600"]


class SplitAt(Delegating):
    """A store whose ``list`` always goes through ``list_split`` with ``SPLITS``."""

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        inner = self.inner
        assert isinstance(inner, S3Store)
        return inner.list_split(prefix, SPLITS)


@pytest.mark.parametrize("check", ACROSS_PARTS, ids=lambda c: c.__name__)
async def test_conformance_listing_at_split_points(check: Check, moto_s3: S3Emulator) -> None:
    """The listing checks with the key space cut at ``SPLITS`` (StartAfter + stop key), pages of 3:
    parts meet on keys, between keys and on prefixes, and the stream stays whole and ascending."""
    inner = moto_s3.store(moto_s3.new_bucket(), page_size=3, list_concurrency=4)
    try:
        await check(SplitAt(inner))
    finally:
        await inner.aclose()


async def test_a_part_whose_page_ends_on_its_bound_asks_for_no_more(
    moto_s3: S3Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut at ``d`` and ``h`` in pages of 4, each part is one page that ends on its bound: 3
    requests, where asking on past each bound made 5."""
    bucket = moto_s3.new_bucket()
    client = moto_s3.client()
    keys = list("abcdefghijkl")
    for key in keys:
        client.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=b"x")
    store = moto_s3.store(bucket, page_size=4, list_concurrency=2)
    try:
        assert [i.key async for i in store.list()] == keys  # the listing order is learned (flat)
        asked = delimiters_asked(store, monkeypatch)
        assert [i.key async for i in store.list_split("", ["d", "h"])] == keys
        assert len(asked) == 3
    finally:
        await store.aclose()


async def test_an_initial_flat_listing_goes_on_while_its_split_points_are_found(
    moto_s3: S3Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no split points, the first part pages on from the first page while the folders are
    listed for them, and is then cut at the first folder past what it has: every key once, in order."""
    bucket = moto_s3.new_bucket()
    keys = [f"{folder}/{i}" for folder in "abcdefgh" for i in range(5)]
    client = moto_s3.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=b"x")
    store = moto_s3.store(bucket, page_size=3, list_concurrency=4)
    asked: list[tuple[str | None, str | None, str | None]] = []  # (delimiter, token, start after)
    page, slow = store._page, SlowFolders(store._discover_splits)

    async def recorded(prefix: str, token: str | None, delimiter: str | None = None, **kwargs: Any) -> Any:
        asked.append((delimiter, token, kwargs.get("start_after")))
        if delimiter is None:
            await slow.page()
        return await page(prefix, token, delimiter, **kwargs)

    monkeypatch.setattr(store, "_page", recorded)
    monkeypatch.setattr(store, "_discover_splits", slow.discover)
    try:
        assert [i.key async for i in store.list()] == keys
        assert store._listing == "flat"
    finally:
        await store.aclose()
    folders_from = [a[0] for a in asked].index("/")
    assert folders_from >= 4  # the first part went on with continuation tokens, not waiting for the folders
    # the parts after the cut start after a folder past what the first part had listed
    assert {a[2] for a in asked if a[2] is not None} <= {f"{PREFIX}{f}/" for f in "defgh"}


async def walked(store: S3Store) -> list[str]:
    """Every key ``store`` lists, which it must have walked folder by folder; the store is closed."""
    try:
        keys = [i.key async for i in store.list()]
        assert store._listing == "walk"
        return keys
    finally:
        await store.aclose()


def delimiters_asked(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The delimiter of every ListObjectsV2 page ``store`` asks for from now on (None: flat)."""
    asked: list[str | None] = []
    page = store._page

    async def counted(prefix: str, token: str | None, delimiter: str | None = None, **kwargs: Any) -> Any:
        asked.append(delimiter)
        return await page(prefix, token, delimiter, **kwargs)

    monkeypatch.setattr(store, "_page", counted)
    return asked


async def test_seaweedfs_parallel_walk_keeps_key_order(seaweedfs: S3Emulator) -> None:
    """SeaweedFS lists a folder at its bare name (``a/b`` before ``a-c``): listed a folder per
    part, in parallel, the stream is still in S3 key order and whole, as listed sequentially."""
    bucket = seaweedfs.new_bucket()
    folders = [f"{top}/{sub}/{leaf}" for top in ("a", "a-c", "a0", "b") for sub in ("x", "x-y", "x0") for leaf in "12"]
    keys = [*folders, "a-", "a.txt", "z"]
    client = seaweedfs.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=b"x")
    listed = {}
    for width in (1, 2, 8):
        listed[width] = await walked(seaweedfs.store(bucket, page_size=2, list_concurrency=width))
    assert listed[1] == listed[2] == listed[8] == sorted(keys)


async def test_seaweedfs_walk_lists_a_parts_subfolders_at_once_within_the_bound(
    seaweedfs: S3Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part of the walk (a top folder) too big to sort in memory lists its subfolders several
    at a time, and the whole listing never has more than ``list_concurrency`` requests out."""
    bucket = seaweedfs.new_bucket()
    keys = sorted(f"t{top}/{sub:02d}/k{n}" for top in range(6) for sub in range(5) for n in range(2))
    client = seaweedfs.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=b"x")
    monkeypatch.setattr(s3_module, "FLAT_PART", 3)  # every part (10 keys) is too big to list flat
    store = seaweedfs.store(bucket, list_concurrency=4, page_size=3)
    out: list[str] = []
    peak, peak_in_part = 0, 0
    page = store._page

    async def slow_page(prefix: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal peak, peak_in_part
        out.append(prefix)
        peak = max(peak, len(out))
        part = prefix[len(PREFIX) :].split("/")[0]
        peak_in_part = max(peak_in_part, sum(1 for p in out if part and p[len(PREFIX) :].startswith(part + "/")))
        try:
            await asyncio.sleep(0.02)  # every request overlaps the ones sent with it
            return await page(prefix, *args, **kwargs)
        finally:
            out.remove(prefix)

    monkeypatch.setattr(store, "_page", slow_page)
    assert await walked(store) == keys
    assert peak == 4
    assert peak_in_part >= 2


@pytest.mark.parametrize("flat_part", [2, 8000])
async def test_seaweedfs_walk_lists_a_part_flat_and_sorts_it(
    seaweedfs: S3Emulator, monkeypatch: pytest.MonkeyPatch, flat_part: int
) -> None:
    """A part of the walk that fits in ``FLAT_PART`` keys is listed without a delimiter (a request
    per page, none per folder) and sorted: SeaweedFS's own flat order (folder ``a`` before
    ``a.txt``, ``a-1``, ``a b``) comes out in S3 key order. A part that does not fit is walked
    folder by folder after all, with the same result."""
    bucket = seaweedfs.new_bucket()
    inner = ["a/b/1", "a/b/2", "a/c", "a.txt", "a-1/x", "a b", "a0/y", "b/z/1", "b/z-2", "b/z.q"]
    keys = sorted(f"{top}/{key}" for top in ("p", "q", "r") for key in inner)
    client = seaweedfs.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=b"x")
    monkeypatch.setattr(s3_module, "FLAT_PART", flat_part)
    store = seaweedfs.store(bucket, list_concurrency=2, page_size=3)  # 3 top folders: the parts
    asked = delimiters_asked(store, monkeypatch)
    assert await walked(store) == keys
    flat = asked.count(None) - 1  # the first page, which finds the server
    if flat_part > len(inner):
        # the root's level, then each of the three parts: its 10 keys in 4 pages of 3
        assert (flat, asked.count("/")) == (3 * 4, 1)
    else:  # the parts running at once gave up after a page of 3 (not fewer than FLAT_PART); all walked
        assert 1 <= flat <= 2 and asked.count("/") > 1 + 3 * 3


async def test_seaweedfs_walk_stops_listing_parts_flat_when_they_do_not_fit(
    seaweedfs: S3Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts each just over ``FLAT_PART``: every flat try is dropped, so once the dropped keys
    outweigh what flat parts saved, the rest are walked without one. Without that, the whole
    tree is listed twice (flat, then folder by folder)."""
    bucket = seaweedfs.new_bucket()
    keys = sorted(f"t{top}/{sub}/k" for top in range(10) for sub in range(4))
    client = seaweedfs.client()
    for key in keys:
        client.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=b"x")
    monkeypatch.setattr(s3_module, "FLAT_PART", 2)
    store = seaweedfs.store(bucket, list_concurrency=2, page_size=3)  # 10 top folders: the parts
    asked = delimiters_asked(store, monkeypatch)
    assert await walked(store) == keys
    tried = asked.count(None) - 1  # the first page, which finds the server
    assert 1 <= tried <= 2  # the parts running when the first gave up; none after
    assert store._flat_dropped == 3 * tried and store._flat_listed == 0


async def test_a_server_ignoring_start_after_is_slow_not_wrong() -> None:
    """Parts that start from the beginning (StartAfter ignored) still yield each key once."""

    class IgnoresStartAfter:
        def __init__(self) -> None:
            self.calls: list[dict[str, Any]] = []

        async def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]:
            self.calls.append(kwargs)
            token = int(kwargs.get("ContinuationToken") or 0)
            keys = [f"p/{c}" for c in "abcdef"][token : token + 2]
            more = token + 2 < 6
            return {"Contents": [obj(k) for k in keys], "IsTruncated": more, "NextContinuationToken": str(token + 2)}

    store = S3Store("bkt", "p/", page_size=2, fast_list=False, list_concurrency=3, listing="flat")
    store._client = IgnoresStartAfter()
    assert [i.key async for i in store.list_split("", ["b", "d"])] == list("abcdef")
    assert {c.get("StartAfter") for c in store._client.calls} == {None, "p/b", "p/d"}


@pytest.mark.parametrize("server", ["seaweedfs", "moto_s3"])
async def test_missing_bucket(server: str, request: pytest.FixtureRequest) -> None:
    emulator: S3Emulator = request.getfixturevalue(server)
    store = emulator.store("bs-never-created-bucket", page_size=10)
    try:
        await check_missing_root(store)
        with pytest.raises(NotFound, match="NoSuchBucket"):
            await list_keys(store)
    finally:
        await store.aclose()


async def test_permission_denied(s3_readonly_store: S3Store) -> None:
    await check_permission_denied(s3_readonly_store)
    assert await read_all(s3_readonly_store, "existing") == b"readable"
    with pytest.raises(PermissionDenied, match="AccessDenied"):
        await s3_readonly_store.delete("existing")


async def test_wrong_credentials(seaweedfs: S3Emulator) -> None:
    bucket = seaweedfs.new_bucket()
    seaweedfs.client().put_object(Bucket=bucket, Key=f"{PREFIX}k", Body=b"x")
    secret = "not-the-secret-0123456789"
    for key_id in (seaweedfs.access_key_id, "AKIA-UNKNOWN-KEY"):  # SignatureDoesNotMatch, InvalidAccessKeyId
        store = S3Store(
            bucket,
            PREFIX,
            endpoint_url=seaweedfs.endpoint_url,
            access_key_id=key_id,
            secret_access_key=secret,
            attempts=1,
        )
        try:
            calls = (lambda s=store: list_keys(s), lambda s=store: s.head("k"), lambda s=store: read_all(s, "k"))
            for call in calls:
                with pytest.raises(PermissionDenied) as exc:
                    await call()
                assert secret not in str(exc.value) and secret not in repr(exc.value)
            with pytest.raises(PermissionDenied):
                await store.put("new", one_chunk(b"x"))
        finally:
            await store.aclose()


# --- S3 specifics on a real server --------------------------------------------------------------


@pytest.mark.parametrize("server", ["seaweedfs", "moto_s3"])
async def test_multipart_put(server: str, request: pytest.FixtureRequest) -> None:
    """11 MiB with 5 MiB parts: three parts (S3's minimum part size is 5 MiB), streamed in odd chunks."""
    emulator: S3Emulator = request.getfixturevalue(server)
    store = emulator.store(emulator.new_bucket(), part_size=5 * MiB, page_size=10)
    data = random.Random(7).randbytes(11 * MiB + 5)
    try:
        put = await store.put("big/blob", chunks_of(data, 3 * MiB + 1), content_type="application/x-test")
        assert put.size == len(data)
        assert put.etag is not None and put.etag.endswith("-3"), f"not a 3-part multipart etag: {put.etag!r}"
        assert [(i.key, i.size, i.etag) async for i in store.list()] == [("big/blob", len(data), put.etag)]
        assert await store.head("big/blob") == put
        assert await read_all(store, "big/blob") == data

        # Conditional multipart puts: refused early when the precondition already fails ...
        with pytest.raises(AlreadyExists):
            await store.put("big/blob", chunks_of(data), CREATE)
        with pytest.raises(PreconditionFailed):
            await store.put("big/blob", chunks_of(data), PutMode.matching("0" * 32))
        # ... and honoured when it holds.
        again = await store.put("big/blob", chunks_of(data[::-1]), PutMode.matching(put.etag))
        assert again.etag != put.etag and again.size == len(data)
        created = await store.put("big/other", chunks_of(data), CREATE)
        assert created.etag == put.etag  # same bytes, same parts: same multipart etag
        uploads = emulator.client().list_multipart_uploads(Bucket=store.bucket)
        assert not uploads.get("Uploads"), f"no upload may be left behind: {uploads.get('Uploads')}"
    finally:
        await store.aclose()


async def test_failed_multipart_put_is_aborted(seaweedfs: S3Emulator) -> None:
    store = seaweedfs.store(seaweedfs.new_bucket(), part_size=5 * MiB)

    async def breaks_after_two_parts() -> AsyncIterator[bytes]:
        for _ in range(11):
            yield b"x" * MiB
        raise RuntimeError("the source broke")

    try:
        with pytest.raises(RuntimeError, match="the source broke"):
            await store.put("broken", breaks_after_two_parts())
        assert not seaweedfs.client().list_multipart_uploads(Bucket=store.bucket).get("Uploads")
        with pytest.raises(NotFound):
            await store.head("broken")
    finally:
        await store.aclose()


async def test_part_size_boundary(s3_store: S3Store) -> None:
    """Exactly one part's worth is a single PutObject; one byte more is two parts (the last one small)."""
    s3_store.part_size = 5 * MiB
    data = b"p" * s3_store.part_size
    one = await s3_store.put("one-part", chunks_of(data, 1000 * 1000))
    assert one.etag is not None and "-" not in one.etag, f"expected a plain MD5 etag: {one.etag!r}"
    two = await s3_store.put("two-parts", chunks_of(data + b"!", 1000 * 1000))
    assert two.etag is not None and two.etag.endswith("-2") and two.size == len(data) + 1


async def test_seaweedfs_flat_listing_is_out_of_order(seaweedfs: S3Emulator) -> None:
    """Invariant 6 against a real server: listed flat, SeaweedFS returns 'a/b' before 'a-c'
    (S3 order is the reverse, '-' < '/'); the store refuses that listing instead of passing it on.
    In the default ("auto") mode the store sees it is SeaweedFS and lists folder by folder."""
    bucket = seaweedfs.new_bucket()
    flat, auto = seaweedfs.store(bucket, listing="flat"), seaweedfs.store(bucket)
    try:
        for key in ("a/b", "a-c", "a0"):
            await auto.put(key, one_chunk(b"x"))
        with pytest.raises(OrderError, match="'some/prefix/a-c' after 'some/prefix/a/b'"):
            await list_keys(flat)
        assert await list_keys(auto) == ["a-c", "a/b", "a0"]
        assert auto._listing == "walk"
    finally:
        await flat.aclose()
        await auto.aclose()


async def test_moto_is_listed_flat(s3_moto_store: S3Store) -> None:
    await s3_moto_store.put("a/b", one_chunk(b"x"))
    assert await list_keys(s3_moto_store) == ["a/b"]
    assert s3_moto_store._listing == "flat"


async def test_delete_if_match_of_a_missing_key(s3_store: S3Store, s3_moto_store: S3Store) -> None:
    """Both answers servers give (AWS/moto: 404, SeaweedFS: 412) mean 'already gone': fine."""
    for store in (s3_store, s3_moto_store):
        await store.delete("never-there", if_match="0" * 32)


async def test_put_if_match_on_a_missing_key(s3_moto_store: S3Store) -> None:
    """moto (like AWS) answers 404 NoSuchKey to If-Match on a missing key: that is a failed precondition."""
    with pytest.raises(PreconditionFailed, match="no longer exists"):
        await s3_moto_store.put("absent", one_chunk(b"x"), PutMode.matching("0" * 32))


async def test_storage_class_and_content_type(moto_s3: S3Emulator) -> None:
    bucket = moto_s3.new_bucket()
    store = moto_s3.store(bucket, storage_class="STANDARD_IA")
    try:
        await store.put("cold", one_chunk(b"x"), content_type="text/csv")
        head = moto_s3.client().head_object(Bucket=bucket, Key=f"{PREFIX}cold")
        assert (head.get("StorageClass"), head["ContentType"]) == ("STANDARD_IA", "text/csv")
    finally:
        await store.aclose()


@pytest.mark.parametrize("lean", [True, False])
async def test_retried_conditional_put_whose_first_attempt_landed(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    """The first PutObject (a lean request, or through the SDK) reaches storage but its answer is
    lost; the retry then fails its precondition on our own write. The store must recognise its
    bytes and report success."""
    lost: list[str] = []
    if lean:
        real_put = s3_store._lean_put

        async def lossy_put(*args: Any) -> Any:
            result = await real_put(*args)
            if not lost:
                lost.append("put")
                raise Transient("connection reset after the request was sent")
            return result

        monkeypatch.setattr(s3_store, "_lean_put", lossy_put)
    else:
        s3_store.lean_get = False
        real_call = s3_store._call

        async def lossy(method: str, op: str, key: str | None, mode: PutMode | None = None, **kw: Any) -> Any:
            result = await real_call(method, op, key, mode, **kw)
            if method == "put_object" and not lost:
                lost.append(method)
                raise Transient("connection reset after the request was sent")
            return result

        monkeypatch.setattr(s3_store, "_call", lossy)
    s3_store.retry_base = 0.001
    first = await s3_store.put("once", one_chunk(b"first"), CREATE)
    assert lost and first.size == 5
    lost.clear()
    second = await s3_store.put("once", one_chunk(b"second"), PutMode.matching(first.etag or ""))
    assert lost and second.etag != first.etag
    assert await read_all(s3_store, "once") == b"second"
    lost.clear()
    # A genuine conflict is still reported after a retry.
    with pytest.raises(AlreadyExists):
        await s3_store.put("once", one_chunk(b"third"), CREATE)


# --- configuration -------------------------------------------------------------------------------


async def test_store_from_s3_config(s3_config: dict[str, Any]) -> None:
    """The fixture's plain-string config goes through Settings and the registry to a working store."""
    settings = Settings(integrations=s3_config["integrations"], drivers={"d": s3_config["driver"]})
    store = open_store(settings.drivers["d"], settings)
    try:
        assert isinstance(store, S3Store) and isinstance(store, Store)
        assert store.url == s3_config["driver"]["url"]
        secret = s3_config["integrations"]["aws_test"]["secret_access_key"]
        assert secret not in repr(store) and secret not in store.url
        await store.put("via/settings", one_chunk(b"ok"))
        assert await list_keys(store) == ["via/settings"]
    finally:
        await store.aclose()


def test_open_s3_maps_driver_and_integration(tmp_path: Any) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cr3t\n")
    integration = AwsIntegration(kind="aws", access_key_id="AKID", secret_access_key_file=secret_file, profile="p")
    driver = DriverConfig(url="s3://bkt/some/prefix/", storage_class="GLACIER_IR", endpoint_url="http://h:1")
    store = open_s3(driver.location, driver, integration)
    assert (store.bucket, store.prefix, store.url) == ("bkt", "some/prefix/", "s3://bkt/some/prefix/")
    assert (store.region, store.storage_class, store.endpoint_url) == ("us-east-1", "GLACIER_IR", "http://h:1")
    assert store._credentials == {"aws_access_key_id": "AKID", "aws_secret_access_key": "s3cr3t"}
    assert store._profile == "p" and "s3cr3t" not in repr(store)

    aws = open_s3(DriverConfig(url="s3://bkt").location, DriverConfig(url="s3://bkt"), None)
    assert (aws.region, aws.endpoint_url, aws._credentials, aws.url) == (None, None, {}, "s3://bkt/")


async def test_no_credentials_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The default chain finds nothing: a PermissionDenied that says so, not a botocore traceback."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for store in (S3Store("bkt", "p/", attempts=1), S3Store("bkt", "p/", profile="missing", attempts=1)):
        try:
            with pytest.raises(PermissionDenied, match="no usable AWS credentials"):
                await store.head("k")
        finally:
            await store.aclose()


def test_half_a_key_pair_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="access_key_id and secret_access_key"):
        S3Store("bkt", access_key_id="AKID")


# --- unit tests against a stub client ------------------------------------------------------------

T0 = datetime(2024, 5, 1, 12, 0, 0, 500_000, tzinfo=UTC)


def obj(key: str, size: int = 1) -> dict[str, Any]:
    return {"Key": key, "Size": size, "LastModified": T0, "ETag": '"e"'}


def client_error(code: str, status: int, op: str = "ListObjectsV2") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "msg"}, "ResponseMetadata": {"HTTPStatusCode": status}}, op)


class StubClient:
    """Serves scripted ListObjectsV2 pages (or raises scripted errors) and records calls."""

    def __init__(self, *steps: dict[str, Any] | BaseException) -> None:
        self.steps = list(steps)
        self.calls: list[dict[str, Any]] = []

    async def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


def stub_store(client: StubClient, prefix: str = "p/") -> S3Store:
    store = S3Store("bkt", prefix, page_size=2, retry_base=0.0001, fast_list=False, list_concurrency=1)
    store._client = client  # skip the lazy real client
    return store


async def test_pages_are_followed_and_filtered() -> None:
    client = StubClient(
        {"Contents": [obj("p/.bucketsync/x"), obj("p/a", 3)], "IsTruncated": True, "NextContinuationToken": "t1"},
        {"Contents": [obj("p/b/"), obj("p/b/c")], "IsTruncated": False},
    )
    infos = [i async for i in stub_store(client).list()]
    assert [(i.key, i.size, i.etag, i.modified, i.version) for i in infos] == [
        ("a", 3, "e", T0.replace(microsecond=0).timestamp(), None),
        ("b/c", 1, "e", T0.replace(microsecond=0).timestamp(), None),
    ]
    assert client.calls == [
        {"Bucket": "bkt", "Prefix": "p/", "MaxKeys": 2},
        {"Bucket": "bkt", "Prefix": "p/", "MaxKeys": 2, "ContinuationToken": "t1"},
    ]


async def test_truncated_page_without_token_is_an_error() -> None:
    client = StubClient({"Contents": [obj("p/a"), obj("p/b")], "IsTruncated": True})
    seen = []
    with pytest.raises(StorageError, match="truncated page without a continuation token"):
        async for info in stub_store(client).list():
            seen.append(info.key)
    assert seen == ["a", "b"]  # what came before is yielded; the listing then fails, never ends quietly


@pytest.mark.parametrize(
    "pages",
    [
        [{"Contents": [obj("p/b"), obj("p/a")], "IsTruncated": False}],
        [{"Contents": [obj("p/a"), obj("p/a")], "IsTruncated": False}],
        [
            {"Contents": [obj("p/a"), obj("p/c")], "IsTruncated": True, "NextContinuationToken": "t"},
            {"Contents": [obj("p/b")], "IsTruncated": False},
        ],
    ],
    ids=["within-a-page", "duplicate", "across-pages"],
)
async def test_out_of_order_listing_is_an_order_error(pages: list[dict[str, Any]]) -> None:
    with pytest.raises(OrderError):
        _ = [i async for i in stub_store(StubClient(*pages)).list()]


async def test_key_outside_the_prefix_is_an_error() -> None:
    client = StubClient({"Contents": [obj("q/a")], "IsTruncated": False})
    with pytest.raises(StorageError, match="outside the prefix"):
        _ = [i async for i in stub_store(client).list()]


async def test_throttling_is_retried() -> None:
    client = StubClient(
        client_error("SlowDown", 503),
        client_error("ThrottlingException", 400),
        {"Contents": [obj("p/a")], "IsTruncated": False},
    )
    assert [i.key async for i in stub_store(client).list()] == ["a"]
    assert len(client.calls) == 3


async def test_retries_are_bounded_and_permanent_errors_are_not_retried() -> None:
    client = StubClient(*(client_error("InternalError", 500) for _ in range(5)))
    with pytest.raises(Transient, match="InternalError"):
        _ = [i async for i in stub_store(client).list()]
    assert len(client.calls) == 5  # attempts=5 in all

    client = StubClient(client_error("AccessDenied", 403))
    with pytest.raises(PermissionDenied):
        _ = [i async for i in stub_store(client).list()]
    assert len(client.calls) == 1


class TreeClient:
    """Answers ListObjectsV2 from a table: (Prefix, Delimiter, ContinuationToken) -> page."""

    def __init__(self, pages: dict[tuple[str, str | None, str | None], dict[str, Any]]) -> None:
        self.pages = pages
        self.calls: list[tuple[str, str | None, str | None]] = []

    async def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]:
        call = (kwargs["Prefix"], kwargs.get("Delimiter"), kwargs.get("ContinuationToken"))
        self.calls.append(call)
        return self.pages[call]


def folders(*names: str) -> list[dict[str, str]]:
    return [{"Prefix": n} for n in names]


async def test_walk_puts_folders_in_key_order_across_pages() -> None:
    """A server that lists a level by bare name ('a' before 'a b'), split over pages: the folder
    'a/' waits until the server has passed it, and the hidden folder is never entered."""
    pages = {
        ("p/", "/", None): {
            "Contents": [obj("p/-x")],
            "CommonPrefixes": folders("p/.bucketsync/", "p/a/"),
            "IsTruncated": True,
            "NextContinuationToken": "t1",
        },
        ("p/", "/", "t1"): {
            "Contents": [obj("p/a b"), obj("p/a-c")],
            "IsTruncated": True,
            "NextContinuationToken": "t2",
        },
        ("p/", "/", "t2"): {"Contents": [obj("p/a0")], "CommonPrefixes": folders("p/b/"), "IsTruncated": False},
        ("p/a/", "/", None): {"Contents": [obj("p/a/"), obj("p/a/x")], "IsTruncated": False},
        ("p/b/", "/", None): {"CommonPrefixes": folders("p/b/c/"), "IsTruncated": False},
        ("p/b/c/", "/", None): {"Contents": [obj("p/b/c/d")], "IsTruncated": False},
        ("p/a", "/", None): {"Contents": [obj("p/a0")], "CommonPrefixes": folders("p/a/"), "IsTruncated": False},
    }
    client = TreeClient(pages)
    store = S3Store("bkt", "p/", listing="walk", fast_list=False)
    store._client = client
    assert [i.key async for i in store.list()] == ["-x", "a b", "a-c", "a/x", "a0", "b/c/d"]
    assert ("p/.bucketsync/", "/", None) not in client.calls
    assert [i.key async for i in store.list("a")] == ["a/x", "a0"]


async def test_walk_truncated_page_without_token_is_an_error() -> None:
    client = TreeClient({("p/", "/", None): {"Contents": [obj("p/a")], "IsTruncated": True}})
    store = S3Store("bkt", "p/", listing="walk", fast_list=False)
    store._client = client
    with pytest.raises(StorageError, match="truncated page without a continuation token"):
        _ = [i async for i in store.list()]


LIST_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>bkt</Name><Prefix>p%2F</Prefix><KeyCount>3</KeyCount><MaxKeys>3</MaxKeys>
  <EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
  <Contents><Key>p%2Fa+b</Key><LastModified>2024-05-01T12:00:00.500Z</LastModified>
    <ETag>&quot;9e107d9d372bb6826bd81d3542a419d6&quot;</ETag><Size>43</Size><StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>p%2Fa%2Bb%3C%26%3E</Key><LastModified>2024-05-01T12:00:01Z</LastModified>
    <ETag>"d41d8cd98f00b204e9800998ecf8427e-2"</ETag><Size>0</Size></Contents>
  <CommonPrefixes><Prefix>p%2Fdir+1%2F</Prefix></CommonPrefixes>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
</ListBucketResult>"""


def test_parse_list_matches_botocore() -> None:
    page = parse_list(LIST_XML, "AmazonS3")
    t0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    assert page.entries == [
        ("p/a b", 43, t0, "9e107d9d372bb6826bd81d3542a419d6"),
        ("p/a+b<&>", 0, t0 + 1, "d41d8cd98f00b204e9800998ecf8427e-2"),
    ]
    assert page.folders == ["p/dir 1/"]
    assert (page.truncated, page.token, page.server) == (
        True,
        "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=",
        "AmazonS3",
    )
    # Without <EncodingType>url</EncodingType> keys are taken as they are.
    plain = parse_list(LIST_XML.replace(b"<EncodingType>url</EncodingType>", b""), "")
    assert plain.entries[0][0] == "p%2Fa+b"


def test_signed_urls_never_reach_messages() -> None:
    url = (
        "https://s3.example/bkt?list-type=2&X-Amz-Credential=AKIAEXAMPLE%2F20240501%2Fus-east-1"
        "&X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE&X-Amz-Signature=abcdef0123"
    )
    err = translate(aiohttp.InvalidURL(url), "s3://bkt/", "list")
    for secret in ("AKIAEXAMPLE", "FQoGZXIvYXdzEXAMPLE", "abcdef0123"):
        assert secret not in str(err)


class Body:
    """A GetObject body that breaks after ``fail_after`` bytes."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data, self.pos, self.fail_after, self.closed = data, 0, fail_after, False

    async def read(self, n: int) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ResponseStreamingError(error="connection reset")
        chunk = self.data[self.pos : self.pos + min(n, 1000)]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


async def test_interrupted_download_resumes_at_the_offset_pinned_to_the_etag() -> None:
    data = bytes(range(256)) * 20
    bodies: list[Body] = []
    calls: list[dict[str, Any]] = []

    class GetClient:
        async def get_object(self, **kwargs: Any) -> dict[str, Any]:
            calls.append(kwargs)
            start = int(kwargs.get("Range", "bytes=0-")[6:-1])
            body = Body(data[start:], fail_after=1500 if len(bodies) < 2 else None)
            bodies.append(body)
            return {"Body": body, "ETag": '"v1"'}

    store = S3Store("bkt", "p/", retry_base=0.0001, lean_get=False)  # the SDK path; the lean one: test_lean_read_*
    store._client = GetClient()
    assert await read_all(store, "k") == data
    assert [c.get("Range") for c in calls] == [None, "bytes=2000-", "bytes=4000-"]
    assert [c.get("IfMatch") for c in calls] == [None, '"v1"', '"v1"']
    assert all(b.closed for b in bodies)


@pytest.mark.parametrize(
    ("code", "status", "mode", "kind"),
    [
        ("NoSuchKey", 404, None, NotFound),
        ("404", 404, None, NotFound),
        ("NoSuchBucket", 404, None, NotFound),
        ("NoSuchBucket", 404, PutMode.matching("e"), NotFound),
        ("NoSuchKey", 404, PutMode.matching("e"), PreconditionFailed),
        ("AccessDenied", 403, None, PermissionDenied),
        ("403", 403, None, PermissionDenied),
        ("InvalidAccessKeyId", 403, None, PermissionDenied),
        ("SignatureDoesNotMatch", 403, None, PermissionDenied),
        ("ExpiredToken", 400, None, PermissionDenied),
        ("PreconditionFailed", 412, None, PreconditionFailed),
        ("PreconditionFailed", 412, PutMode.matching("e"), PreconditionFailed),
        ("PreconditionFailed", 412, CREATE, AlreadyExists),
        ("ConditionalRequestConflict", 409, CREATE, AlreadyExists),
        ("ConditionalRequestConflict", 409, PutMode.matching("e"), PreconditionFailed),
        ("SlowDown", 503, None, Transient),
        ("503", 503, None, Transient),
        ("InternalError", 500, None, Transient),
        ("RequestTimeout", 400, None, Transient),
        ("Throttling", 400, None, Transient),
        ("RequestLimitExceeded", 400, None, Transient),
        ("TooManyRequests", 429, None, Transient),
        ("BadGateway", 502, None, Transient),
        ("EntityTooSmall", 400, None, StorageError),
        ("InvalidBucketName", 400, OVERWRITE, StorageError),
    ],
)
def test_translate_client_errors(code: str, status: int, mode: PutMode | None, kind: type[StorageError]) -> None:
    err = translate(client_error(code, status, "PutObject"), "s3://bkt/p/k", "put", key="k", mode=mode)
    assert isinstance(err, kind) and (type(err) is kind or kind is NotFound), f"{code} -> {err!r}"
    assert "s3://bkt/p/k" in str(err) and code in str(err) and err.key == "k"


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="https://user:hunter2@minio.example:9000/bkt"),
        ConnectTimeoutError(endpoint_url="http://h"),
        ReadTimeoutError(endpoint_url="http://h"),
        ResponseStreamingError(error="reset"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("truncated"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_translate_network_errors_are_transient(exc: BaseException) -> None:
    err = translate(exc, "s3://bkt/p/k", "get", key="k")
    assert isinstance(err, Transient) and "hunter2" not in str(err)


def test_translate_missing_credentials() -> None:
    err = translate(NoCredentialsError(), "s3://bkt/", "list")
    assert isinstance(err, PermissionDenied) and "credentials" in str(err)


#: a page as SeaweedFS writes it: Key, ETag (with &#34;), Size, StorageClass, LastModified
SEAWEED_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>bkt</Name><Prefix>p/</Prefix>\
<MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter><IsTruncated>true</IsTruncated>\
<Contents><Key>p/a</Key><ETag>&#34;9e107d9d372bb6826bd81d3542a419d6&#34;</ETag><Size>43</Size>\
<StorageClass>STANDARD</StorageClass><LastModified>2024-05-01T12:00:00Z</LastModified></Contents>\
<Contents><Key>p/b &amp; c</Key><ETag>&#34;d41d8cd98f00b204e9800998ecf8427e-2&#34;</ETag><Size>0</Size>\
<StorageClass>STANDARD</StorageClass><LastModified>2024-05-01T12:00:01Z</LastModified></Contents>\
<CommonPrefixes><Prefix>p/d/</Prefix></CommonPrefixes><NextContinuationToken>t1</NextContinuationToken>\
</ListBucketResult>"""


def test_the_page_scan_reads_seaweedfs_layout_without_the_xml_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """SeaweedFS writes a <Contents>'s fields in another order: the scan reads it as the parser does."""
    want = parse_list(SEAWEED_XML, "SeaweedFS")
    assert want.entries[1] == ("p/b & c", 0, datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC).timestamp(), want.entries[1][3])

    def no_parser(body: bytes, server: str) -> None:
        raise AssertionError("the page went to the XML parser")

    monkeypatch.setattr(s3_lean, "parse_list", no_parser)
    got = s3_lean.scan_list(SEAWEED_XML, "SeaweedFS")
    assert (got.entries, got.folders, got.truncated, got.token) == (want.entries, want.folders, True, "t1")


ETAG_TEXTS = [
    "&quot;9e107d9d372bb6826bd81d3542a419d6&quot;",
    "&#34;d41d8cd98f00b204e9800998ecf8427e-2&#34;",
    '"9e107d9d372bb6826bd81d3542a419d6"',
    "9e107d9d372bb6826bd81d3542a419d6",
    "&quot;9e107d9d&quot;&quot;",
    "9e107d9d&quot;",
    "&quot;9e107d9d",
    "W/&quot;weak&quot;",
    "&quot;with space&quot;",
    "&quot;a&amp;b&quot;",
    " &quot;padded&quot; ",
    "&quot;&quot;",
    "&quot;",
    "",
]


@pytest.mark.parametrize("layout", ["s3", "seaweedfs"])
@pytest.mark.parametrize("text", ETAG_TEXTS)
def test_the_page_scan_reads_an_etag_as_the_parser_does(
    text: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan folds the usual quoted ETag in its regex and hands any other text to
    ``listed_etag``: either way the entry is the XML parser's, read without it."""
    if layout == "s3":
        fields = f"<Key>p/a</Key><LastModified>2024-05-01T12:00:00Z</LastModified><ETag>{text}</ETag><Size>3</Size>"
    else:
        fields = f"<Key>p/a</Key><ETag>{text}</ETag><Size>3</Size><LastModified>2024-05-01T12:00:00Z</LastModified>"
    page = (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<IsTruncated>false</IsTruncated><Contents>{fields}</Contents></ListBucketResult>"
    ).encode()
    want = parse_list(page, "S3")
    monkeypatch.setattr(s3_lean, "parse_list", None)  # the scan must not need it
    assert s3_lean.scan_list(page, "S3").entries == want.entries
    assert want.entries[0][3] == normalize_etag(unescape(text))


@pytest.mark.parametrize(
    "text",
    [
        "&quot;9e107d9d372bb6826bd81d3542a419d6&quot;",
        "&#34;d41d8cd98f00b204e9800998ecf8427e-2&#34;",
        '"9e107d9d372bb6826bd81d3542a419d6"',
        "9e107d9d372bb6826bd81d3542a419d6",
        "W/&quot;weak&quot;",
        "&quot;with space&quot;",
        "&quot;a&amp;b&quot;",
        " &quot;padded&quot; ",
        "&quot;&quot;",
        "",
    ],
)
def test_a_listed_etag_is_what_unescaping_and_normalizing_give(text: str) -> None:
    """The scan's one-step ETag (``_listed_etag``) against the long way round it replaces."""
    assert s3_lean.listed_etag(text) == normalize_etag(unescape(text))
