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
import ssl
from typing import Any

import structlog
from aiohttp import web

from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.api import TASKS, make_app
from bucketsync.config import AgentConfig, Settings
from bucketsync.errors import ConfigError
from bucketsync.probe import probe
from bucketsync.retry import backoff
from bucketsync.tls import server_context

log = structlog.get_logger("bucketsync.supervisor")


async def _dataset(agent: Agent, name: str, stop: asyncio.Event) -> None:
    """Probe the driver until it passes, then run the dataset's loop."""
    loop = agent.loop(name)
    driver_name = agent.settings.datasets[name].driver
    driver = agent.settings.drivers[driver_name]
    attempt = 0
    while not stop.is_set():
        result = await probe(loop.store, driver_name, driver.allow_delete)
        if result.ok:
            agent.not_ready.pop(name, None)
            break
        attempt += 1
        agent.not_ready[name] = result.summary()
        metrics.LOOP_ERRORS.labels(name).inc()
        log.error("dataset not ready: permission probe failed", dataset=name, reason=result.summary())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(loop.config.interval, 5 + backoff(attempt, 5, 300)))
    if stop.is_set():
        return
    await agent.refresh_item_gauges(name)
    await loop.run(stop)


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


async def serve(settings: Settings) -> int:
    conf = settings.agent
    ssl_ctx = check_listener(conf)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Agent(settings) as agent:
        app = make_app(agent, stop)
        # A 1,024-byte key percent-encodes to 3 KiB, and a client may send it in characters that
        # do not fit: request lines up to 32 KiB reach the API, which names what is wrong as JSON.
        runner = web.AppRunner(app, access_log=None, max_line_size=32768)
        await runner.setup()
        try:
            site = web.TCPSite(runner, conf.host, conf.port, ssl_context=ssl_ctx)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"agent.listen: cannot listen on {conf.listen}: {exc.strerror}") from None
        for name in agent.settings.datasets:
            agent.not_ready[name] = "permission probe not run yet"
        tasks = {name: asyncio.create_task(_dataset(agent, name, stop), name=f"dataset:{name}") for name in agent.loops}
        outbox = asyncio.create_task(agent.outbox.run(stop), name="outbox")
        log.info(
            "agent started",
            listen=conf.listen,
            tls=ssl_ctx is not None,
            datasets=sorted(agent.loops),
            pid=os.getpid(),
            ledger=str(conf.ledger),
        )
        await stop.wait()
        log.info("stopping: letting running batches commit", grace=conf.grace)
        api_runs: set[asyncio.Task[Any]] = app[TASKS]
        busy: set[asyncio.Task[Any]] = {*tasks.values(), outbox, *api_runs}
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
