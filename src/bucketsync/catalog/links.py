"""Linked items: items whose binary is at a URL or in another bucket, not in the driver's bucket.

A linked item has a ``ref``: ``https://...`` (``http://`` only with ``[links] allow_http``),
fetched through the SSRF-safe fetcher (catalog/fetch.py), or ``s3://``, ``gs://``/``gcs://``,
``az://``/``azure://``, read through the configured driver whose location holds it (its
integration's credentials, its store). It comes one of two ways (``Item.link``):

- ``api``: ``POST .../links`` or a CSV import. Nothing is in the bucket, so a listing never
  sees it and never removes it (the ledger's snapshot leaves it out); deleting it unlinks
  it from the catalog (the gate's UNLINK). If an object later appears in the bucket at its
  key, the bucket wins: the row becomes that object's item.
- ``file``: a *link file* synced from the bucket, recognised by its key ending in
  ``.link.json`` (cheap: known at listing time without reading a byte; a ledger trigger
  queues it in the transaction that indexes it, and :class:`LinkFiles` reads it in the
  background, so a run never waits for it). Its content is the document
  ``{"type": "link", "ref": "...", "mimetype": "...", "metadata": {...}}``. The item keeps the
  link file's key, size and etag (the listing tracks the file); deleting it tombstones it,
  so the file stays in the bucket and the next sync does not bring the item back. A file
  that is no valid link document stays an ordinary item (logged ``link file invalid``).

Either way, ``GET .../content`` streams the target, never the link file.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import structlog

from bucketsync import metrics
from bucketsync.catalog import fetch
from bucketsync.catalog.query import META_NAME
from bucketsync.core import gate
from bucketsync.core.errors import (
    AlreadyExists,
    FetchRefused,
    InvalidKey,
    NotFound,
    Refused,
    StorageError,
    Transient,
)
from bucketsync.core.keys import check_key
from bucketsync.core.location import SCHEMES

if TYPE_CHECKING:
    from bucketsync.agent import Agent
    from bucketsync.config import Settings

log = structlog.get_logger("bucketsync.links")

SUFFIX = ".link.json"
#: a link file is a small JSON document; a larger object with the suffix is no link file
MAX_LINK_FILE = 64 * 1024
CLOUD = ("s3", "gs", "az")
#: how a cloud ref starts (any case is a cloud ref too: ``cloud_ref`` is the judge)
CLOUD_PREFIXES = tuple(f"{s}://" for s in SCHEMES if SCHEMES[s] in CLOUD)
META_VALUE = (str, int, float, bool)


@dataclass(frozen=True, slots=True)
class Link:
    """What a link says: its target, and optionally a content type and user metadata."""

    ref: str
    mimetype: str | None = None
    metadata: dict[str, Any] | None = None


# -- pure checks ----------------------------------------------------------------------


def check_metadata(meta: Any, what: str = "metadata") -> dict[str, Any]:
    """User metadata as items take it (names 1-64 of A-Z a-z 0-9 _ . -; scalar values), else ValueError."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ValueError(f"{what} must be a JSON object of NAME: value")
    for name, value in meta.items():
        if not META_NAME.match(name):
            raise ValueError(f"{what}: name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(value, META_VALUE):
            raise ValueError(f"{what}: {name!r} must be a string, number or boolean")
    return meta


def check_mimetype(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "/" not in value or len(value) > 255 or not value.isprintable():
        raise ValueError(f"mimetype must look like type/subtype, not {value!r}")
    return value


def cloud_ref(ref: str) -> tuple[str, str, str, str] | None:
    """(scheme, account, bucket, path) of an ``s3://``/``gs://``/``az://`` ref; None for another scheme."""
    scheme, sep, _ = ref.partition("://")
    canonical = SCHEMES.get(scheme.lower()) if sep else None
    if canonical not in CLOUD:
        return None
    parts = urlsplit(ref)
    path = unquote(parts.path).lstrip("/")
    if canonical == "az":
        container, _, path = path.partition("/")
        return canonical, parts.netloc, container, path
    return canonical, "", parts.netloc, path


def driver_for(settings: Settings, ref: str) -> tuple[str, str]:
    """(driver name, key under its prefix) of a cloud ref: the configured driver of the same
    store whose location holds it (the longest prefix wins), else ValueError naming the ref."""
    parsed = cloud_ref(ref)
    assert parsed is not None
    scheme, account, bucket, path = parsed
    holders = [
        (len(d.location.prefix), name)
        for name, d in settings.drivers.items()
        if (d.location.scheme, d.location.account, d.location.bucket) == (scheme, account, bucket)
        and path.startswith(d.location.prefix)
        and len(path) > len(d.location.prefix)
    ]
    if not holders:
        raise ValueError(f"ref {ref!r}: no configured driver can read it (add a driver whose url holds it)")
    n, name = max(holders)
    return name, check_key(path[n:])


def check_ref(ref: Any, settings: Settings, policy: fetch.Policy) -> str:
    """A ref a linked item may hold, else ValueError (or FetchRefused) naming why. An https
    ref is checked as a fetch would check it, its address too when it is a literal; a name
    is resolved only when fetched (and then every time, pinned)."""
    if not isinstance(ref, str) or not ref or len(ref) > 4096:
        raise ValueError('"ref" must be a URL: https://..., s3://..., gs://... or az://...')
    if cloud_ref(ref) is not None:
        driver_for(settings, ref)
        return ref
    target = fetch.check_url(ref, policy)
    if (literal := target.literal) is not None:
        fetch.check_address(literal, policy, ref)
    return ref


def parse_link_file(raw: bytes) -> Link:
    """The link document a ``*.link.json`` object holds, else ValueError saying what is wrong."""
    if len(raw) > MAX_LINK_FILE:
        raise ValueError(f"larger than {MAX_LINK_FILE} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("type") != "link":
        raise ValueError('not a link document: {"type": "link", "ref": "...", ...}')
    unknown = set(doc) - {"type", "ref", "mimetype", "metadata"}
    if unknown:
        raise ValueError(f"unknown member(s) {', '.join(sorted(unknown))}")
    if not isinstance(doc.get("ref"), str):
        raise ValueError('"ref" must be a URL string')
    return Link(doc["ref"], check_mimetype(doc.get("mimetype")), check_metadata(doc.get("metadata")))


def link_key(name: Any) -> str:
    """The key of a linked item made through the API: a key's rules, and not a link file's
    name (that suffix is how a synced bucket says "link", see the module's docstring)."""
    if not isinstance(name, str):
        raise InvalidKey('"name" must be the item\'s key, a string')
    key = check_key(name)
    if key.endswith(SUFFIX):
        raise InvalidKey(f"{key!r}: keys ending in {SUFFIX} are link files in the bucket, not API links")
    return key


# -- creating ----------------------------------------------------------------------------


async def quota_room(agent: Agent, dataset: str, ds_id: int, wanted: int) -> int:
    """How many of ``wanted`` new items the gate lets in (a dataset's quota counts links too)."""
    assert agent.ledger is not None
    quota = agent.settings.datasets[dataset].quota
    if quota is None:
        return wanted
    live = await agent.ledger.live_count(ds_id)
    decision = gate.decide_put(read_only=False, quota=quota, live_items=live, new_key=True)
    return min(wanted, max(0, quota - live)) if decision.allowed else 0


async def create(agent: Agent, dataset: str, name: Any, link: Link) -> tuple[str, dict[str, Any]]:
    """Create one linked item: ("created" | "exists", the item as JSON). A key that exists with
    the same ref is "exists"; with anything else, AlreadyExists. The gate's quota applies;
    ``read_only`` does not (nothing is written to storage)."""
    ledger = agent.ledger
    assert ledger is not None
    key = link_key(name)
    ref = check_ref(link.ref, agent.settings, fetch.Policy.of(agent.settings.links))
    ds_id = await ledger.dataset_id(dataset)
    if await quota_room(agent, dataset, ds_id, 1) < 1:
        metrics.GATE_REFUSALS.labels("quota").inc()
        raise Refused("quota", f"the dataset is at its quota of {agent.settings.datasets[dataset].quota} items")
    existed = await ledger.add_links(ds_id, [(key, ref, link.mimetype, link.metadata)])
    item = await ledger.item(ds_id, key)
    assert item is not None
    if existed:
        if item.ref != ref:
            raise AlreadyExists(f"{key!r} already exists in dataset {dataset!r} (not a link to {ref!r})", key=key)
        return "exists", item.as_json(full=True)
    await agent.refresh_item_gauges(dataset)
    log.info("link created", dataset=dataset, key=key, item=item.id)
    return "created", item.as_json(full=True)


# -- reading the target ------------------------------------------------------------------


@dataclass(slots=True)
class Target:
    content_type: str | None
    length: int | None
    chunks: AsyncIterator[bytes]


@asynccontextmanager
async def open_target(agent: Agent, ref: str, resolve: fetch.Resolve = fetch.system_resolve) -> AsyncIterator[Target]:
    """The target's bytes: a cloud ref through its driver's store, anything else through the
    SSRF-safe fetcher. FetchRefused, NotFound or a StorageError when it cannot be read."""
    if cloud_ref(ref) is not None:
        try:
            driver, key = driver_for(agent.settings, ref)
        except ValueError as exc:  # the driver went away in a reload
            raise NotFound(str(exc)) from None
        store = agent.stores.get(driver)
        if store is None:
            raise NotFound(f"ref {ref!r}: driver {driver!r} is not open (no dataset uses it)")
        info = await store.head(key)
        yield Target(None, info.size, store.open(key))
        return
    async with fetch.fetch(ref, fetch.Policy.of(agent.settings.links), resolve=resolve) as got:
        yield Target(got.content_type, got.length, got.chunks)


# -- link files ----------------------------------------------------------------------------


class LinkFiles:
    """Reads queued ``*.link.json`` objects (the ledger's trigger queues them when they are
    indexed) and records what they say; a task of the daemon, woken after each run."""

    BATCH = 32
    IDLE = 2.0

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                done = await self.run_once()
            except Exception:
                log.exception("link files: a pass failed; trying again")
                done = 0
            if done:
                continue
            self.wake.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._either(stop), self.IDLE)

    async def _either(self, stop: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def run_once(self) -> int:
        """Read one batch of queued link files; how many were settled."""
        ledger = self.agent.ledger
        assert ledger is not None
        due = await ledger.link_files_due(self.BATCH)
        if not due:
            return 0
        names = {await ledger.dataset_id(n): n for n in self.agent.settings.datasets}
        settled = 0
        for item_id, ds_id, key, etag in due:
            dataset = names.get(ds_id)
            if dataset is None:  # not configured any more
                await ledger.drop_link_file(item_id)
                settled += 1
                continue
            try:
                link = await self._read(dataset, key)
            except Transient as exc:
                log.warning("link file unreadable for now", dataset=dataset, key=key, error=str(exc))
                continue
            except StorageError as exc:  # gone, or refused: the next sync says what became of it
                log.warning("link file unreadable", dataset=dataset, key=key, error=str(exc))
                await ledger.drop_link_file(item_id)
                settled += 1
                continue
            recorded = None if isinstance(link, str) else (link.ref, link.mimetype, link.metadata or {})
            if await ledger.set_link_file(item_id, etag, recorded) and isinstance(link, str):
                log.warning("link file invalid", dataset=dataset, key=key, error=link, kept="an ordinary item")
            elif recorded is not None:
                log.info("link file recognised", dataset=dataset, key=key, item=item_id)
            settled += 1
        return settled

    async def _read(self, dataset: str, key: str) -> Link | str:
        """The link the object holds, or why it is none (a string)."""
        store = self.agent.stores[self.agent.settings.datasets[dataset].driver]
        raw = bytearray()
        async for chunk in store.open(key, 0, MAX_LINK_FILE + 1):
            raw += chunk
            if len(raw) > MAX_LINK_FILE:
                break
        try:
            link = parse_link_file(bytes(raw))
            check_ref(link.ref, self.agent.settings, fetch.Policy.of(self.agent.settings.links))
        except (ValueError, FetchRefused) as exc:  # FetchRefused: a ref the policy would never fetch
            return str(exc)
        return link
