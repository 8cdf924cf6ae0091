"""Permanent errors end an op; operators list, retry and cancel ops (issue 13 points 8 and 10).

In-process tests use an Agent on a real ledger file over a real local folder; the
end-to-end ones drive a real daemon over HTTP and the real CLI.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bucketsync.agent import Agent
from bucketsync.config import Settings
from bucketsync.core.errors import FileFolderConflict, KeyFiltered, KeyNotStorable, OpStateError
from bucketsync.core.model import OpKind, OpState
from bucketsync.downstream import opsctl
from bucketsync.downstream.ops import Downstream
from bucketsync.stores import one_chunk
from e2e import Daemon, cli, local_driver, one_json, write_config

LONG = "x" * 300  # over NAME_MAX (255 bytes) on every filesystem Linux uses


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[tuple[Agent, Downstream, Path]]:
    root = tmp_path / "storage"
    root.mkdir()
    settings = Settings(
        agent={"ledger": str(tmp_path / "var" / "ledger.db")},
        drivers={"d": {"url": root.as_uri(), "allow_delete": True}},
        datasets={
            "ds": {"driver": "d", "sync": "manual"},
            "photos": {"driver": "d", "sync": "manual", "include": ["*.jpg"], "exclude": ["tmp/**"]},
        },
    )
    async with Agent(settings) as agent:
        yield agent, Downstream(agent, agent.outbox, in_process=True), root


def staged(agent: Agent) -> list[Path]:
    return list(agent.outbox.staging.glob("*")) if agent.outbox.staging.exists() else []


async def test_a_segment_too_long_for_the_filesystem_is_refused_before_staging(
    local: tuple[Agent, Downstream, Path],
) -> None:
    agent, down, _root = local
    with pytest.raises(KeyNotStorable, match=r"at most 255 bytes per file or folder name"):
        await down.put("ds", f"dir/{LONG}.bin", one_chunk(b"data"))
    assert staged(agent) == []
    assert agent.ledger is not None and await agent.ledger.ops() == []


async def test_a_queued_op_the_filesystem_refuses_fails_and_is_not_retried(
    local: tuple[Agent, Downstream, Path],
) -> None:
    """An op queued before the check existed (or by an older agent) meets ENAMETOOLONG in
    storage: a permanent error, so the op fails with its code instead of retrying forever."""
    agent, _down, _root = local
    ledger = agent.ledger
    assert ledger is not None
    path, sha, _ = await agent.outbox.stage(one_chunk(b"data"))
    op_id = await ledger.enqueue(await ledger.dataset_id("ds"), OpKind.PUT, LONG, staged=path, sha256=sha)
    op = await agent.outbox.settle(op_id)
    assert op.state is OpState.FAILED and op.error_code == "key_not_storable" and op.attempts == 1, op
    assert "File name too long" in (op.error or "")


@pytest.mark.parametrize(
    ("first", "second"),
    [("a", "a/b.txt"), ("a/b.txt", "a"), ("a", "a/b/c.txt")],
    ids=["file-then-child", "folder-then-file", "file-then-grandchild"],
)
async def test_file_folder_conflicts_are_409s_that_end_the_op(
    local: tuple[Agent, Downstream, Path], first: str, second: str
) -> None:
    agent, down, root = local
    await down.put("ds", first, one_chunk(b"first"))
    with pytest.raises(FileFolderConflict, match="is where the key needs a"):
        await down.put("ds", second, one_chunk(b"second"))
    assert agent.ledger is not None
    [failed] = await agent.ledger.ops(state=OpState.FAILED)
    assert failed.error_code == "file_folder_conflict" and failed.attempts == 1
    assert (root / first).read_bytes() == b"first"  # nothing lost


async def test_retry_runs_a_failed_op_again_once_the_cause_is_gone(local: tuple[Agent, Downstream, Path]) -> None:
    agent, down, root = local
    ledger = agent.ledger
    assert ledger is not None
    (root / "a").write_bytes(b"someone's file")  # not indexed: no sync ran
    with pytest.raises(FileFolderConflict):
        await down.put("ds", "a/b.txt", one_chunk(b"ours"))
    [failed] = await ledger.ops(state=OpState.FAILED)
    assert failed.staged is not None and os.path.exists(failed.staged)  # kept for a retry
    with pytest.raises(OpStateError, match=r"no op \d+") as exc:
        await opsctl.retry(ledger, None, failed.id + 100)
    assert exc.value.code == "op_not_found"
    (root / "a").unlink()
    op = await opsctl.retry(ledger, None, failed.id)
    assert op.state is OpState.PENDING
    op = await agent.outbox.settle(failed.id)
    assert op.state is OpState.DONE, op
    assert (root / "a" / "b.txt").read_bytes() == b"ours"
    assert staged(agent) == []
    with pytest.raises(OpStateError) as exc:
        await opsctl.retry(ledger, None, failed.id)
    assert exc.value.code == "op_not_failed"


async def test_cancel_drops_a_pending_op_and_its_staged_body(local: tuple[Agent, Downstream, Path]) -> None:
    agent, _down, root = local
    ledger = agent.ledger
    assert ledger is not None
    path, sha, _ = await agent.outbox.stage(one_chunk(b"never written"))
    op_id = await ledger.enqueue(await ledger.dataset_id("ds"), OpKind.PUT, "k.bin", staged=path, sha256=sha)
    op = await opsctl.cancel(ledger, agent.outbox, op_id)
    assert op.state is OpState.CANCELLED and op.error_code == "cancelled"
    assert not os.path.exists(path)
    assert await ledger.backlog() == 0
    assert await ledger.due_ops(1e12) == []
    assert not (root / "k.bin").exists()
    with pytest.raises(OpStateError) as exc:
        await opsctl.cancel(ledger, agent.outbox, op_id)
    assert exc.value.code == "op_settled"
    with pytest.raises(OpStateError) as exc:
        await opsctl.retry(ledger, agent.outbox, op_id)
    assert exc.value.code == "op_not_failed"


async def test_a_later_op_on_a_key_waits_for_the_earlier_one(local: tuple[Agent, Downstream, Path]) -> None:
    """Ops on one key stay in order even while the earlier one backs off."""
    agent, _down, _root = local
    ledger = agent.ledger
    assert ledger is not None
    ds = await ledger.dataset_id("ds")
    first = await ledger.enqueue(ds, OpKind.DELETE, "same")
    second = await ledger.enqueue(ds, OpKind.DELETE, "same")
    other = await ledger.enqueue(ds, OpKind.DELETE, "other")
    await ledger.retry_later(first, "backing off", next_at=1e12)
    assert [o.id for o in await ledger.due_ops(time.time() + 1)] == [other]
    await ledger.retry_later(first, "due again", next_at=0)
    assert [o.id for o in await ledger.due_ops(time.time() + 1)] == [first, other]
    assert second not in [o.id for o in await ledger.due_ops(time.time() + 1)]


async def test_a_put_outside_the_filters_is_refused_naming_the_filter(local: tuple[Agent, Downstream, Path]) -> None:
    agent, down, root = local
    with pytest.raises(KeyFiltered, match=r"matches none of the include patterns \['\*\.jpg'\]"):
        await down.put("photos", "notes.txt", one_chunk(b"text"))
    with pytest.raises(KeyFiltered, match=r"matches the exclude pattern 'tmp/\*\*'"):
        await down.put("photos", "tmp/x.jpg", one_chunk(b"jpeg"))
    assert staged(agent) == [] and list(root.iterdir()) == []
    assert (await down.put("photos", "ok/x.jpg", one_chunk(b"jpeg"))).result == "created"


# -- end to end: the daemon's API and the CLI -------------------------------------------------------


def test_ops_through_the_api_and_the_cli(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    root.mkdir()
    cfg = write_config(
        tmp_path,
        {"d": local_driver(root)},
        {"ds": {"driver": "d", "sync": "manual", "exclude": ["*.tmp"]}},
    )
    (root / "a").write_bytes(b"a file")
    (root / "c").write_bytes(b"another file")

    # Without a daemon: the CLI fails the puts (409), lists, cancels in-process.
    put = cli(cfg, "put", "ds", str(_file(tmp_path, "body", b"body")), "--key", "c/d.bin")
    assert put.returncode == 1 and "a file is where the key needs a folder" in put.stderr, put.stderr
    listed = one_json(cli(cfg, "ops", "--state", "failed", "--json"))
    [cancel_me] = listed["ops"]
    assert cancel_me["error_code"] == "file_folder_conflict" and cancel_me["key"] == "c/d.bin"
    out = one_json(cli(cfg, "ops", "cancel", str(cancel_me["id"]), "--json"))
    assert out["state"] == "cancelled"
    assert list((tmp_path / "var" / "staging").glob("*")) == []
    put = cli(cfg, "put", "ds", str(_file(tmp_path, "body", b"body")), "--key", "c/f.bin")
    assert put.returncode == 1
    retry_me = one_json(cli(cfg, "ops", "--state", "failed", "--json"))["ops"][0]
    (root / "c").unlink()
    out = one_json(cli(cfg, "ops", "retry", str(retry_me["id"]), "--json"))
    assert out["state"] == "done", out  # no daemon: the CLI runs the op itself
    assert (root / "c" / "f.bin").read_bytes() == b"body"

    with Daemon(cfg) as daemon:
        r = daemon.api("PUT", "/datasets/ds/items/a%2Fb.bin", headers={"Content-Type": "application/octet-stream"})
        assert r.status == 409 and r.body["error"]["code"] == "file_folder_conflict", r.body
        r = daemon.api("PUT", f"/datasets/ds/items/{LONG}", headers={"Content-Type": "application/octet-stream"})
        assert r.status == 400 and r.body["error"]["code"] == "key_not_storable", r.body
        r = daemon.api("PUT", "/datasets/ds/items/x.tmp", headers={"Content-Type": "application/octet-stream"})
        assert r.status == 400 and r.body["error"]["code"] == "key_filtered" and "'*.tmp'" in r.body["error"]["message"]

        r = daemon.api("GET", "/ops", params={"state": "failed"})
        assert r.status == 200
        [failed] = r.body["ops"]
        assert failed["key"] == "a/b.bin" and failed["error_code"] == "file_folder_conflict"
        assert daemon.api("GET", "/ops", params={"state": "bogus"}).status == 400
        r = daemon.api("POST", f"/ops/{failed['id']}/cancel")
        assert r.status == 200 and r.body["state"] == "cancelled"
        r = daemon.api("POST", f"/ops/{failed['id']}/retry")
        assert r.status == 409 and r.body["error"]["code"] == "op_not_failed"
        assert daemon.api("POST", "/ops/999999/retry").body["error"]["code"] == "op_not_found"
        assert daemon.api("POST", "/ops/99999999999999999999/cancel").status == 400

        # Fail one more, clear the cause, retry through the CLI (which goes through the daemon).
        r = daemon.api("PUT", "/datasets/ds/items/a%2Fe.bin", headers={"Content-Type": "application/octet-stream"})
        assert r.status == 409
        (root / "a").unlink()
        failed_id = next(o["id"] for o in daemon.api("GET", "/ops", params={"state": "failed"}).body["ops"])
        retried = cli(cfg, "ops", "retry", str(failed_id))
        assert retried.returncode == 0 and f"{failed_id}" in retried.stdout and "pending" in retried.stdout
        _poll_done(daemon, failed_id)
        assert (root / "a" / "e.bin").exists()
        text = cli(cfg, "ops")
        assert text.returncode == 0 and "cancelled" in text.stdout and "done" in text.stdout


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _poll_done(daemon: Daemon, op_id: int) -> None:
    from e2e import poll

    poll(lambda: daemon.api("GET", f"/ops/{op_id}").body["state"] == "done" or None, what=f"op {op_id} done")


async def test_a_put_waiting_for_its_op_hears_of_the_cancel(local: tuple[Agent, Downstream, Path]) -> None:
    """No worker runs here, so the op stays pending; cancelling it answers the waiting put."""
    agent, _down, root = local
    ledger = agent.ledger
    assert ledger is not None
    waiting = Downstream(agent, agent.outbox, wait=60)
    put = asyncio.create_task(waiting.put("ds", "w.bin", one_chunk(b"waiting")))
    while not await ledger.ops(state=OpState.PENDING):  # noqa: ASYNC110 (the ledger has no event)
        await asyncio.sleep(0.01)
    [pending] = await ledger.ops(state=OpState.PENDING)
    await opsctl.cancel(ledger, agent.outbox, pending.id)
    with pytest.raises(OpStateError) as exc:
        await put
    assert exc.value.code == "op_cancelled"
    assert not (root / "w.bin").exists() and staged(agent) == []
