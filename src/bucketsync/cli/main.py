"""The ``bucketsync`` command.

Commands that write the ledger (``sync``) run in-process when no agent is
running, and through the running agent's HTTP API when one holds the ledger's
lock. ``items`` reads the ledger directly (SQLite WAL allows it beside a daemon).
Exit codes: 0 success, 1 a run or check that failed, 2 bad config or usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from bucketsync import __version__
from bucketsync.cli.display import ProgressLine, dumps, print_json, safe_text, shown
from bucketsync.core.errors import BucketsyncError, ConfigError, InvalidKey, LedgerError, LedgerLocked, NotFound

# Everything else is imported by the command that needs it: ``--version`` and ``--help`` stay
# instant, and no command pays for the cloud SDKs, the HTTP server or pydantic it does not use.
if TYPE_CHECKING:
    from bucketsync.cli.client import AgentClient
    from bucketsync.config import Settings
    from bucketsync.core.model import Item, ItemState
    from bucketsync.ledger.ledger import Ledger
    from bucketsync.ledger.sqlite import InstanceLock
    from bucketsync.upstream.sync import RunResult, SyncLoop

Command = Callable[["Settings", argparse.Namespace], Coroutine[Any, Any, int]]


def _human_counts(d: dict[str, Any]) -> str:
    keys = ("listed", "added", "modified", "removed", "renamed", "unchanged", "errors")
    return ", ".join(f"{k} {d.get(k, 0)}" for k in keys)


SYNC_KEYS = (
    "dataset",
    "run",
    "status",
    "listed",
    "added",
    "modified",
    "removed",
    "renamed",
    "unchanged",
    "errors",
    "error",
)


PLAN_KEYS = ("would_remove", "would_rename")


def _sync_json(raw: dict[str, Any]) -> dict[str, Any]:
    """The documented shape of ``sync --json``, whether the run was local or the daemon's.
    A dry run adds its plan: the keys it would remove and rename (the first 1,000 of each)."""
    out = {k: raw.get(k) for k in SYNC_KEYS} | {"gaps": raw.get("gaps") or [], "dry_run": bool(raw.get("dry_run"))}
    if out["dry_run"]:
        out |= {k: raw[k] for k in PLAN_KEYS if k in raw}
    return out


async def _read_ledger(settings: Settings) -> Ledger | None:
    """The ledger opened read-only; None when there is none yet (no SQLite file)."""
    from bucketsync.ledger.ledger import Ledger

    conf = settings.agent
    if not conf.ledger_present():
        return None
    return await Ledger.open(conf.ledger, readonly=True, password=conf.ledger_password())


async def _daemon_running(settings: Settings) -> bool:
    """Whether an agent runs on the ledger: then a command goes through the API (``agent.listen``).
    On PostgreSQL, any agent on the database counts: the one at ``agent.listen`` serves the whole
    API, and asks the dataset's owner to run what only the owner may."""
    file = settings.agent.ledger_file
    if file is not None:
        from bucketsync.ledger.sqlite import InstanceLock

        return await _agent_settled(InstanceLock(file), settings)
    from bucketsync.ledger.postgres import agent_running

    return await agent_running(str(settings.agent.ledger), settings.agent.ledger_password())


#: how long a command waits for an agent that holds the ledger's lock but whose API does not answer
AGENT_SETTLE = 10.0


async def _agent_settled(lock: InstanceLock, settings: Settings) -> bool:
    """Whether an agent holds the lock and serves its API. Between taking the lock and listening
    (a start, or one that fails on a damaged ledger and exits) an agent does not answer yet: the
    command waits, up to AGENT_SETTLE, until it answers (the API) or lets the lock go (the command
    runs here). Past that, the lock's holder is taken for an agent; the API call says it is mute."""
    import asyncio
    import time

    from bucketsync.cli.client import answers

    deadline = time.monotonic() + AGENT_SETTLE
    while lock.held_by_other():
        if await answers(settings, 1.0) or time.monotonic() > deadline:
            return True
        await asyncio.sleep(0.1)
    return False


# -- sync ------------------------------------------------------------------------


async def _with_progress(loop: SyncLoop | None, work: Awaitable[RunResult], show: bool, label: str) -> RunResult:
    import asyncio

    if not show or loop is None:
        return await work
    task = asyncio.ensure_future(work)
    progress = ProgressLine()
    try:
        while not task.done():
            p = loop.progress
            progress.update(f"{label} " + (_human_counts(p.as_dict()) if p else "starting..."))
            await asyncio.wait([task], timeout=0.125)
    finally:
        progress.clear()  # the summary (or an error) starts on a clean line
    return task.result()


async def cmd_sync(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.agent import Agent

    settings.dataset(args.dataset)
    show = sys.stderr.isatty() and not args.json
    if await _daemon_running(settings):
        out = await _remote_sync(settings, args, show)
    else:
        try:
            async with Agent(settings) as agent:
                loop = agent.loop(args.dataset)
                work = loop.run_once(dry_run=args.dry_run, force=args.force)
                out = (await _with_progress(loop, work, show, f"syncing {args.dataset}:")).as_json()
        except LedgerLocked:  # an agent started meanwhile
            out = await _remote_sync(settings, args, show)
        except LedgerError as exc:  # no run could begin (a damaged ledger, a full disk): still one result
            counts = dict.fromkeys(SYNC_KEYS[3:-1], 0)
            out = {"dataset": args.dataset, "run": None, "status": "failed", **counts, "error": str(exc)}
    out = _sync_json(out)
    if args.json:
        print_json(out)
    else:
        run = f"run {out['run']}" if out.get("run") is not None else "dry run, nothing written"
        print(f"{out['dataset']}: {out['status']} - {_human_counts(out)} ({run})")
        _print_plan(out)
        if out.get("error"):
            print(f"error: {safe_text(out['error'])}", file=sys.stderr)
    return 0 if out["status"] == "ok" else 1


def _print_plan(out: dict[str, Any]) -> None:
    """A dry run's removals and renames, one per line (control characters escaped)."""
    remove, rename = out.get("would_remove"), out.get("would_rename")
    if remove and remove["count"]:
        print(f"would remove {remove['count']}:")
        for key in remove["keys"]:
            print(f"  - {shown(key)}")
        if remove["truncated"]:
            print(f"  ... and {remove['count'] - len(remove['keys'])} more")
    if rename and rename["count"]:
        print(f"would rename {rename['count']}:")
        for r in rename["renames"]:
            print(f"  {shown(r['from'])} -> {shown(r['to'])}")
        if rename["truncated"]:
            print(f"  ... and {rename['count'] - len(rename['renames'])} more")


async def _remote_sync(settings: Settings, args: argparse.Namespace, show: bool) -> dict[str, Any]:
    import asyncio

    from bucketsync.cli.client import AgentClient, ApiCallFailed

    params = {"dry_run": str(args.dry_run).lower(), "force": str(args.force).lower()}
    async with AgentClient(settings) as client:
        while True:
            try:
                started = await client.call("POST", f"/datasets/{args.dataset}/sync", params=params)
                break
            except ApiCallFailed as exc:
                if exc.code != "run_in_progress":
                    raise
                await asyncio.sleep(0.5)  # the daemon's own run is going; ours follows it
        if started.get("status") != "running":
            return dict(started)  # a dry run answers with its result
        run_id = started["run"]
        progress = ProgressLine()
        try:
            while True:
                run = await client.call("GET", f"/datasets/{args.dataset}/runs/{run_id}")
                if run["status"] != "running":
                    return {**run, "dataset": args.dataset, "run": run_id}
                if show:
                    progress.update(f"syncing {args.dataset}: {_human_counts(run)}")
                await asyncio.sleep(0.25)
        finally:
            progress.clear()  # the summary (or an error) starts on a clean line


# -- items and status ----------------------------------------------------------------


async def cmd_items(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.core.model import ItemState

    settings.dataset(args.dataset)
    ledger = await _read_ledger(settings)
    if ledger is None:
        return 0
    try:
        ds_id = await ledger.find_dataset(args.dataset)
        if ds_id is None:
            return 0
        state = None if args.state == "all" else ItemState(args.state)
        async for item in _query(ledger, ds_id, args, state):
            if args.json:
                print_json(item.as_json(full=True))
            elif state is None:
                print(f"{item.size:>12}  {item.as_json()['modified']}  {item.state:<9}  {shown(item.key)}")
            else:
                print(f"{item.size:>12}  {item.as_json()['modified']}  {shown(item.key)}")
    finally:
        await ledger.close()
    return 0


async def _query(ledger: Ledger, ds_id: int, args: argparse.Namespace, state: ItemState | None) -> AsyncIterator[Item]:
    """Every item the --where filter matches, in --sort order, page by page (at most --limit)."""
    from bucketsync.catalog import items as catalog_items
    from bucketsync.catalog import query

    q = catalog_items.Query(
        filter=query.parse_filter(args.where) if args.where else None,
        sort=query.parse_sort(args.sort),
        limit=1000 if args.limit is None else min(args.limit, 1000),
        state=None if state is None else str(state),
        prefix=args.prefix,
    )
    left = args.limit
    while True:
        items, q.cursor = await catalog_items.page(ledger, ds_id, q)
        for item in items:
            yield item
        if left is not None:
            left -= len(items)
            q.limit = min(left, 1000)
        if q.cursor is None or (left is not None and left <= 0):
            return


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.agent import datasets_status
    from bucketsync.cli.client import AgentClient
    from bucketsync.core.model import ItemState

    if await _daemon_running(settings):
        async with AgentClient(settings) as client:
            rows = (await client.call("GET", "/datasets"))["datasets"]
    else:
        ledger = await _read_ledger(settings) if settings.agent.ledger_present() else None
        try:
            rows = await datasets_status(settings, ledger, {})
        finally:
            if ledger is not None:
                await ledger.close()
    failing = [name for r in rows if (name := _failing(r))]
    code = 1 if args.check and failing else 0
    if args.json:
        print_json({"datasets": rows})
        return code
    if not rows:
        print("no datasets configured")
    for r in rows:
        last = r["last_run"]
        last_s = f"{last['status']} at {last['ended'] or last['started']} ({_human_counts(last)})" if last else "never"
        print(f"{r['dataset']}  {r['url']}")
        print(f"  items: {r['items'].get(ItemState.LIVE, 0)} live, {r['items'].get(ItemState.TOMBSTONE, 0)} tombstoned")
        if r.get("kind", "synced") != "synced":
            print(
                f"  {r['kind']} of {r['source']}: {r['items'].get('orphaned', 0)} orphaned, "
                f"{r['items'].get('stale', 0)} stale (their source removed or changed the object)"
            )
        print(f"  last run: {last_s}")
        if r.get("last_run") and r["last_run"].get("error"):
            print(f"  error: {safe_text(r['last_run']['error'])}")
        if last and last.get("gaps"):
            gaps = ", ".join(safe_text(g["prefix"]) for g in last["gaps"][:5])
            more = f" and {len(last['gaps']) - 5} more" if len(last["gaps"]) > 5 else ""
            print(f"  not listed (kept as last seen): {gaps}{more}")
        nxt = r["next_run"] or ("when asked (manual)" if r["sync"] == "manual" else "when the agent runs")
        print(f"  next run: {nxt}")
        if r.get("running"):
            print(f"  running: {_human_counts(r['running'])}")
        if r.get("not_ready_reason"):
            print(f"  not ready: {safe_text(r['not_ready_reason'])}")
        if r.get("downstream") == "unavailable":
            why = safe_text(r["downstream_reason"] or "downstream unavailable")
            print(f"  {why} (writes through bucketsync are refused)")
        if r.get("guard_blocked"):
            print("  guard-blocked: the last run was stopped by the mass-delete guard; nothing is removed until")
            print(f"    a forced run (bucketsync sync {r['dataset']} --force) or the objects come back")
    if args.check and failing:
        print(f"check failed: {', '.join(failing)}", file=sys.stderr)
    return code


async def cmd_ls(settings: Settings, args: argparse.Namespace) -> int:
    """``ls DS[/PREFIX]``: the folders directly under PREFIX (with '/'), then its items, as
    ``rclone lsf`` shows them; from the ledger, beside a running agent too."""
    from bucketsync.catalog import folders
    from bucketsync.core.model import ItemState

    dataset, _, prefix = args.path.partition("/")
    settings.dataset(dataset)
    parent = folders.parent_of(prefix)
    ledger = await _read_ledger(settings)
    if ledger is None:
        return 0
    try:
        ds_id = await ledger.find_dataset(dataset)
        if ds_id is None:
            return 0
        found = await folders.listing(ledger, ds_id, parent)
        for f in found.folders:
            if args.json:
                print_json({"type": "folder", **f.as_json()})
            else:
                print(f"{shown(f.name)}/" if not args.long else f"{f.size:>12}  {f.items:>8} items  {shown(f.name)}/")
        after: str | None = None
        while batch := await ledger.direct_items(ds_id, parent, str(ItemState.LIVE), after, 1000):
            for item in batch:
                name = item.key[len(parent) :]
                if args.json:
                    print_json({"type": "item", **item.as_json(full=True)})
                elif args.long:
                    print(f"{item.size:>12}  {item.as_json()['modified']}  {shown(name)}")
                else:
                    print(shown(name))
            after = batch[-1].key
    finally:
        await ledger.close()
    return 0


async def cmd_datasets(settings: Settings, args: argparse.Namespace) -> int:
    """One line per dataset: name, live items, last run, and the chosen metadata columns."""
    from bucketsync.agent import datasets_status
    from bucketsync.catalog import datasets as catalog_datasets
    from bucketsync.catalog import query
    from bucketsync.cli.client import AgentClient
    from bucketsync.core.model import ItemState

    names = [c.strip() for c in (args.columns or "").split(",") if c.strip()]
    for name in names:
        query.field(name if name.startswith(query.META_PREFIX) else query.META_PREFIX + name, "--columns")
    if await _daemon_running(settings):
        params = {k: v for k, v in (("filter", args.where), ("sort", args.sort)) if v}
        async with AgentClient(settings) as client:
            rows = (await client.call("GET", "/datasets", params=params))["datasets"]
    else:
        ledger = await _read_ledger(settings) if settings.agent.ledger_present() else None
        try:
            wanted = list(settings.datasets)
            if ledger is not None and (args.where or args.sort):
                flt = query.parse_filter(args.where) if args.where else None
                wanted = await catalog_datasets.matching(ledger, flt, args.sort, wanted)
            elif ledger is None and args.where:
                wanted = []  # no ledger, no metadata: nothing matches a filter
            rows = await datasets_status(settings, ledger, {}, wanted)
        finally:
            if ledger is not None:
                await ledger.close()
    if args.json:
        print_json({"datasets": rows})
        return 0
    table = [["DATASET", "ITEMS", "LAST RUN", *names]]
    for r in rows:
        last = r["last_run"]
        table.append(
            [
                r["dataset"],
                str(r["items"].get(ItemState.LIVE, 0)),
                f"{last['status']} {last['ended'] or last['started']}" if last else "never",
                *(shown(v) for v in catalog_datasets.columns(r, names)),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _failing(row: dict[str, Any]) -> str | None:
    """The dataset's name when ``status --check`` should fail for it: its last run failed,
    was guard-aborted or left parts unlisted (partial), or the running agent says it is not ready."""
    last = row.get("last_run") or {}
    if last.get("status") in ("failed", "aborted", "partial") or row.get("ready") is False:
        return str(row["dataset"])
    return None


# -- enrich ----------------------------------------------------------------------------


def _enrich_line(out: dict[str, Any]) -> str:
    return f"{out['dataset']}: {out['done']} done, {out['failed']} failed, {out['pending']} pending"


async def cmd_enrich(settings: Settings, args: argparse.Namespace) -> int:
    """Queue a dataset's items (missing ones, --failed or --all) and enrich them, with progress:
    through the running agent when there is one, else in this process (burst mode)."""
    settings.dataset(args.dataset)
    if not settings.enriches(args.dataset):
        raise ConfigError(
            f"dataset {args.dataset!r} does not enrich: set enrich.enabled = true or datasets.{args.dataset}.enrich"
        )
    mode = "all" if args.all else "failed" if args.failed else "missing"
    progress = ProgressLine() if sys.stderr.isatty() and not args.json else None
    out: dict[str, Any] | None = None
    if not await _daemon_running(settings):
        try:
            out = await _enrich_local(settings, args.dataset, mode, progress)
        except LedgerLocked:
            out = None  # an agent started meanwhile
    if out is None:
        out = await _enrich_remote(settings, args.dataset, mode, progress)
    if progress is not None:
        progress.clear()
    if args.json:
        print_json(out)
    else:
        print(f"{_enrich_line(out)} (queued {out['queued']})")
    return 0 if out["failed"] == 0 else 1


async def _enrich_local(settings: Settings, dataset: str, mode: str, progress: ProgressLine | None) -> dict[str, Any]:
    from bucketsync.agent import Agent
    from bucketsync.enrich import EnrichQueue

    async with Agent(settings) as agent:
        assert agent.ledger is not None
        queue = EnrichQueue(agent.ledger)
        ds_id = await agent.ledger.dataset_id(dataset)
        queued = await queue.requeue(ds_id, mode)
        while True:
            counts = await queue.counts(ds_id)
            if progress is not None:
                progress.update(_enrich_line({"dataset": dataset, **counts}))
            if not await agent.enricher.drain(max_items=settings.agent.enrich_concurrency * 8):
                break
        await agent.triggers.drain()
        return {"dataset": dataset, "enabled": True, **await queue.counts(ds_id), "queued": queued}


async def _enrich_remote(settings: Settings, dataset: str, mode: str, progress: ProgressLine | None) -> dict[str, Any]:
    import asyncio

    from bucketsync.cli.client import AgentClient

    async with AgentClient(settings) as client:
        out = dict(await client.call("POST", f"/datasets/{dataset}/enrich", params={"mode": mode}))
        queued = out["queued"]
        while out["pending"]:
            if progress is not None:
                progress.update(_enrich_line(out))
            await asyncio.sleep(0.5)
            out = dict(await client.call("GET", f"/datasets/{dataset}/enrich"))
        return out | {"queued": queued}


# -- downstream: put, rm, restore, meta ------------------------------------------------


async def _downstream(
    settings: Settings, local: Callable[[Any], Awaitable[Any]], remote: Callable[[AgentClient], Awaitable[Any]]
) -> dict[str, Any]:
    """Through the running agent when there is one, else in this process."""
    from bucketsync.agent import Agent
    from bucketsync.cli.client import AgentClient

    if not await _daemon_running(settings):
        from bucketsync.downstream.ops import Downstream

        try:
            async with Agent(settings) as agent:
                out = await local(Downstream(agent, agent.outbox, in_process=True))
                return dict(out.as_json())
        except LedgerLocked:
            pass  # an agent started meanwhile
    async with AgentClient(settings) as client:
        return dict(await remote(client))


async def _runtime_op(
    settings: Settings, local: Callable[[Any], Awaitable[dict[str, Any]]], path: str, body: dict[str, Any]
) -> dict[str, Any]:
    """Create a runtime dataset through the running agent, else in this process."""
    from bucketsync.agent import Agent
    from bucketsync.cli.client import AgentClient

    if not await _daemon_running(settings):
        try:
            async with Agent(settings) as agent:
                return await local(agent)
        except LedgerLocked:
            pass
    async with AgentClient(settings) as client:
        return dict(await client.call("POST", path, json=body))


async def cmd_clone(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.catalog import query, runtime

    settings.dataset(args.source)
    flt = query.parse_filter(args.where) if args.where else None
    body = {"name": args.name, "with_metadata": args.with_metadata, "filter": flt}
    out = await _runtime_op(
        settings,
        lambda agent: runtime.clone(agent, args.source, args.name, args.with_metadata, flt),
        f"/datasets/{args.source}/clone",
        body,
    )
    return _report(args, out, f"{out['dataset']}: clone of {out['source']}, {out['items']} items")


async def cmd_merge(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.catalog import runtime

    body = {"name": args.name, "sources": args.sources, "on_conflict": args.on_conflict}
    out = await _runtime_op(
        settings,
        lambda agent: runtime.merge(agent, args.name, args.sources, args.on_conflict),
        "/datasets/merge",
        body,
    )
    return _report(args, out, f"{out['dataset']}: merge of {out['source']}, {out['items']} items")


def _item_path(dataset: str, key: str) -> str:
    from urllib.parse import quote

    return f"/datasets/{quote(dataset, safe='')}/items/{quote(key, safe='')}"


def _report(args: argparse.Namespace, out: dict[str, Any], line: str) -> int:
    if args.json:
        print_json(out)
    else:
        print(line)
    return 0


async def cmd_put(settings: Settings, args: argparse.Namespace) -> int:
    import mimetypes
    import os

    from bucketsync.downstream.outbox import file_chunks

    settings.dataset(args.dataset)
    if not os.path.isfile(args.file):
        raise UsageError(f"{args.file}: no such file")
    key = args.key or os.path.basename(args.file)
    ctype = mimetypes.guess_type(key)[0] or "application/octet-stream"
    out = await _downstream(
        settings,
        lambda d: d.put(args.dataset, key, file_chunks(args.file), overwrite=args.overwrite, content_type=ctype),
        lambda c: c.call(
            "PUT",
            _item_path(args.dataset, key),
            params={"overwrite": str(args.overwrite).lower()},
            data=file_chunks(args.file),
            headers={"Content-Type": ctype},
        ),
    )
    item = out.get("item") or {}
    line = f"{out['result']}: {shown(key)} ({item.get('size', '?')} bytes, id {item.get('id', '?')})"
    return _report(args, out, line)


async def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    """Stream the CSV to the running agent; its per-row results stream back (NDJSON)."""
    from pathlib import Path
    from urllib.parse import quote

    from bucketsync.cli.client import AgentClient
    from bucketsync.downstream.outbox import file_chunks

    settings.dataset(args.dataset)
    if not os.path.isfile(args.file):
        raise UsageError(f"{args.file}: no such file")
    if not await _daemon_running(settings):
        raise BucketsyncError("import needs the running agent (bucketsync run): it imports through its API")
    report: dict[str, Any] = {}
    # A CLI command owns its thread: a blocking open of the local report file stalls nothing else.
    out = open(args.report, "w", encoding="utf-8") if args.report else None  # noqa: SIM115, ASYNC230
    try:
        async with AgentClient(settings) as client:
            async for line in client.lines(
                "POST",
                f"/datasets/{quote(args.dataset, safe='')}/import",
                params={"name": Path(args.file).name},
                data=file_chunks(args.file),
                headers={"Content-Type": "text/csv"},
            ):
                if out is not None:
                    out.write(dumps(line) + "\n")
                if "report" in line:
                    report = line["report"]
                elif args.json:
                    print_json(line)
                elif line.get("result") == "failed":
                    print(f"row {line['row']}: failed: {safe_text(str(line.get('reason')))}", file=sys.stderr)
    finally:
        if out is not None:
            out.close()
    if not report:
        raise BucketsyncError("the import ended without its report: the agent stopped before the end?")
    if args.json:
        print_json({"report": report})
    else:
        print(
            f"{report['rows']} rows into {shown(report['folder'])}: {report['created']} created, "
            f"{report['exists']} existed, {report['failed']} failed"
        )
    return 1 if report["failed"] else 0


async def cmd_rm(settings: Settings, args: argparse.Namespace) -> int:
    settings.dataset(args.dataset)
    out = await _downstream(
        settings,
        lambda d: d.delete(args.dataset, args.key),
        lambda c: c.call("DELETE", _item_path(args.dataset, args.key)),
    )
    if out["result"] == "tombstoned":
        line = f"tombstoned: {shown(args.key)} (the driver does not allow deletes; the object stays in storage)"
    else:
        line = f"{out['result']}: {shown(args.key)}"
    return _report(args, out, line)


async def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    settings.dataset(args.dataset)
    out = await _downstream(
        settings,
        lambda d: d.restore(args.dataset, args.key),
        lambda c: c.call("POST", _item_path(args.dataset, args.key) + "/restore"),
    )
    return _report(args, out, f"{out['result']}: {shown(args.key)}")


def meta_value(raw: str, as_string: bool) -> Any:
    """``NAME=VALUE`` stores what the API would store for that JSON value: ``0.9`` a
    number, ``true``/``false`` a boolean, ``null`` a removal, ``"0.9"`` (quoted) a
    string; anything that is not JSON is the string as typed. ``--string`` stores
    every value verbatim as a string."""
    if as_string:
        return raw
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except ValueError:
        return raw
    if isinstance(value, float) and not math.isfinite(value):
        return raw  # 1e999: JSON has no infinity; keep what was typed
    if isinstance(value, dict | list):
        raise UsageError(
            f"{raw!r}: metadata values are strings, numbers, booleans or null (--string stores it as text)"
        )
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def cmd_meta(settings: Settings, args: argparse.Namespace) -> int:
    settings.dataset(args.dataset)
    patch: dict[str, Any] = {}
    for pair in args.pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"{pair!r}: expected NAME=VALUE")
        patch[name] = meta_value(value, args.string)
    for name in args.unset:
        patch[name] = None
    if not patch:
        return await _show_meta(settings, args)
    out = await _downstream(
        settings,
        lambda d: d.patch_meta(args.dataset, args.key, patch),
        lambda c: c.call("PATCH", _item_path(args.dataset, args.key), json={"metadata": patch}),
    )
    meta = (out.get("item") or {}).get("metadata", {})
    return _report(args, out, f"{shown(args.key)}: " + (dumps(meta) if meta else "no metadata"))


async def _show_meta(settings: Settings, args: argparse.Namespace) -> int:
    """``meta DATASET KEY`` alone: the item's user metadata, read from the ledger (beside a
    running agent too, as ``items`` does)."""

    ledger = await _read_ledger(settings) if settings.agent.ledger_present() else None
    try:
        ds_id = await ledger.find_dataset(args.dataset) if ledger is not None else None
        item = await ledger.item(ds_id, args.key) if ledger is not None and ds_id is not None else None
    finally:
        if ledger is not None:
            await ledger.close()
    if item is None:
        raise NotFound(f"dataset {args.dataset!r} has no item {args.key!r}", key=args.key)
    if args.json:
        print_json(item.as_json(full=True))
    elif not item.meta:
        print(f"{shown(args.key)}: no metadata")
    else:
        for name, value in sorted(item.meta.items()):
            print(f"{name}={dumps(value)}")
    return 0


# -- ops: the outbox ---------------------------------------------------------------------


def _op_line(op: dict[str, Any]) -> str:
    error = f"  {op['error_code']}: {safe_text(op['error'])}" if op.get("error") else ""
    return (
        f"{op['id']:>6}  {op['state']:<9}  {op['kind']:<6}  {op['dataset']}  {shown(op['key'])}  "
        f"(attempts {op['attempts']}){error}"
    )


async def _ops_local(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from bucketsync.agent import Agent
    from bucketsync.core.model import OpState
    from bucketsync.downstream import opsctl

    if args.action is None:
        ledger = await _read_ledger(settings)
        if ledger is None:
            return {"ops": [], "backlog": 0}
        try:
            ops = await ledger.ops(state=OpState(args.state) if args.state else None, limit=args.limit)
            return {"ops": [o.as_json() for o in ops], "backlog": await ledger.backlog()}
        finally:
            await ledger.close()
    async with Agent(settings) as agent:
        assert agent.ledger is not None
        if args.action == "cancel":
            return (await opsctl.cancel(agent.ledger, agent.outbox, args.id)).as_json()
        await opsctl.retry(agent.ledger, agent.outbox, args.id)
        # No worker runs without a daemon: run the op here, as `put` does.
        return (await agent.outbox.settle(args.id)).as_json()


async def _ops_remote(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from bucketsync.cli.client import AgentClient

    async with AgentClient(settings) as client:
        if args.action is None:
            params: dict[str, str] = {"limit": str(args.limit)}
            if args.state:
                params["state"] = args.state
            return dict(await client.call("GET", "/ops", params=params))
        return dict(await client.call("POST", f"/ops/{args.id}/{args.action}"))


async def cmd_ops(settings: Settings, args: argparse.Namespace) -> int:
    out: dict[str, Any] | None = None
    if not await _daemon_running(settings):
        try:
            out = await _ops_local(settings, args)
        except LedgerLocked:
            out = None  # an agent started meanwhile: ask it
    if out is None:
        out = await _ops_remote(settings, args)
    if args.json:
        print_json(out)
    elif args.action is None:
        for op in out["ops"]:
            print(_op_line(op))
        print(f"{len(out['ops'])} ops shown; backlog {out['backlog']} pending")
    else:
        print(_op_line(out))
    return 0


# -- check and run ---------------------------------------------------------------------


async def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.stores import open_store
    from bucketsync.upstream.probe import driver_takes_writes, probe

    driver = settings.drivers.get(args.driver)
    if driver is None:
        known = ", ".join(sorted(settings.drivers)) or "none configured"
        raise ConfigError(f"no driver named {args.driver!r} (drivers: {known})")
    store = open_store(driver, settings)
    try:
        result = await probe(store, args.driver, driver.allow_delete, writes=driver_takes_writes(settings, args.driver))
    finally:
        await store.aclose()
    if args.json:
        print_json(result.as_json())
    else:
        for name, c in result.checks.items():
            print(f"{name:<7} {safe_text(c.describe())}")
        if result.leftover:
            print(f"note: the test-file {shown(result.leftover)} could not be removed", file=sys.stderr)
        print(safe_text(result.summary()), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


async def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    from bucketsync.ledger.durability import backup

    source = settings.agent.ledger_file
    if source is None:
        raise UsageError("backup copies a SQLite ledger; back up a PostgreSQL ledger with pg_dump or the server's own")
    target = Path(args.path)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not args.overwrite:
        raise UsageError(f"{target} already exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent} is not a folder")
    if target.exists() and os.path.samefile(target, source):
        raise UsageError(f"{target} is the ledger itself")
    t0 = time.monotonic()
    pages, size = await backup(source, target)
    out = {
        "ledger": str(settings.agent.ledger),
        "backup": str(target),
        "pages": pages,
        "bytes": size,
        "seconds": round(time.monotonic() - t0, 3),
    }
    return _report(args, out, f"backed up {out['ledger']} to {target} ({size} bytes)")


async def cmd_ledger_migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Copy the SQLite ledger into PostgreSQL (ledger/migrate.py), printing progress as it goes."""
    from pathlib import Path

    from bucketsync.config import LEDGER_PASSWORD_ENV
    from bucketsync.ledger.migrate import BadMigration, migrate

    password = os.environ.get(LEDGER_PASSWORD_ENV) or None  # as the agent takes it; the file wins
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --password-file {args.password_file}: {exc.strerror}") from None
    out = sys.stderr if args.json else sys.stdout
    try:
        report = await migrate(
            settings.agent.ledger, args.to, password=password, progress=lambda line: print(line, file=out, flush=True)
        )
    except BadMigration as exc:
        raise UsageError(str(exc)) from None
    tables = report.as_json()["tables"]
    line = (
        f"copied {report.source} to {report.target} in {report.seconds:.1f} s: "
        f"{len(report.datasets)} datasets, {tables.get('items', 0):,} items, {tables.get('runs', 0):,} runs, "
        f"{tables.get('ops', 0):,} ops; counts and checksums verified per dataset. The SQLite file is untouched: "
        f'point agent.ledger at the database ("{report.target}") and start the agent'
    )
    return _report(args, report.as_json(), line)


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.config import load_settings
    from bucketsync.daemon.supervisor import serve

    return await serve(settings, load=lambda: load_settings(args.config))


async def cmd_events_setup(settings: Settings, args: argparse.Namespace) -> int:
    """Print (``--apply``: create) the notification configuration a driver's event source needs."""
    from bucketsync.upstream.events import setup

    plan = setup.plan(settings, args.driver, public_url=args.public_url)
    if args.apply and plan.cannot_apply is None:
        await setup.apply(settings, plan)
    if args.json:
        print_json(plan.as_json())
    else:
        print(plan.text())
    if args.apply and plan.cannot_apply is not None:  # the commands above are the way; say why not ours
        raise UsageError(f"--apply cannot set up {plan.source} for driver {args.driver!r}: {plan.cannot_apply}")
    return 0


# -- operations: reload, healthcheck, doctor ---------------------------------------------


async def cmd_reload(settings: Settings, args: argparse.Namespace) -> int:
    """What SIGHUP does, through the running agent's API (it re-reads its own config file)."""
    from bucketsync.cli.client import AgentClient

    if not await _daemon_running(settings):
        raise BucketsyncError(f"no agent is running on ledger {settings.agent.ledger}; nothing to reload")
    async with AgentClient(settings) as client:
        out = await client.call("POST", "/reload")
    if args.json:
        print_json(out)
    else:
        for what in ("added", "removed", "changed"):
            print(f"{what}: {', '.join(out[what]) or 'none'}")
        print(f"untouched: {len(out['unchanged'])}")
        if out["needs_restart"]:
            print(f"needs a restart to apply: {', '.join(out['needs_restart'])}")
    return 0


async def cmd_healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 if the local agent answers /healthz (or /readyz with --ready), else 1: for HEALTHCHECK and probes."""
    from bucketsync.cli.client import probe_health

    ok, detail = await probe_health(settings, "/readyz" if args.ready else "/healthz", args.timeout)
    print(detail, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


async def cmd_doctor(args: argparse.Namespace) -> int:
    from bucketsync.cli.doctor import run_doctor

    report = await run_doctor(args.config)
    if args.json:
        print_json(report.as_json())
    else:
        print(report.text())
    return 0 if report.ok else 1


def _positive(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {raw!r}")
    return int(raw)


class UsageError(BucketsyncError):
    """Bad arguments on the command line (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bucketsync", description="Keep dataset catalogs in sync with object storage.")
    config_help = "TOML config (default: $BUCKETSYNC_CONFIG, else ./bucketsync.toml)"
    p.add_argument("-c", "--config", help=config_help)
    p.add_argument("--version", action="version", version=f"bucketsync {__version__}")
    # -c also after the subcommand (``bucketsync items photos -c prod.toml``); SUPPRESS
    # keeps a subcommand that was not given -c from resetting the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    command("run", "run the agent: sync loops, HTTP API, /metrics").set_defaults(func=cmd_run)

    ini = command("init", "write a commented starter config (never over an existing file)")
    ini.add_argument(
        "path", nargs="?", default="bucketsync.toml", help="where to write it (default: ./bucketsync.toml)"
    )
    ini.set_defaults(func=None)

    b = command("backup", "copy the ledger to PATH (safe while the agent runs)")
    b.add_argument("path", help="the copy's file name, or a folder to put it in")
    b.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_backup)

    s = command("sync", "run one upstream sync of a dataset now")
    s.add_argument("dataset", help="the dataset's name in the config")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    s.add_argument("--force", action="store_true", help="let the run pass the mass-delete guard")
    s.set_defaults(func=cmd_sync)

    en = command("enrich", "enrich a dataset's items now (backfill; --failed or --all re-run), with progress")
    en.add_argument("dataset", help="the dataset's name in the config")
    which = en.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="re-enrich every item")
    which.add_argument("--failed", action="store_true", help="re-enrich the items whose enrichment failed")
    en.add_argument("--json", action="store_true", help="print one JSON object")
    en.set_defaults(func=cmd_enrich)

    i = command("items", "list a dataset's items (live ones unless --state says otherwise)")
    i.add_argument("dataset", help="the dataset's name in the config")
    i.add_argument("--prefix", default="", help="only keys starting with this")
    i.add_argument(
        "--state", choices=["live", "tombstone", "all"], default="live", help="which items to list (default: live)"
    )
    i.add_argument(
        "--json", action="store_true", help="one JSON object per line, with metadata, content type and version"
    )
    i.add_argument(
        "--where",
        metavar="FILTER",
        help='a JSON filter (docs/catalog.md), e.g. \'{"size": {"$gt": 1024}, "metadata.camera": "x100"}\'',
    )
    i.add_argument("--sort", metavar="FIELD", help="order by FIELD, or -FIELD descending (default: key)")
    i.add_argument("--limit", type=_positive, metavar="N", help="at most N items")
    i.set_defaults(func=cmd_items)

    ls = command("ls", "folders (ending in '/') then items directly under DATASET[/PREFIX], from the ledger")
    ls.add_argument("path", metavar="DATASET[/PREFIX]", help="a dataset, or a folder in it: photos/2024/03")
    ls.add_argument("-l", "--long", action="store_true", help="sizes, item counts and modified times too")
    ls.add_argument("--json", action="store_true", help="one JSON object per line, with a type: folder or item")
    ls.set_defaults(func=cmd_ls)

    cl = command("clone", "create a runtime dataset of pointer items to SOURCE's items (nothing copied in storage)")
    cl.add_argument("source", help="a synced dataset")
    cl.add_argument("name", help="the clone's name")
    cl.add_argument("--with-metadata", action="store_true", help="copy the items' user metadata (then the clone's own)")
    cl.add_argument("--where", metavar="FILTER", help="only the items this JSON filter matches")
    cl.add_argument("--json", action="store_true", help="print one JSON object")
    cl.set_defaults(func=cmd_clone)

    mg = command("merge", "create a runtime dataset of pointer items to several synced datasets' items")
    mg.add_argument("name", help="the merge's name")
    mg.add_argument("sources", nargs="+", help="two or more synced datasets")
    mg.add_argument(
        "--on-conflict",
        choices=["folder", "suffix", "merge"],
        default="folder",
        help="a key in several sources: a folder per source (default), a ~SOURCE suffix, or one item",
    )
    mg.add_argument("--json", action="store_true", help="print one JSON object")
    mg.set_defaults(func=cmd_merge)

    dl = command("datasets", "one line per dataset; --where/--sort by its metadata, --columns shows metadata")
    dl.add_argument("--where", metavar="FILTER", help="a JSON filter over name, created, metadata.NAME")
    dl.add_argument("--sort", metavar="FIELD", help="name, created or metadata.NAME; --sort=-FIELD descending")
    dl.add_argument("--columns", metavar="NAMES", help="metadata names to show as columns, comma-separated")
    dl.add_argument("--json", action="store_true", help="print one JSON object (as status --json)")
    dl.set_defaults(func=cmd_datasets)

    st = command("status", "every dataset: items, last run, next run")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a dataset's last run failed, was stopped by the guard or could not list a part "
        "(partial), or it is not ready",
    )
    st.set_defaults(func=cmd_status)

    c = command("check", "probe a driver's permissions: list, get; put unless read-only; delete with allow_delete")
    c.add_argument("driver", help="the driver's name in the config")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd_check)

    pu = command("put", "write a file to the dataset's bucket and index it")
    pu.add_argument("dataset", help="the dataset's name in the config")
    pu.add_argument("file", help="the local file to upload")
    pu.add_argument("--key", help="the item's key (default: the file's name)")
    pu.add_argument("--overwrite", action="store_true", help="replace an existing item (if unchanged in storage)")
    pu.add_argument("--json", action="store_true", help="print one JSON object")
    pu.set_defaults(func=cmd_put)

    im = command(
        "import",
        "import a CSV of URLs (url,name,action,mimetype,item_metadata,item_description) as linked or uploaded "
        "items in the folder named after it, through the running agent; exit 1 if a row failed",
    )
    im.add_argument("dataset", help="the dataset's name in the config")
    im.add_argument("file", help="the CSV file (FILE.csv: items land in the folder FILE/)")
    im.add_argument("--report", metavar="FILE", help="write every row's result and the report there (NDJSON)")
    im.add_argument("--json", action="store_true", help="print each row's result and the report as JSON lines")
    im.set_defaults(func=cmd_import)

    rm = command("rm", "delete an item (a tombstone unless the driver allows deletes)")
    rm.add_argument("dataset", help="the dataset's name in the config")
    rm.add_argument("key", help="the item's key")
    rm.add_argument("--json", action="store_true", help="print one JSON object")
    rm.set_defaults(func=cmd_rm)

    rs = command("restore", "bring a tombstoned item back")
    rs.add_argument("dataset", help="the dataset's name in the config")
    rs.add_argument("key", help="the item's key")
    rs.add_argument("--json", action="store_true", help="print one JSON object")
    rs.set_defaults(func=cmd_restore)

    me = command("meta", "show an item's user metadata, or set and remove names")
    me.add_argument("dataset", help="the dataset's name in the config")
    me.add_argument("key", help="the item's key")
    me.add_argument(
        "pairs",
        nargs="*",
        metavar="NAME=VALUE",
        help='set NAME to the JSON value VALUE (0.9, true, null removes, "text"); '
        "a VALUE that is not JSON is a string; none given: show the metadata",
    )
    me.add_argument("--unset", action="append", default=[], metavar="NAME", help="remove a metadata name")
    me.add_argument("--string", action="store_true", help="store every VALUE as a string, exactly as typed")
    me.add_argument("--json", action="store_true", help="print one JSON object")
    me.set_defaults(func=cmd_meta)

    rl = command("reload", "make the running agent re-read its config (as SIGHUP does)")
    rl.add_argument("--json", action="store_true", help="print one JSON object")
    rl.set_defaults(func=cmd_reload)

    ev = command("events", 'event sources of drivers (sync = "events")')
    ev_actions = ev.add_subparsers(dest="action", metavar="ACTION", required=True)
    text = "print the notification configuration a driver's event source needs; --apply creates it"
    es = ev_actions.add_parser("setup", help=text, description=text, parents=[common])
    es.add_argument("driver", help="the driver's name in the config")
    es.add_argument(
        "--apply", action="store_true", help="create it (sqs: the queue, its policy, the bucket notification)"
    )
    es.add_argument("--public-url", help="the agent's URL as push webhooks reach it (default: from agent.listen)")
    es.add_argument("--json", action="store_true", help="print one JSON object")
    es.set_defaults(func=cmd_events_setup)

    le = command("ledger", "the ledger itself: move it to PostgreSQL")
    le_actions = le.add_subparsers(dest="action", metavar="ACTION", required=True)
    text = "copy the SQLite ledger (agent.ledger; the agent stopped) into an empty PostgreSQL database, verified"
    lm = le_actions.add_parser("migrate", help=text, description=text, parents=[common])
    lm.add_argument("--to", required=True, metavar="URL", help="the target: postgresql://USER@HOST:PORT/DATABASE")
    lm.add_argument("--password-file", help="a file holding the target's password (else the URL's, or PGPASSWORD)")
    lm.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    lm.set_defaults(func=cmd_ledger_migrate)

    hc = command("healthcheck", "exit 0 if the local agent is alive (--ready: and ready), else 1")
    hc.add_argument("--ready", action="store_true", help="check /readyz (every dataset probed) instead of /healthz")
    hc.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer (default 3)")
    hc.set_defaults(func=cmd_healthcheck)

    dr = command("doctor", "check a config end to end: parse, probes, ledger, port, clock")
    dr.add_argument("--json", action="store_true", help="print one JSON object")
    dr.set_defaults(func=None)

    op = command("ops", "outbox ops (writes to storage): list, retry a failed one, cancel one")
    op.add_argument("--state", choices=["pending", "done", "failed", "cancelled"], help="only ops in this state")
    op.add_argument("--limit", type=int, default=100, help="at most this many ops (default 100)")
    op.add_argument("--json", action="store_true", help="print one JSON object")
    op.set_defaults(func=cmd_ops, action=None)
    actions = op.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (
        ("retry", "queue a failed op again (its uploaded body must still be staged)"),
        ("cancel", "cancel a pending or failed op and drop its staged body (storage is not touched)"),
    ):
        a = actions.add_parser(name, help=text, description=text, parents=[common])
        a.add_argument("id", type=int, help="the op's id (see `bucketsync ops`)")
        # SUPPRESS: without --json here, the value given before ACTION stands.
        a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the op as JSON")
    return p


def _init(path: str) -> int:
    from pathlib import Path

    from bucketsync.cli.starter import write_starter

    written = write_starter(Path(path))
    print(f"wrote {written}: edit its [drivers] and [datasets], then `bucketsync -c {written} run`")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives NAME=VALUE pairs that follow an option (``meta DS KEY --string a=1``)
    # to nobody: they belong to ``meta``'s pairs wherever they stand.
    if extra and args.command == "meta" and all("=" in e and not e.startswith("-") for e in extra):
        args.pairs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


#: API error codes that mean the command line asked for something invalid (exit 2)
USAGE_CODES = (
    "invalid_key",
    "invalid_request",
    "invalid_metadata",
    "invalid_parameter",
    "invalid_filter",
    "invalid_csv",
)


def entry(argv: list[str] | None = None) -> int:
    """The ``bucketsync`` command: ``main`` with the collector off until the command's work
    starts (``_run``), then the objects left are frozen (``gc.freeze``).

    Start-up (the imports, the config model) allocates a few hundred thousand objects that live
    as long as the process: the collector's passes over them free nothing (38-44 ms of a local
    sync's start), and every collection during the work walked them again. ``_run`` freezes
    them and turns the collector back on for the work itself.

    An interpreter's exit ends with a full collection over every object still alive: 0.2-0.3 s
    of CPU after a sync of 20,000 objects, a tenth of the whole process. By then the command
    has closed what it opened (ledger, sessions, logs), so freezing them leaves the exit to
    free them by reference count alone. Not in ``main``: a process that calls it and goes on
    (the tests) must keep collecting.
    """
    import gc

    gc.disable()
    try:
        return main(argv)
    finally:
        gc.freeze()


def _run(work: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run`` of a command's work; from ``entry``, with the collector back on and what
    start-up built frozen. Called from ``main`` in a process that collects (the tests), it
    changes nothing."""
    import asyncio
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()
    return asyncio.run(work)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "doctor":  # reports a broken config instead of stopping at it
        from bucketsync.logs import configure

        configure("error", "auto")
        return _run(cmd_doctor(args))
    try:
        try:
            return _main(args)
        finally:
            sys.stdout.flush()  # a closed pipe surfaces here, not at exit
    except BrokenPipeError:
        # ``bucketsync items DS | head -1``: the reader has all it wanted. Exit like a
        # program killed by SIGPIPE would (128 + 13), without a traceback; the null
        # device takes the rest of the buffered output so the exit itself stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _main(args: argparse.Namespace) -> int:
    import sqlite3

    from bucketsync.config import load_settings
    from bucketsync.ledger.durability import ledger_error
    from bucketsync.logs import configure

    settings: Settings | None = None
    try:
        if args.command == "init":
            return _init(args.path)
        settings = load_settings(args.config)
        conf = settings.agent
        # One-off commands keep stderr for warnings and the progress line.
        configure(conf.log_level if args.command == "run" else "warning", conf.log_format)
        func: Command = args.func
        return _run(func(settings, args))
    except (ConfigError, InvalidKey, UsageError) as exc:
        _error(exc)
        return 2
    except ValueError as exc:  # bad metadata names or values
        _error(exc)
        return 2
    except BucketsyncError as exc:
        from bucketsync.cli.client import ApiCallFailed

        if isinstance(exc, ApiCallFailed):
            _error(f"{exc} ({exc.status} {exc.code})")
            return 2 if exc.status in (400, 404) and exc.code in USAGE_CODES else 1
        _error(exc)
        return 1
    except sqlite3.Error as exc:  # a ledger failure the ledger did not translate (a damaged page on a read)
        assert settings is not None
        from pathlib import Path

        print(f"bucketsync: {ledger_error(Path(settings.agent.ledger), exc, 'read')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _error(exc: object) -> None:
    print(f"bucketsync: {safe_text(str(exc))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
