"""``source = "sqs"``: S3 Event Notifications read from an SQS queue.

S3 can deliver its notifications to SQS directly, through an SNS topic (the body is an
SNS envelope whose ``Message`` is the S3 notification as a JSON string; "raw message
delivery" leaves the S3 notification as is) or through EventBridge (the body is an
EventBridge event, ``detail-type`` "Object Created" / "Object Deleted"). All three are
understood; ``s3:TestEvent`` (sent once when a notification is configured) is not a change.

Acknowledgement. A message is deleted only in its batch's ``ack``, which the consumer
calls after the batch's effect is committed to the ledger. A message never acked
(the agent crashed, the commit failed) becomes visible again after the queue's
visibility timeout and is delivered again: at least once, never lost.

Malformed messages are logged with their message id and deleted with their batch,
not left to a redrive policy: they can never parse, so every redelivery would cost a
receive and a warning until ``maxReceiveCount``, and nothing is lost by dropping one
because an event is only a hint and the reconcile run lists the bucket anyway.

Failures. A queue that does not exist, credentials that are refused, or a queue
endpoint that stays unreachable after a few retries raise ``SourceFailed`` naming the
queue; the consumer falls back to polling and retries the source later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus, urlsplit

import structlog
from botocore.config import Config

from bucketsync.config import AwsIntegration
from bucketsync.core.errors import ConfigError, NotFound, PermissionDenied, StorageError, Transient
from bucketsync.core.retry import retrying
from bucketsync.stores.s3 import aws_credentials, aws_session, translate
from bucketsync.upstream.events import Batch, Event, EventKind, SourceContext, SourceFailed
from bucketsync.upstream.events.scope import Malformed, Scope, hex_token, timestamp

if TYPE_CHECKING:
    from bucketsync.config import DriverConfig

log = structlog.get_logger(__name__)

#: SQS's longest long poll: one request per 20 s on an idle queue, an answer as soon as a message lands.
WAIT_SECONDS = 20
#: SQS's largest batch per ReceiveMessage (and per DeleteMessageBatch).
MAX_MESSAGES = 10
#: Long polls in flight at once. SQS spreads a queue over servers, and one poll sees only
#: some of them; two keep up with bursts while bounding the messages held unacknowledged.
RECEIVERS = 2
_QUEUE_NOT_FOUND = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_SQS_HOST = re.compile(r"^sqs\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$")
_EVENTBRIDGE = {"Object Created": EventKind.CHANGED, "Object Deleted": EventKind.REMOVED}


# --------------------------------------------------------------------------- parsing (pure)


def parse_message(body: str, scope: Scope) -> list[Event]:
    """The driver's events in one SQS message body, in any of the three delivery forms.

    Raises ``Malformed`` for a body that is none of them. Events for other buckets or
    prefixes, and event types that do not change content, yield nothing.
    """
    doc = _json(body, "body")
    if doc.get("Type") == "Notification" and "Message" in doc:  # SNS envelope
        doc = _json(doc["Message"], "SNS Message")
    if "detail-type" in doc:
        return _eventbridge(doc, scope)
    if doc.get("Event") == "s3:TestEvent":
        return []
    records = doc.get("Records")
    if not isinstance(records, list):
        raise Malformed("neither S3 notification Records, an SNS envelope nor an EventBridge event")
    return [event for record in records if (event := _record(record, scope)) is not None]


def _json(text: object, what: str) -> dict[str, Any]:
    if not isinstance(text, str):
        raise Malformed(f"{what} is not a string")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise Malformed(f"{what} is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise Malformed(f"{what} is not a JSON object")
    return doc


def _field(doc: object, *path: str) -> Any:
    for name in path:
        if not isinstance(doc, dict) or name not in doc:
            raise Malformed(f"missing {'.'.join(path)}")
        doc = doc[name]
    return doc


def _kind(event_name: str) -> EventKind | None:
    # AWS writes "ObjectCreated:Put"; MinIO and others "s3:ObjectCreated:Put".
    family = event_name.removeprefix("s3:").split(":", 1)[0]
    return {"ObjectCreated": EventKind.CHANGED, "ObjectRemoved": EventKind.REMOVED}.get(family)


def _record(record: object, scope: Scope) -> Event | None:
    name = _field(record, "eventName")
    if not isinstance(name, str):
        raise Malformed("eventName is not a string")
    kind = _kind(name)
    if kind is None:  # tagging, ACL, restore, lifecycle transition: the content is the same
        return None
    obj = _field(record, "s3", "object")
    return _event(kind, _field(record, "s3", "bucket", "name"), obj, "eTag", _field(record, "eventTime"), scope)


def _eventbridge(doc: dict[str, Any], scope: Scope) -> list[Event]:
    kind = _EVENTBRIDGE.get(str(doc["detail-type"]))
    if kind is None:  # restore, tagging, storage class changes
        return []
    detail = _field(doc, "detail")
    event = _event(kind, _field(detail, "bucket", "name"), _field(detail, "object"), "etag", doc.get("time"), scope)
    return [] if event is None else [event]


def _event(kind: EventKind, bucket: object, obj: object, etag_field: str, at: object, scope: Scope) -> Event | None:
    raw = _field(obj, "key")
    if not isinstance(raw, str) or not isinstance(bucket, str):
        raise Malformed("bucket name or object key is not a string")
    key = scope.key(bucket, unquote_plus(raw))  # keys arrive URL-encoded, '+' for a space
    if key is None:
        return None
    assert isinstance(obj, dict)
    size = obj.get("size")
    etag = obj.get(etag_field)
    return Event(
        key=key,
        kind=kind,
        token=hex_token(obj.get("sequencer")),
        etag=etag if isinstance(etag, str) and etag else None,
        size=size if isinstance(size, int) and not isinstance(size, bool) and kind is EventKind.CHANGED else None,
        at=timestamp(at),
    )


# --------------------------------------------------------------------------- the source


def region_of(queue_url: str) -> str | None:
    """The region in an AWS queue URL (``https://sqs.eu-west-1.amazonaws.com/...``), else ``None``."""
    match = _SQS_HOST.match(urlsplit(queue_url).hostname or "")
    return match.group(1) if match else None


def _endpoint_of(queue_url: str) -> str | None:
    """A queue URL outside AWS (an emulator, LocalStack) names its server: use it as the endpoint.

    botocore sends SQS requests to the client's endpoint, not to the queue URL's host.
    """
    if region_of(queue_url) is not None:
        return None
    parts = urlsplit(queue_url)
    return f"{parts.scheme}://{parts.netloc}"


def check_queue_url(queue: str) -> str:
    """The queue URL as given, or a ``ConfigError`` naming it (SQS addresses queues by URL)."""
    parts = urlsplit(queue)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.count("/") != 2:
        raise ConfigError(
            f"events queue {queue!r}: an sqs source needs the queue URL, "
            "e.g. https://sqs.eu-west-1.amazonaws.com/123456789012/raw-events"
        )
    return queue


class SqsSource:
    """Batches of one SQS queue's S3 notifications for one driver."""

    name = "sqs"

    def __init__(
        self,
        queue_url: str,
        scope: Scope,
        *,
        credentials: dict[str, str] | None = None,
        profile: str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        wait_seconds: int = WAIT_SECONDS,
        receivers: int = RECEIVERS,
        attempts: int = 4,
        retry_base: float = 0.2,
        connect_timeout: float = 5.0,
    ) -> None:
        self.queue_url = check_queue_url(queue_url)
        self.scope = scope
        self.region = region or region_of(queue_url) or "us-east-1"
        self.endpoint_url = endpoint_url or _endpoint_of(queue_url)
        self.wait_seconds = wait_seconds
        self.receivers = receivers
        self.attempts = attempts
        self.retry_base = retry_base
        self._credentials = credentials or {}
        self._profile = profile
        self._config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # retries are ours, as in the S3 store
            connect_timeout=connect_timeout,
            read_timeout=wait_seconds + 10,  # a long poll legitimately stays silent for wait_seconds
            max_pool_connections=receivers + 2,
        )
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()

    def __repr__(self) -> str:  # never the credentials
        return f"SqsSource({self.queue_url!r})"

    async def _sqs(self) -> Any:
        if self._client is None:
            session = aws_session(self._profile)
            self._client = await self._stack.enter_async_context(
                session.create_client(
                    "sqs",
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    config=self._config,
                    **self._credentials,
                )
            )
        return self._client

    async def request(self, op: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
        """``call(sqs client)``, retried on transient errors, errors translated (naming the queue)."""

        async def once() -> Any:
            try:
                return await call(await self._sqs())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise _translate(exc, self.queue_url, op) from exc

        return await retrying(once, attempts=self.attempts, base=self.retry_base)

    async def _call(self, op: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
        """``request``, with any error left as ``SourceFailed``: the source cannot go on."""
        try:
            return await self.request(op, call)
        except StorageError as exc:
            raise SourceFailed(f"sqs queue {self.queue_url}: {_reason(exc)}") from exc

    async def _receive(self) -> list[dict[str, Any]]:
        resp = await self._call(
            "receive",
            lambda sqs: sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=MAX_MESSAGES,
                WaitTimeSeconds=self.wait_seconds,
            ),
        )
        messages: list[dict[str, Any]] = resp.get("Messages") or []
        return messages

    def _batch(self, messages: list[dict[str, Any]]) -> Batch:
        events: list[Event] = []
        for message in messages:
            try:
                events.extend(parse_message(message.get("Body", ""), self.scope))
            except Malformed as exc:
                log.warning(
                    "malformed event message dropped", source=self.name, queue=self.queue_url,
                    message_id=message.get("MessageId"), error=str(exc),
                )  # fmt: skip
        handles = [m["ReceiptHandle"] for m in messages]
        return Batch(events, ack=lambda: self._delete(handles))

    async def _delete(self, handles: list[str]) -> None:
        """Delete acknowledged messages, ten per request (SQS's limit)."""
        for start in range(0, len(handles), MAX_MESSAGES):
            entries = [{"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(handles[start : start + MAX_MESSAGES])]

            def delete(sqs: Any, entries: list[dict[str, str]] = entries) -> Awaitable[Any]:
                return sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)  # type: ignore[no-any-return]

            resp = await self._call("delete", delete)
            for failed in resp.get("Failed") or []:
                # Usually a receipt handle whose visibility timeout ran out: the message comes
                # back and is applied again, which converges (an event is a hint).
                log.warning(
                    "event message not deleted; it will be delivered again", queue=self.queue_url,
                    code=failed.get("Code"), error=failed.get("Message"),
                )  # fmt: skip

    async def _receiver(self, out: asyncio.Queue[Batch | SourceFailed]) -> None:
        try:
            while True:
                await out.put(self._batch(await self._receive()))
        except SourceFailed as exc:
            await out.put(exc)
        except Exception as exc:  # a bug must end the source loudly, not leave batches() waiting forever
            await out.put(SourceFailed(f"sqs queue {self.queue_url}: {type(exc).__name__}: {exc}"))

    async def batches(self) -> AsyncIterator[Batch]:
        # Bounded: each receiver waits until its batch is taken, so the source holds at most
        # 2 * receivers * MAX_MESSAGES messages the consumer has not taken yet.
        out: asyncio.Queue[Batch | SourceFailed] = asyncio.Queue(maxsize=self.receivers)
        tasks = [asyncio.create_task(self._receiver(out), name=f"sqs-receive-{i}") for i in range(self.receivers)]
        try:
            while True:
                item = await out.get()
                if isinstance(item, SourceFailed):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        self._client = None
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()


def _translate(exc: BaseException, queue_url: str, op: str) -> StorageError:
    err = translate(exc, queue_url, op)
    code = str(((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code") or "")
    if code in _QUEUE_NOT_FOUND:
        return NotFound(f"{op} {queue_url}: the queue does not exist")
    return err


def _reason(exc: StorageError) -> str:
    if isinstance(exc, NotFound):
        return "the queue does not exist (create it, e.g. with `bucketsync events setup DRIVER --apply`)"
    if isinstance(exc, PermissionDenied):
        return f"access denied ({exc}); the credentials need sqs:ReceiveMessage and sqs:DeleteMessage"
    if isinstance(exc, Transient):
        return f"unreachable after retries ({exc})"
    return str(exc)


def open_sqs(
    driver: DriverConfig, integration: AwsIntegration | None, *, queue: str, endpoint_url: str | None = None
) -> SqsSource:
    """The source for an ``s3://`` driver: credentials and region as the S3 store takes them."""
    loc = driver.location
    if loc.scheme != "s3":
        raise ConfigError(f"events source 'sqs' needs an s3:// driver, not {driver.url!r}")
    credentials, profile = aws_credentials(integration)
    return SqsSource(
        queue,
        Scope(loc.bucket, loc.prefix),
        credentials=credentials,
        profile=profile,
        region=driver.region or region_of(queue),
        endpoint_url=endpoint_url,
        connect_timeout=driver.connect_timeout,
    )


def open_source(ctx: SourceContext) -> SqsSource:
    """The consumer's entry point (see ``events.open_source``): ``[drivers.X.events]`` of the dataset's driver."""
    events = ctx.driver.events
    assert events is not None and events.queue is not None  # the config requires both for sqs
    integration = ctx.settings.integrations.get(ctx.driver.integration) if ctx.driver.integration else None
    if integration is not None and not isinstance(integration, AwsIntegration):
        raise SourceFailed(f"driver {ctx.driver_name!r}: integration {ctx.driver.integration!r} is not aws")
    try:
        return open_sqs(ctx.driver, integration, queue=events.queue, endpoint_url=events.endpoint_url)
    except ConfigError as exc:
        raise SourceFailed(str(exc)) from None
