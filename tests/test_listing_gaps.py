"""A listing failure is scoped to the part of storage it affects (``ListingGap``).

Two levels:

- the engine, through the ``PartialListing`` contract that any store (a cloud's
  parallel listing too) can implement: a wrapper reports one prefix as a gap;
- the real thing: a sub-folder the agent may not read. Root reads every folder
  whatever its mode, so the CLI and the daemon run here as the unprivileged user
  ``nobody`` (``setpriv``), over a folder it owns, with one sub-folder at mode 000.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bucketsync import metrics
from bucketsync.config import DatasetConfig
from bucketsync.core.model import ItemState, ListingGap, ObjectInfo, RunStatus
from bucketsync.ledger.ledger import Ledger
from bucketsync.stores import one_chunk
from bucketsync.stores.memory import MemoryStore
from bucketsync.upstream.sync import SyncLoop
from conformance import Delegating
from e2e import NOBODY, Daemon, chown_tree, cli, describe, json_lines, local_driver, one_json, write_config, write_files

DATASET = "photos"


class GapAt(Delegating):
    """A store whose listing cannot read ``prefix``: it reports a gap there, in key order."""

    def __init__(self, inner: MemoryStore, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix

    async def list_with_gaps(self, prefix: str = "") -> AsyncIterator[ObjectInfo | ListingGap]:
        reported = False
        async for obj in self.inner.list(prefix):
            if obj.key.startswith(self.prefix):
                continue
            if not reported and obj.key > self.prefix:
                reported = True
                yield ListingGap(self.prefix, f"cannot list {self.prefix}: connection reset, 5 tries")
            yield obj
        if not reported:
            yield ListingGap(self.prefix, f"cannot list {self.prefix}: connection reset, 5 tries")


@pytest.fixture
def memory() -> Iterator[MemoryStore]:
    name = f"gaps-{uuid.uuid4().hex}"
    yield MemoryStore(name)
    MemoryStore.drop(name)


async def put(store: MemoryStore, *keys: str, data: bytes = b"x") -> None:
    for key in keys:
        await store.put(key, one_chunk(data))


async def live(ledger: Ledger) -> dict[str, int]:
    ds = await ledger.dataset_id(DATASET)
    return {i.key: i.id for i in await ledger.items(ds)}


def gauge(name: str, dataset: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, {"dataset": dataset})


async def test_a_gap_keeps_its_keys_and_the_rest_syncs(memory: MemoryStore, ledger: Ledger) -> None:
    await put(memory, "a/1", "b/1", "b/2", "c/1", "c/2", "z")
    first = await SyncLoop(DATASET, DatasetConfig(driver="d"), memory, ledger).run_once()
    assert first.status is RunStatus.OK and first.counts.added == 6
    before = await live(ledger)
    # b/ cannot be listed now; meanwhile b/2 and c/2 were deleted, a/1 rewritten and d/1 added.
    await memory.delete("b/2")
    await memory.delete("c/2")
    await put(memory, "a/1", data=b"new bytes")
    await put(memory, "d/1")

    partial = await SyncLoop(DATASET, DatasetConfig(driver="d"), GapAt(memory, "b/"), ledger).run_once()
    assert partial.status is RunStatus.PARTIAL
    assert [g.prefix for g in partial.gaps] == ["b/"]
    assert partial.error is not None and "cannot list b/" in partial.error
    c = partial.counts
    assert (c.added, c.modified, c.removed, c.unchanged, c.errors) == (1, 1, 1, 2, 1)
    after = await live(ledger)
    assert set(after) == {"a/1", "b/1", "b/2", "c/1", "d/1", "z"}, "b/2 kept (under the gap), c/2 removed"
    assert all(after[k] == before[k] for k in ("a/1", "b/1", "b/2", "c/1", "z"))
    assert gauge("bucketsync_listing_gaps", DATASET) == 1

    ds = await ledger.dataset_id(DATASET)
    (record,) = await ledger.runs(ds, limit=1)
    assert record.status is RunStatus.PARTIAL and record.gaps == (partial.gaps[0],)
    assert record.as_json()["gaps"] == [
        {"prefix": "b/", "exact": False, "error": "cannot list b/: connection reset, 5 tries"}
    ]

    healed = await SyncLoop(DATASET, DatasetConfig(driver="d"), memory, ledger).run_once()
    assert healed.status is RunStatus.OK and healed.gaps == [] and healed.counts.removed == 1
    assert "b/2" not in await live(ledger)
    assert gauge("bucketsync_listing_gaps", DATASET) == 0
    (record,) = await ledger.runs(ds, limit=1)
    assert record.gaps == () and record.as_json()["gaps"] == []


async def test_the_guard_counts_only_removals_outside_gaps(memory: MemoryStore, ledger: Ledger) -> None:
    """Half the dataset under an unreadable prefix is not half the dataset removed."""
    await put(memory, *(f"big/{i}" for i in range(8)), "x", "y")
    await SyncLoop(DATASET, DatasetConfig(driver="d"), memory, ledger).run_once()
    await memory.delete("x")
    result = await SyncLoop(DATASET, DatasetConfig(driver="d"), GapAt(memory, "big/"), ledger).run_once()
    assert result.status is RunStatus.PARTIAL and result.counts.removed == 1
    assert len(await live(ledger)) == 9


async def test_tombstones_and_filters_under_a_gap(memory: MemoryStore, ledger: Ledger) -> None:
    await put(memory, "b/keep.jpg", "b/gone.jpg", "b/note.txt", "c.jpg")
    config = DatasetConfig(driver="d", include=["*.jpg"])
    await SyncLoop(DATASET, config, memory, ledger).run_once()
    ds = await ledger.dataset_id(DATASET)
    gone = await ledger.item(ds, "b/gone.jpg")
    assert gone is not None
    await ledger.set_state(gone.id, ItemState.TOMBSTONE)
    await memory.delete("b/gone.jpg")
    result = await SyncLoop(DATASET, config, GapAt(memory, "b/"), ledger).run_once()
    assert result.status is RunStatus.PARTIAL, "a gap passes the include filter: it may hide included keys"
    still = await ledger.item(ds, "b/gone.jpg")
    assert still is not None and still.state is ItemState.TOMBSTONE, "a tombstone under a gap is not purged"


async def test_a_dry_run_reports_gaps_and_writes_nothing(memory: MemoryStore, ledger: Ledger) -> None:
    await put(memory, "a", "b/1")
    await SyncLoop(DATASET, DatasetConfig(driver="d"), memory, ledger).run_once()
    result = await SyncLoop(DATASET, DatasetConfig(driver="d"), GapAt(memory, "b/"), ledger).run_once(dry_run=True)
    assert result.status is RunStatus.PARTIAL and result.run is None
    assert result.as_json()["gaps"] == [
        {"prefix": "b/", "exact": False, "error": "cannot list b/: connection reset, 5 tries"}
    ]


# ---------------------------------------------------------------------- for real: a folder nobody may read


def keys_of(cfg: Path) -> set[str]:
    # As the agent's user too: root must not leave files in the ledger's folder that it cannot open.
    proc = cli(cfg, "items", DATASET, "--json", run_as=NOBODY)
    assert proc.returncode == 0, describe(proc)
    return {i["key"] for i in json_lines(proc.stdout)}


def test_an_unreadable_sub_folder_no_longer_blocks_the_dataset(shared_dir: Path) -> None:
    data = shared_dir / "data"
    write_files(data, {"a/1.txt": "a1", "b/1.txt": "b1", "b/2.txt": "b2", "c/1.txt": "c1", "c/2.txt": "c2", "z": "z"})
    write_files(data, {"0-private/x.txt": "x"})  # sorts first: the permission probe's listing meets it first
    cfg = write_config(shared_dir, {"d": local_driver(data)}, {DATASET: {"driver": "d", "sync": "manual"}})
    (shared_dir / "var").mkdir()
    chown_tree(shared_dir, NOBODY)

    first = one_json(cli(cfg, "sync", DATASET, "--json", run_as=NOBODY))
    assert (first["status"], first["added"], first["gaps"]) == ("ok", 7, [])

    # The agent's user loses access to b/ and 0-private/; the rest changes, before and after b/.
    (data / "b").chmod(0)
    (data / "0-private").chmod(0)
    (data / "a" / "1.txt").write_text("a1, longer now")
    (data / "b" / "2.txt").unlink()  # root may; the agent cannot see it
    (data / "c" / "2.txt").unlink()
    write_files(data, {"d/1.txt": "d1"})
    chown_tree(data / "d", NOBODY)

    proc = cli(cfg, "sync", DATASET, "--json", run_as=NOBODY)
    out = one_json(proc)
    assert proc.returncode == 1, "a partial run is not a success"
    assert out["status"] == "partial", out
    assert (out["added"], out["modified"], out["removed"], out["unchanged"], out["errors"]) == (1, 1, 1, 2, 2)
    assert [g["prefix"] for g in out["gaps"]] == ["0-private/", "b/"]
    gap = out["gaps"][1]
    assert gap["exact"] is False and "permission denied" in gap["error"] and "b/" in out["error"]
    assert keys_of(cfg) == {"0-private/x.txt", "a/1.txt", "b/1.txt", "b/2.txt", "c/1.txt", "d/1.txt", "z"}
    check = cli(cfg, "status", "--check", run_as=NOBODY)
    assert check.returncode == 1 and f"check failed: {DATASET}" in check.stderr, describe(check)
    assert "not listed (kept as last seen): 0-private/, b/" in check.stdout, describe(check)

    with Daemon(cfg, run_as=NOBODY) as daemon:
        daemon.wait_ready()  # the permission probe lists too: an unreadable first folder is no failed list
        run = daemon.api("POST", f"/datasets/{DATASET}/sync", params={"wait": "true"})
        assert run.status == 200 and run.body["status"] == "partial", run.body
        assert [g["prefix"] for g in run.body["gaps"]] == ["0-private/", "b/"]
        runs = daemon.api("GET", f"/datasets/{DATASET}/runs").body["runs"]
        assert runs[0]["status"] == "partial" and [g["prefix"] for g in runs[0]["gaps"]] == ["0-private/", "b/"]
        assert runs[1]["status"] == "partial" and runs[2]["gaps"] == []
        metric = f'bucketsync_listing_gaps{{dataset="{DATASET}"}} 2.0'
        assert metric in daemon.get("/metrics").text

        for folder in ("b", "0-private"):  # access restored: the run is whole again, and b/2.txt goes
            (data / folder).chmod(0o755)
        healed = daemon.api("POST", f"/datasets/{DATASET}/sync", params={"wait": "true"}).body
        assert (healed["status"], healed["removed"], healed["gaps"]) == ("ok", 1, [])
        assert f'bucketsync_listing_gaps{{dataset="{DATASET}"}} 0.0' in daemon.get("/metrics").text
    assert "b/2.txt" not in keys_of(cfg)


def test_a_file_that_cannot_be_hashed_is_a_gap_of_one_key(shared_dir: Path) -> None:
    """With ``verify = "hash"`` the agent must read each changed file; one it may not read keeps its
    last known state (an exact gap), and the rest of the folder syncs."""
    data = shared_dir / "data"
    write_files(data, {"a.txt": "a", "secret.txt": "secret", "secret.txt.bak": "bak", "z.txt": "z", "zz.txt": "zz"})
    cfg = write_config(shared_dir, {"d": local_driver(data, verify="hash")}, {DATASET: {"driver": "d"}})
    (shared_dir / "var").mkdir()
    chown_tree(shared_dir, NOBODY)
    first = one_json(cli(cfg, "sync", DATASET, "--json", run_as=NOBODY))
    assert (first["status"], first["added"]) == ("ok", 5)
    assert any((shared_dir / "var" / "ledger.db.hashes").iterdir()), "the memo lives beside the ledger"
    assert sorted(os.listdir(data)) == ["a.txt", "secret.txt", "secret.txt.bak", "z.txt", "zz.txt"]

    (data / "secret.txt").write_text("rewritten, unreadable")
    (data / "secret.txt").chmod(0)
    (data / "z.txt").write_text("z, changed")
    (data / "a.txt").unlink()
    out = one_json(cli(cfg, "sync", DATASET, "--json", run_as=NOBODY))
    assert out["status"] == "partial", out
    (gap,) = out["gaps"]
    assert gap["prefix"] == "secret.txt" and gap["exact"] is True and "permission denied" in gap["error"]
    assert (out["removed"], out["modified"], out["unchanged"]) == (1, 1, 2), "secret.txt.bak is not in the gap"
    assert keys_of(cfg) == {"secret.txt", "secret.txt.bak", "z.txt", "zz.txt"}
