"""``source = "azure-queue"``: Event Grid blob events read from an Azure Storage Queue.

Event Grid delivers to a Storage Queue one event per message, base64-encoded JSON, in
the Event Grid schema or the CloudEvents 1.0 schema (the subscription's choice); both
are understood. ``Microsoft.Storage.BlobCreated`` is a change, ``BlobDeleted`` a
removal, and ``BlobRenamed`` (accounts with a hierarchical namespace) both: a removal
of the source and a change of the destination. The key comes from the blob URL
(``data.url``), relative to the driver's container and prefix; ``data.sequencer`` is
the ordering token (Azure documents it as ordered by plain string comparison).

Storage Queues have no long poll, so the source polls: again at once while messages
come, then backing off to ``poll_interval`` when the queue is empty. That keeps the
latency under about a second at a cost of about one request a second per idle
dataset. An empty batch is yielded after ``idle_report`` seconds without messages,
so the consumer sees the source alive.

Acknowledgement, malformed messages and failures work as in the sqs source: a
message is deleted only in its batch's ``ack`` (after the commit), comes back after
its visibility timeout otherwise; a malformed one is logged with its id and deleted
with its batch (it can never parse; the reconcile is the safety net); a missing
queue, refused credentials or an unreachable endpoint raise ``SourceFailed`` naming
the queue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import structlog
from azure.storage.queue.aio import QueueClient

from bucketsync.config import AzureIntegration
from bucketsync.core.errors import ConfigError, NotFound, PermissionDenied, StorageError, Transient
from bucketsync.core.retry import retrying
from bucketsync.stores.azure import credentials, translate
from bucketsync.upstream.events import Batch, Event, EventKind, SourceContext, SourceFailed
from bucketsync.upstream.events.scope import Malformed, Scope, timestamp

if TYPE_CHECKING:
    from bucketsync.config import DriverConfig
    from bucketsync.stores.azure import Credential

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Storage Queues hand out at most 32 messages per request.
MAX_MESSAGES = 32
#: Seconds a received message stays invisible to others; past it, an unacknowledged
#: message is delivered again. Far above the time to HEAD and commit one batch.
VISIBILITY_TIMEOUT = 60
#: Longest pause between two polls of an empty queue (the latency bound when idle).
POLL_INTERVAL = 1.0
#: First pause after a poll found nothing: busy queues are read back to back.
_FIRST_PAUSE = 0.05
#: Seconds without messages before an empty batch tells the consumer the source is alive.
IDLE_REPORT = 20.0

_CREATED = "Microsoft.Storage.BlobCreated"
_DELETED = "Microsoft.Storage.BlobDeleted"
_RENAMED = "Microsoft.Storage.BlobRenamed"


# --------------------------------------------------------------------------- parsing (pure)


def decode_message(content: str) -> list[dict[str, Any]]:
    """The events in one queue message: base64 JSON as Event Grid writes it, or plain JSON.

    A message holds one event; an array of events is accepted too.
    """
    text = content.strip()
    if not text.startswith(("{", "[")):
        try:
            text = base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Malformed("neither base64 nor JSON") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise Malformed(f"not JSON ({exc})") from None
    events = doc if isinstance(doc, list) else [doc]
    if not events or not all(isinstance(e, dict) for e in events):
        raise Malformed("not an Event Grid event (a JSON object) or an array of them")
    return events


def parse_message(content: str, account: str, scope: Scope) -> list[Event]:
    """The driver's events in one queue message; ``Malformed`` when it is not Event Grid or CloudEvents."""
    return [event for doc in decode_message(content) for event in parse_event(doc, account, scope)]


def parse_event(doc: dict[str, Any], account: str, scope: Scope) -> list[Event]:
    """One Event Grid (``eventType``) or CloudEvents 1.0 (``type``, ``specversion``) event."""
    kind = doc.get("eventType") if "eventType" in doc else doc.get("type")
    if not isinstance(kind, str):
        raise Malformed("neither an Event Grid eventType nor a CloudEvents type")
    if kind not in (_CREATED, _DELETED, _RENAMED):  # tier changes, directories, policies: no content change
        return []
    data = doc.get("data")
    if not isinstance(data, dict):
        raise Malformed(f"{kind} event without a data object")
    at = timestamp(doc.get("eventTime") if "eventTime" in doc else doc.get("time"))
    token = data.get("sequencer")
    if token is not None and not isinstance(token, str):
        raise Malformed("data.sequencer is not a string")
    if kind == _RENAMED:
        gone = _event(EventKind.REMOVED, data, "sourceUrl", account, scope, token, at)
        new = _event(EventKind.CHANGED, data, "destinationUrl", account, scope, token, at)
        return [e for e in (gone, new) if e is not None]
    plain = EventKind.CHANGED if kind == _CREATED else EventKind.REMOVED
    change = _event(plain, data, "url", account, scope, token, at)
    return [] if change is None else [change]


def _event(
    kind: EventKind, data: dict[str, Any], field: str, account: str, scope: Scope, token: str | None, at: float | None
) -> Event | None:
    url = data.get(field)
    if not isinstance(url, str):
        raise Malformed(f"data.{field} is missing")
    where = blob_of(url, account)
    if where is None:
        return None
    key = scope.key(*where)
    if key is None:
        return None
    etag, size = data.get("eTag"), data.get("contentLength")
    return Event(
        key=key,
        kind=kind,
        token=token or None,
        etag=etag if isinstance(etag, str) and etag else None,
        size=size if isinstance(size, int) and not isinstance(size, bool) and kind is EventKind.CHANGED else None,
        at=at,
    )


def blob_of(url: str, account: str) -> tuple[str, str] | None:
    """(container, blob name) of a blob URL in ``account``, or ``None`` for another account's.

    Both URL styles: ``https://ACCOUNT.blob.core.windows.net/CONTAINER/NAME`` and the
    path style of emulators and custom endpoints, ``http://HOST/ACCOUNT/CONTAINER/NAME``.
    The path is percent-encoded; ``+`` is a plus there, not a space.
    """
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        raise Malformed(f"blob URL {url!r} is not a URL")
    path = parts.path.lstrip("/")
    if not parts.hostname.startswith(f"{account}."):
        owner, _, path = path.partition("/")
        if owner != account:
            return None
    container, _, name = path.partition("/")
    return container, unquote(name)


# --------------------------------------------------------------------------- the source


class AzureQueueSource:
    """Batches of one Storage Queue's Event Grid blob events for one driver."""

    name = "azure-queue"

    def __init__(
        self,
        account_url: str,
        queue: str,
        credential: Credential,
        account: str,
        scope: Scope,
        *,
        close_credential: bool = False,
        visibility_timeout: int = VISIBILITY_TIMEOUT,
        poll_interval: float = POLL_INTERVAL,
        idle_report: float = IDLE_REPORT,
        attempts: int = 4,
        retry_base: float = 0.2,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.queue = queue
        self.account = account
        self.scope = scope
        self.where = f"{account_url.rstrip('/')}/{queue}"
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.idle_report = idle_report
        self.attempts = attempts
        self.retry_base = retry_base
        self._credential = credential
        self._close_credential = close_credential
        self._client = QueueClient(
            account_url,
            queue,
            credential=credential,
            retry_total=0,  # retries are ours, as in the Blob store
            connection_timeout=connect_timeout,
            read_timeout=read_timeout,
        )

    def __repr__(self) -> str:  # never the credentials
        return f"AzureQueueSource({self.where!r})"

    async def _retried(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        """One queue call, retried on transient errors, errors translated (naming the queue)."""

        async def once() -> T:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise translate(exc, action, f"queue {self.where}") from None

        return await retrying(once, attempts=self.attempts, base=self.retry_base)

    async def _call(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        """``_retried``, with any error left as ``SourceFailed``: the source cannot go on."""
        try:
            return await self._retried(action, call)
        except StorageError as exc:
            raise SourceFailed(f"azure-queue {self.where}: {_reason(exc)}") from None

    async def _receive(self) -> list[Any]:
        async def receive() -> list[Any]:
            pages = self._client.receive_messages(
                messages_per_page=MAX_MESSAGES, max_messages=MAX_MESSAGES, visibility_timeout=self.visibility_timeout
            )
            return [message async for message in pages]

        return await self._call("receive messages from", receive)

    def _batch(self, messages: list[Any]) -> Batch:
        events: list[Event] = []
        for message in messages:
            try:
                events.extend(parse_message(str(message.content or ""), self.account, self.scope))
            except Malformed as exc:
                log.warning(
                    "malformed event message dropped", source=self.name, queue=self.where,
                    message_id=message.id, error=str(exc),
                )  # fmt: skip
        receipts = [(m.id, m.pop_receipt) for m in messages]
        return Batch(events, ack=lambda: self._delete(receipts))

    async def _delete(self, receipts: list[tuple[str, str]]) -> None:
        """Delete acknowledged messages (the Queue service deletes one message per request)."""

        async def delete(message_id: str, pop_receipt: str) -> None:
            try:
                await self._retried(
                    "delete a message from", lambda: self._client.delete_message(message_id, pop_receipt)
                )
            except (PermissionDenied, Transient) as exc:
                raise SourceFailed(f"azure-queue {self.where}: {_reason(exc)}") from None
            except StorageError as exc:
                # The visibility timeout ran out, so the pop receipt is stale (404 or 400): the message
                # comes back and is applied again, which converges (an event is a hint).
                log.warning("event message not deleted; it will be delivered again", queue=self.where,
                            message_id=message_id, error=str(exc))  # fmt: skip

        await asyncio.gather(*(delete(message_id, receipt) for message_id, receipt in receipts))

    async def batches(self) -> AsyncIterator[Batch]:
        pause, idle = _FIRST_PAUSE, 0.0
        while True:
            messages = await self._receive()
            if messages:
                pause, idle = _FIRST_PAUSE, 0.0
                yield self._batch(messages)
                continue
            if idle >= self.idle_report:
                idle = 0.0
                yield Batch([])
            await asyncio.sleep(pause)
            idle += pause
            pause = min(pause * 2, self.poll_interval)

    async def aclose(self) -> None:
        await self._client.close()
        if self._close_credential:
            close = getattr(self._credential, "close", None)
            if close is not None:
                await close()


def _reason(exc: StorageError) -> str:
    if isinstance(exc, NotFound):
        return f"the queue does not exist ({exc})"
    if isinstance(exc, PermissionDenied):
        return f"access denied ({exc}); the credential needs the Storage Queue Data Message Processor role"
    if isinstance(exc, Transient):
        return f"unreachable after retries ({exc})"
    return str(exc)


def open_azure_queue(
    driver: DriverConfig, integration: AzureIntegration | None, *, queue: str, endpoint_url: str | None = None
) -> AzureQueueSource:
    """The source for an ``az://`` driver: the account and credential the Blob store uses, the Queue endpoint.

    ``endpoint_url`` is the Queue service endpoint (emulators, private endpoints); else
    the connection string's ``QueueEndpoint``, else ``https://ACCOUNT.queue.core.windows.net``.
    """
    loc = driver.location
    if loc.scheme != "az":
        raise ConfigError(f"events source 'azure-queue' needs an az:// driver, not {driver.url!r}")
    if not queue or "/" in queue:
        raise ConfigError(f"events queue {queue!r}: an azure-queue source needs the queue's name")
    url, credential, owned = credentials(loc, driver, integration, service="queue", endpoint_url=endpoint_url)
    return AzureQueueSource(
        url,
        queue,
        credential,
        loc.account,
        Scope(loc.bucket, loc.prefix),
        close_credential=owned,
        connect_timeout=driver.connect_timeout,
        read_timeout=driver.read_timeout,
    )


def open_source(ctx: SourceContext) -> AzureQueueSource:
    """The consumer's entry point (see ``events.open_source``): ``[drivers.X.events]`` of the dataset's driver."""
    events = ctx.driver.events
    assert events is not None and events.queue is not None  # the config requires both for azure-queue
    integration = ctx.settings.integrations.get(ctx.driver.integration) if ctx.driver.integration else None
    if integration is not None and not isinstance(integration, AzureIntegration):
        raise SourceFailed(f"driver {ctx.driver_name!r}: integration {ctx.driver.integration!r} is not azure")
    try:
        return open_azure_queue(ctx.driver, integration, queue=events.queue, endpoint_url=events.endpoint_url)
    except ConfigError as exc:
        raise SourceFailed(str(exc)) from None
