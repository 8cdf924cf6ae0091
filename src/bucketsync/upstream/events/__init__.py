"""Event sources: changes reported by the provider, applied within about a second.

An event is a hint and storage is the truth: whatever a source reports, the consumer
HEADs the key and applies what storage says now, so duplicated, reordered and stale
events converge. A full listing run (the reconcile) still runs at start-up and every
``reconcile_interval``, because no provider promises delivery.

Every source speaks this one protocol; each lives in its own module (``watch``,
``sqs``, ``azure_queue``, ``webhook``).
"""

from __future__ import annotations

import asyncio
import enum
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bucketsync.config import DatasetConfig, DriverConfig, Settings
    from bucketsync.ledger.ledger import Ledger


class EventKind(enum.StrEnum):
    CHANGED = "changed"  # created, overwritten or metadata updated: HEAD says which
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class Event:
    """One change to one key, relative to the driver's prefix (as a listing reports it).

    ``token`` orders events of the same key when the provider gives an order (S3's
    ``sequencer``, GCS's ``generation``, Azure's ``sequencer``), normalised by the
    source so that plain string comparison orders it (fixed width, zero-padded). An
    event whose token is older than the last one applied for its key is dropped
    without a HEAD. ``None``: no order known, always HEAD.

    ``at`` is when the change happened according to the provider (POSIX seconds),
    for the event-to-catalog latency histogram; ``None`` if it does not say.
    """

    key: str
    kind: EventKind
    token: str | None = None
    etag: str | None = None
    size: int | None = None
    at: float | None = None


async def _nothing() -> None:
    return None


@dataclass(slots=True)
class Batch:
    """Events a source delivered together, and how to acknowledge them.

    The consumer calls ``ack`` only after the batch's effect is committed to the
    ledger, so a crash before that loses nothing: a queue redelivers the messages
    after their visibility timeout, and a webhook's durable inbox keeps them.
    """

    events: list[Event]
    ack: Callable[[], Awaitable[None]] = field(default=_nothing)


class SourceFailed(Exception):
    """The source cannot deliver (queue gone, credentials revoked, watcher died).

    The dataset is marked degraded and falls back to polling at its ``interval``;
    the consumer retries the source with backoff and returns to event mode when it
    delivers again.
    """


class EventSource(Protocol):
    """Where a dataset's events come from. One instance per dataset in events mode."""

    #: ``watch``, ``sqs``, ``azure-queue`` or ``webhook``: for logs, metrics and /readyz
    name: str

    def batches(self) -> AsyncIterator[Batch]:
        """Batches as they arrive, forever; raises ``SourceFailed`` when it cannot go on.

        A batch may be empty (a long poll that timed out), which lets the consumer
        notice a stop request without a separate timer.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and watchers. Unacknowledged events stay with the provider."""
        ...


@dataclass(slots=True)
class SourceContext:
    """What a source may need to open: one per dataset in events mode.

    ``inbox`` is set by whoever writes events to the dataset's durable inbox (the
    webhook routes), so a source reading it wakes at once instead of polling.
    """

    dataset: str
    dataset_id: int
    config: DatasetConfig
    driver_name: str
    driver: DriverConfig
    settings: Settings
    ledger: Ledger
    inbox: asyncio.Event = field(default_factory=asyncio.Event)


#: source name -> the module whose ``open_source(ctx) -> EventSource`` builds it (imported when used)
MODULES = {
    "watch": "bucketsync.upstream.events.watch",
    "webhook": "bucketsync.upstream.events.webhook",
    "sqs": "bucketsync.upstream.events.sqs",
    "azure-queue": "bucketsync.upstream.events.azure_queue",
}


def open_source(name: str, ctx: SourceContext) -> EventSource:
    """The source ``name`` for ``ctx``'s dataset; ``SourceFailed`` when it cannot be built."""
    try:
        module = importlib.import_module(MODULES[name])
    except (KeyError, ImportError) as exc:
        raise SourceFailed(f"event source {name!r} is not available in this build: {exc}") from None
    source: EventSource = module.open_source(ctx)
    return source
