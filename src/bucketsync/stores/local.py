"""Local folder store (``file:///abs/path``).

Listing walks the tree in code-point order of the *key*: a directory ``a`` sorts
as ``a/``, so ``a-c`` < ``a/b`` < ``a0`` as in a bucket. Directory reads and stats
run in a worker thread, one directory per hop.

Change detection has two modes (the driver's ``verify``):

- ``stat`` (default): the etag is (size, mtime_ns, inode), which a rename keeps, so
  renames are matched; the version is the inode's change time (``st_ctime_ns``),
  which the kernel moves on every content or metadata write and no user call can
  set back. A rewrite that restores size and mtime (``touch -r``, ``cp -p``,
  ``rsync -t``), a delete and re-create that reuses the inode, and a ``chmod`` all
  move it, so all of them are seen as modifications.
- ``hash``: the etag is a content hash (``contenthash``), recomputed only when the
  file's fingerprint (size, mtime_ns, ctime_ns, inode) moved; there is no version.
  A change of content is a modification, a ``chmod`` or a same-bytes rewrite is not,
  and renames are matched by content.

A sub-folder (or, with ``hash``, a file) that cannot be read is reported in place
as a ``ListingGap`` by ``list_with_gaps``; ``list`` raises instead.

Writes go to a temp file in the hidden folder and are renamed into place, so a
reader never sees half a file; the temp file is created with mode 0666 less the
umask, as any program's new file is. Create-only uses ``link`` (atomic, fails if
the key exists). If-match compares the etag under a per-store lock: atomic against
bucketsync's own writers, best effort against other processes.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import os
import stat
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, cast

import structlog

from bucketsync.core.errors import (
    AlreadyExists,
    FileFolderConflict,
    KeyNotStorable,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from bucketsync.core.keys import HIDDEN, indexable
from bucketsync.core.location import Location
from bucketsync.core.model import OVERWRITE, ListingGap, ObjectInfo, PutMode
from bucketsync.stores import PAGE
from bucketsync.stores.contenthash import Fingerprint, Hasher, HashMemo, MemoSession, fingerprint, hash_file, memo_path

if TYPE_CHECKING:
    from bucketsync.config import DriverConfig

log = structlog.get_logger(__name__)
CHUNK = 1 << 20
Verify = Literal["stat", "hash"]

# (sort name, entry name, is_dir, size, mtime_ns, etag, version, error): a file whose
# content could not be read (``hash`` mode) has etag None and the reason in error.
_Entry = tuple[str, str, bool, int, int, str | None, str | None, str | None]
_Entries = list[_Entry]
#: the walk's open folders: (folder key, its entries, the next entry's index)
_Stack = list[tuple[str, _Entries, int]]


def _stat_etag(size: int, mtime_ns: int, ino: int) -> str:
    # Dots, not the dashes of earlier versions: a ledger indexed before the change time
    # was recorded sees every etag change once, and so records each file's version.
    return f"{size:x}.{mtime_ns:x}.{ino:x}"


def _version(ctime_ns: int) -> str:
    return f"{ctime_ns:x}"


def _stat_info(key: str, st: os.stat_result) -> ObjectInfo:
    etag = _stat_etag(st.st_size, st.st_mtime_ns, st.st_ino)
    return ObjectInfo(key, st.st_size, st.st_mtime_ns / 1e9, etag, _version(st.st_ctime_ns))


def _write(f: BinaryIO, chunk: bytes, hasher: Hasher | None) -> None:
    f.write(chunk)
    if hasher is not None:
        hasher.update(chunk)


def _scan(path: str, folder: str, hashing: bool, memo: MemoSession | None) -> list[_Entry]:
    """One folder's entries, sorted by key; with ``hashing``, files carry their content hash."""
    out: list[_Entry] = []
    files: list[tuple[str, os.stat_result]] = []
    with os.scandir(path) as it:
        for e in it:
            try:
                st = e.stat()  # follows symlinks to files
            except FileNotFoundError:
                continue  # removed (or a dangling link) since readdir
            if stat.S_ISDIR(st.st_mode):
                if e.is_symlink():
                    continue  # never follow links to folders: loops, escapes
                out.append((e.name + "/", e.name, True, 0, 0, None, None, None))
            elif stat.S_ISREG(st.st_mode):
                if hashing:
                    files.append((e.name, st))
                else:
                    etag = _stat_etag(st.st_size, st.st_mtime_ns, st.st_ino)
                    out.append(
                        (e.name, e.name, False, st.st_size, st.st_mtime_ns, etag, _version(st.st_ctime_ns), None)
                    )
    if hashing:
        out.extend(_hashed(path, folder, files, memo))
    out.sort()
    return out


def _hashed(path: str, folder: str, files: list[tuple[str, os.stat_result]], memo: MemoSession | None) -> list[_Entry]:
    """Content etags for one folder's files: from the memo while the fingerprint holds, else read."""
    if memo is not None and not _utf8(folder):
        memo = None  # never indexed (the walk skips it with a warning): nothing to remember
    known = memo.folder(folder) if memo is not None else {}
    out: list[_Entry] = []
    fresh: list[tuple[str, Fingerprint, str]] = []
    for name, st in files:
        if not _utf8(name):
            out.append((name, name, False, st.st_size, st.st_mtime_ns, None, None, None))  # skipped by the walk
            continue
        fp = fingerprint(st)
        hit = known.get(name)
        if hit is not None and hit[0] == fp:
            etag = hit[1]
        else:
            try:
                etag, st = hash_file(os.path.join(path, name))
            except FileNotFoundError:
                continue
            except OSError as exc:
                out.append((name, name, False, st.st_size, st.st_mtime_ns, None, None, _reason(exc)))
                continue
            fresh.append((name, fingerprint(st), etag))
        out.append((name, name, False, st.st_size, st.st_mtime_ns, etag, None, None))
    if memo is not None:
        present = {name for name, _ in files}
        memo.update(folder, fresh, (name for name in known if name not in present))
    return out


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_DENIED = "permission denied"


def _reason(exc: OSError) -> str:
    return _DENIED if isinstance(exc, PermissionError) else (exc.strerror or type(exc).__name__)


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

    def __init__(self, root: str, verify: Verify = "stat", memo: HashMemo | None = None) -> None:
        self.root = root
        self.url = f"file://{root}"
        self.verify = verify
        #: with ``verify = "hash"``: the fingerprint -> hash memo (None: hash every file every time)
        self.memo = memo
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

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        # Without gaps: the first folder or file that cannot be read ends the listing with its error.
        return cast(AsyncIterator[ObjectInfo], _flat(self._walk(prefix, strict=True)))

    def list_with_gaps(self, prefix: str = "") -> AsyncIterator[ObjectInfo | ListingGap]:
        return _flat(self._walk(prefix, strict=False))

    def list_pages(
        self, prefix: str = "", splits: Sequence[str] = ()
    ) -> AsyncIterator[builtins.list[ObjectInfo | ListingGap]]:
        """``list_with_gaps`` in pages of up to ``PAGE`` entries (``PagedListing``); no splits."""
        return self._walk(prefix, strict=False)

    async def _walk(self, prefix: str, strict: bool) -> AsyncGenerator[builtins.list[ObjectInfo | ListingGap], None]:
        await asyncio.to_thread(self._check_root)
        hashing = self.verify == "hash"
        memo = await asyncio.to_thread(self.memo.session) if hashing and self.memo is not None else None
        try:
            gaps = 0
            page: builtins.list[ObjectInfo | ListingGap] = []
            # Descend only into folders that can hold keys under ``prefix``.
            stack: _Stack = []
            top = await self._scan("", hashing, memo)
            if isinstance(top, StorageError):
                raise top  # the root itself: the whole listing failed
            stack.append(("", top, 0))
            try:
                while stack:
                    rel, entries, i = stack[-1]
                    # A folder's files one after another in this inner loop (about 1 us each); a
                    # subfolder ends it, and is descended into below.
                    n = len(entries)
                    while i < n:
                        sort_name, name, is_dir, size, mtime_ns, etag, version, error = entries[i]
                        i += 1
                        if is_dir:
                            break
                        key = rel + sort_name
                        if prefix and not key.startswith(prefix):
                            continue
                        if not key.isascii() and not _utf8(key):  # before indexable(), which refuses it silently
                            log.warning("skipping file whose name is not UTF-8", folder=rel, name=repr(name))
                            continue
                        if not indexable(key):
                            continue
                        if error is not None:
                            message = f"cannot read {key} under {self.root}: {error}"
                            if strict:
                                raise (PermissionDenied if error == _DENIED else StorageError)(message, key=key)
                            gaps += 1
                            page.append(ListingGap(key, message, exact=True))
                            continue
                        page.append(ObjectInfo(key, size, mtime_ns / 1e9, etag, version))
                        if len(page) >= PAGE:
                            yield page
                            page = []
                    else:
                        stack.pop()  # the folder is done
                        continue
                    stack[-1] = (rel, entries, i)
                    key = rel + sort_name  # a subfolder
                    if key == HIDDEN or not (key.startswith(prefix) or prefix.startswith(key)):
                        continue
                    sub = await self._scan(key, hashing, memo)
                    if isinstance(sub, StorageError):
                        if strict:
                            raise sub
                        # Only this sub-tree is unknown; the rest of the listing goes on.
                        gaps += 1
                        page.append(ListingGap(prefix if prefix.startswith(key) else key, str(sub)))
                        continue
                    stack.append((key, sub, 0))
                if page:
                    yield page
                    page = []
                await asyncio.to_thread(self._check_root)  # a root that vanished mid-walk is an error
            except Exception:
                if page:  # what was listed before a failure is synced, as it was object by object
                    yield page
                raise
            if memo is not None and not prefix and not gaps:
                await asyncio.to_thread(memo.prune)  # the whole tree was listed: forget folders that are gone
        finally:
            if memo is not None:
                await asyncio.to_thread(memo.close)

    async def _scan(self, rel: str, hashing: bool, memo: MemoSession | None) -> _Entries | StorageError:
        """The folder ``rel``'s entries, or the error that kept it from being read."""
        try:
            return await asyncio.to_thread(_scan, self._path(rel) if rel else self.root, rel, hashing, memo)
        except FileNotFoundError:
            await asyncio.to_thread(self._check_root)
            return []  # the folder itself was removed during the listing
        except NotADirectoryError:
            return []
        except PermissionError:
            return PermissionDenied(f"cannot read folder {rel or '/'} under {self.root}: {_DENIED}")
        except OSError as exc:
            return StorageError(f"cannot read folder {rel or '/'} under {self.root}: {exc.strerror}")

    async def head(self, key: str) -> ObjectInfo:
        def _head() -> ObjectInfo:
            try:
                info = self._object(key)
            except PermissionError:
                raise PermissionDenied(f"cannot read {key} in {self.root}", key=key) from None
            if info is None:
                raise NotFound(f"{key} not found in {self.root}", key=key)
            return info

        return await asyncio.to_thread(_head)

    def _object(self, key: str) -> ObjectInfo | None:
        """The file at ``key`` as a listing reports it; None when it is not a file. Blocking."""
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # a folder is no object
        if self.verify == "stat":
            return _stat_info(key, st)
        folder, _, name = key.rpartition("/")
        folder = folder + "/" if folder else ""
        etag = None
        memo = self.memo.session() if self.memo is not None else None
        if memo is not None:
            try:
                etag = memo.lookup(folder, name, fingerprint(st))
            finally:
                memo.close()
        if etag is None:
            try:
                etag, st = hash_file(path)
            except (FileNotFoundError, NotADirectoryError):
                return None
        return ObjectInfo(key, st.st_size, st.st_mtime_ns / 1e9, etag)

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
        info = self._object(key)
        return info.etag if info is not None else None

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        mode: PutMode = OVERWRITE,
        content_type: str | None = None,
    ) -> ObjectInfo:
        await asyncio.to_thread(self._check_root)
        tmpdir = os.path.join(self.root, HIDDEN, "tmp")
        tmp = os.path.join(tmpdir, f"{uuid.uuid4().hex}.tmp")
        try:
            await asyncio.to_thread(os.makedirs, tmpdir, exist_ok=True)
            # 0666 less the umask (and the folder's default ACL), like any program's new file;
            # mkstemp's 0600 would make every file bucketsync writes private to its user.
            fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except PermissionError:
            raise PermissionDenied(f"cannot write under {self.root}", key=key) from None
        except OSError as exc:
            raise _os_error(exc, key, self.root) from None
        hasher = Hasher() if self.verify == "hash" else None
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    await asyncio.to_thread(_write, f, chunk, hasher)
                await asyncio.to_thread(os.fsync, f.fileno())
            dest = self._path(key)
            async with self._lock:
                info = await asyncio.to_thread(self._commit, key, tmp, dest, mode)
            # The etag of what was written: hashed on the way, never read back.
            return info if hasher is None else ObjectInfo(key, info.size, info.modified, hasher.etag())
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
                # Dropping the temp name changes the link count, and so the change time: before the stat.
                os.unlink(tmp)
            else:
                if mode.if_match is not None and self._current_etag(key) != mode.if_match:
                    raise PreconditionFailed(f"{key} changed in {self.root} (etag mismatch)", key=key)
                try:
                    os.replace(tmp, dest)
                except IsADirectoryError:
                    raise self._conflict(key, "a folder is where the key needs a file") from None
            return _stat_info(key, os.stat(dest))
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


async def _flat(
    pages: AsyncGenerator[builtins.list[ObjectInfo | ListingGap], None],
) -> AsyncIterator[ObjectInfo | ListingGap]:
    """The entries of ``pages``; closing this closes the walk (its memo session) at once."""
    try:
        async for page in pages:
            for entry in page:
                yield entry
    finally:
        await pages.aclose()


def open_local(loc: Location, driver: DriverConfig, integration: object, *, ledger: Path | None = None) -> LocalStore:
    """The store of a ``file://`` driver; with ``verify = "hash"``, its memo lives beside ``ledger``."""
    memo = HashMemo(memo_path(ledger, loc.path)) if driver.verify == "hash" and ledger is not None else None
    return LocalStore(loc.path, driver.verify, memo)
