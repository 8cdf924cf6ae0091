"""Content hashes for local folders (``verify = "hash"``), and the memo that spares re-reading.

A file's content hash is only recomputed when its *fingerprint* moves: (size,
mtime_ns, ctime_ns, inode). The change time is the key: the kernel sets it on every
content or metadata write and no user call can set it back, so a rewrite that
restores the size and mtime (``touch -r``, ``cp -p``, ``rsync -t``) or reuses the
inode still moves it. An unchanged fingerprint therefore means unchanged content,
and its hash is taken from the memo.

The memo is a small SQLite file per driver root beside the ledger (never in the
user's folder: a read-only dataset writes nothing there), one row per file:
(folder, name) -> fingerprint + hash. It is a pure cache of facts "this fingerprint had this content
hash", so it can never make a listing wrong, only slower: a lost, stale or corrupt
memo just costs re-hashing. It is read and written one folder at a time, in the same
worker-thread hop that lists the folder, so a listing holds one folder's rows at a
time whatever the size of the tree.

The hash is XXH3-128 (``xxhash``): see docs/benchmarks.md for why, measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import stat
from collections.abc import Iterable
from pathlib import Path

import structlog
import xxhash

log = structlog.get_logger(__name__)

CHUNK = 1 << 20
#: the etag prefix names the algorithm, so a change of algorithm can never compare equal
PREFIX = "xxh128:"
#: (size, mtime_ns, ctime_ns, inode)
Fingerprint = tuple[int, int, int, int]


def fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class Hasher:
    """An incremental content hash, for bytes as they are written."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def etag(self) -> str:
        return PREFIX + self._h.hexdigest()


def hash_file(path: str, tries: int = 3) -> tuple[str, os.stat_result]:
    """The file's content etag and the stat it belongs to (taken before the read).

    A file that changes while it is read (its fingerprint moves) is read again, up to
    ``tries`` times; after that the stat from before the last read is returned with
    its hash, which is safe: the write moved the change time past that stat, so the
    next listing sees a new fingerprint and hashes the file again. Raises
    ``FileNotFoundError`` when the file is gone (or is no regular file any more),
    ``PermissionError`` when it cannot be read.
    """
    # O_NONBLOCK: a file swapped for a FIFO since it was listed must not hang the listing.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(tries):
        fd = os.open(path, flags)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise FileNotFoundError(f"{path} is no longer a regular file")
            h = xxhash.xxh3_128()
            while chunk := os.read(fd, CHUNK):
                h.update(chunk)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if fingerprint(before) == fingerprint(after) or attempt == tries - 1:
            return PREFIX + h.hexdigest(), before
    raise AssertionError("unreachable")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS memo (
    folder TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    etag TEXT NOT NULL,
    PRIMARY KEY (folder, name)
) WITHOUT ROWID;
"""


def memo_path(ledger: Path, root: str) -> Path:
    """The memo of the driver root ``root``, beside the ledger ``ledger``."""
    digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:24]
    return ledger.parent / f"{ledger.name}.hashes" / f"{digest}.sqlite"


class HashMemo:
    """Where the memo of one local driver lives; ``session()`` opens it for one listing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def session(self) -> MemoSession | None:
        """A connection for one listing or one write; None (with a warning) when the memo
        cannot be used: the listing then hashes every file, which is slow but correct."""
        try:
            return MemoSession(self._connect())
        except sqlite3.DatabaseError as exc:
            # A damaged cache is thrown away and rebuilt: it holds nothing that cannot be recomputed.
            log.warning("content-hash memo unreadable; starting a new one", path=str(self.path), error=str(exc))
            with contextlib.suppress(OSError):
                for suffix in ("", "-wal", "-shm"):
                    os.unlink(f"{self.path}{suffix}")
            try:
                return MemoSession(self._connect())
            except (sqlite3.Error, OSError) as again:
                log.warning("content-hash memo unusable; hashing every file", path=str(self.path), error=str(again))
        except (sqlite3.Error, OSError) as exc:
            log.warning("content-hash memo unusable; hashing every file", path=str(self.path), error=str(exc))
        return None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Used from the listing's worker threads, one call at a time.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a cache: a lost tail costs re-hashing, never a wrong answer
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db


class MemoSession:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.folders: set[str] = set()

    def folder(self, folder: str) -> dict[str, tuple[Fingerprint, str]]:
        """name -> (fingerprint, etag) of the files last seen in ``folder`` ("" or "a/b/")."""
        self.folders.add(folder)
        rows = self.db.execute("SELECT name, size, mtime_ns, ctime_ns, ino, etag FROM memo WHERE folder = ?", (folder,))
        return {r[0]: ((r[1], r[2], r[3], r[4]), r[5]) for r in rows}

    def update(self, folder: str, fresh: Iterable[tuple[str, Fingerprint, str]], gone: Iterable[str]) -> None:
        """Record newly hashed files and forget files that left ``folder``, in one transaction."""
        fresh, gone = list(fresh), list(gone)
        if not fresh and not gone:
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT OR REPLACE INTO memo (folder, name, size, mtime_ns, ctime_ns, ino, etag) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(folder, name, *fp, etag) for name, fp, etag in fresh],
            )
            self.db.executemany("DELETE FROM memo WHERE folder = ? AND name = ?", [(folder, name) for name in gone])
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            log.warning("content-hash memo not updated; those files are hashed again next time", error=str(exc))

    def lookup(self, folder: str, name: str, fp: Fingerprint) -> str | None:
        row = self.db.execute(
            "SELECT size, mtime_ns, ctime_ns, ino, etag FROM memo WHERE folder = ? AND name = ?", (folder, name)
        ).fetchone()
        return row[4] if row is not None and tuple(row[:4]) == fp else None

    def prune(self) -> None:
        """After a complete listing of the whole tree: forget folders it did not visit (gone)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS visited (folder TEXT PRIMARY KEY)")
            self.db.execute("DELETE FROM visited")
            self.db.executemany("INSERT OR IGNORE INTO visited VALUES (?)", [(f,) for f in self.folders])
            self.db.execute("DELETE FROM memo WHERE folder NOT IN (SELECT folder FROM visited)")
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            log.warning("content-hash memo not pruned", error=str(exc))

    def close(self) -> None:
        self.db.close()
