"""The store conformance suite: one set of plain async checks applied to every store.

Modelled on Rust object_store's ``src/integration.rs`` and rclone's ``fstests``: each
store's test file is a few lines that build a store and call these functions::

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    async def test_conformance(check, s3_store):
        await check(s3_store)

Every check in ``CHECKS`` takes a FRESH, EMPTY store (its own bucket or prefix) whose
list page size is small (about 10), so pagination is exercised. Each check puts its
own objects and keeps counts small (at most ~35), so it is fine on slow-ish emulators.

Two checks need a store in a special place and are not in ``CHECKS``:
``check_permission_denied`` (a read/list-only location) and ``check_missing_root``
(a bucket, container or folder that does not exist).

This module is imported by test files but is not one itself, so pytest does not
rewrite its asserts: every assert carries its own message.

Local folders cannot hold a file ``a`` and a file ``a/b`` at the same time, so no check
puts a key that is also a folder of another key (a bucket could; a folder cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import unicodedata
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from bucketsync.core.errors import (
    AlreadyExists,
    BucketsyncError,
    NotFound,
    NotSupported,
    PermissionDenied,
    PreconditionFailed,
)
from bucketsync.core.model import CREATE, OVERWRITE, ObjectInfo, PutMode
from bucketsync.stores import Store, listing_pages, one_chunk, read_all

Check = Callable[[Store], Awaitable[None]]

# How far a store's ``modified`` may be from this machine's clock. Emulators run here,
# so this only catches unit bugs (milliseconds, zero, local time instead of UTC ...).
CLOCK_SLACK = 3600.0


# --------------------------------------------------------------------------- helpers


class SlowFolders:
    """A split-point finder that answers once the listing has asked for ``pages`` pages, with the
    first part held past them until it has: ``parallel.cut_parts`` then cuts inside the listing,
    however quick the server. A listing that waits for its split points gets them after 3 s."""

    def __init__(self, discover: Callable[[str], Awaitable[list[str]]], pages: int = 4) -> None:
        self._discover = discover
        self.pages = pages
        self.asked = 0
        self._known = asyncio.Event()

    async def page(self) -> None:
        """Called before each page asked for without a delimiter."""
        self.asked += 1
        if self.asked > self.pages:
            await self._known.wait()

    async def discover(self, prefix: str) -> list[str]:
        for _ in range(300):
            if self.asked >= self.pages:
                break
            await asyncio.sleep(0.01)
        try:
            return await self._discover(prefix)
        finally:
            self._known.set()


async def listing(store: Store, prefix: str = "") -> list[ObjectInfo]:
    """The whole listing as a list."""
    return [info async for info in store.list(prefix)]


async def list_keys(store: Store, prefix: str = "") -> list[str]:
    return [info.key for info in await listing(store, prefix)]


async def chunked(data: bytes, size: int, *, empty_chunks: bool = False) -> AsyncIterator[bytes]:
    """``data`` in chunks of ``size`` bytes; optionally with empty chunks in between."""
    for i in range(0, len(data), size):
        if empty_chunks:
            yield b""
        yield data[i : i + size]
        await asyncio.sleep(0)


async def no_chunks() -> AsyncIterator[bytes]:
    """A stream that yields nothing at all (an empty object)."""
    return
    yield b""  # pragma: no cover - makes this an async generator


async def put_bytes(store: Store, key: str, data: bytes, mode: PutMode = OVERWRITE) -> ObjectInfo:
    return await store.put(key, one_chunk(data), mode)


async def put_many(store: Store, objects: dict[str, bytes], concurrency: int = 8) -> dict[str, ObjectInfo]:
    """Put every object, a few at a time; return what each put reported."""
    sem = asyncio.Semaphore(concurrency)

    async def one(key: str, data: bytes) -> tuple[str, ObjectInfo]:
        async with sem:
            return key, await put_bytes(store, key, data)

    return dict(await asyncio.gather(*(one(k, v) for k, v in objects.items())))


async def aclose(it: AsyncIterator[Any]) -> None:
    """Close an abandoned iterator (async generators have ``aclose``; other iterators may not)."""
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


async def first(it: AsyncIterable[Any]) -> Any:
    """The first item of an async iterable (closing it afterwards)."""
    iterator = aiter(it)
    try:
        return await anext(iterator)
    finally:
        await aclose(iterator)


async def drain(it: AsyncIterable[Any]) -> int:
    n = 0
    async for _ in it:
        n += 1
    return n


def assert_sorted_unique(keys: list[str], what: str) -> None:
    assert keys == sorted(keys), f"{what}: not in ascending code-point order: {keys!r}"
    assert len(keys) == len(set(keys)), f"{what}: duplicate keys: {keys!r}"


def assert_info(info: ObjectInfo, key: str, size: int, what: str) -> None:
    """The fields every store must fill correctly, wherever the info came from."""
    assert isinstance(info, ObjectInfo), f"{what}: expected ObjectInfo, got {type(info).__name__}"
    assert info.key == key, f"{what}: key {info.key!r}, expected {key!r} (relative to the driver prefix)"
    assert info.size == size, f"{what}: size {info.size}, expected {size} for {key!r}"
    assert isinstance(info.etag, str) and info.etag, f"{what}: no etag for {key!r}: {info.etag!r}"
    assert not info.etag.startswith(('"', "W/")) and not info.etag.endswith('"'), (
        f"{what}: etag {info.etag!r} for {key!r} is not normalised (see model.normalize_etag)"
    )
    assert isinstance(info.modified, float), f"{what}: modified {info.modified!r} is not a float"
    assert abs(info.modified - time.time()) < CLOCK_SLACK, (
        f"{what}: modified {info.modified!r} for {key!r} is not POSIX seconds near now ({time.time():.0f})"
    )
    assert info.version is None or (isinstance(info.version, str) and info.version), (
        f"{what}: version {info.version!r} for {key!r} must be None or a non-empty str"
    )


async def assert_missing(store: Store, key: str, what: str) -> None:
    with pytest.raises(NotFound) as exc:
        await store.head(key)
    assert exc.value.key in (None, key), f"{what}: NotFound.key is {exc.value.key!r}, expected {key!r}"


async def assert_content(store: Store, key: str, data: bytes, what: str) -> None:
    got = await read_all(store, key)
    assert got == data, f"{what}: content of {key!r} differs: {len(got)} bytes read, {len(data)} expected"


# ---------------------------------------------------------------------------- checks


async def check_empty_listing(store: Store) -> None:
    """A fresh store lists nothing, whatever the prefix; an absent prefix is not an error."""
    assert await list_keys(store) == [], "a fresh store must list nothing"
    for prefix in ("a", "a/", "no/such/folder/", ".bucketsync/"):
        assert await list_keys(store, prefix) == [], f"list({prefix!r}) on a fresh store must yield nothing"


async def check_round_trip(store: Store) -> None:
    """put -> head -> list -> open -> delete; the etag put returns is the one list and head report."""
    key, data = "dir/object.txt", b"hello, bucketsync\n"
    put = await store.put(key, one_chunk(data), OVERWRITE, content_type="text/plain")
    assert_info(put, key, len(data), "put")

    head = await store.head(key)
    assert_info(head, key, len(data), "head")
    assert head.etag == put.etag, f"head etag {head.etag!r} != put etag {put.etag!r}"

    listed = await listing(store)
    assert [i.key for i in listed] == [key], f"list() after one put: {listed!r}"
    assert_info(listed[0], key, len(data), "list")
    assert listed[0].etag == put.etag, f"list etag {listed[0].etag!r} != put etag {put.etag!r}"
    # S3 lists milliseconds while HEAD's Last-Modified has whole seconds: allow one second.
    assert abs(listed[0].modified - head.modified) <= 1.0, (
        f"list modified {listed[0].modified} and head modified {head.modified} disagree"
    )
    assert [i.key for i in await listing(store, "dir/")] == [key], "list('dir/') must find the object"

    await assert_content(store, key, data, "open")

    await store.delete(key)
    await assert_missing(store, key, "head after delete")
    assert await list_keys(store) == [], "list() after delete must be empty"


async def check_content_bytes(store: Store) -> None:
    """Content survives byte for byte: every byte value, NULs, CR/LF, chunk boundaries, empty chunks."""
    data = bytes(range(256)) * 64 + b"\r\n\n\r\x00\x00\xff" + "é😀\n".encode()
    put = await store.put("bytes.bin", chunked(data, 1000, empty_chunks=True), content_type="application/gzip")
    assert_info(put, "bytes.bin", len(data), "put of a chunked stream with empty chunks")
    await assert_content(store, "bytes.bin", data, "open after a chunked put")

    text = b"line one\nline two\r\n"
    await store.put("text.txt", one_chunk(text), content_type="text/plain; charset=utf-8")
    await assert_content(store, "text.txt", text, "text must not be transcoded or have newlines translated")
    assert (await store.head("text.txt")).size == len(text), "size of a text object"


async def check_ranged_open(store: Store) -> None:
    """``open(key, offset, length)`` reads exactly that byte range, natively (HTTP Range for the API)."""
    data = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes
    await store.put("ranged.bin", chunked(data, 3000))

    async def read(offset: int, length: int | None) -> bytes:
        return b"".join([c async for c in store.open("ranged.bin", offset, length)])

    for offset, length in ((0, None), (0, 1), (1, 1), (10, 5), (255, 258), (5000, None), (10_240, 4), (10_243, 1)):
        got = await read(offset, length)
        want = data[offset : None if length is None else offset + length]
        assert got == want, f"open(offset={offset}, length={length}) gave {len(got)} bytes, wanted {len(want)}"
    assert await read(10_000, 1_000_000) == data[10_000:], "a range past the end stops at the end"
    assert await read(0, len(data)) == data, "a range of the whole object"
    with pytest.raises(NotFound):
        await drain(store.open("no-such-object", 5, 10))


async def check_empty_object(store: Store) -> None:
    """Zero-byte objects: from one empty chunk and from a stream with no chunks at all."""
    for key, chunks in (("empty-one-chunk", one_chunk(b"")), ("empty-no-chunks", no_chunks())):
        put = await store.put(key, chunks)
        assert_info(put, key, 0, f"put of empty object {key!r}")
        assert_info(await store.head(key), key, 0, f"head of empty object {key!r}")
        assert await read_all(store, key) == b"", f"empty object {key!r} must read back as b''"
        chunks_read = [c async for c in store.open(key)]
        assert all(c == b"" for c in chunks_read), f"open({key!r}) of an empty object yielded {chunks_read!r}"
    listed = await listing(store)
    assert [(i.key, i.size) for i in listed] == [("empty-no-chunks", 0), ("empty-one-chunk", 0)], (
        f"empty objects must be listed with size 0: {listed!r}"
    )


async def check_large_object_streaming(store: Store) -> None:
    """A 3 MiB object streams back in several chunks, byte-identical; an abandoned read is harmless."""
    data = random.Random(20240601).randbytes(3 * 1024 * 1024 + 123)
    key = "large/blob.bin"
    put = await store.put(key, chunked(data, 256 * 1024 + 17))
    assert_info(put, key, len(data), "put of 3 MiB")
    assert_info(await store.head(key), key, len(data), "head of 3 MiB")

    chunks = [c async for c in store.open(key)]
    got = b"".join(chunks)
    assert len(got) == len(data) and got == data, f"3 MiB object differs after round trip ({len(got)} bytes read)"
    assert len(chunks) > 1, "open() must stream a 3 MiB object in several chunks, not buffer it whole"

    # Read one chunk and walk away: no error, no lock left behind.
    head_chunk = await first(store.open(key))
    assert head_chunk and data.startswith(head_chunk), "the first chunk must be the start of the object"
    await store.delete(key)
    await assert_missing(store, key, "head after deleting a partly read object")


# Keys that break naive URL encoding, XML handling, sorting or path handling.
NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")
AWKWARD_KEYS = [
    "a-c",
    "a/b",
    "a0",
    "A",
    "B",
    "b",
    "é",
    "with space",
    "a b",
    "a+b",  # decoding + as a space would collide with "a b"
    "100%",
    "%41",  # double decoding would collide with "A"
    "x%2Fy",  # double decoding would turn this into a folder
    "a#b",
    "q?x=1&y=2",
    "semi;colon:comma,",
    "tilde~(paren)[bracket]{brace}",
    "quote'dquote\"",
    "lt<gt>amp&",
    "日本語/ファイル.txt",
    "emoji😀",
    f"nf/{NFC}",
    f"nf/{NFD}",
]


async def check_list_sorted_awkward_keys(store: Store) -> None:
    """Awkward keys are listed exactly, in ascending code-point order, and each reads back its own bytes."""
    objects = {key: f"content of {key}".encode() for key in AWKWARD_KEYS}
    puts = await put_many(store, objects)
    for key, info in puts.items():
        assert_info(info, key, len(objects[key]), f"put {key!r}")

    listed = await listing(store)
    keys = [i.key for i in listed]
    assert_sorted_unique(keys, "list() of awkward keys")
    assert keys == sorted(objects), f"list() of awkward keys: got {keys!r}, expected {sorted(objects)!r}"
    for info in listed:
        assert_info(info, info.key, len(objects[info.key]), "list of awkward keys")
        assert info.etag == puts[info.key].etag, f"{info.key!r}: list etag {info.etag!r} != put etag"

    for key, data in objects.items():
        head = await store.head(key)
        assert_info(head, key, len(data), f"head {key!r}")
        assert head.etag == puts[key].etag, f"{key!r}: head etag {head.etag!r} != put etag {puts[key].etag!r}"
        await assert_content(store, key, data, "awkward key")


async def check_unicode_forms_distinct(store: Store) -> None:
    """NFC and NFD spellings of one word are two keys: never normalised, never merged."""
    assert NFC != NFD
    await put_bytes(store, NFC, b"nfc")
    await put_bytes(store, NFD, b"nfd")
    assert await list_keys(store) == sorted([NFC, NFD]), "NFC and NFD keys must both be listed, unchanged"
    assert await read_all(store, NFC) == b"nfc", "the NFC key must read its own content"
    assert await read_all(store, NFD) == b"nfd", "the NFD key must read its own content"
    assert await list_keys(store, NFD[:4]) == [NFD], "list(prefix) with a decomposed prefix must not match NFC"
    await store.delete(NFC)
    assert await list_keys(store) == [NFD], "deleting the NFC key must leave the NFD key"


async def check_list_code_point_order(store: Store) -> None:
    """Code-point order, not UTF-16 order: U+FF5E sorts before U+1F600 (UTF-16 would say the opposite)."""
    keys = ["xz", "x\u00e9", "x\u4e00", "x\uff21", "x\uff5e", "x\U0001f600", "x\U0001f600-z", "x\U00020000"]
    await put_many(store, {k: k.encode() for k in keys})
    got = await list_keys(store)
    assert got == sorted(keys), f"list() must be in code-point order (UTF-8 byte order): got {got!r}"
    got = await list_keys(store, "x\U0001f600")
    assert got == ["x\U0001f600", "x\U0001f600-z"], f"list(prefix with an astral character): {got!r}"


def _long_key() -> str:
    # Local file systems cap one path segment at 255 bytes: build 1,000 bytes from segments <= 200.
    segments = ["long-" + "x" * 195, "é" * 100, "日" * 66 + "ab", "y" * 200, "z" * 196]
    key = "/".join(segments)
    assert len(key.encode()) == 1000 and all(len(s.encode()) <= 200 for s in segments)
    return key


LONG_KEY = _long_key()


async def check_long_key(store: Store) -> None:
    """A 1,000-byte key of several segments round-trips through put, head, list, open and delete."""
    data = b"long key"
    put = await put_bytes(store, LONG_KEY, data)
    assert_info(put, LONG_KEY, len(data), "put of a 1,000-byte key")
    assert_info(await store.head(LONG_KEY), LONG_KEY, len(data), "head of a 1,000-byte key")
    assert await list_keys(store) == [LONG_KEY], "list() must return the 1,000-byte key whole"
    first_segment = LONG_KEY.split("/", 1)[0] + "/"
    assert await list_keys(store, first_segment) == [LONG_KEY], "list(first segment) must find the long key"
    assert await list_keys(store, LONG_KEY) == [LONG_KEY], "list(the whole key) must find it"
    await assert_content(store, LONG_KEY, data, "long key")
    await store.delete(LONG_KEY)
    await assert_missing(store, LONG_KEY, "head of a deleted long key")
    assert await list_keys(store) == [], "list() after deleting the long key"


async def check_pagination(store: Store) -> None:
    """35 objects over several small pages: complete, sorted, no duplicates, prefixes across pages."""
    objects = {f"page/{i:03d}": f"object {i}".encode() for i in range(30)}
    objects.update({k: k.encode() for k in ("pag", "page-0", "page0", "pagez/x", "z")})
    puts = await put_many(store, objects)

    listed = await listing(store)
    keys = [i.key for i in listed]
    assert_sorted_unique(keys, "paginated list()")
    assert keys == sorted(objects), f"paginated list(): {len(keys)} keys, expected {len(objects)}: {keys!r}"
    for info in listed:
        assert info.etag == puts[info.key].etag and info.size == len(objects[info.key]), f"listed {info!r}"

    cases = {
        "page/": 30,  # several pages
        "page": 33,  # not on a '/' boundary
        "page/01": 10,  # exactly one page's worth
        "page/029": 1,
        "page/03": 0,
        "pa": 34,
    }
    for prefix, count in cases.items():
        got = await list_keys(store, prefix)
        expected = sorted(k for k in objects if k.startswith(prefix))
        assert len(expected) == count
        assert got == expected, f"list({prefix!r}): got {len(got)} keys {got!r}, expected {expected!r}"

    # Walking away from a listing after a few items is harmless, and the next listing is whole.
    it = aiter(store.list())
    try:
        few = [(await anext(it)).key for _ in range(3)]
    finally:
        await aclose(it)
    assert few == sorted(objects)[:3], f"the first three listed keys: {few!r}"
    assert await list_keys(store) == sorted(objects), "a listing after an abandoned one must be whole"


PREFIX_KEYS = ["a-c", "a/b", "a/c/d", "a0", "ab", "b", "ba/x", "e", "é/x"]
PREFIXES = ["", "a", "a/", "a/b", "a/b/", "a/c", "a/c/", "a/c/d", "a-", "b", "b/", "ba", "e", "é", "z", "none/here/"]


async def check_list_prefix(store: Store) -> None:
    """``list(prefix)`` matches by plain string prefix, on and off '/' boundaries."""
    await put_many(store, {k: k.encode() for k in PREFIX_KEYS})
    for prefix in PREFIXES:
        got = await list_keys(store, prefix)
        expected = sorted(k for k in PREFIX_KEYS if k.startswith(prefix))
        assert got == expected, f"list({prefix!r}): got {got!r}, expected {expected!r}"
        # what a sync diffs: the same listing, in pages (the store's own, or cut for it)
        paged = [o.key async for page in listing_pages(store, prefix) for o in page if isinstance(o, ObjectInfo)]
        assert paged == expected, f"listing_pages({prefix!r}): got {paged!r}, expected {expected!r}"
    assert await list_keys(store, "a") == ["a-c", "a/b", "a/c/d", "a0", "ab"], "list('a') (the brief's example)"


async def check_hidden_folder_not_listed(store: Store) -> None:
    """Keys in ``.bucketsync/`` are readable but never listed, even when they fill whole pages."""
    hidden = {f".bucketsync/thumbs/{i:02d}.jpg": b"thumb" for i in range(12)}
    hidden[".bucketsync/permission-test"] = b"probe"
    visible = {
        "-dash": b"sorts before '.'",
        ".bucketsync-not-hidden": b"only .bucketsync/ is hidden",
        ".bucketsync2/x": b"not the hidden folder",
        "sub/.bucketsync/x": b"the hidden folder is only at the driver root",
        "visible": b"v",
    }
    await put_many(store, {**hidden, **visible})

    assert await list_keys(store) == sorted(visible), f"list() must skip {len(hidden)} hidden keys"
    assert await list_keys(store, ".bucketsync/") == [], "list('.bucketsync/') must yield nothing"
    assert await list_keys(store, ".b") == [".bucketsync-not-hidden", ".bucketsync2/x"], "list('.b')"
    assert await list_keys(store, ".bucketsync") == [".bucketsync-not-hidden", ".bucketsync2/x"], "list('.bucketsync')"

    key = ".bucketsync/permission-test"
    assert_info(await store.head(key), key, 5, "head of a hidden key")
    await assert_content(store, key, b"probe", "hidden key")
    await store.delete(key)
    await assert_missing(store, key, "head of a deleted hidden key")


async def check_folder_marker(store: Store) -> None:
    """A key ending in '/' is a folder marker, not an item: ``put`` rejects it, or ``list`` never shows it."""
    await put_bytes(store, "dir/file", b"f")
    for marker in ("marker/", "dir/"):
        with contextlib.suppress(BucketsyncError, ValueError):  # rejected: fine (InvalidKey, StorageError ...)
            await put_bytes(store, marker, b"")
    assert await list_keys(store) == ["dir/file"], "folder markers must never be listed"
    assert await list_keys(store, "marker") == [], "list('marker') must not show a folder marker"
    assert await list_keys(store, "dir/") == ["dir/file"], "list('dir/') must show only the file"


async def check_not_found(store: Store) -> None:
    """head and open (on first iteration) raise NotFound for a missing key, and for a key that is only a folder."""
    await put_bytes(store, "folder/inner", b"x")
    for key in ("missing", "folder", "folder/inner/deeper", "folder/innerx"):
        await assert_missing(store, key, f"head({key!r})")
        it = aiter(store.open(key))  # must not raise yet: NotFound comes on the first iteration
        with pytest.raises(NotFound):
            await anext(it)
        await aclose(it)


async def check_delete_idempotent(store: Store) -> None:
    """Deleting a missing key, or a key twice, is fine; deleting a folder-only key changes nothing."""
    await store.delete("never-existed")
    await store.delete("no/such/folder/key")

    await put_bytes(store, "twice", b"x")
    await store.delete("twice")
    await store.delete("twice")
    await assert_missing(store, "twice", "head after deleting twice")

    await put_bytes(store, "p/q/r", b"deep")
    await store.delete("p")  # a prefix of a key, not a key: nothing to delete
    await store.delete("p/q")
    assert await list_keys(store) == ["p/q/r"], "deleting a folder-only key must not touch the keys under it"

    # After the last key under p/q/ is gone, p/q can be a plain object (buckets have no real folders).
    await store.delete("p/q/r")
    assert await list_keys(store) == [], "list() after deleting everything"
    await put_bytes(store, "p/q", b"now a file")
    assert await list_keys(store) == ["p/q"], "a key where a folder used to be"
    await assert_content(store, "p/q", b"now a file", "key where a folder used to be")


async def check_overwrite_new_etag(store: Store) -> None:
    """Each overwrite (same size or not) gets a new etag; head, list and content follow the last write."""
    key = "over"
    versions = [b"version-1", b"version-2", b"v3"]  # 1 and 2: same size, different bytes
    etags: list[str | None] = []
    for data in versions:
        put = await put_bytes(store, key, data, OVERWRITE)
        assert_info(put, key, len(data), "overwrite")
        etags.append(put.etag)
        head = await store.head(key)
        assert head.etag == put.etag and head.size == len(data), f"head after overwrite: {head!r} vs put {put!r}"
        listed = await listing(store)
        assert [(i.key, i.etag, i.size) for i in listed] == [(key, put.etag, len(data))], f"list: {listed!r}"
        await assert_content(store, key, data, "overwrite")
    assert len(set(etags)) == len(etags), f"every overwrite must change the etag: {etags!r}"


async def check_create_only(store: Store) -> None:
    """CREATE succeeds on a new key and raises AlreadyExists, changing nothing, on an existing one."""
    put = await put_bytes(store, "made", b"first", CREATE)
    assert_info(put, "made", 5, "create-only put of a new key")
    with pytest.raises(AlreadyExists):
        await put_bytes(store, "made", b"second", CREATE)
    head = await store.head("made")
    assert head.etag == put.etag, f"a refused create-only put changed the etag: {head.etag!r} != {put.etag!r}"
    await assert_content(store, "made", b"first", "after a refused create-only put")

    # Once deleted, the key can be created again.
    await store.delete("made")
    again = await put_bytes(store, "made", b"third", CREATE)
    assert_info(again, "made", 5, "create-only put after delete")
    await assert_content(store, "made", b"third", "create-only put after delete")


async def check_create_only_race(store: Store) -> None:
    """Of several concurrent create-only puts of one key, exactly one wins; the others get AlreadyExists."""
    n = 5
    results = await asyncio.gather(
        *(put_bytes(store, "race", f"writer {i}".encode(), CREATE) for i in range(n)), return_exceptions=True
    )
    wins = [(i, r) for i, r in enumerate(results) if isinstance(r, ObjectInfo)]
    losses = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(wins) == 1 and len(losses) == n - 1, (
        f"create-only race: expected 1 win, {n - 1} AlreadyExists: {results!r}"
    )
    winner, info = wins[0]
    await assert_content(store, "race", f"writer {winner}".encode(), "winner of the create-only race")
    assert (await store.head("race")).etag == info.etag, "the race winner's etag must be the stored one"


async def check_put_if_match(store: Store) -> None:
    """PutMode.matching(etag) writes only over that exact etag; a stale etag never overwrites silently."""
    key = "cond"
    e1 = (await put_bytes(store, key, b"one")).etag
    assert e1 is not None
    try:
        put2 = await put_bytes(store, key, b"two", PutMode.matching(e1))
    except NotSupported:
        assert not store.conditional_writes, "NotSupported from a store that says conditional_writes=True"
        await assert_content(store, key, b"one", "after an unsupported if-match put")
        return
    assert_info(put2, key, 3, "if-match put with the current etag")
    assert put2.etag != e1, "an if-match put must produce a new etag"
    assert (await store.head(key)).etag == put2.etag, "head etag after an if-match put"

    allowed: tuple[type[BaseException], ...] = (PreconditionFailed,)
    if not store.conditional_writes:
        allowed = (PreconditionFailed, NotSupported)
    with pytest.raises(allowed):
        await put_bytes(store, key, b"three", PutMode.matching(e1))  # e1 is stale now
    await assert_content(store, key, b"two", "after an if-match put with a stale etag")
    assert (await store.head(key)).etag == put2.etag, "a refused if-match put must not change the etag"

    # If-match on a missing key must not create it (the object changed: it was deleted).
    with pytest.raises((*allowed, NotFound)):
        await put_bytes(store, "cond-missing", b"x", PutMode.matching(e1))
    await assert_missing(store, "cond-missing", "an if-match put of a missing key must not create it")

    if store.conditional_writes:
        # Two writers holding the same etag: exactly one may win.
        current = put2.etag
        assert current is not None
        results = await asyncio.gather(
            *(put_bytes(store, key, f"racer {i}".encode(), PutMode.matching(current)) for i in range(3)),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, ObjectInfo)]
        losses = [r for r in results if isinstance(r, PreconditionFailed)]
        assert len(wins) == 1 and len(losses) == 2, f"if-match race: expected 1 win, 2 PreconditionFailed: {results!r}"


async def check_delete_if_match(store: Store) -> None:
    """delete(if_match=stale) raises PreconditionFailed and keeps the object; the current etag deletes it."""
    key = "del-cond"
    e1 = (await put_bytes(store, key, b"one")).etag
    e2 = (await put_bytes(store, key, b"two")).etag
    assert e1 is not None and e2 is not None and e1 != e2
    if store.conditional_writes:
        with pytest.raises(PreconditionFailed):
            await store.delete(key, if_match=e1)
        assert (await store.head(key)).etag == e2, "a refused conditional delete must keep the object"
        await store.delete(key, if_match=e2)
        await assert_missing(store, key, "head after a conditional delete with the current etag")
        return
    # Without native conditional writes a store may refuse, report NotSupported, or delete anyway.
    try:
        await store.delete(key, if_match=e1)
    except (PreconditionFailed, NotSupported):
        assert (await store.head(key)).etag == e2, "a refused conditional delete must keep the object"
    try:
        await store.delete(key, if_match=e2)
    except NotSupported:
        await store.delete(key)
    await assert_missing(store, key, "head after deleting with the current etag")


CHECKS: list[Check] = [
    check_empty_listing,
    check_round_trip,
    check_content_bytes,
    check_ranged_open,
    check_empty_object,
    check_large_object_streaming,
    check_list_sorted_awkward_keys,
    check_unicode_forms_distinct,
    check_list_code_point_order,
    check_long_key,
    check_pagination,
    check_list_prefix,
    check_hidden_folder_not_listed,
    check_folder_marker,
    check_not_found,
    check_delete_idempotent,
    check_overwrite_new_etag,
    check_create_only,
    check_create_only_race,
    check_put_if_match,
    check_delete_if_match,
]


# ------------------------------------------------------------- store-specific checks


async def check_permission_denied(readonly: Store) -> None:
    """A store on a location the credentials may read and list but not write.

    The location need not be empty. ``put`` (any mode, hidden folder included) must
    raise ``PermissionDenied`` and leave nothing behind. ``delete`` of a missing key
    may raise ``PermissionDenied`` or succeed quietly (a store may find nothing to
    delete before it asks), but never anything else.
    """
    n = 0
    it = aiter(readonly.list())
    try:
        async for _ in it:  # listing is allowed
            n += 1
            if n >= 25:
                break
    finally:
        await aclose(it)

    key = f"bucketsync-conformance-denied-{uuid.uuid4().hex}"
    for target, mode in ((key, OVERWRITE), (key, CREATE), (f".bucketsync/{key}", OVERWRITE)):
        with pytest.raises(PermissionDenied):
            await put_bytes(readonly, target, b"must not be written", mode)
    await assert_missing(readonly, key, "head after a denied put")
    with contextlib.suppress(PermissionDenied):
        await readonly.delete(key)


async def check_missing_root(store_on_missing_root: Store) -> None:
    """A store whose root (bucket, container, folder) does not exist.

    ``list`` raises ``NotFound`` on the first iteration (an absent root is never an
    empty listing), with or without a prefix; ``head`` and ``open`` raise ``NotFound``;
    ``put`` raises ``NotFound`` and does not create the root.
    """
    store = store_on_missing_root
    for prefix in ("", "some/prefix/", "s"):
        with pytest.raises(NotFound):
            await drain(store.list(prefix))
    with pytest.raises(NotFound):
        await store.head("key")
    with pytest.raises(NotFound):
        await drain(store.open("key"))
    with pytest.raises(NotFound):
        await put_bytes(store, "key", b"must not create the root")
    with pytest.raises(NotFound):
        await drain(store.list())  # still missing: put did not create it


class Delegating:
    """Delegates the Store protocol to another store; tests subclass it to break one promise."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.conditional_writes = inner.conditional_writes

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix)

    async def head(self, key: str) -> ObjectInfo:
        return await self.inner.head(key)

    def open(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        return self.inner.open(key, offset, length)

    async def put(
        self, key: str, chunks: AsyncIterable[bytes], mode: PutMode = OVERWRITE, content_type: str | None = None
    ) -> ObjectInfo:
        return await self.inner.put(key, chunks, mode, content_type)

    async def delete(self, key: str, if_match: str | None = None) -> None:
        await self.inner.delete(key, if_match)

    async def aclose(self) -> None:
        await self.inner.aclose()
