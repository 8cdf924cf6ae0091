"""The daemon: sync loops, the HTTP server, signals, and a graceful drain.

SIGTERM/SIGINT set one stop event. Runs notice it after their current batch
commits and end (nothing removed), the server stops, and anything still busy
after ``agent.grace`` seconds is cancelled. A dataset whose probe or runs fail is
logged, counted and retried with backoff; it never stops the others.

SIGHUP reloads the configuration (see ``reload.py``): each dataset's task has its
own stop event, so a reload stops and starts only the datasets that changed.
Under systemd (``Type=notify``) the agent reports READY/RELOADING/STOPPING, a
one-line STATUS, and watchdog pings (see ``notify.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sqlite3
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.config import AgentConfig, Settings
from bucketsync.core import failpoints
from bucketsync.core.errors import BucketsyncError, ConfigError, LeaseLost, LedgerError
from bucketsync.core.leases import Fence, default_agent_id
from bucketsync.core.model import RunStatus
from bucketsync.core.retry import backoff
from bucketsync.daemon.leases import LeaseKeeper
from bucketsync.daemon.notify import Notifier
from bucketsync.daemon.reload import ReloadPlan, apply, driver_fingerprints
from bucketsync.ledger import durability, retention
from bucketsync.ledger.leases import FENCE, Leases
from bucketsync.ledger.postgres import PostgresDb
from bucketsync.logs import AccessLog
from bucketsync.server import front
from bucketsync.server.api import HEARTBEAT, RELOAD, TASKS, make_app
from bucketsync.server.tls import server_context
from bucketsync.upstream.events import SourceContext, open_source
from bucketsync.upstream.events.consumer import Consumer
from bucketsync.upstream.probe import ProbeResult, probe
from bucketsync.upstream.sync import RunResult
from bucketsync.upstream.workers import workers_for

log = structlog.get_logger("bucketsync.supervisor")


#: READY=1 waits for every dataset's first probe, but no longer than this: an unreachable
#: store must not fail the unit's start (``/readyz`` and STATUS say which dataset waits).
READY_WAIT = 60.0
#: how often STATUS= is refreshed
STATUS_EVERY = 10.0


#: a dead dataset loop is restarted after a backoff that grows to this many seconds
RESTART_CAP = 300.0
#: while ledger writes fail (a full disk), a tiny write is tried this often to notice recovery
HEAL_INTERVAL = 2.0
#: a dataset that stays not ready warns again at most this often (and whenever the failure changes)
NOT_READY_WARN_EVERY = 600.0
#: the daemon's GIL switch interval (CPython's default is 5 ms); see ``serve``
SWITCH_INTERVAL = 0.001


class _NotReadyLog:
    """Warn once when a dataset becomes not ready, then at a bounded rate; debug in between."""

    def __init__(self) -> None:
        self.last: tuple[object, float] | None = None

    def __call__(self, dataset: str, result: ProbeResult, attempt: int) -> None:
        # "The same reason" is the same checks failing the same way; message texts may vary.
        now, kind, reason = time.monotonic(), result.failures(), result.summary()
        if self.last is None or self.last[0] != kind or now - self.last[1] >= NOT_READY_WARN_EVERY:
            self.last = (kind, now)
            log.warning("dataset not ready", dataset=dataset, reason=reason, attempts=attempt)
        else:
            log.debug("dataset still not ready", dataset=dataset, reason=reason, attempts=attempt)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _dataset(agent: Agent, name: str, stop: asyncio.Event, probed: asyncio.Event | None = None) -> None:
    """Keep one dataset's loop alive. A loop that dies (any exception escaping it) is
    logged with the dataset, counted, shown as not ready with the reason, and restarted
    with backoff; it never takes the agent or the other datasets down."""
    deaths = 0
    while not stop.is_set():
        try:
            await _run_dataset(agent, name, stop, dead=deaths > 0, probed=probed)
            return
        except Exception as exc:
            deaths += 1
            delay = 1.0 + backoff(deaths, 2.0, RESTART_CAP)
            agent.set_ready(name, f"sync loop died ({_describe(exc)}); restart {deaths} in {delay:.0f}s")
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


async def _run_dataset(
    agent: Agent, name: str, stop: asyncio.Event, *, dead: bool, probed: asyncio.Event | None = None
) -> None:
    """Probe the driver until the dataset can be synced, then run the dataset's loop.
    ``probed`` is set after the first probe.

    Only list and get gate the sync. A dataset whose storage refuses writes syncs all the
    same; its writes are refused up front until a later probe finds them allowed.
    """
    loop = agent.loop(name)
    await _publish(agent, name)
    ds = agent.settings.datasets[name]
    driver_name = ds.driver
    driver = agent.settings.drivers[driver_name]
    failpoints.raises("supervisor.dataset_start")
    attempt = 0
    warn = _NotReadyLog()
    while not stop.is_set():
        result = await probe(loop.store, driver_name, driver.allow_delete, writes=not ds.read_only)
        if probed is not None:
            probed.set()
        if result.upstream_ok:
            if not dead:  # a restarted loop is ready once a run of it completes
                agent.set_ready(name, None)
            break
        attempt += 1
        agent.set_ready(name, result.summary())
        metrics.LOOP_ERRORS.labels(name).inc()
        warn(name, result, attempt)
        await _sleep(stop, min(loop.config.interval, 5 + backoff(attempt, 5, 300)))
    if stop.is_set():
        return
    agent.set_downstream(name, result)
    if attempt:
        log.info("dataset ready", dataset=name, attempts=attempt + 1)
    await agent.refresh_item_gauges(name)

    if (fence := FENCE.get()) is not None:
        # The lease was just claimed: a run its previous owner left 'running' ended with it.
        assert agent.ledger is not None
        if n := await agent.ledger.fail_stale_runs(await agent.ledger.dataset_id(name)):
            log.warning("marked runs left running by the dataset's previous owner as failed", dataset=name, runs=n)

    def on_error(exc: Exception) -> None:
        if isinstance(exc, LeaseLost) and fence is not None and agent.leases is not None:
            agent.leases.lost(name, fence.epoch)  # the keeper stops this loop now
        agent.set_ready(name, f"sync loop error: {_describe(exc)}")

    def on_result(result: RunResult) -> None:
        agent.enricher.wake.set()  # the run committed items: their enrichment and events follow
        agent.triggers.wake.set()
        agent.link_files.wake.set()
        if (agent.not_ready.get(name) or "").startswith("sync loop"):
            agent.set_ready(name, None)

    async with asyncio.TaskGroup() as tg:
        if not result.downstream_ok:
            log.warning(
                "downstream unavailable: writes through bucketsync are refused", dataset=name, reason=result.summary()
            )
            tg.create_task(_reprobe_writes(agent, name, stop), name=f"reprobe:{name}")
        if ds.sync == "events":
            tg.create_task(_events(agent, name, stop), name=f"events:{name}")
        await loop.run(stop, on_error=on_error, on_result=on_result)


async def _events(agent: Agent, name: str, stop: asyncio.Event) -> None:
    """Events mode: the consumer of the dataset's event source, next to its listing loop (the reconcile)."""
    assert agent.ledger is not None
    loop = agent.loop(name)
    ds = agent.settings.datasets[name]
    driver = agent.settings.drivers[ds.driver]
    source = driver.event_source()
    assert source is not None  # the config refuses events mode without one
    ctx = SourceContext(
        name,
        await agent.ledger.dataset_id(name),
        ds,
        ds.driver,
        driver,
        agent.settings,
        agent.ledger,
        agent.inbox(name),
    )

    def on_state(failure: str | None) -> None:
        agent.event_sources[name] = (source, failure)

    consumer = Consumer(loop, ctx.dataset_id, lambda: open_source(source, ctx), on_state=on_state)
    try:
        await consumer.run(stop)
    finally:
        agent.event_sources.pop(name, None)


async def _reprobe_writes(agent: Agent, name: str, stop: asyncio.Event) -> None:
    """Probe again now and then while storage refuses the dataset's writes; clear it once they work."""
    loop = agent.loop(name)
    ds = agent.settings.datasets[name]
    driver = agent.settings.drivers[ds.driver]
    while not stop.is_set():
        await _sleep(stop, agent.settings.agent.reprobe_interval)
        if stop.is_set():
            return
        result = await probe(loop.store, ds.driver, driver.allow_delete, writes=not ds.read_only)
        if result.upstream_ok and result.downstream_ok:
            agent.set_downstream(name, None)
            log.info("downstream available again: writes are accepted", dataset=name)
            return
        if result.upstream_ok:
            agent.set_downstream(name, result)


async def _guard_gauges(agent: Agent) -> None:
    """The guard gauge from the ledger: a dataset whose last run the guard stopped stays flagged across restarts."""
    for name in agent.settings.datasets:
        await _guard_gauge(agent, name)


async def _guard_gauge(agent: Agent, name: str) -> None:
    assert agent.ledger is not None
    ds_id = await agent.ledger.find_dataset(name)
    last = await agent.ledger.runs(ds_id, limit=1) if ds_id is not None else []
    agent.loop(name).set_guard_blocked(bool(last) and last[0].status is RunStatus.ABORTED)


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
    file = agent.settings.agent.ledger_file
    if file is None:
        return "not run"  # a PostgreSQL server checks its own pages (data checksums, amcheck)
    try:
        result = await durability.quick_check(file)
    except (sqlite3.Error, OSError) as exc:  # the check must not stop an agent whose ledger opened
        log.warning("ledger quick_check could not run", error=str(exc))
        return "not run"
    if result.result == "damaged":
        agent.ledger_problem = f"the ledger is damaged ({result.summary()}); {durability.damaged_hint(file)}"
    return result.result


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, BucketsyncError) else f"{type(exc).__name__}: {text}"


async def _publish(agent: Agent, name: str) -> None:
    assert agent.ledger is not None
    ds = agent.settings.datasets[name]
    ds_id = await agent.ledger.find_dataset(name)
    last = await agent.ledger.last_ok_run(ds_id) if ds_id is not None else None
    period = {"poll": ds.interval, "events": ds.reconcile_interval}.get(ds.sync)
    metrics.publish_dataset(name, period, last.ended if last else None)
    await _guard_gauge(agent, name)  # a loop a reload started is a new one: the ledger says if the guard stopped it


class _DatasetTasks:
    """One task per dataset, each with its own stop event: a reload stops one and leaves the rest running."""

    def __init__(self, agent: Agent, stop: asyncio.Event) -> None:
        self.agent = agent
        self.all_stop = stop
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stops: dict[str, asyncio.Event] = {}
        self.probed: dict[str, asyncio.Event] = {}

    def start(self, name: str, fence: Fence | None = None) -> None:
        """Start a dataset's task. Shared (leases): only a dataset whose lease this agent holds,
        its task running under the lease's fence; the lease keeper starts the others as it claims them."""
        if (keeper := self.agent.leases) is not None:
            fence = fence or keeper.fence(name)
            if fence is None:
                return
            self.agent.set_ready(name, "permission probe not run yet")
        stop, probed = asyncio.Event(), asyncio.Event()
        if self.all_stop.is_set():
            stop.set()
        self.stops[name], self.probed[name] = stop, probed
        self.tasks[name] = asyncio.create_task(self._run(name, stop, probed, fence), name=f"dataset:{name}")

    async def _run(self, name: str, stop: asyncio.Event, probed: asyncio.Event, fence: Fence | None) -> None:
        FENCE.set(fence)  # this task's context (and its children's): every write it makes is fenced
        try:
            await _dataset(self.agent, name, stop, probed)
        finally:
            probed.set()

    async def stop(self, name: str, at_once: bool = False) -> None:
        """Stop one dataset: its run ends after the current batch; cancelled after ``agent.grace``,
        or at once (``at_once``: its lease is lost, so it could commit nothing anyway)."""
        stop, task = self.stops.pop(name, None), self.tasks.pop(name, None)
        self.probed.pop(name, None)
        if stop is not None:
            stop.set()
        if self.agent.leases is not None:
            self.agent.set_ready(name, None)  # another agent's to sync now: not this one's readiness
        if task is None:
            return
        _, pending = await asyncio.wait({task}, timeout=0 if at_once else self.agent.settings.agent.grace)
        if pending:
            task.cancel()
            if not at_once:
                log.warning("grace period over: cancelled", tasks=[task.get_name()])
        # Bounded: a task that swallows its cancellation (Python 3.11's wait_for can) must not
        # hold up the caller, the lease keeper above all; a lost lease's writes are refused anyway.
        _, pending = await asyncio.wait({task}, timeout=self.agent.settings.agent.grace)
        if pending:
            log.warning("a cancelled dataset task has not ended yet", tasks=[task.get_name()])

    def stop_all(self) -> None:
        for stop in self.stops.values():
            stop.set()

    async def first_probes(self, timeout: float) -> None:
        """Until every dataset's first probe has answered, the agent stops, or ``timeout``."""
        probed: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in self.probed.values())))
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self.all_stop.wait())
        try:
            await asyncio.wait([probed, stopping], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (probed, stopping):
                w.cancel()


async def status_line(agent: Agent) -> str:
    """The one-line summary systemd shows (``systemctl status``): datasets, last runs, backlog."""
    names = sorted(agent.loops)
    ready = sum(1 for n in names if n not in agent.not_ready)
    running = sum(1 for n in names if agent.loops[n].busy)
    last: Counter[str] = Counter()
    backlog = 0
    if agent.ledger is not None:
        for name in names:
            ds_id = await agent.ledger.find_dataset(name)
            runs = await agent.ledger.runs(ds_id, limit=1) if ds_id is not None else []
            last[str(runs[0].status) if runs else "never"] += 1
        backlog = await agent.ledger.backlog()
    runs_s = ", ".join(f"{k} {v}" for k, v in sorted(last.items())) or "none"
    return f"{len(names)} datasets, {ready} ready, {running} running; last runs: {runs_s}; outbox backlog {backlog}"


async def _watchdog(notifier: Notifier, interval: float, stop: asyncio.Event) -> None:
    """WATCHDOG=1 every ``interval``: this task only gets to run while the event loop is not stuck."""
    while not stop.is_set():
        notifier.ping()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def _status_updates(agent: Agent, notifier: Notifier, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=STATUS_EVERY)
        if not stop.is_set():
            try:
                notifier.status(await status_line(agent))
            except Exception:
                log.exception("status line failed")


class _Reloader:
    """SIGHUP and ``POST /api/v1/reload``: one reload at a time; an invalid config leaves the running one."""

    def __init__(
        self, agent: Agent, tasks: _DatasetTasks, load: Callable[[], Settings], notifier: Notifier, stop: asyncio.Event
    ) -> None:
        self.agent, self.tasks, self.load, self.notifier, self.stop = agent, tasks, load, notifier, stop
        #: what the running stores were opened with (secret contents included), to see rotations
        self.fingerprints = driver_fingerprints(agent.settings, strict=False)
        self._lock = asyncio.Lock()
        self._signalled: set[asyncio.Task[Any]] = set()

    async def __call__(self) -> ReloadPlan:
        async with self._lock:
            if self.stop.is_set():
                raise ConfigError("the agent is stopping; nothing reloaded")
            self.notifier.reloading()
            log.info("reloading the configuration")
            try:
                new = await asyncio.to_thread(self.load)
                plan = await apply(self.agent, self.tasks, new, self.fingerprints)
            except ConfigError as exc:
                log.error("reload refused: the new configuration is invalid; the running one stays", error=str(exc))
                raise
            except Exception:
                log.exception("reload failed; the running configuration stays")
                raise
            finally:
                self.notifier.ready(await status_line(self.agent))
            log.info("configuration reloaded", **plan.as_json())
            refreeze()  # what the reload replaced may hold cycles among frozen objects
            if plan.needs_restart:
                log.warning("some changes need a restart to take effect", options=list(plan.needs_restart))
            return plan

    def on_signal(self) -> None:
        task = asyncio.create_task(self._quiet(), name="reload")
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    async def _quiet(self) -> None:
        with contextlib.suppress(Exception):  # already logged; a signal has nobody to answer
            await self()


def check_listener(conf: AgentConfig) -> ssl.SSLContext | None:
    """Refuse an open API beyond loopback; warn about a token sent in clear; build the TLS context."""
    ssl_ctx = server_context(conf)
    if conf.is_loopback():
        return ssl_ctx
    if conf.token() is None:
        configured = conf.api_token is not None or conf.api_token_file is not None
        why = f"{conf.token_field()} is empty" if configured else "no API token is set"
        raise ConfigError(
            f"agent.listen: {conf.listen} is not a loopback address and {why} (an empty or blank token is no "
            "token); set agent.api_token or agent.api_token_file to a real token, or listen on 127.0.0.1"
        )
    if ssl_ctx is None:
        log.warning(
            "API token sent over plain HTTP beyond loopback: anyone on the network path can read it; "
            "set agent.tls_cert_file and agent.tls_key_file, or put a TLS proxy in front",
            listen=conf.listen,
        )
    return ssl_ctx


def refreeze() -> None:
    """Leave what exists now out of the collector's full passes, which stop every thread (the front
    door's too): under the API load of bench/api_load.py they took 50-160 ms each. What start-up
    builds (modules, settings, stores, the app) lives as long as the process. Frozen objects are
    never collected, so a reload, which replaces some, unfreezes first to let them go."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, load: Callable[[], Settings] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT. ``load`` re-reads the configuration for a reload."""
    conf = settings.agent
    # The front door's threads answer /healthz and /metrics off the loop, but each step of theirs
    # (accept, peek, send) waits for the GIL, held by a busy loop for up to the switch interval:
    # 5 ms by default, so a probe waited 40 ms and more at p99 under load; 1 ms keeps it near 15.
    sys.setswitchinterval(SWITCH_INTERVAL)
    ssl_ctx = check_listener(conf)
    notifier = Notifier()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    shared = conf.ledger_file is None  # a PostgreSQL ledger: agents divide its datasets by leases
    async with Agent(settings, shared=shared, sync_workers=workers_for(conf.sync_workers)) as agent:
        # Not ready until probed, before the first request can ask (the site starts below).
        metrics.init(agent.settings.datasets, shared=shared)
        metrics.init_hooks(agent.settings)
        for name in agent.settings.datasets:
            agent.set_ready(name, "permission probe not run yet")
        await _guard_gauges(agent)
        tasks = _DatasetTasks(agent, stop)
        if shared:
            agent.leases = await _keeper(agent, tasks)
        reloader = _Reloader(agent, tasks, load or (lambda: settings), notifier, stop)
        app = make_app(agent, stop)
        app[RELOAD] = reloader
        # A 1,024-byte key percent-encodes to 3 KiB, and a client may send it in characters that
        # do not fit: request lines up to 32 KiB reach the API, which names what is wrong as JSON.
        runner = web.AppRunner(
            app,
            access_log_class=AccessLog,
            access_log=logging.getLogger("bucketsync.access"),
            max_line_size=32768,
        )
        await runner.setup()
        heartbeat = app[HEARTBEAT]
        door: front.Front | None = None
        try:
            if ssl_ctx is None:
                # Liveness and metrics answered by a thread, the rest by the loop (server/front.py).
                door = front.Front(front.bind(conf.host, conf.port), loop, runner.server, heartbeat)  # type: ignore[arg-type]
                door.start()
            else:
                site = web.TCPSite(runner, conf.host, conf.port, ssl_context=ssl_ctx)
                await site.start()
        except OSError as exc:
            await runner.cleanup()
            agent.discard_new_ledger = True  # a start that fails leaves no ledger it created behind
            raise ConfigError(f"agent.listen: cannot listen on {conf.listen}: {exc.strerror}") from None
        refreeze()
        beat = asyncio.create_task(heartbeat.run(stop), name="heartbeat")
        check = await _check_ledger(agent)
        keeper: set[asyncio.Task[None]] = set()
        if agent.leases is not None:  # the keeper starts each dataset as it claims its lease
            await agent.leases.turn()  # ready only once it knows which datasets are its own
            for name in agent.settings.datasets:
                if name not in agent.leases.held:
                    agent.set_ready(name, None)  # another agent's to sync
            keeper.add(asyncio.create_task(agent.leases.run(stop), name="leases"))
        else:
            for name in agent.loops:
                tasks.start(name)
        outbox = asyncio.create_task(agent.outbox.run(stop), name="outbox")
        heal = asyncio.create_task(_heal_ledger(agent, stop), name="ledger-heal")
        enricher = asyncio.create_task(agent.enricher.run(stop), name="enrich")
        triggers = asyncio.create_task(agent.triggers.run(stop), name="triggers")
        link_files = asyncio.create_task(agent.link_files.run(stop), name="link-files")
        assert agent.ledger is not None
        pruner = asyncio.create_task(retention.run(agent.ledger, conf, stop, agent.leases), name="retention")
        log.info(
            "agent started",
            listen=conf.listen,
            tls=ssl_ctx is not None,
            datasets=sorted(agent.loops),
            pid=os.getpid(),
            ledger=str(conf.ledger),
            ledger_check=check,
        )
        loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
        helpers = await _tell_systemd(agent, tasks, notifier, stop)
        await stop.wait()
        loop.remove_signal_handler(signal.SIGHUP)
        notifier.stopping()
        tasks.stop_all()
        log.info("stopping: letting running batches commit", grace=conf.grace)
        api_runs: set[asyncio.Task[Any]] = app[TASKS]
        busy: set[asyncio.Task[Any]] = {
            *tasks.tasks.values(),
            *keeper,
            outbox,
            heal,
            enricher,
            triggers,
            link_files,
            pruner,
            *api_runs,
            *reloader._signalled,
        }
        if busy:
            _, pending = await asyncio.wait(busy, timeout=conf.grace)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("grace period over: cancelled", tasks=sorted(t.get_name() for t in pending))
                await asyncio.gather(*pending, return_exceptions=True)
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, beat, return_exceptions=True)
        if door is not None:
            await asyncio.to_thread(door.close)
        await runner.cleanup()
    notifier.close()
    log.info("agent stopped")
    return 0


async def _keeper(agent: Agent, tasks: _DatasetTasks) -> LeaseKeeper:
    """The lease loop of a daemon sharing a PostgreSQL ledger (see daemon/leases.py), on
    connections of its own (closed with the ledger's)."""
    conf = agent.settings.agent
    assert agent.ledger is not None and isinstance(agent.ledger.db, PostgresDb)
    agent_id = conf.id or default_agent_id()
    log.info("sharing the ledger's datasets by leases", agent=agent_id, lease_seconds=conf.lease_seconds)
    pool = await agent.ledger.db.side_pool(2)
    agent.closing.append(pool.close)
    return LeaseKeeper(
        Leases(pool, agent_id, conf.lease_seconds),
        lambda: list(agent.settings.datasets),
        tasks.start,
        tasks.stop,
        max_datasets=conf.max_datasets,
    )


async def _tell_systemd(
    agent: Agent, tasks: _DatasetTasks, notifier: Notifier, stop: asyncio.Event
) -> list[asyncio.Task[None]]:
    """READY=1 once the HTTP server is up and every dataset's first probe has answered; then
    the watchdog and STATUS tasks. Nothing to do outside systemd."""
    if not notifier.enabled:
        return []
    helpers = []
    if notifier.watchdog is not None:  # start pinging at once: the first probes may take a while
        helpers.append(asyncio.create_task(_watchdog(notifier, notifier.watchdog, stop), name="watchdog"))
    await tasks.first_probes(READY_WAIT)
    if not stop.is_set():
        notifier.ready(await status_line(agent))
        log.info("told systemd we are ready")
    helpers.append(asyncio.create_task(_status_updates(agent, notifier, stop), name="status"))
    return helpers
