"""The ``bucketsync`` command.

Commands that write the ledger (``sync``) run in-process when no agent is
running, and through the running agent's HTTP API when one holds the ledger's
lock. ``items`` reads the ledger directly (SQLite WAL allows it beside a daemon).
Exit codes: 0 success, 1 a run or check that failed, 2 bad config or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from bucketsync import __version__
from bucketsync.agent import Agent, dataset_status
from bucketsync.client import AgentClient, ApiCallFailed
from bucketsync.config import Settings, load_settings
from bucketsync.durability import ledger_error
from bucketsync.errors import BucketsyncError, ConfigError, InvalidKey, LedgerError, LedgerLocked
from bucketsync.ledger import InstanceLock, Ledger
from bucketsync.logs import configure
from bucketsync.model import ItemState
from bucketsync.outbox import file_chunks
from bucketsync.probe import probe
from bucketsync.stores import open_store
from bucketsync.sync import RunResult, SyncLoop

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


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


def _sync_json(raw: dict[str, Any]) -> dict[str, Any]:
    """The documented shape of ``sync --json``, whether the run was local or the daemon's."""
    return {k: raw.get(k) for k in SYNC_KEYS} | {"gaps": raw.get("gaps") or [], "dry_run": bool(raw.get("dry_run"))}


def _daemon_running(settings: Settings) -> bool:
    return InstanceLock(settings.agent.ledger).held_by_other()


# -- sync ------------------------------------------------------------------------


async def _with_progress(loop: SyncLoop | None, work: Awaitable[RunResult], show: bool, label: str) -> RunResult:
    if not show or loop is None:
        return await work
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    task = asyncio.ensure_future(work)
    with Live(console=console, refresh_per_second=8, transient=True) as live:
        while not task.done():
            p = loop.progress
            live.update(f"[bold]{label}[/] " + (_human_counts(p.as_dict()) if p else "starting..."))
            await asyncio.wait([task], timeout=0.125)
    return task.result()


async def cmd_sync(settings: Settings, args: argparse.Namespace) -> int:
    settings.dataset(args.dataset)
    show = sys.stderr.isatty() and not args.json
    if _daemon_running(settings):
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
        _print_json(out)
    else:
        run = f"run {out['run']}" if out.get("run") is not None else "dry run, nothing written"
        print(f"{out['dataset']}: {out['status']} - {_human_counts(out)} ({run})")
        if out.get("error"):
            print(f"error: {out['error']}", file=sys.stderr)
    return 0 if out["status"] == "ok" else 1


async def _remote_sync(settings: Settings, args: argparse.Namespace, show: bool) -> dict[str, Any]:
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
        while True:
            run = await client.call("GET", f"/datasets/{args.dataset}/runs/{run_id}")
            if run["status"] != "running":
                return {**run, "dataset": args.dataset, "run": run_id}
            if show:
                print(f"\rsyncing {args.dataset}: {_human_counts(run)}", end="", file=sys.stderr)
            await asyncio.sleep(0.25)


# -- items and status ----------------------------------------------------------------


async def cmd_items(settings: Settings, args: argparse.Namespace) -> int:
    settings.dataset(args.dataset)
    if not settings.agent.ledger.exists():
        return 0
    ledger = await Ledger.open(settings.agent.ledger, readonly=True)
    try:
        ds_id = await ledger.find_dataset(args.dataset)
        if ds_id is None:
            return 0
        async for item in ledger.iter_items(ds_id, prefix=args.prefix):
            if args.json:
                _print_json(item.as_json())
            else:
                print(f"{item.size:>12}  {item.as_json()['modified']}  {item.key}")
    finally:
        await ledger.close()
    return 0


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    if _daemon_running(settings):
        async with AgentClient(settings) as client:
            rows = (await client.call("GET", "/datasets"))["datasets"]
    else:
        ledger = await Ledger.open(settings.agent.ledger, readonly=True) if settings.agent.ledger.exists() else None
        try:
            rows = [await dataset_status(settings, ledger, name, None) for name in settings.datasets]
        finally:
            if ledger is not None:
                await ledger.close()
    if args.json:
        _print_json({"datasets": rows})
        return 0
    if not rows:
        print("no datasets configured")
    for r in rows:
        last = r["last_run"]
        last_s = f"{last['status']} at {last['ended'] or last['started']} ({_human_counts(last)})" if last else "never"
        print(f"{r['dataset']}  {r['url']}")
        print(f"  items: {r['items'].get(ItemState.LIVE, 0)} live, {r['items'].get(ItemState.TOMBSTONE, 0)} tombstoned")
        print(f"  last run: {last_s}")
        if r.get("last_run") and r["last_run"].get("error"):
            print(f"  error: {r['last_run']['error']}")
        nxt = r["next_run"] or ("when asked (manual)" if r["sync"] == "manual" else "when the agent runs")
        print(f"  next run: {nxt}")
        if r.get("running"):
            print(f"  running: {_human_counts(r['running'])}")
        if r.get("not_ready_reason"):
            print(f"  not ready: {r['not_ready_reason']}")
    return 0


# -- downstream: put, rm, restore, meta ------------------------------------------------


async def _downstream(
    settings: Settings, local: Callable[[Any], Awaitable[Any]], remote: Callable[[AgentClient], Awaitable[Any]]
) -> dict[str, Any]:
    """Through the running agent when there is one, else in this process."""
    if not _daemon_running(settings):
        from bucketsync.downstream import Downstream

        try:
            async with Agent(settings) as agent:
                out = await local(Downstream(agent, agent.outbox, in_process=True))
                return dict(out.as_json())
        except LedgerLocked:
            pass  # an agent started meanwhile
    async with AgentClient(settings) as client:
        return dict(await remote(client))


def _item_path(dataset: str, key: str) -> str:
    from urllib.parse import quote

    return f"/datasets/{quote(dataset, safe='')}/items/{quote(key, safe='')}"


def _report(args: argparse.Namespace, out: dict[str, Any], line: str) -> int:
    if args.json:
        _print_json(out)
    else:
        print(line)
    return 0


async def cmd_put(settings: Settings, args: argparse.Namespace) -> int:
    import mimetypes
    import os

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
    return _report(args, out, f"{out['result']}: {key} ({item.get('size', '?')} bytes, id {item.get('id', '?')})")


async def cmd_rm(settings: Settings, args: argparse.Namespace) -> int:
    settings.dataset(args.dataset)
    out = await _downstream(
        settings,
        lambda d: d.delete(args.dataset, args.key),
        lambda c: c.call("DELETE", _item_path(args.dataset, args.key)),
    )
    if out["result"] == "tombstoned":
        line = f"tombstoned: {args.key} (the driver does not allow deletes; the object stays in storage)"
    else:
        line = f"{out['result']}: {args.key}"
    return _report(args, out, line)


async def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    settings.dataset(args.dataset)
    out = await _downstream(
        settings,
        lambda d: d.restore(args.dataset, args.key),
        lambda c: c.call("POST", _item_path(args.dataset, args.key) + "/restore"),
    )
    return _report(args, out, f"{out['result']}: {args.key}")


async def cmd_meta(settings: Settings, args: argparse.Namespace) -> int:
    settings.dataset(args.dataset)
    patch: dict[str, Any] = {}
    for pair in args.pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"{pair!r}: expected NAME=VALUE")
        patch[name] = value
    for name in args.unset:
        patch[name] = None
    if not patch:
        raise UsageError("nothing to change: give NAME=VALUE pairs or --unset NAME")
    out = await _downstream(
        settings,
        lambda d: d.patch_meta(args.dataset, args.key, patch),
        lambda c: c.call("PATCH", _item_path(args.dataset, args.key), json={"metadata": patch}),
    )
    meta = (out.get("item") or {}).get("metadata", {})
    return _report(args, out, f"{args.key}: " + (json.dumps(meta, ensure_ascii=False) if meta else "no metadata"))


# -- ops: the outbox ---------------------------------------------------------------------


def _op_line(op: dict[str, Any]) -> str:
    error = f"  {op['error_code']}: {op['error']}" if op.get("error") else ""
    key = json.dumps(op["key"], ensure_ascii=False)[1:-1]  # control characters escaped
    return (
        f"{op['id']:>6}  {op['state']:<9}  {op['kind']:<6}  {op['dataset']}  {key}  (attempts {op['attempts']}){error}"
    )


async def _ops_local(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from bucketsync import opsctl
    from bucketsync.model import OpState

    path = settings.agent.ledger
    if args.action is None:
        if not path.exists():
            return {"ops": [], "backlog": 0}
        ledger = await Ledger.open(path, readonly=True)
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
    async with AgentClient(settings) as client:
        if args.action is None:
            params: dict[str, str] = {"limit": str(args.limit)}
            if args.state:
                params["state"] = args.state
            return dict(await client.call("GET", "/ops", params=params))
        return dict(await client.call("POST", f"/ops/{args.id}/{args.action}"))


async def cmd_ops(settings: Settings, args: argparse.Namespace) -> int:
    out: dict[str, Any] | None = None
    if not _daemon_running(settings):
        try:
            out = await _ops_local(settings, args)
        except LedgerLocked:
            out = None  # an agent started meanwhile: ask it
    if out is None:
        out = await _ops_remote(settings, args)
    if args.json:
        _print_json(out)
    elif args.action is None:
        for op in out["ops"]:
            print(_op_line(op))
        print(f"{len(out['ops'])} ops shown; backlog {out['backlog']} pending")
    else:
        print(_op_line(out))
    return 0


# -- check and run ---------------------------------------------------------------------


async def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    driver = settings.drivers.get(args.driver)
    if driver is None:
        known = ", ".join(sorted(settings.drivers)) or "none configured"
        raise ConfigError(f"no driver named {args.driver!r} (drivers: {known})")
    store = open_store(driver, settings)
    try:
        result = await probe(store, args.driver, driver.allow_delete)
    finally:
        await store.aclose()
    if args.json:
        _print_json(result.as_json())
    else:
        for name, c in result.checks.items():
            mark = "ok" if c.ok else ("MISSING" if c.required else "missing (not required)")
            print(f"{name:<7} {mark}" + (f"  {c.error}" if c.error and not c.ok else ""))
        print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


async def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    from bucketsync.durability import backup

    target = Path(args.path)
    if target.is_dir():
        target = target / settings.agent.ledger.name
    if target.exists() and not args.overwrite:
        raise UsageError(f"{target} already exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent} is not a folder")
    if target.exists() and os.path.samefile(target, settings.agent.ledger):
        raise UsageError(f"{target} is the ledger itself")
    t0 = time.monotonic()
    pages, size = await backup(settings.agent.ledger, target)
    out = {
        "ledger": str(settings.agent.ledger),
        "backup": str(target),
        "pages": pages,
        "bytes": size,
        "seconds": round(time.monotonic() - t0, 3),
    }
    return _report(args, out, f"backed up {out['ledger']} to {target} ({size} bytes)")


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from bucketsync.supervisor import serve

    return await serve(settings)


class UsageError(BucketsyncError):
    """Bad arguments on the command line (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bucketsync", description="Keep dataset catalogs in sync with object storage.")
    p.add_argument("-c", "--config", help="TOML config (default: $BUCKETSYNC_CONFIG, else ./bucketsync.toml)")
    p.add_argument("--version", action="version", version=f"bucketsync {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="run the agent: sync loops, HTTP API, /metrics").set_defaults(func=cmd_run)

    ini = sub.add_parser("init", help="write a commented starter config (never over an existing file)")
    ini.add_argument(
        "path", nargs="?", default="bucketsync.toml", help="where to write it (default: ./bucketsync.toml)"
    )
    ini.set_defaults(func=None)

    b = sub.add_parser("backup", help="copy the ledger to PATH (safe while the agent runs)")
    b.add_argument("path", help="the copy's file name, or a folder to put it in")
    b.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_backup)

    s = sub.add_parser("sync", help="run one upstream sync of a dataset now")
    s.add_argument("dataset")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    s.add_argument("--force", action="store_true", help="let the run pass the mass-delete guard")
    s.set_defaults(func=cmd_sync)

    i = sub.add_parser("items", help="list a dataset's live items")
    i.add_argument("dataset")
    i.add_argument("--prefix", default="", help="only keys starting with this")
    i.add_argument("--json", action="store_true", help="one JSON object per line")
    i.set_defaults(func=cmd_items)

    st = sub.add_parser("status", help="every dataset: items, last run, next run")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("check", help="probe a driver's permissions (list, get, put, delete)")
    c.add_argument("driver")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)

    pu = sub.add_parser("put", help="write a file to the dataset's bucket and index it")
    pu.add_argument("dataset")
    pu.add_argument("file")
    pu.add_argument("--key", help="the item's key (default: the file's name)")
    pu.add_argument("--overwrite", action="store_true", help="replace an existing item (if unchanged in storage)")
    pu.add_argument("--json", action="store_true")
    pu.set_defaults(func=cmd_put)

    rm = sub.add_parser("rm", help="delete an item (a tombstone unless the driver allows deletes)")
    rm.add_argument("dataset")
    rm.add_argument("key")
    rm.add_argument("--json", action="store_true")
    rm.set_defaults(func=cmd_rm)

    rs = sub.add_parser("restore", help="bring a tombstoned item back")
    rs.add_argument("dataset")
    rs.add_argument("key")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=cmd_restore)

    me = sub.add_parser("meta", help="set user metadata on an item: NAME=VALUE ...")
    me.add_argument("dataset")
    me.add_argument("key")
    me.add_argument("pairs", nargs="*", metavar="NAME=VALUE")
    me.add_argument("--unset", action="append", default=[], metavar="NAME", help="remove a metadata name")
    me.add_argument("--json", action="store_true")
    me.set_defaults(func=cmd_meta)

    op = sub.add_parser("ops", help="outbox ops (writes to storage): list, retry a failed one, cancel one")
    op.add_argument("--state", choices=["pending", "done", "failed", "cancelled"], help="only ops in this state")
    op.add_argument("--limit", type=int, default=100, help="at most this many ops (default 100)")
    op.add_argument("--json", action="store_true", help="print one JSON object")
    op.set_defaults(func=cmd_ops, action=None)
    actions = op.add_subparsers(dest="action", metavar="ACTION")
    for name, text in (
        ("retry", "queue a failed op again (its uploaded body must still be staged)"),
        ("cancel", "cancel a pending or failed op and drop its staged body (storage is not touched)"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("id", type=int, help="the op's id (see `bucketsync ops`)")
        # SUPPRESS: without --json here, the value given before ACTION stands.
        a.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the op as JSON")
    return p


def _init(path: str) -> int:
    from pathlib import Path

    from bucketsync.starter import write_starter

    written = write_starter(Path(path))
    print(f"wrote {written}: edit its [drivers] and [datasets], then `bucketsync -c {written} run`")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings: Settings | None = None
    try:
        if args.command == "init":
            return _init(args.path)
        settings = load_settings(args.config)
        conf = settings.agent
        # One-off commands keep stderr for warnings and the progress line.
        configure(conf.log_level if args.command == "run" else "warning", conf.log_format)
        func: Command = args.func
        return asyncio.run(func(settings, args))
    except (ConfigError, InvalidKey, UsageError) as exc:
        print(f"bucketsync: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad metadata names or values
        print(f"bucketsync: {exc}", file=sys.stderr)
        return 2
    except ApiCallFailed as exc:
        print(f"bucketsync: {exc} ({exc.status} {exc.code})", file=sys.stderr)
        return (
            2
            if exc.status in (400, 404)
            and exc.code in ("invalid_key", "invalid_request", "invalid_metadata", "invalid_parameter")
            else 1
        )
    except BucketsyncError as exc:
        print(f"bucketsync: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # a ledger failure the ledger did not translate (a damaged page on a read)
        assert settings is not None
        print(f"bucketsync: {ledger_error(settings.agent.ledger, exc, 'read')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
