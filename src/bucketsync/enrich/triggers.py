"""Triggers: a user's hooks on item events, delivered at least once from the ledger.

SQL triggers on ``items`` write an ``item_events`` row in the transaction that commits the
change (``enriched`` is written with the enrichment result). The dispatcher turns each event
into one ``deliveries`` row per matching trigger (its ``on`` list and key filter), with the
JSON body fixed then, and drops the event, in one transaction. The deliverer sends due
deliveries, at most ``agent.trigger_concurrency`` at once: a webhook POST signed with
HMAC-SHA256, or a local command with the body on stdin. A failure is retried with capped
exponential backoff and dead-lettered after the trigger's ``max_attempts``. Sync never waits
for any of it: events are rows, and delivery runs in its own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from bucketsync import metrics
from bucketsync.config import TriggerConfig
from bucketsync.core.keys import KeyFilter
from bucketsync.core.model import iso
from bucketsync.core.retry import backoff

if TYPE_CHECKING:
    from bucketsync.agent import Agent
    from bucketsync.ledger.ledger import Ledger

log = structlog.get_logger("bucketsync.triggers")
SIGNATURE = "X-Bucketsync-Signature"
POLL = 1.0
#: the longest wait between two attempts of one delivery
RETRY_CAP = 3600.0
#: what a delivery keeps of a failed target's answer (a body or stderr), for the API
ERROR_TEXT = 300
DELIVERY_STATES = ("pending", "done", "dead")


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    dataset: str
    trigger: str
    event: str
    key: str
    body: str
    state: str
    attempts: int
    error: str | None
    created: float
    updated: float
    next_at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dataset": self.dataset,
            "trigger": self.trigger,
            "event": self.event,
            "key": self.key,
            "state": self.state,
            "attempts": self.attempts,
            "error": self.error,
            "created": iso(self.created),
            "updated": iso(self.updated),
            "next_attempt": iso(self.next_at) if self.state == "pending" else None,
        }


_COLS = "v.id, d.name, v.trigger, v.event, v.key, v.body, v.state, v.attempts, v.error, v.created, v.updated, v.next_at"


def _of(datasets: Sequence[str] | None, word: str) -> str:
    """The condition that keeps the rows of ``datasets`` (all rows when None)."""
    if datasets is None:
        return ""
    if not datasets:
        return f"{word} 1 = 0"
    return f"{word} d.name IN ({','.join('?' * len(datasets))})"


class Deliveries:
    """The ledger side: events to deliveries, due deliveries, results."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """A read of what is committed, run whole in one step (see ``Ledger._read``)."""
        return list(await self.ledger.db.read(sql, params))

    async def events(self, limit: int = 500, datasets: Sequence[str] | None = None) -> list[tuple[Any, ...]]:
        """Item events not yet fanned out, oldest first; with ``datasets``, of those datasets only."""
        rows = await self._read(
            "SELECT e.id, d.name, e.item_id, e.kind, e.key, e.etag, e.size, e.created, e.dataset_id "
            f"FROM item_events e JOIN datasets d ON d.id = e.dataset_id {_of(datasets, 'WHERE')} "
            "ORDER BY e.id LIMIT ?",
            (*(datasets or ()), limit),
        )
        return [tuple(r) for r in rows]

    async def fan_out(self, events: Sequence[int], rows: Sequence[tuple[int, int, str, str, str, str]]) -> int:
        """Take ``events`` and insert their deliveries, rows of (event id, dataset_id, trigger, event,
        key, body), in one transaction; how many events this call took. Only the events it deletes get
        deliveries: an agent that read the same events (its lease moved on meanwhile) inserts nothing,
        so an event is never fanned out twice, on one ledger or shared."""
        now = time.time()
        taken: set[int] = set()
        async with self.ledger.db.transaction() as tx:
            for i in range(0, len(events), 500):  # SQLite's host-parameter limit
                part = events[i : i + 500]
                sql = f"DELETE FROM item_events WHERE id IN ({','.join('?' * len(part))}) RETURNING id"
                taken.update(int(r[0]) for r in await tx.fetch(sql, part))
            await tx.executemany(
                "INSERT INTO deliveries (dataset_id, trigger, event, key, body, created, updated, next_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*r[1:], now, now, now) for r in rows if r[0] in taken],
            )
        return len(taken)

    async def due(
        self, now: float, limit: int, skip: list[int], datasets: Sequence[str] | None = None
    ) -> list[Delivery]:
        """Pending deliveries whose time has come, but those in ``skip`` (running); with ``datasets``,
        of those datasets only."""
        not_running = f"AND v.id NOT IN ({','.join('?' * len(skip))})" if skip else ""
        rows = await self._read(
            f"SELECT {_COLS} FROM deliveries v JOIN datasets d ON d.id = v.dataset_id "
            f"WHERE v.state = 'pending' AND v.next_at <= ? {not_running} {_of(datasets, 'AND')} "
            "ORDER BY v.next_at, v.id LIMIT ?",
            (now, *skip, *(datasets or ()), limit),
        )
        return [Delivery(*r) for r in rows]

    async def list(self, *, state: str | None = None, dataset: str | None = None, limit: int = 100) -> list[Delivery]:
        sql = f"SELECT {_COLS} FROM deliveries v JOIN datasets d ON d.id = v.dataset_id WHERE 1 = 1"
        args: list[Any] = []
        if state is not None:
            sql += " AND v.state = ?"
            args.append(state)
        if dataset is not None:
            sql += " AND d.name = ?"
            args.append(dataset)
        sql += " ORDER BY v.id DESC LIMIT ?"
        args.append(limit)
        return [Delivery(*r) for r in await self._read(sql, tuple(args))]

    async def settle(self, d: Delivery, state: str, error: str | None, next_at: float) -> None:
        async with self.ledger.db.transaction() as tx:
            await tx.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, error = ?, updated = ?, next_at = ? "
                "WHERE id = ?",
                (state, error, time.time(), next_at, d.id),
            )

    async def prune(self, before: float, keep: int) -> int:
        """Forget finished (done, dead) deliveries last updated before ``before``, keeping the newest
        ``keep`` of them whatever their age (the retention of ops, ``agent.keep_ops*``)."""
        async with self.ledger.db.transaction() as tx:
            n = await tx.execute(
                "DELETE FROM deliveries WHERE state != 'pending' AND updated < ? AND id NOT IN "
                "(SELECT id FROM deliveries WHERE state != 'pending' ORDER BY id DESC LIMIT ?)",
                (before, keep),
            )
        return max(n, 0)

    async def counts(self) -> dict[str, dict[str, int]]:
        """Deliveries per dataset and state."""
        out: dict[str, dict[str, int]] = {}
        for name, state, n in await self._read(
            "SELECT d.name, v.state, count(*) FROM deliveries v JOIN datasets d ON d.id = v.dataset_id "
            "GROUP BY d.name, v.state"
        ):
            out.setdefault(name, dict.fromkeys(DELIVERY_STATES, 0))[state] = n
        return out


class Triggers:
    """The dispatcher and the deliverer, in one task."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.wake = asyncio.Event()
        self.running: set[int] = set()
        self._session: aiohttp.ClientSession | None = None
        self._pruned = 0.0  # monotonic time of the last prune

    @property
    def store(self) -> Deliveries:
        assert self.agent.ledger is not None
        return Deliveries(self.agent.ledger)

    def _trigger(self, dataset: str, name: str) -> TriggerConfig | None:
        ds = self.agent.settings.datasets.get(dataset)
        if ds is None:
            return None
        for t, tname in zip(ds.triggers, ds.trigger_names(), strict=True):
            if tname == name:
                return t
        return None

    def _owned(self) -> list[str] | None:
        """On a ledger shared by agents, the datasets whose leases this agent holds: their events and
        deliveries are this agent's to handle, as their syncs and outbox ops are (None: every dataset)."""
        keeper = self.agent.leases
        return sorted(keeper.held) if keeper is not None else None

    async def dispatch(self) -> int:
        """Turn recorded item events into deliveries; how many events were handled."""
        handled = 0
        owned = self._owned()
        while events := await self.store.events(datasets=owned):
            rows: list[tuple[int, int, str, str, str, str]] = []
            for ev_id, dataset, item_id, kind, key, etag, size, created, ds_id in events:
                ds = self.agent.settings.datasets.get(dataset)
                if ds is None:
                    continue
                body = None
                for t, name in zip(ds.triggers, ds.trigger_names(), strict=True):
                    if kind not in t.on or not KeyFilter(t.include, t.exclude)(key):
                        continue
                    if body is None:
                        body = await self._body(ev_id, dataset, item_id, kind, key, etag, size, created)
                    rows.append((ev_id, ds_id, name, kind, key, body))
            handled += await self.store.fan_out([e[0] for e in events], rows)
        return handled

    async def _body(
        self, ev_id: int, dataset: str, item_id: int, kind: str, key: str, etag: str | None, size: int, created: float
    ) -> str:
        """The event's JSON: the item as the API shows it (what is left of it, once removed)."""
        ledger = self.agent.ledger
        assert ledger is not None
        item: dict[str, Any] = {"id": item_id, "key": key, "etag": etag, "size": size}
        if kind != "removed":
            ds_id = await ledger.dataset_id(dataset)
            found = await ledger.item(ds_id, key)
            if found is not None and found.id == item_id:
                from bucketsync.enrich.queue import EnrichQueue

                item = found.as_json(full=True)
                enr = (await EnrichQueue(ledger).of_items([item_id])).get(item_id)
                item["system"] = enr.as_json() if enr is not None else None
        return json.dumps(
            {"event": kind, "dataset": dataset, "event_id": ev_id, "time": iso(created), "item": item},
            ensure_ascii=False,
        )

    # -- delivering -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        running: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                self.wake.clear()
                try:
                    await self.dispatch()
                    limit = self.agent.settings.agent.trigger_concurrency
                    if len(running) < limit:
                        due = await self.store.due(time.time(), limit - len(running), list(self.running), self._owned())
                        for d in due:
                            self.running.add(d.id)
                            running.add(asyncio.create_task(self._one(d), name=f"delivery-{d.id}"))
                    await self._gauges()
                    await self._prune()
                except Exception:
                    log.exception("trigger loop error")
                waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())}
                done, _ = await asyncio.wait(waiters | running, timeout=POLL, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                running -= done
        finally:
            if running:
                await asyncio.wait(running)
            await self.aclose()

    async def drain(self) -> int:
        """Burst mode (tests, the CLI): dispatch, then make every delivery that is due now; how many."""
        await self.dispatch()
        n, limit = 0, self.agent.settings.agent.trigger_concurrency
        while due := await self.store.due(time.time(), limit, [], self._owned()):
            await asyncio.gather(*(self._one(d) for d in due))
            n += len(due)
        return n

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _prune(self) -> None:
        """Finished deliveries are history: pruned like ops, once per ``agent.prune_interval``."""
        conf = self.agent.settings.agent
        if time.monotonic() - self._pruned < conf.prune_interval and self._pruned:
            return
        self._pruned = time.monotonic()
        if n := await self.store.prune(time.time() - conf.keep_ops_for, conf.keep_ops):
            log.info("pruned finished trigger deliveries", deliveries=n)

    async def _gauges(self) -> None:
        counts = await self.store.counts()
        metrics.set_per_dataset(metrics.TRIGGER_BACKLOG, {n: c["pending"] for n, c in counts.items()})
        metrics.set_per_dataset(metrics.TRIGGER_DEAD, {n: c["dead"] for n, c in counts.items()})

    async def _one(self, d: Delivery) -> None:
        """One attempt; its result recorded. Never raises (cancellation aside)."""
        try:
            t = self._trigger(d.dataset, d.trigger)
            if t is None:
                await self.store.settle(d, "dead", "the trigger is no longer configured", time.time())
                metrics.TRIGGER_DELIVERIES.labels(d.dataset, d.trigger, "dead").inc()
                return
            try:
                error = await asyncio.wait_for(self._send(t, d), t.timeout)
            except TimeoutError:
                error = f"no answer within timeout={t.timeout:g}s"
            except (aiohttp.ClientError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            await self._record(t, d, error)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("a trigger delivery crashed; it stays pending", delivery=d.id)
        finally:
            self.running.discard(d.id)

    async def _record(self, t: TriggerConfig, d: Delivery, error: str | None) -> None:
        attempt = d.attempts + 1
        if error is None:
            await self.store.settle(d, "done", None, time.time())
            result = "ok"
        elif attempt >= t.max_attempts:
            await self.store.settle(d, "dead", f"{error} (attempt {attempt} of {t.max_attempts})", time.time())
            log.warning("trigger delivery dead-lettered", delivery=d.id, trigger=d.trigger, key=d.key, error=error)
            result = "dead"
        else:
            delay = (
                min(RETRY_CAP, t.retry_base * 2 ** (attempt - 1)) / 2 + backoff(attempt, t.retry_base, RETRY_CAP) / 2
            )
            await self.store.settle(d, "pending", error, time.time() + delay)
            log.info("trigger delivery failed; retried", delivery=d.id, trigger=d.trigger, error=error, attempt=attempt)
            result = "retry"
        metrics.TRIGGER_DELIVERIES.labels(d.dataset, d.trigger, result).inc()

    async def _send(self, t: TriggerConfig, d: Delivery) -> str | None:
        """Deliver once: None on success, else what went wrong."""
        body = d.body.encode()
        if t.url is not None:
            headers = {
                "Content-Type": "application/json",
                "X-Bucketsync-Event": d.event,
                "X-Bucketsync-Delivery": str(d.id),
            }
            if (secret := t.secret_value()) is not None:
                headers[SIGNATURE] = sign(secret, body)
            if self._session is None:
                self._session = aiohttp.ClientSession()
            async with self._session.post(t.url, data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return None
                text = (await resp.text(errors="replace"))[:ERROR_TEXT]
                return f"HTTP {resp.status}: {text}".strip()
        assert t.exec is not None
        proc = await asyncio.create_subprocess_exec(
            *t.exec,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await proc.communicate(body)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode == 0:
            return None
        return f"exit {proc.returncode}: {err.decode(errors='replace')[-ERROR_TEXT:]}".strip()
