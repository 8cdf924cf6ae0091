"""The conformance suite on the in-memory and local-folder stores, plus what only they can show.

Permissions: the tests run as root, and root ignores file modes, so a chmod-based
"read-only folder" cannot make the local store fail; there is no test of
``check_permission_denied`` against a real local folder (it could not fail). The check
itself is exercised below against a read-only wrapper, and against a writable store
to prove it can fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import stat
import unicodedata
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bucketsync.core.errors import NotFound, PermissionDenied, StorageError
from bucketsync.core.model import CREATE, OVERWRITE, ObjectInfo, PutMode
from bucketsync.stores import Store, one_chunk, read_all
from bucketsync.stores.contenthash import HashMemo
from bucketsync.stores.local import LocalStore, Verify
from bucketsync.stores.memory import MemoryStore
from conformance import (
    CHECKS,
    Check,
    check_create_only,
    check_delete_if_match,
    check_hidden_folder_not_listed,
    check_large_object_streaming,
    check_list_code_point_order,
    check_list_prefix,
    check_list_sorted_awkward_keys,
    check_missing_root,
    check_not_found,
    check_pagination,
    check_permission_denied,
    check_put_if_match,
    check_round_trip,
    check_unicode_forms_distinct,
    list_keys,
    listing,
)
from conformance import Delegating as _Wrapper

# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def memory_name() -> Iterator[str]:
    name = f"conformance-{uuid.uuid4().hex}"
    yield name
    MemoryStore.drop(name)


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture(params=["memory", "memory-prefixed", "local", "local-hash"])
def store(request: pytest.FixtureRequest, memory_name: str, local_root: Path, tmp_path: Path) -> Store:
    """A fresh, empty store of each kind."""
    if request.param == "memory":
        return MemoryStore(memory_name)
    if request.param == "memory-prefixed":
        # Same bucket, other prefixes: the store must see none of these neighbours.
        MemoryStore(memory_name).load(
            (key, b"neighbour", 1.0) for key in ("pre", "pre-x", "pre0", "prf/x", "a", "z", "pre.bucketsync/x")
        )
        MemoryStore(memory_name, "pre0/").load([("x", b"neighbour", 1.0)])
        return MemoryStore(memory_name, "pre/")
    if request.param == "local-hash":  # content-hash etags (verify = "hash"), with the memo
        return LocalStore(str(local_root), "hash", HashMemo(tmp_path / "memo.sqlite"))
    return LocalStore(str(local_root))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_conformance(check: Check, store: Store) -> None:
    await check(store)


# ------------------------------------------------------------ local-store specifics


async def test_local_missing_root(tmp_path: Path) -> None:
    await check_missing_root(LocalStore(str(tmp_path / "absent")))
    assert not (tmp_path / "absent").exists(), "no operation may create a missing root"


async def test_local_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"not a folder")
    with pytest.raises(NotFound):
        await listing(LocalStore(str(tmp_path / "file")))


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
async def test_local_root_removed_mid_listing(local_root: Path, nested: bool) -> None:
    """A root that vanishes during a listing is NotFound, never an empty or partial success."""
    store = LocalStore(str(local_root))
    keys = [f"{d}/{i}" for d in "abc" for i in range(3)] if nested else [f"f{i}" for i in range(5)]
    for key in keys:
        await store.put(key, one_chunk(b"x"))
    seen = []
    with pytest.raises(NotFound):
        async for info in store.list():
            seen.append(info.key)
            if len(seen) == 1:
                await asyncio.to_thread(shutil.rmtree, local_root)
    assert seen[0] == keys[0]


def _write_raw_names(root: bytes, names: list[bytes]) -> None:
    """Create files whose names are raw bytes (not UTF-8), with their folders."""
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"a name that is not UTF-8")


@pytest.mark.parametrize("verify", ["stat", "hash"])
async def test_local_non_utf8_names_skipped(local_root: Path, tmp_path: Path, verify: Verify) -> None:
    store = LocalStore(str(local_root), verify, HashMemo(tmp_path / "memo.sqlite"))
    await store.put("good", one_chunk(b"g"))
    await store.put("zz/ok", one_chunk(b"o"))
    _write_raw_names(os.fsencode(local_root), [b"bad\xff", b"dir\xfe/inner", b"zz/bad\xc3("])

    with capture_logs() as logs:
        keys = await list_keys(store)
    assert keys == ["good", "zz/ok"]
    skipped = [e for e in logs if "not UTF-8" in e["event"]]
    assert len(skipped) == 3, f"each skipped file is logged: {logs!r}"


async def test_local_symlinked_folders_not_followed(tmp_path: Path, local_root: Path) -> None:
    store = LocalStore(str(local_root))
    await store.put("real/f", one_chunk(b"f"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"outside the root")
    (local_root / "link-in").symlink_to(local_root / "real", target_is_directory=True)
    (local_root / "link-out").symlink_to(outside, target_is_directory=True)
    (local_root / "real" / "loop").symlink_to(local_root, target_is_directory=True)
    (local_root / "dangling").symlink_to(tmp_path / "nowhere")

    assert await list_keys(store) == ["real/f"]
    assert await list_keys(store, "link") == []


async def test_local_etag_survives_rename_and_changes_on_rewrite(local_root: Path) -> None:
    store = LocalStore(str(local_root))
    put = await store.put("a", one_chunk(b"payload"))

    os.rename(local_root / "a", local_root / "b")
    (local_root / "sub").mkdir()
    os.rename(local_root / "b", local_root / "sub" / "c")
    [moved] = await listing(store)
    assert (moved.key, moved.size, moved.etag) == ("sub/c", 7, put.etag), "a rename keeps the etag"
    assert (await store.head("sub/c")).etag == put.etag

    rewritten = await store.put("sub/c", one_chunk(b"payload"))  # same bytes, new file
    assert rewritten.etag != put.etag, "a rewrite through the store changes the etag"

    # A rewrite in place by another program: new size, or same size with a new mtime.
    # (Same size within one kernel clock tick keeps the etag: a known limit of stat-based etags.)
    path = local_root / "sub" / "c"
    path.write_bytes(b"longer payload")
    grown = await store.head("sub/c")
    assert grown.etag not in (put.etag, rewritten.etag)
    st = path.stat()
    path.write_bytes(b"other payload!")  # same size as before
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    same_size = await store.head("sub/c")
    assert same_size.size == grown.size and same_size.etag != grown.etag
    assert [i.etag for i in await listing(store)] == [same_size.etag]


async def test_local_delete_leaves_foreign_folders(local_root: Path) -> None:
    """Deleting a key tidies the empty folders it leaves, but never the root."""
    store = LocalStore(str(local_root))
    await store.put("x/y/z", one_chunk(b"z"))
    await store.delete("x/y/z")
    assert os.listdir(local_root) == [".bucketsync"], "x/ and x/y/ are gone; the root and its hidden folder stay"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
@pytest.mark.parametrize("create", [False, True], ids=["overwrite", "create-only"])
async def test_local_written_files_get_the_usual_mode(local_root: Path, umask: int, mode: int, create: bool) -> None:
    """A file bucketsync writes gets 0666 less the umask, like any program's (not mkstemp's 0600)."""
    store = LocalStore(str(local_root))
    old = os.umask(umask)
    try:
        await store.put("new/file.jpg", one_chunk(b"jpg"), CREATE if create else OVERWRITE)
        await store.put("new/file.jpg", one_chunk(b"jpg, again"))  # an overwrite of an existing file too
    finally:
        os.umask(old)
    assert stat.S_IMODE((local_root / "new" / "file.jpg").stat().st_mode) == mode
    assert stat.S_IMODE((local_root / "new").stat().st_mode) == 0o777 & ~umask


# ----------------------------------------------------------- memory-store specifics


async def test_memory_prefixes_share_a_bucket(memory_name: str) -> None:
    """``mem://n/`` and ``mem://n/p/`` are one bucket; keys are always relative to the store's own prefix."""
    whole, sub = MemoryStore(memory_name), MemoryStore(memory_name, "p/")
    await whole.put("p/x", one_chunk(b"written through the root"))
    await sub.put("y", one_chunk(b"written through p/"))
    assert [i.key for i in await listing(sub)] == ["x", "y"]
    assert (await sub.head("x")).key == "x"
    assert [i.key for i in await listing(whole)] == ["p/x", "p/y"]
    assert (await whole.head("p/y")).key == "p/y"


async def test_memory_prefix_upper_bound(memory_name: str) -> None:
    """A key continuing the prefix with U+10FFFF (the largest code point) is still under it."""
    store = MemoryStore(memory_name)
    keys = ["a", "a\U0010ffff", "a\U0010ffffz", "b"]
    for key in keys:
        await store.put(key, one_chunk(b""))
    assert await list_keys(store, "a") == keys[:3]
    assert await list_keys(store, "a\U0010ffff") == keys[1:3]


# ------------------------------------------------- the suite must be able to fail
#
# Each wrapper breaks one promise of the Store protocol; the named checks must catch it.


class _Reversed(_Wrapper):
    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        for info in reversed([i async for i in self.inner.list(prefix)]):
            yield info


class _Utf16Order(_Wrapper):
    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        infos = [i async for i in self.inner.list(prefix)]
        for info in sorted(infos, key=lambda i: i.key.encode("utf-16-be")):
            yield info


class _LastPageLost(_Wrapper):
    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        infos = [i async for i in self.inner.list(prefix)]
        for info in infos[: max(10, len(infos) - len(infos) % 10)]:
            yield info


class _HiddenLeaks(_Wrapper):
    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix):
            yield info
        if ".bucketsync/".startswith(prefix) or prefix.startswith(".bucketsync/"):
            yield ObjectInfo(".bucketsync/thumbs/00.jpg", 5, 1.0, "1")


class _StalePutEtag(_Wrapper):
    async def put(
        self, key: str, chunks: AsyncIterable[bytes], mode: PutMode = OVERWRITE, content_type: str | None = None
    ) -> ObjectInfo:
        info = await self.inner.put(key, chunks, mode, content_type)
        return dataclasses.replace(info, etag=f"{info.etag}-from-put")


class _PlusIsSpace(_Wrapper):
    async def put(
        self, key: str, chunks: AsyncIterable[bytes], mode: PutMode = OVERWRITE, content_type: str | None = None
    ) -> ObjectInfo:
        return await self.inner.put(key.replace("+", " "), chunks, mode, content_type)


class _NormalisesKeys(_Wrapper):
    async def put(
        self, key: str, chunks: AsyncIterable[bytes], mode: PutMode = OVERWRITE, content_type: str | None = None
    ) -> ObjectInfo:
        return await self.inner.put(unicodedata.normalize("NFC", key), chunks, mode, content_type)


class _IgnoresModes(_Wrapper):
    async def put(
        self, key: str, chunks: AsyncIterable[bytes], mode: PutMode = OVERWRITE, content_type: str | None = None
    ) -> ObjectInfo:
        return await self.inner.put(key, chunks, OVERWRITE, content_type)

    async def delete(self, key: str, if_match: str | None = None) -> None:
        await self.inner.delete(key)


class _OneChunk(_Wrapper):
    async def open(self, key: str) -> AsyncIterator[bytes]:
        yield b"".join([c async for c in self.inner.open(key)])


class _EagerNotFound(_Wrapper):
    def open(self, key: str) -> AsyncIterator[bytes]:
        if key not in self.inner._b.objects:
            raise NotFound(key, key=key)
        return self.inner.open(key)


BROKEN: list[tuple[type[_Wrapper], Check]] = [
    (_Reversed, check_list_sorted_awkward_keys),
    (_Reversed, check_list_prefix),
    (_Utf16Order, check_list_code_point_order),
    (_LastPageLost, check_pagination),
    (_HiddenLeaks, check_hidden_folder_not_listed),
    (_StalePutEtag, check_round_trip),
    (_PlusIsSpace, check_list_sorted_awkward_keys),
    (_NormalisesKeys, check_unicode_forms_distinct),
    (_IgnoresModes, check_create_only),
    (_IgnoresModes, check_put_if_match),
    (_IgnoresModes, check_delete_if_match),
    (_OneChunk, check_large_object_streaming),
    (_EagerNotFound, check_not_found),
]


@pytest.mark.parametrize(("wrapper", "check"), BROKEN, ids=lambda v: getattr(v, "__name__", "").lstrip("_"))
async def test_suite_catches_broken_store(wrapper: type[_Wrapper], check: Check, memory_name: str) -> None:
    store = wrapper(MemoryStore(memory_name))
    await check(_Wrapper(MemoryStore(f"{memory_name}-control")))  # the same check passes unbroken
    MemoryStore.drop(f"{memory_name}-control")
    with pytest.raises((AssertionError, pytest.fail.Exception, StorageError)):  # not TypeError & co
        await check(store)


class _ReadOnly(_Wrapper):
    async def put(
        self, key: str, chunks: AsyncIterable[bytes], mode: PutMode = OVERWRITE, content_type: str | None = None
    ) -> ObjectInfo:
        raise PermissionDenied(f"cannot write {key}", key=key)

    async def delete(self, key: str, if_match: str | None = None) -> None:
        raise PermissionDenied(f"cannot delete {key}", key=key)


async def test_check_permission_denied(memory_name: str) -> None:
    inner = MemoryStore(memory_name)
    await inner.put("existing", one_chunk(b"readable"))
    readonly = _ReadOnly(inner)
    await check_permission_denied(readonly)
    assert await read_all(readonly, "existing") == b"readable"
    with pytest.raises(pytest.fail.Exception):
        await check_permission_denied(inner)  # a writable store fails the check
