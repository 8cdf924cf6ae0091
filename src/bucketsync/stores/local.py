"""Local folder store (``file:///abs/path``).

Listing walks the tree in code-point order of the *key*: a directory ``a`` sorts
as ``a/``, so ``a-c`` < ``a/b`` < ``a0`` as in a bucket. Directory reads and stats
run in a worker thread, one directory per hop. The etag is derived from
(size, mtime_ns, inode): a rename keeps it, any rewrite changes it.

Writes go to a temp file in the hidden folder and are renamed into place, so a
reader never sees half a file; create-only uses ``link`` (atomic, fails if the
key exists). If-match compares the etag under a per-store lock: atomic against
bucketsync's own writers, best effort against other processes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import tempfile
from collections.abc import AsyncIterable, AsyncIterator

import structlog

from bucketsync.errors import (
    AlreadyExists,
    FileFolderConflict,
    KeyNotStorable,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from bucketsync.keys import HIDDEN, indexable
from bucketsync.location import Location
from bucketsync.model import OVERWRITE, ObjectInfo, PutMode

log = structlog.get_logger(__name__)
CHUNK = 1 << 20

# (sort name, entry name, is_dir, size, mtime_ns, inode)
_Entry = tuple[str, str, bool, int, int, int]


def _etag(st: os.stat_result) -> str:
    return f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key, st.st_size, st.st_mtime_ns / 1e9, _etag(st))


def _scan(path: str) -> list[_Entry]:
    out: list[_Entry] = []
    with os.scandir(path) as it:
        for e in it:
            try:
                st = e.stat()  # follows symlinks to files
            except FileNotFoundError:
                continue  # removed (or a dangling link) since readdir
            if stat.S_ISDIR(st.st_mode):
                if e.is_symlink():
                    continue  # never follow links to folders: loops, escapes
                out.append((e.name + "/", e.name, True, 0, 0, 0))
            elif stat.S_ISREG(st.st_mode):
                out.append((e.name, e.name, False, st.st_size, st.st_mtime_ns, st.st_ino))
    out.sort()
    return out


def _limit(root: str, name: str, default: int) -> int:
    try:
        return os.pathconf(root, name)
    except (OSError, ValueError):
        return default


def _os_error(exc: OSError, key: str, root: str) -> StorageError:
    """A write's OSError as the permanent or transient error it is (only Transient is retried)."""
    what = f"cannot write {key} in {root}: {exc.strerror}"
    if exc.errno == errno.ENAMETOOLONG:
        return KeyNotStorable(f"{what} (a name is longer than this filesystem allows)", key=key)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Transient(f"{what} (will retry when there is space)", key=key)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(what, key=key)
    return StorageError(what, key=key)


class LocalStore:
    conditional_writes = True

    def __init__(self, root: str) -> None:
        self.root = root
        self.url = f"file://{root}"
        self._lock = asyncio.Lock()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def check_key(self, key: str) -> None:
        """Refuse keys the filesystem cannot hold, before anything is staged: a segment over
        NAME_MAX bytes (255 on most), or a path over PATH_MAX (``File name too long``)."""
        name_max = _limit(self.root, "PC_NAME_MAX", 255)
        for part in key.split("/"):
            if len(os.fsencode(part)) > name_max:
                raise KeyNotStorable(
                    f"key {key!r}: segment {part[:40]!r}... is {len(os.fsencode(part))} bytes; the local "
                    f"filesystem under {self.root} allows at most {name_max} bytes per file or folder name",
                    key=key,
                )
        path_max = _limit(self.root, "PC_PATH_MAX", 4096)
        if len(os.fsencode(self._path(key))) >= path_max:
            raise KeyNotStorable(
                f"key {key!r}: the path under {self.root} would be longer than the filesystem's {path_max} bytes",
                key=key,
            )

    def _check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise NotFound(f"driver root {self.root} does not exist or is not a folder")

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        await asyncio.to_thread(self._check_root)
        # Descend only into folders that can hold keys under ``prefix``.
        stack: list[tuple[str, list[_Entry], int]] = []

        async def scan(rel: str) -> list[_Entry]:
            try:
                return await asyncio.to_thread(_scan, self._path(rel) if rel else self.root)
            except FileNotFoundError:
                await asyncio.to_thread(self._check_root)
                return []  # the folder itself was removed during the listing
            except PermissionError:
                raise PermissionDenied(f"cannot read folder {rel or '/'} under {self.root}") from None
            except NotADirectoryError:
                return []
            except OSError as exc:
                raise StorageError(f"cannot read folder {rel or '/'} under {self.root}: {exc.strerror}") from None

        stack.append(("", await scan(""), 0))
        while stack:
            rel, entries, i = stack[-1]
            if i == len(entries):
                stack.pop()
                continue
            stack[-1] = (rel, entries, i + 1)
            sort_name, name, is_dir, size, mtime_ns, ino = entries[i]
            key = rel + sort_name
            if is_dir:
                if key == HIDDEN:
                    continue
                if key.startswith(prefix) or prefix.startswith(key):
                    stack.append((key, await scan(key), 0))
                continue
            if not key.startswith(prefix):
                continue
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                log.warning("skipping file whose name is not UTF-8", folder=rel, name=repr(name))
                continue
            if not indexable(key):
                continue
            yield ObjectInfo(key, size, mtime_ns / 1e9, f"{size:x}-{mtime_ns:x}-{ino:x}")
        await asyncio.to_thread(self._check_root)  # a root that vanished mid-walk is an error

    async def head(self, key: str) -> ObjectInfo:
        def _head() -> ObjectInfo:
            try:
                st = os.stat(self._path(key))
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"{key} not found in {self.root}", key=key) from None
            except PermissionError:
                raise PermissionDenied(f"cannot stat {key} in {self.root}", key=key) from None
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"{key} is not a file in {self.root}", key=key)
            return _info(key, st)

        return await asyncio.to_thread(_head)

    async def open(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        try:
            f = await asyncio.to_thread(open, self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{key} not found in {self.root}", key=key) from None
        except PermissionError:
            raise PermissionDenied(f"cannot read {key} in {self.root}", key=key) from None
        try:
            if offset:
                f.seek(offset)
            left = -1 if length is None else length
            while left and (chunk := await asyncio.to_thread(f.read, CHUNK if left < 0 else min(CHUNK, left))):
                left -= len(chunk) if left > 0 else 0
                yield chunk
        finally:
            f.close()

    def _current_etag(self, key: str) -> str | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _etag(st) if stat.S_ISREG(st.st_mode) else None  # a folder is no object

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        mode: PutMode = OVERWRITE,
        content_type: str | None = None,
    ) -> ObjectInfo:
        await asyncio.to_thread(self._check_root)
        tmpdir = os.path.join(self.root, HIDDEN, "tmp")
        try:
            await asyncio.to_thread(os.makedirs, tmpdir, exist_ok=True)
            fd, tmp = await asyncio.to_thread(tempfile.mkstemp, dir=tmpdir)
        except PermissionError:
            raise PermissionDenied(f"cannot write under {self.root}", key=key) from None
        except OSError as exc:
            raise _os_error(exc, key, self.root) from None
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    await asyncio.to_thread(f.write, chunk)
                await asyncio.to_thread(os.fsync, f.fileno())
            dest = self._path(key)
            async with self._lock:
                return await asyncio.to_thread(self._commit, key, tmp, dest, mode)
        except OSError as exc:  # writing the temp file: disk full, I/O error
            raise _os_error(exc, key, self.root) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _commit(self, key: str, tmp: str, dest: str, mode: PutMode) -> ObjectInfo:
        try:
            try:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise self._conflict(key, "a file is where the key needs a folder") from None
            if os.path.isdir(dest):
                raise self._conflict(key, "a folder is where the key needs a file")
            if mode.create:
                try:
                    os.link(tmp, dest)
                except FileExistsError:
                    if os.path.isdir(dest):
                        raise self._conflict(key, "a folder is where the key needs a file") from None
                    raise AlreadyExists(f"{key} already exists in {self.root}", key=key) from None
            else:
                if mode.if_match is not None and self._current_etag(key) != mode.if_match:
                    raise PreconditionFailed(f"{key} changed in {self.root} (etag mismatch)", key=key)
                try:
                    os.replace(tmp, dest)
                except IsADirectoryError:
                    raise self._conflict(key, "a folder is where the key needs a file") from None
            return _info(key, os.stat(dest))
        except PermissionError:
            raise PermissionDenied(f"cannot write {key} in {self.root}", key=key) from None
        except OSError as exc:
            raise _os_error(exc, key, self.root) from None

    def _conflict(self, key: str, why: str) -> FileFolderConflict:
        return FileFolderConflict(f"cannot write {key} in {self.root}: {why}", key=key)

    async def delete(self, key: str, if_match: str | None = None) -> None:
        async with self._lock:
            await asyncio.to_thread(self._delete, key, if_match)

    def _delete(self, key: str, if_match: str | None) -> None:
        path = self._path(key)
        current = self._current_etag(key)
        if current is None:
            return
        if if_match is not None and current != if_match:
            raise PreconditionFailed(f"{key} changed in {self.root} (etag mismatch)", key=key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except (PermissionError, IsADirectoryError):
            raise PermissionDenied(f"cannot delete {key} in {self.root}", key=key) from None
        # Tidy now-empty parent folders up to (not including) the root.
        parent = os.path.dirname(path)
        while parent != self.root and parent.startswith(self.root):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)

    async def aclose(self) -> None:
        return None


def open_local(loc: Location, driver: object, integration: object) -> LocalStore:
    return LocalStore(loc.path)
