"""Retention on a real ledger file: what pruning deletes and what it always keeps."""

from __future__ import annotations

import time

from bucketsync.config import AgentConfig
from bucketsync.core.model import Counts, OpKind, RunStatus
from bucketsync.ledger.ledger import Ledger
from bucketsync.ledger.retention import prune_once


async def finished_runs(ledger: Ledger, ds: int, statuses: list[RunStatus]) -> list[int]:
    ids = []
    for status in statuses:
        run = await ledger.begin_run(ds, False)
        await ledger.finish_run(run, Counts(), status, None)
        ids.append(run)
    return ids


async def run_ids(ledger: Ledger, ds: int) -> list[int]:
    return sorted(r.id for r in await ledger.runs(ds, limit=10_000))


def conf(**kw: object) -> AgentConfig:
    return AgentConfig.model_validate(kw)


async def test_keeps_the_newest_runs_a_running_one_and_the_last_ok_one(ledger: Ledger) -> None:
    ds = await ledger.dataset_id("docs")
    other = await ledger.dataset_id("other")
    ok = await finished_runs(ledger, ds, [RunStatus.OK])
    running = await ledger.begin_run(ds, False)  # an old run still going: never pruned
    failed = await finished_runs(ledger, ds, [RunStatus.FAILED] * 10)
    other_runs = await finished_runs(ledger, other, [RunStatus.OK] * 2)

    runs, ops = await prune_once(ledger, conf(keep_runs=3))
    assert (runs, ops) == (7, 0)
    # newest 3, the running one, and the last ok one (the rename matcher starts there)
    assert await run_ids(ledger, ds) == sorted([ok[0], running, *failed[-3:]])
    assert await run_ids(ledger, other) == other_runs, "count is per dataset"
    assert (await ledger.last_ok_run(ds)) is not None


async def test_age_prunes_all_but_the_newest_and_the_last_ok(ledger: Ledger) -> None:
    ds = await ledger.dataset_id("docs")
    ids = await finished_runs(ledger, ds, [RunStatus.OK, RunStatus.OK, RunStatus.FAILED, RunStatus.ABORTED])
    # all of them are older than a day, seen from tomorrow
    runs, _ = await prune_once(ledger, conf(keep_runs_for="1d"), now=time.time() + 2 * 86400)
    assert runs == 2
    assert await run_ids(ledger, ds) == [ids[1], ids[3]]
    # and nothing younger than the age limit goes
    more = await finished_runs(ledger, ds, [RunStatus.OK] * 3)
    assert await prune_once(ledger, conf(keep_runs_for="1d")) == (0, 0)
    assert await run_ids(ledger, ds) == [ids[1], ids[3], *more]


async def test_finished_ops_are_pruned_pending_ones_never(ledger: Ledger) -> None:
    ds = await ledger.dataset_id("docs")
    finished = []
    for i in range(6):
        op = await ledger.enqueue(ds, OpKind.DELETE, f"k{i}")
        await ledger.fail_op(op, "not_found", "gone")
        finished.append(op)
    pending = await ledger.enqueue(ds, OpKind.DELETE, "still-to-do")
    _, ops = await prune_once(ledger, conf(keep_ops=2))
    assert ops == 4
    left = sorted(o.id for o in await ledger.ops(dataset_id=ds))
    assert left == sorted([*finished[-2:], pending])
    # by age: every finished op goes, the pending one stays
    _, ops = await prune_once(ledger, conf(keep_ops_for="1h"), now=time.time() + 7200)
    assert ops == 2
    assert [o.id for o in await ledger.ops(dataset_id=ds)] == [pending]


async def test_pruning_many_runs_goes_in_batches(ledger: Ledger) -> None:
    ds = await ledger.dataset_id("docs")
    await finished_runs(ledger, ds, [RunStatus.OK] * 1200)
    runs, _ = await prune_once(ledger, conf(keep_runs=10))
    assert runs == 1190
    assert len(await run_ids(ledger, ds)) == 10
