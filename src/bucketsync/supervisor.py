"""The daemon: sync loops, the HTTP server, signals, and a graceful drain.

SIGTERM/SIGINT set one stop event. Runs notice it after their current batch
commits and end (nothing removed), the server stops, and anything still busy
after ``agent.grace`` seconds is cancelled. A dataset whose probe or runs fail is
logged, counted and retried with backoff; it never stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
from typing import Any

import structlog
from aiohttp import web

from bucketsync import durability, failpoints, metrics
from bucketsync.agent import Agent
from bucketsync.api import TASKS, make_app
from bucketsync.config import Settings
from bucketsync.errors import BucketsyncError, ConfigError, LedgerError
from bucketsync.probe import probe
from bucketsync.retry import backoff
from bucketsync.sync import RunResult

log = structlog.get_logger("bucketsync.supervisor")


#: a dead dataset loop is restarted after a backoff that grows to this many seconds
RESTART_CAP = 300.0
#: while ledger writes fail (a full disk), a tiny write is tried this often to notice recovery
HEAL_INTERVAL = 2.0


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _dataset(agent: Agent, name: str, stop: asyncio.Event) -> None:
    """Keep one dataset's loop alive. A loop that dies (any exception escaping it) is
    logged with the dataset, counted, shown as not ready with the reason, and restarted
    with backoff; it never takes the agent or the other datasets down."""
    deaths = 0
    while not stop.is_set():
        try:
            await _run_dataset(agent, name, stop, dead=deaths > 0)
            return
        except Exception as exc:
            deaths += 1
            delay = 1.0 + backoff(deaths, 2.0, RESTART_CAP)
            agent.not_ready[name] = f"sync loop died ({_describe(exc)}); restart {deaths} in {delay:.0f}s"
            metrics.LOOP_RESTARTS.labels(name).inc()
            log.error(
                "dataset loop died; restarting it",
                dataset=name,
                error=_describe(exc),
                restarts=deaths,
                retry_in=round(delay, 1),
                exc_info=exc,
            )
            await _sleep(stop, delay)


async def _run_dataset(agent: Agent, name: str, stop: asyncio.Event, *, dead: bool) -> None:
    """Probe the driver until it passes, then run the dataset's loop."""
    loop = agent.loop(name)
    driver_name = agent.settings.datasets[name].driver
    driver = agent.settings.drivers[driver_name]
    failpoints.raises("supervisor.dataset_start")
    attempt = 0
    while not stop.is_set():
        result = await probe(loop.store, driver_name, driver.allow_delete)
        if result.ok:
            if not dead:  # a restarted loop is ready once a run of it completes
                agent.not_ready.pop(name, None)
            break
        attempt += 1
        agent.not_ready[name] = result.summary()
        metrics.LOOP_ERRORS.labels(name).inc()
        log.error("dataset not ready: permission probe failed", dataset=name, reason=result.summary())
        await _sleep(stop, min(loop.config.interval, 5 + backoff(attempt, 5, 300)))
    if stop.is_set():
        return
    await agent.refresh_item_gauges(name)

    def on_error(exc: Exception) -> None:
        agent.not_ready[name] = f"sync loop error: {_describe(exc)}"

    def on_result(result: RunResult) -> None:
        if (agent.not_ready.get(name) or "").startswith("sync loop"):
            agent.not_ready.pop(name, None)

    await loop.run(stop, on_error=on_error, on_result=on_result)


async def _heal_ledger(agent: Agent, stop: asyncio.Event) -> None:
    """While ledger writes fail, try a tiny write now and then: the first that commits
    clears the fault (``/readyz`` turns ready), with no restart and no waiting for the
    next run or request to try."""
    while not stop.is_set():
        await _sleep(stop, HEAL_INTERVAL)
        ledger = agent.ledger
        if ledger is not None and ledger.fault is not None:
            with contextlib.suppress(LedgerError):
                await ledger.probe_write()


async def _check_ledger(agent: Agent) -> str:
    """The start-up ``quick_check``: damage makes the agent not ready (it keeps serving
    what it can read), and the log and a metric say what to do. Returns the result."""
    try:
        result = await durability.quick_check(agent.settings.agent.ledger)
    except (sqlite3.Error, OSError) as exc:  # the check must not stop an agent whose ledger opened
        log.warning("ledger quick_check could not run", error=str(exc))
        return "not run"
    if result.result == "damaged":
        agent.ledger_problem = (
            f"the ledger is damaged ({result.summary()}); {durability.damaged_hint(agent.settings.agent.ledger)}"
        )
    return result.result


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, BucketsyncError) else f"{type(exc).__name__}: {text}"


async def serve(settings: Settings) -> int:
    conf = settings.agent
    if not conf.is_loopback() and conf.token() is None:
        raise ConfigError(
            f"agent.listen: {conf.listen} is not a loopback address and no API token is set; "
            "set agent.api_token or agent.api_token_file, or listen on 127.0.0.1"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Agent(settings) as agent:
        app = make_app(agent, stop)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, conf.host, conf.port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            agent.discard_new_ledger = True  # a start that fails leaves no ledger it created behind
            raise ConfigError(f"agent.listen: cannot listen on {conf.listen}: {exc.strerror}") from None
        for name in agent.settings.datasets:
            agent.not_ready[name] = "permission probe not run yet"
        check = await _check_ledger(agent)
        tasks = {name: asyncio.create_task(_dataset(agent, name, stop), name=f"dataset:{name}") for name in agent.loops}
        outbox = asyncio.create_task(agent.outbox.run(stop), name="outbox")
        heal = asyncio.create_task(_heal_ledger(agent, stop), name="ledger-heal")
        log.info(
            "agent started",
            listen=conf.listen,
            datasets=sorted(agent.loops),
            pid=os.getpid(),
            ledger=str(conf.ledger),
            ledger_check=check,
        )
        await stop.wait()
        log.info("stopping: letting running batches commit", grace=conf.grace)
        api_runs: set[asyncio.Task[Any]] = app[TASKS]
        busy: set[asyncio.Task[Any]] = {*tasks.values(), outbox, heal, *api_runs}
        if busy:
            _, pending = await asyncio.wait(busy, timeout=conf.grace)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("grace period over: cancelled", tasks=sorted(t.get_name() for t in pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await runner.cleanup()
    log.info("agent stopped")
    return 0
