"""The permission probe against real servers: what it checks, and how it names what is wrong.

Each failure class is produced by a real server or a real socket: SeaweedFS with a
read+list identity (denied), a bucket/container/folder that does not exist (not
found), a port nobody listens on (unreachable), a driver pointed at another kind of
storage, or at a server answering as AWS does for the wrong region (bad endpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from bucketsync.stores import Store
from bucketsync.stores.gcs import GcsStore
from bucketsync.stores.local import LocalStore
from bucketsync.stores.s3 import S3Store
from bucketsync.upstream.probe import BAD_ENDPOINT, DENIED, NOT_FOUND, NOT_TESTED, OK, SKIPPED, UNREACHABLE, probe
from emulators import free_port
from emulators.azure import Azurite, make_store
from emulators.gcs import FakeGcs
from emulators.s3 import PREFIX, REGION, S3Emulator


def statuses(result: object) -> dict[str, str]:
    return {name: c.status for name, c in result.checks.items()}  # type: ignore[attr-defined]


async def probed(store: Store, *, allow_delete: bool = False, writes: bool = True) -> object:
    try:
        return await probe(store, "d", allow_delete, writes=writes)
    finally:
        await store.aclose()


# ---------------------------------------------------------------------- what is checked


async def test_a_read_only_identity_is_ready_with_downstream_unavailable(s3_readonly_store: S3Store) -> None:
    result = await probe(s3_readonly_store, "ro", False, writes=True)
    assert statuses(result) == {"list": OK, "put": DENIED, "get": OK, "delete": SKIPPED}
    assert result.upstream_ok and not result.downstream_ok and not result.ok
    summary = result.summary()
    assert "can be synced" in summary and "downstream unavailable" in summary
    assert "put: permission denied" in summary
    assert "lacks permission" not in summary


async def test_a_read_only_dataset_needs_no_put_and_is_simply_ready(s3_readonly_store: S3Store) -> None:
    result = await probe(s3_readonly_store, "ro", False, writes=False)
    assert statuses(result) == {"list": OK, "put": SKIPPED, "get": OK, "delete": SKIPPED}
    assert result.ok and result.downstream_ok
    assert "all required permissions present (list, get)" in result.summary()


async def test_get_reads_an_existing_object_and_an_empty_location_cannot_test_it(seaweedfs: S3Emulator) -> None:
    empty = seaweedfs.store(seaweedfs.new_bucket(), readonly=True)
    result = await probed(empty, writes=False)
    assert statuses(result)["get"] == NOT_TESTED
    assert "empty" in result.checks["get"].detail
    assert result.ok, "an empty read-only location is not a failure"

    writable = seaweedfs.store(seaweedfs.new_bucket())
    result = await probed(writable, allow_delete=True)  # get reads the test-file back
    assert statuses(result) == {"list": OK, "put": OK, "get": OK, "delete": OK}


async def test_delete_is_not_probed_without_allow_delete_but_the_test_file_is_cleaned(
    seaweedfs: S3Emulator,
) -> None:
    bucket = seaweedfs.new_bucket()
    result = await probed(seaweedfs.store(bucket))
    assert statuses(result)["delete"] == SKIPPED
    assert "allow_delete is off" in result.checks["delete"].detail
    assert result.ok and result.leftover is None
    listed = seaweedfs.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert listed == [], "the probe's test-file stays behind"


async def test_a_reader_with_allow_delete_lacks_delete_too(seaweedfs: S3Emulator) -> None:
    bucket = seaweedfs.new_bucket()
    seaweedfs.client().put_object(Bucket=bucket, Key=f"{PREFIX}x", Body=b"x")
    result = await probed(seaweedfs.store(bucket, readonly=True), allow_delete=True)
    # nothing could be written, so there was nothing of ours to delete
    assert statuses(result) == {"list": OK, "put": DENIED, "get": OK, "delete": NOT_TESTED}
    assert result.upstream_ok and not result.downstream_ok


# ---------------------------------------------------------------------- denied


async def test_wrong_keys_are_permission_denied(seaweedfs: S3Emulator) -> None:
    store = S3Store(
        seaweedfs.new_bucket(),
        PREFIX,
        endpoint_url=seaweedfs.endpoint_url,
        region=REGION,
        access_key_id=seaweedfs.access_key_id,
        secret_access_key="not-the-secret",
        attempts=1,
    )
    result = await probed(store)
    assert statuses(result)["list"] == DENIED
    assert not result.upstream_ok
    assert "list: permission denied" in result.summary()


async def test_a_missing_local_folder_is_not_found(tmp_path: Path) -> None:
    # (A folder a non-root uid may not read is in test_e2e_probe: as root, modes do not bite.)
    result = await probed(LocalStore(str(tmp_path / "absent")))
    assert statuses(result)["list"] == NOT_FOUND
    assert "bucket or folder not found" in result.summary()


# ---------------------------------------------------------------------- not found


async def test_a_missing_bucket_is_not_found_on_s3(seaweedfs: S3Emulator) -> None:
    result = await probed(seaweedfs.store("bs-no-such-bucket-anywhere"))
    assert statuses(result)["list"] == NOT_FOUND
    assert statuses(result)["put"] == NOT_TESTED, "nothing else is tried against a missing bucket"
    assert "list: bucket or folder not found" in result.summary()


async def test_a_missing_bucket_is_not_found_on_gcs(fake_gcs: FakeGcs) -> None:
    result = await probed(GcsStore("bs-no-such-bucket-anywhere", PREFIX, endpoint_url=fake_gcs.url))
    assert statuses(result)["list"] == NOT_FOUND


async def test_a_missing_container_is_not_found_on_azure(azurite: Azurite) -> None:
    result = await probed(make_store(azurite, "nosuchcontainer"))
    assert statuses(result)["list"] == NOT_FOUND


# ---------------------------------------------------------------------- unreachable


def _refused() -> str:
    return f"http://127.0.0.1:{free_port()}"  # free: nobody listens there


async def test_a_refused_connection_is_unreachable_on_s3() -> None:
    store = S3Store("b", PREFIX, endpoint_url=_refused(), region=REGION, access_key_id="k", secret_access_key="s")
    store.attempts, store.retry_base = 2, 0.01
    result = await probed(store)
    assert statuses(result)["list"] == UNREACHABLE
    assert "list: storage unreachable" in result.summary()


async def test_a_refused_connection_is_unreachable_on_gcs() -> None:
    result = await probed(GcsStore("b", PREFIX, endpoint_url=_refused()))
    assert statuses(result)["list"] == UNREACHABLE


async def test_a_refused_connection_is_unreachable_on_azure(azurite: Azurite) -> None:
    from dataclasses import replace

    nowhere = _refused()
    moved = replace(
        azurite,
        endpoint=f"{nowhere}/{azurite.account}",
        connection_string=azurite.connection_string.replace(f"http://127.0.0.1:{azurite.port}", nowhere),
    )
    result = await probed(make_store(moved, "anything", retry_attempts=2))
    assert statuses(result)["list"] == UNREACHABLE


async def test_a_name_that_does_not_resolve_is_unreachable() -> None:
    # .invalid never resolves (RFC 2606): the resolver answers at once, no network needed.
    store = S3Store(
        "b", PREFIX, endpoint_url="http://bucketsync-test.invalid:9", region=REGION, access_key_id="k",
        secret_access_key="s", attempts=1,
    )  # fmt: skip
    result = await probed(store)
    assert statuses(result)["list"] == UNREACHABLE


# ---------------------------------------------------------------------- bad region or endpoint


@pytest.fixture
async def web_site() -> AsyncIterator[str]:
    """An HTTP server that is not storage at all (a web site): 404 pages in HTML."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(status=404, text="<html><body>Not Found</body></html>", content_type="text/html")

    async with _serve(page) as url:
        yield url


async def test_an_s3_driver_pointed_at_a_web_site_is_a_bad_endpoint(web_site: str) -> None:
    store = S3Store("b", PREFIX, endpoint_url=web_site, region=REGION, access_key_id="k", secret_access_key="s")
    result = await probed(store)
    assert statuses(result)["list"] == BAD_ENDPOINT, result.checks["list"].detail
    assert "list: bad region or endpoint" in result.summary()


async def test_a_gcs_driver_pointed_at_an_s3_server_is_a_bad_endpoint(seaweedfs: S3Emulator) -> None:
    result = await probed(GcsStore("b", PREFIX, endpoint_url=seaweedfs.endpoint_url))
    assert statuses(result)["list"] == BAD_ENDPOINT, result.checks["list"].detail


async def test_an_azure_driver_pointed_at_a_web_site_is_a_bad_endpoint(azurite: Azurite, web_site: str) -> None:
    from dataclasses import replace

    moved = replace(
        azurite,
        endpoint=f"{web_site}/{azurite.account}",
        connection_string=azurite.connection_string.replace(f"http://127.0.0.1:{azurite.port}", web_site),
    )
    result = await probed(make_store(moved, "anything", retry_attempts=1))
    assert statuses(result)["list"] == BAD_ENDPOINT, result.checks["list"].detail


@contextlib.asynccontextmanager
async def _serve(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def wrong_region_s3() -> AsyncIterator[str]:
    """A server answering every request as AWS S3 does when the bucket lives in another region."""

    async def answer(request: web.Request) -> web.Response:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><Error><Code>AuthorizationHeaderMalformed</Code>'
            "<Message>The authorization header is malformed; the region 'us-east-1' is wrong; "
            "expecting 'eu-west-1'</Message><Region>eu-west-1</Region></Error>"
        )
        return web.Response(status=400, body=body, content_type="application/xml")

    async with _serve(answer) as url:
        yield url


async def test_the_wrong_region_is_a_bad_region_or_endpoint(wrong_region_s3: str) -> None:
    store = S3Store("b", PREFIX, endpoint_url=wrong_region_s3, region=REGION, access_key_id="k", secret_access_key="s")
    result = await probed(store)
    assert statuses(result)["list"] == BAD_ENDPOINT, result.checks["list"].detail
    assert "eu-west-1" in result.checks["list"].detail
    assert "region" in result.checks["list"].detail
