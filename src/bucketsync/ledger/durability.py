"""The ledger under faults: what a SQLite failure means to an operator, a bounded
integrity check, the commit-sequence mirror that detects a lost ``-wal``, and backups.

Everything here sits beside ``Ledger`` behind small functions, so the ledger's hot
path only gains a counter bump per transaction and an occasional sidecar write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from bucketsync import metrics
from bucketsync.core.errors import DiskFull, LedgerError

log = structlog.get_logger("bucketsync.ledger")

#: how long the start-up ``PRAGMA quick_check`` may take before it is abandoned (huge ledgers)
QUICK_CHECK_BUDGET = 5.0
#: at most this many problems are reported by ``quick_check``
QUICK_CHECK_MAX_ERRORS = 10
#: the sidecar is rewritten at most this often (seconds): its fsync must not compete
#: with every batch's own commit fsync on a busy disk
SEQ_MIRROR_INTERVAL = 0.25


# -- what a failure means --------------------------------------------------------------


def _owner_hint(path: Path) -> str:
    me = os.geteuid()
    try:
        owner = path.stat().st_uid
    except OSError:
        owner = None
    if owner is not None and owner != me:
        return f"run bucketsync as the file's owner (uid {owner}; this process is uid {me}), or "
    return ""


def damaged_hint(path: Path) -> str:
    return (
        f"restore it from a copy made with `bucketsync backup`, or stop the agent, move {path} "
        f"(with {path.name}-wal and {path.name}-shm) aside and start again: every dataset is then "
        "re-synced from storage (user metadata and pending ops kept only in the ledger are lost)"
    )


def kind_of(exc: BaseException) -> str:
    """One word for what went wrong: disk_full, damaged, permission, io, busy or other."""
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    text = str(exc).lower()
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission"
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return "disk_full"
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "not a database" in text or "malformed" in text:
        return "damaged"
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")) or (
        "readonly" in text or "unable to open" in text
    ):
        return "permission"
    if name.startswith("SQLITE_IOERR") or "disk i/o error" in text:
        return "io"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return "busy"
    return "other"


def ledger_error(path: Path, exc: BaseException, doing: str) -> LedgerError:
    """The operator's version of a SQLite or OS error on the ledger: the file, and the fix."""
    kind = kind_of(exc)
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if kind == "disk_full":
        return DiskFull(
            f"cannot {doing} the ledger {path}: the disk is full ({detail}); nothing half-written was kept. "
            f"Free space on the file system holding {path.parent}: writes resume by themselves, no restart needed"
        )
    if kind == "damaged":
        return LedgerError(f"the ledger {path} is damaged ({detail}); {damaged_hint(path)}")
    if kind == "permission":
        return LedgerError(
            f"cannot {doing} the ledger {path}: {detail}. SQLite needs to read and write the file and create "
            f"{path.name}-wal and {path.name}-shm in {path.parent}: {_owner_hint(path)}make them writable by "
            "this user, or set agent.ledger to a writable path"
        )
    if kind == "io":
        return LedgerError(f"cannot {doing} the ledger {path}: I/O error ({detail}); check the disk and the kernel log")
    if kind == "busy":
        return LedgerError(f"cannot {doing} the ledger {path}: it stayed locked by another process ({detail})")
    return LedgerError(f"cannot {doing} the ledger {path}: {detail}")


def record_write_failure(err: LedgerError, exc: BaseException, *, log_it: bool = True) -> None:
    kind = kind_of(exc)
    metrics.LEDGER_WRITE_ERRORS.labels(kind).inc()
    metrics.LEDGER_WRITABLE.set(0)
    if log_it:
        log.error("ledger write failed", reason=kind, error=str(err))


# -- the start-up integrity check --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckResult:
    result: str  # ok | damaged | incomplete
    problems: tuple[str, ...] = ()
    seconds: float = 0.0

    def summary(self) -> str:
        if self.result == "ok":
            return "ok"
        if self.result == "incomplete":
            return f"not finished within its {QUICK_CHECK_BUDGET:g}s budget"
        return "; ".join(self.problems)


def _quick_check(path: Path, budget: float) -> CheckResult:
    t0 = time.monotonic()
    deadline = t0 + budget
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        # The progress handler is how SQLite lets a long statement be abandoned: a
        # non-zero return interrupts it, so a huge ledger cannot hold the start-up.
        db.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            rows = db.execute(f"PRAGMA quick_check({QUICK_CHECK_MAX_ERRORS})").fetchall()
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                return CheckResult("incomplete", (), time.monotonic() - t0)
            raise
        except sqlite3.DatabaseError as exc:  # damage bad enough that the check itself fails
            return CheckResult("damaged", (str(exc),), time.monotonic() - t0)
    finally:
        db.close()
    problems = tuple(str(r[0]) for r in rows)
    ok = problems == ("ok",)
    return CheckResult("ok" if ok else "damaged", () if ok else problems, time.monotonic() - t0)


async def quick_check(path: Path, budget: float = QUICK_CHECK_BUDGET) -> CheckResult:
    """``PRAGMA quick_check`` on its own connection in a thread, abandoned after ``budget`` s."""
    result = await asyncio.to_thread(_quick_check, path, budget)
    for name in ("ok", "damaged", "incomplete"):
        metrics.LEDGER_CHECK.labels(name).set(int(result.result == name))
    if result.result == "damaged":
        log.error(
            "ledger quick_check found damage",
            ledger=str(path),
            problems=list(result.problems),
            fix=damaged_hint(path),
        )
    elif result.result == "incomplete":
        log.warning("ledger quick_check did not finish in its time budget", ledger=str(path), budget=budget)
    return result  # ok: the "agent started" line says so


# -- the commit sequence mirror ----------------------------------------------------------


class SeqMirror:
    """A small fsynced sidecar (``LEDGER.seq``) holding the ledger's commit sequence.

    Every write transaction bumps a counter inside the ledger. After it commits, the
    new value is mirrored here. If a crash is followed by the loss of the ``-wal``,
    SQLite silently opens the older main file: its counter is then *below* the
    sidecar's, which is how the loss is detected at start-up.

    Cost: the sidecar is only ever written *after* a commit (so it never runs ahead
    of what is durable), by at most one writer at a time, at most every
    ``SEQ_MIRROR_INTERVAL``; commits that land meanwhile are coalesced into its next
    write. Under load that is a few small fsyncs a second, not one per transaction,
    and the hot path never waits for it. The price is a window of that interval: a
    WAL lost with only the last fraction of a second of commits in it may go unnoticed.
    """

    def __init__(self, ledger: Path) -> None:
        self.path = Path(f"{ledger}.seq")
        # -1 until a writer's commit or start-up check gives a value: a read-only ledger (the CLI's
        # reads, a sync worker's snapshot) closes without writing, never over a writer's number
        self._latest = -1
        self._written = -1
        self._last_write = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Event | None = None

    def read(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return int(text)
        except ValueError:
            log.warning("ignoring an unreadable commit-sequence sidecar", path=str(self.path), content=text[:40])
            return None

    def write_now(self, seq: int) -> None:
        """Write and fsync ``seq`` (blocking). The value is fixed-width and rewritten in
        place: one small write inside one sector, one fsync, no rename."""
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, f"{seq:020d}\n".encode(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # the file's name must survive a crash too
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._written = max(self._written, seq)

    def committed(self, seq: int) -> None:
        """Note a committed sequence number; mirror it soon, coalescing with others."""
        self._latest = max(self._latest, seq)
        if self._closing is None:
            self._closing = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="ledger-seq-mirror")

    async def _drain(self) -> None:
        while self._written < self._latest:
            # Commits that land meanwhile ride along with this write; closing skips the wait.
            pause = self._last_write + SEQ_MIRROR_INTERVAL - time.monotonic()
            if pause > 0 and self._closing is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), pause)
            self._last_write = time.monotonic()
            try:
                await asyncio.to_thread(self.write_now, self._latest)
            except OSError as exc:  # a full disk must not break commits; the next one retries
                log.warning("could not mirror the commit sequence", path=str(self.path), error=str(exc))
                return

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        if self._written < self._latest:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.write_now, self._latest)


# -- backups -----------------------------------------------------------------------------


def _backup(source: Path, target: Path) -> tuple[int, int]:
    tmp = target.with_name(f".{target.name}.part")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(tmp)
        try:
            # In steps, so the agent's writers are never held up for the whole copy;
            # a write meanwhile restarts the copy, which the backup API handles.
            src.backup(dst, pages=4096, sleep=0.005)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            check = dst.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise LedgerError(f"the copy of {source} failed its integrity check ({check}); not kept")
            pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
        finally:
            dst.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        src.close()
    return pages, target.stat().st_size


async def backup(source: Path, target: Path) -> tuple[int, int]:
    """Copy the ledger with SQLite's online backup API; safe while an agent writes it.

    Returns (pages, bytes). The copy is written beside ``target`` and renamed into
    place once complete and checked, so ``target`` is never a half copy.
    """
    if not source.exists():
        raise LedgerError(f"ledger {source} does not exist yet (nothing to back up)")
    try:
        return await asyncio.to_thread(_backup, source, target)
    except (sqlite3.Error, OSError) as exc:
        raise ledger_error(source, exc, "back up") from None
