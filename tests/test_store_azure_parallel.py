"""Parallel listing on Azure: the first folder levels listed with ``delimiter=/``, each subfolder
listed flat under its own prefix, the parts read back in order (``AzureStore._walk_parts``).

What must hold: the parallel listing is the flat listing, object for object, whatever the
tree (blobs between folders, folders that sort among blobs, names Azure orders differently from
code points, folder markers, the hidden folder, pages that end anywhere); more than one request
is in flight; a level of more than a page or of many folders is listed flat, not a request per
folder; a listing of one page is one request; a folder that cannot be listed fails the listing;
the SDK path lists flat.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from bucketsync.core.errors import PermissionDenied, StorageError
from bucketsync.stores import one_chunk
from bucketsync.stores.azure import AzureStore
from bucketsync.stores.azure_lean import Rest, RestError, parse_level, scan_level
from conformance import listing
from emulators.azure import PREFIX, Azurite, make_store
from test_store_azure import ORDER_KEYS

#: folders three levels deep, blobs between folders at every level, names that sort around a
#: folder's ``/`` (``a-c`` < ``a/`` < ``a0``), the keys Azure orders by UTF-16 code units, a folder
#: of three pages of 50 (``big/``) and one of 40 subfolders (``many/``)
TREE = {
    *ORDER_KEYS,  # a-c, a/b, a0 among them
    "%41",
    "b",
    *(f"a/{m:02d}/{d:02d}/img{i}.jpg" for m in range(1, 4) for d in range(1, 4) for i in range(4)),
    *(f"a/{m:02d}/between{m}" for m in range(1, 4)),
    "a/top.txt",
    *(f"c/{i:02d}/x" for i in range(12)),
    "c/d",
    "\uff01/x",
    *(f"big/{i:03d}.jpg" for i in range(120)),
    *(f"many/{i:02d}/x" for i in range(40)),
}


async def _put(azurite: Azurite, container: str, keys: set[str]) -> None:
    writer = make_store(azurite, container, lean=False)
    try:
        await asyncio.gather(*(writer.put(key, one_chunk(key.encode())) for key in keys))
    finally:
        await writer.aclose()


@pytest.fixture
async def tree(azurite: Azurite, azure_container: str) -> AsyncIterator[list[str]]:
    await _put(azurite, azure_container, TREE)
    # Written around the store: a folder marker, bucketsync's hidden folder, neighbours of the prefix.
    raw = azurite.container(azure_container)
    for name in (PREFIX + "a/01/", PREFIX + ".bucketsync/perm-test", PREFIX[:-1], "some/prefix0", "other/x"):
        raw.upload_blob(name, b"written around the store")
    yield sorted(TREE)


async def _listed(store: AzureStore, prefix: str = "") -> list[Any]:
    try:
        return await listing(store, prefix)
    finally:
        await store.aclose()


class Requests:
    """Every List Blobs request of the lean path, flat (a page) or by level, and how many were
    in flight at once; each held 20 ms, a little latency as a real service has."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.flat: list[str] = []
        self.levels: list[str] = []
        self.in_flight = self.most = 0
        monkeypatch.setattr(Rest, "list_page", self._counted(Rest.list_page, self.flat))
        monkeypatch.setattr(Rest, "list_level", self._counted(Rest.list_level, self.levels))

    def _counted(self, method: Any, seen: list[str]) -> Any:
        async def call(rest: Rest, prefix: str, marker: str | None, size: int) -> Any:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            seen.append(prefix[len(PREFIX) :])
            try:
                await asyncio.sleep(0.02)
                return await method(rest, prefix, marker, size)
            finally:
                self.in_flight -= 1

        return call


@pytest.mark.parametrize("page_size", [2, 3, 10, 50, 1000])
async def test_the_parallel_listing_is_the_flat_listing(
    azurite: Azurite, azure_container: str, tree: list[str], page_size: int
) -> None:
    flat = await _listed(make_store(azurite, azure_container, page_size=page_size, list_concurrency=1))
    assert [info.key for info in flat] == tree
    for width in (2, 4, 8):
        parallel = await _listed(make_store(azurite, azure_container, page_size=page_size, list_concurrency=width))
        assert parallel == flat
    for sub in ("a/", "a/02/", "c/", "big/", "\U0001f600/", "x", "nothing/"):
        store = make_store(azurite, azure_container, page_size=page_size)
        assert [i.key for i in await _listed(store, sub)] == [k for k in tree if k.startswith(sub)]


async def test_folders_are_listed_at_once(
    azurite: Azurite, azure_container: str, tree: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = Requests(monkeypatch)
    store = make_store(azurite, azure_container, page_size=50, list_concurrency=8)
    assert [i.key for i in await _listed(store)] == tree
    # The first page and the top level at once, then one request out per running part.
    assert 1 < requests.most <= 9
    # Seven folders at the top (the hidden one aside), fewer than 8 listers: each is looked into,
    # down to three levels. Below that, a folder is a part listed flat under its own prefix ...
    assert requests.levels[0] == "" and {"a/", "a/01/", "c/", "big/", "many/"} <= set(requests.levels)
    assert {"a/01/01/", "a/03/03/", "c/00/", "c/11/"} <= set(requests.flat)
    # ... but a level of more than a page (big/: 120 blobs) or of more subfolders than parts are
    # worth (many/: 40 of them, for 8 listers x 4) is one part, listed flat.
    assert requests.flat.count("big/") == 3 and "many/" in requests.flat
    assert not any(p.startswith("many/") and p != "many/" for p in requests.flat + requests.levels)
    assert not any(p.startswith(".bucketsync") for p in requests.flat + requests.levels)


async def test_a_listing_of_one_page_is_one_request(
    azurite: Azurite, azure_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = {"a/1", "a/2", "b/1", "c"}
    await _put(azurite, azure_container, keys)
    requests = Requests(monkeypatch)
    store = make_store(azurite, azure_container, page_size=50)
    assert [i.key for i in await _listed(store)] == sorted(keys)
    assert requests.flat == [""]  # the top level was asked for at once, and left unread


async def test_a_folder_that_cannot_be_listed_fails_the_listing(
    azurite: Azurite, azure_container: str, tree: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing(method: Any) -> Any:
        async def call(self: Rest, prefix: str, marker: str | None, size: int) -> Any:
            if prefix.startswith(PREFIX + "c/"):
                raise RestError(403, "AuthorizationPermissionMismatch")
            return await method(self, prefix, marker, size)

        return call

    monkeypatch.setattr(Rest, "list_page", refusing(Rest.list_page))
    monkeypatch.setattr(Rest, "list_level", refusing(Rest.list_level))
    store = make_store(azurite, azure_container, page_size=50)
    got: list[str] = []
    with pytest.raises(PermissionDenied):
        try:
            async for info in store.list():
                got.append(info.key)
        finally:
            await store.aclose()
    # At most what comes before the folder, in order: never a listing that looks whole.
    assert got == [k for k in tree if k < "c/"][: len(got)]


def _tls_error() -> aiohttp.ClientSSLError:
    return aiohttp.ClientSSLError(ConnectionKey("h", 443, True, True, None, None, None, None), OSError("bad cert"))


async def test_a_tls_error_before_anything_is_listed_hands_the_listing_to_the_sdk(
    azurite: Azurite, azure_container: str, tree: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(*_: Any) -> Any:
        raise _tls_error()

    monkeypatch.setattr(Rest, "list_page", refused)
    monkeypatch.setattr(Rest, "list_level", refused)
    store = make_store(azurite, azure_container, page_size=50)
    assert [i.key for i in await _listed(store)] == tree
    assert not store.lean


async def test_a_tls_error_in_the_middle_of_the_walk_fails_the_listing(
    azurite: Azurite, azure_container: str, tree: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    list_level = Rest.list_level

    async def refused(rest: Rest, prefix: str, marker: str | None, size: int) -> Any:
        if prefix == PREFIX + "a/":
            raise _tls_error()
        return await list_level(rest, prefix, marker, size)

    monkeypatch.setattr(Rest, "list_level", refused)
    store = make_store(azurite, azure_container, page_size=50)
    with pytest.raises(StorageError, match="a TLS error in the middle of the listing"):
        await _listed(store)


async def test_the_sdk_path_lists_one_page_after_another(
    azurite: Azurite, azure_container: str, tree: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_levels(*_: Any) -> None:
        raise AssertionError("a level listing through the SDK path")

    monkeypatch.setattr(Rest, "list_level", no_levels)
    store = make_store(azurite, azure_container, lean=False, list_concurrency=8)
    assert [i.key for i in await _listed(store)] == tree


_BLOB = (
    "<Blob><Name>{}</Name><Properties><Last-Modified>Mon, 01 Jan 2024 00:00:00 GMT</Last-Modified>"
    "<Etag>0x1</Etag><Content-Length>1</Content-Length></Properties></Blob>"
)


def _level_page(*items: str, marker: str = "m2") -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Blobs>'
        + "".join(i if i.startswith("<") else _BLOB.format(i) for i in items)
        + "</Blobs>"
        + (f"<NextMarker>{marker}</NextMarker>" if marker else "<NextMarker/>")
        + "</EnumerationResults>"
    ).encode()


LEVEL_PAGES = {
    # Azurite writes a page's folders first; Azure's order is by UTF-16 code units.
    "folders first": _level_page(
        "<BlobPrefix><Name>p/a/</Name></BlobPrefix>",
        '<BlobPrefix><Name Encoded="true">p/%F0%9F%98%80/</Name></BlobPrefix>',
        "p/a-c",
        "p/a0",
        "p/\uff01",
    ),
    "interleaved": _level_page(
        "p/a-c",
        "<BlobPrefix><Name>p/a/</Name></BlobPrefix>",
        "p/a0",
        '<BlobPrefix><Name Encoded="true">p/%F0%9F%98%80/</Name></BlobPrefix>',
        "p/\uff01",
    ),
    "escaped folder": _level_page(
        "<BlobPrefix><Name>p/a&amp;b/</Name></BlobPrefix>",
        "p/a&amp;b",
        "p/\U0001f600",
        "p/\ue000",
    ),
    "blobs only": _level_page("p/a", "p/b", "p/\U0001f600", "p/\uff01", marker=""),
}


@pytest.mark.parametrize("raw", LEVEL_PAGES.values(), ids=LEVEL_PAGES.keys())
def test_a_level_page_is_read_in_the_services_order(raw: bytes) -> None:
    items, marker = scan_level(raw)
    assert (items, marker) == parse_level(raw)
    assert scan_level(raw.replace(b"><", b">\n  <")) == (items, marker)  # another layout: the parser reads it
    names = [i if isinstance(i, str) else i[0] for i in items]
    assert names == sorted(names, key=lambda n: n.encode("utf-16-be"))


def test_level_pages_keep_every_folder_and_blob() -> None:
    items, marker = scan_level(LEVEL_PAGES["folders first"])
    assert [i if isinstance(i, str) else i[0] for i in items] == ["p/a-c", "p/a/", "p/a0", "p/\U0001f600/", "p/\uff01"]
    assert marker == "m2"
    assert scan_level(LEVEL_PAGES["blobs only"])[1] is None
    items, _ = scan_level(LEVEL_PAGES["escaped folder"])
    assert "p/a&b/" in items
