"""The local-change matrix: the ways backup tools and people change a file behind bucketsync's back.

Each change below keeps the file's size, its mtime to the nanosecond and (all but one)
its inode, so the old etag (size, mtime_ns, inode) never saw it. Every one moves the
inode's change time, which no user call can set. Each is made with the real tool
(``touch -r``, ``cp -p``, ``rsync -t -I --inplace``, ``chmod``) on real files, then a
real ``SyncLoop`` run against a real ledger file must see it:

- ``verify = "stat"`` (default): all five are modifications;
- ``verify = "hash"``: the four that change content are modifications, ``chmod`` is
  not (the content is the same), and renames are matched by content.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import xxhash
from structlog.testing import capture_logs

from bucketsync.config import DatasetConfig
from bucketsync.core.errors import PreconditionFailed
from bucketsync.core.model import Counts, ItemState, ObjectInfo, PutMode, RunStatus
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores import local as local_module
from bucketsync.stores import one_chunk
from bucketsync.stores.contenthash import HashMemo, memo_path
from bucketsync.stores.local import LocalStore
from bucketsync.upstream.sync import RunResult, SyncLoop

KEY = "photos/2024/IMG_0001.jpg"
OLD = b"A" * 4096
NEW = b"B" * 4096  # same size: only the content differs
MODES = ["stat", "hash"]


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    led = await Ledger.open(tmp_path / "var" / "ledger.db")
    try:
        yield led
    finally:
        await led.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Where the tools' source and reference files live (not under the driver root)."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def store_for(root: Path, ledger: Ledger, verify: str) -> LocalStore:
    """A store as ``open_store`` builds it: with ``hash``, its memo beside the ledger."""
    if verify == "hash":
        return LocalStore(str(root), "hash", HashMemo(memo_path(ledger.path, str(root))))
    return LocalStore(str(root))


async def sync(root: Path, ledger: Ledger, verify: str) -> RunResult:
    # A fresh store per run, as a fresh process would have: nothing is carried in memory.
    loop = SyncLoop("ds", DatasetConfig(driver="d"), store_for(root, ledger, verify), ledger)
    result = await loop.run_once()
    assert result.status is RunStatus.OK, result.error
    return result


async def item(ledger: Ledger, key: str = KEY) -> tuple[int, str | None, str | None]:
    found = await ledger.item(await ledger.dataset_id("ds"), key)
    assert found is not None and found.state is ItemState.LIVE
    return found.id, found.etag, found.version


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def run(*argv: str | Path) -> None:
    subprocess.run([os.fspath(a) for a in argv], check=True, capture_output=True)


def same_times_as(path: Path, ref: Path) -> None:
    st = ref.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------------- the five changes


def rewrite_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:  # the inode stays
        f.write(data)


def rewrite_then_touch_r(path: Path, outside: Path) -> None:
    """A same-size rewrite, then ``touch -r`` puts the old times back."""
    ref = outside / "times"
    ref.touch()
    run("touch", "-r", path, ref)
    rewrite_in_place(path, NEW)
    run("touch", "-r", ref, path)


def cp_p_same_mtime(path: Path, outside: Path) -> None:
    """``cp -p`` over the file from a copy with the same size and mtime (cp writes into the inode)."""
    src = outside / "src"
    src.write_bytes(NEW)
    same_times_as(src, path)
    run("cp", "-p", src, path)


def rsync_in_place(path: Path, outside: Path) -> None:
    """``rsync -t -I --inplace``: transfers although size and mtime match, into the same inode."""
    src = outside / "src"
    src.write_bytes(NEW)
    same_times_as(src, path)
    run("rsync", "-t", "-I", "--inplace", src, path)


def recreate_same_size_and_mtime(path: Path, outside: Path) -> None:
    """Delete and re-create with the same size and the mtime restored; ext4 and tmpfs hand the
    freed inode straight back to the next file made in the folder."""
    st = path.stat()
    path.unlink()
    path.write_bytes(NEW)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def chmod(path: Path, outside: Path) -> None:
    os.chmod(path, 0o600 if path.stat().st_mode & 0o777 != 0o600 else 0o644)


CONTENT_CHANGES: list[Callable[[Path, Path], None]] = [
    rewrite_then_touch_r,
    cp_p_same_mtime,
    rsync_in_place,
    recreate_same_size_and_mtime,
]
CHANGES = [*CONTENT_CHANGES, chmod]


def old_etag(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def test_the_tools_are_installed() -> None:
    """The matrix runs every tool for real; the Makefile's test install puts rsync in place."""
    for tool in ("touch", "cp", "rsync"):
        assert shutil.which(tool), f"{tool} is needed by the local-change matrix (make test installs it)"


@pytest.mark.parametrize("verify", MODES)
@pytest.mark.parametrize("change", CHANGES, ids=lambda c: c.__name__)
async def test_local_change_matrix(
    verify: str, change: Callable[[Path, Path], None], root: Path, outside: Path, ledger: Ledger
) -> None:
    path = root.joinpath(*KEY.split("/"))
    write(path, OLD)
    write(root / "other.bin", b"untouched")
    first = await sync(root, ledger, verify)
    assert first.counts.added == 2
    item_id, etag, version = await item(ledger)
    before = old_etag(path)

    change(path, outside)

    after = old_etag(path)
    assert after[:2] == before[:2], "the change must keep size and mtime (else it proves nothing)"
    if change is not recreate_same_size_and_mtime:
        assert after[2] == before[2], "the change must keep the inode"
    content_changed = change is not chmod
    assert (path.read_bytes() == NEW) is content_changed

    result = await sync(root, ledger, verify)
    detected = content_changed or verify == "stat"
    assert (result.counts.modified, result.counts.unchanged) == ((1, 1) if detected else (0, 2))
    assert result.counts.added == result.counts.removed == 0
    new_id, new_etag, new_version = await item(ledger)
    assert new_id == item_id, "a modification keeps the item"
    if verify == "hash":
        assert version is None and new_version is None
        assert etag == "xxh128:" + xxhash.xxh3_128_hexdigest(OLD)
        assert new_etag == "xxh128:" + xxhash.xxh3_128_hexdigest(path.read_bytes())
    else:
        assert (new_etag, new_version) != (etag, version)

    again = await sync(root, ledger, verify)  # seen once, then stable
    assert (again.counts.modified, again.counts.unchanged) == (0, 2)


@pytest.mark.parametrize("verify", MODES)
async def test_a_rewrite_with_the_same_bytes(verify: str, root: Path, outside: Path, ledger: Ledger) -> None:
    """Only ``hash`` can tell that a rewrite with restored times put back the very same bytes."""
    path = root / "a.bin"
    write(path, OLD)
    await sync(root, ledger, verify)
    ref = outside / "times"
    ref.touch()
    run("touch", "-r", path, ref)
    path.write_bytes(OLD)
    run("touch", "-r", ref, path)
    result = await sync(root, ledger, verify)
    assert result.counts.modified == (1 if verify == "stat" else 0)


@pytest.mark.parametrize("verify", MODES)
async def test_renames(verify: str, root: Path, ledger: Ledger) -> None:
    """``mv`` keeps the inode: a rename in both modes. A copy then delete makes a new inode:
    only the content hash recognises the same file, and keeps its item and metadata."""
    write(root / "a" / "moved.bin", b"moved by mv")
    write(root / "a" / "copied.bin", b"copied, then the original deleted")
    await sync(root, ledger, verify)
    ds = await ledger.dataset_id("ds")
    moved, copied = await item(ledger, "a/moved.bin"), await item(ledger, "a/copied.bin")
    await ledger.merge_meta(copied[0], {"label": "cat"})

    (root / "b").mkdir()
    run("mv", root / "a" / "moved.bin", root / "b" / "moved.bin")
    run("cp", root / "a" / "copied.bin", root / "b" / "copied.bin")
    (root / "a" / "copied.bin").unlink()

    result = await sync(root, ledger, verify)
    assert (await item(ledger, "b/moved.bin"))[0] == moved[0]
    new_copy = await ledger.item(ds, "b/copied.bin")
    assert new_copy is not None
    if verify == "hash":
        assert (result.counts.renamed, result.counts.added, result.counts.removed) == (2, 0, 0)
        assert new_copy.id == copied[0] and new_copy.meta == {"label": "cat"}
    else:
        assert (result.counts.renamed, result.counts.added, result.counts.removed) == (1, 1, 1)
        assert new_copy.id != copied[0]


# ---------------------------------------------------------------------- the memo


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the local store reads to hash, in order (the real hash still runs)."""
    calls: list[str] = []
    real = local_module.hash_file

    def spy(path: str, tries: int = 3) -> tuple[str, os.stat_result]:
        calls.append(os.path.basename(path))
        return real(path, tries)

    monkeypatch.setattr(local_module, "hash_file", spy)
    return calls


async def test_hash_memo_reads_only_files_whose_change_time_moved(
    root: Path, ledger: Ledger, hashed: list[str]
) -> None:
    for name in ("a", "b", "c"):
        write(root / "d" / f"{name}.bin", name.encode() * 100)
    for name in ("x", "y", "z"):  # so that removing d/ later stays under the mass-delete guard
        write(root / f"{name}.bin", name.encode())
    await sync(root, ledger, "hash")
    assert sorted(hashed) == ["a.bin", "b.bin", "c.bin", "x.bin", "y.bin", "z.bin"]
    memo = memo_path(ledger.path, str(root))
    assert memo.parent == ledger.path.parent / "ledger.db.hashes" and memo.exists()
    assert not (root / ".bucketsync").exists(), "the memo never goes into the user's folder"

    def remembered(folder: str) -> list[str]:
        with sqlite3.connect(memo) as db:
            return sorted(r[0] for r in db.execute("SELECT name FROM memo WHERE folder = ?", (folder,)))

    hashed.clear()
    await sync(root, ledger, "hash")  # a fresh store: the memo is all it has
    assert hashed == []

    os.chmod(root / "d" / "b.bin", 0o600)
    result = await sync(root, ledger, "hash")
    assert hashed == ["b.bin"] and result.counts.modified == 0

    hashed.clear()
    (root / "d" / "c.bin").unlink()
    result = await sync(root, ledger, "hash")
    assert hashed == [] and result.counts.removed == 1
    assert remembered("d/") == ["a.bin", "b.bin"]

    shutil.rmtree(root / "d")  # a whole folder gone: its rows go after a complete listing
    result = await sync(root, ledger, "hash")
    assert hashed == [] and result.counts.removed == 2
    assert remembered("d/") == [] and remembered("") == ["x.bin", "y.bin", "z.bin"]


async def test_a_lost_or_damaged_memo_costs_time_not_correctness(root: Path, ledger: Ledger, hashed: list[str]) -> None:
    write(root / "a.bin", b"a" * 10)
    write(root / "b.bin", b"b" * 10)
    await sync(root, ledger, "hash")
    memo = memo_path(ledger.path, str(root))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{memo}{suffix}").unlink(missing_ok=True)
    hashed.clear()
    result = await sync(root, ledger, "hash")
    assert sorted(hashed) == ["a.bin", "b.bin"] and result.counts.unchanged == 2

    for suffix in ("-wal", "-shm"):
        Path(f"{memo}{suffix}").unlink(missing_ok=True)
    memo.write_bytes(b"this is not a database" * 100)
    hashed.clear()
    with capture_logs() as logs:
        result = await sync(root, ledger, "hash")
    assert sorted(hashed) == ["a.bin", "b.bin"] and result.counts.unchanged == 2
    assert any(e["event"].startswith("content-hash memo unreadable") for e in logs)
    hashed.clear()
    await sync(root, ledger, "hash")
    assert hashed == [], "the memo was rebuilt"


async def test_hash_mode_put_head_and_if_match(root: Path, ledger: Ledger) -> None:
    """A write's etag is the hash of what was written, as a listing will report it; if-match
    compares content hashes."""
    store = store_for(root, ledger, "hash")
    put = await store.put("k.bin", one_chunk(OLD))
    assert put.etag == "xxh128:" + xxhash.xxh3_128_hexdigest(OLD)
    assert await store.head("k.bin") == put
    assert [o async for o in store.list()] == [put]
    rewrite_in_place(root / "k.bin", NEW)
    with pytest.raises(PreconditionFailed):
        await store.put("k.bin", one_chunk(b"mine"), PutMode.matching(put.etag))
    assert (root / "k.bin").read_bytes() == NEW


@pytest.mark.parametrize("verify", MODES)
@pytest.mark.parametrize("mode", [PutMode(), PutMode(create=True)], ids=["overwrite", "create-only"])
async def test_a_put_reports_what_a_listing_will(verify: str, mode: PutMode, root: Path, ledger: Ledger) -> None:
    """The outbox indexes what ``put`` returns; a different version (change time) than the next
    listing's would make every upload look modified by someone else."""
    store = store_for(root, ledger, verify)
    put = await store.put("new/k.bin", one_chunk(OLD), mode)
    assert [o async for o in store.list()] == [put]
    assert await store.head("new/k.bin") == put


async def test_items_indexed_before_the_change_time_was_recorded(root: Path, ledger: Ledger) -> None:
    """A ledger from before this change holds (size-mtime-inode) etags and no version: the
    first run re-records every file once; from then on the five changes are seen."""
    path = root / "a.bin"
    write(path, OLD)
    st = path.stat()
    ds = await ledger.dataset_id("ds")
    run_id = await ledger.begin_run(ds, False)
    legacy = ObjectInfo("a.bin", st.st_size, st.st_mtime_ns / 1e9, f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}")
    await ledger.write_batch(ds, run_id, [legacy], [], Counts(added=1))
    await ledger.finish_run(run_id, Counts(added=1), RunStatus.OK, None)

    assert (await sync(root, ledger, "stat")).counts.modified == 1
    assert (await sync(root, ledger, "stat")).counts.modified == 0
    os.chmod(path, 0o600)
    assert (await sync(root, ledger, "stat")).counts.modified == 1


def test_hashing_never_blocks_on_a_fifo(tmp_path: Path) -> None:
    """A file swapped for a named pipe after the listing saw it must be skipped, not wait for a writer
    forever (the child process would hang; the timeout only turns a hang into a failure)."""
    fifo = tmp_path / "was-a-file"
    os.mkfifo(fifo)
    code = "import sys; from bucketsync.stores.contenthash import hash_file\n"
    code += "try:\n    hash_file(sys.argv[1])\nexcept FileNotFoundError:\n    print('skipped')\n"
    proc = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "skipped", proc.stderr


async def test_switching_verify_reports_every_file_once(root: Path, ledger: Ledger) -> None:
    write(root / "a.bin", OLD)
    write(root / "b.bin", NEW)
    await sync(root, ledger, "stat")
    for verify in ("hash", "stat"):
        assert (await sync(root, ledger, verify)).counts.modified == 2, "the etags' kind changed"
        assert (await sync(root, ledger, verify)).counts.modified == 0
