"""The ``webhook`` source: events posted to the API, through a durable inbox in the ledger.

Two routes take them (server/routes/events.py):

- ``POST /api/v1/events/s3/{dataset}``: S3 event records, as MinIO and Ceph RGW post
  them (``{"Records": [...]}``; MinIO adds ``EventName`` and ``Key``). Keys arrive
  URL-encoded with ``+`` for a space. The ``sequencer`` is the ordering token.
- ``POST /api/v1/events/gcs/{dataset}``: a Pub/Sub push envelope whose message carries a
  Cloud Storage notification (``payloadFormat`` ``JSON_API_V1``; ``eventType``
  ``OBJECT_FINALIZE``, ``OBJECT_DELETE``, ``OBJECT_METADATA_UPDATE``, ``OBJECT_ARCHIVE``).
  The object's ``generation`` is the ordering token.

The route parses the payload here (pure functions, 400 naming the culprit for a bad
one), writes the events to the inbox in one transaction and answers 202: from then on
a crash loses none of them. ``WebhookSource`` reads the inbox, oldest first, and
deletes entries only once the consumer has committed their effect (``Batch.ack``).
Records of another bucket, or for keys outside the driver's prefix, are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bucketsync.core.location import Location
from bucketsync.ledger.ledger import InboxEvent, Ledger
from bucketsync.upstream.events import Batch, Event, EventKind, SourceContext

#: the header a poster sends the per-driver shared secret in (the API token works too)
SECRET_HEADER = "X-Bucketsync-Secret"
#: inbox entries read into one batch
INBOX_BATCH = 2000
#: an empty batch at least this often when nothing is posted (the consumer notices a stop)
IDLE = 1.0


class BadPayload(ValueError):
    """The posted body is not what the route takes; the message names the culprit."""


# -- the payloads, as typed models (also the OpenAPI document's request bodies) -----


class _Open(BaseModel):
    """Providers add fields over time: unknown ones are kept, not refused."""

    model_config = ConfigDict(extra="allow")


class S3Object(_Open):
    key: str = Field(description="the object key, URL-encoded ('+' for a space)")
    size: int | None = None
    eTag: str | None = None
    sequencer: str | None = Field(default=None, description="orders the events of one key (hex)")


class S3Bucket(_Open):
    name: str


class S3Entity(_Open):
    bucket: S3Bucket
    object: S3Object


class S3Record(_Open):
    eventName: str = Field(description="e.g. s3:ObjectCreated:Put, ObjectRemoved:Delete")
    eventTime: str | None = None
    s3: S3Entity


class S3Notification(_Open):
    """S3 event records, as MinIO and Ceph RGW post them (an ``s3:TestEvent`` has none)."""

    Records: list[S3Record] = Field(default_factory=list)


class PubSubMessage(_Open):
    attributes: dict[str, str] = Field(
        description="eventType, bucketId, objectId, objectGeneration, payloadFormat, eventTime"
    )
    data: str | None = Field(default=None, description="base64 of the object resource (JSON_API_V1)")
    messageId: str | None = None
    publishTime: str | None = None


class PubSubPush(_Open):
    """A Pub/Sub push request carrying a Cloud Storage notification."""

    message: PubSubMessage
    subscription: str | None = None


class Accepted(BaseModel):
    accepted: int = Field(description="events written to the inbox")
    ignored: int = Field(description="records for another bucket or outside the driver's prefix")
    deferred: int = Field(
        0,
        description="events not kept because the dataset's inbox is full (events.inbox_max); the reconcile "
        "listing asked for instead brings in what they said",
    )


# -- parsing (pure) ----------------------------------------------------------------

_M = TypeVar("_M", bound=BaseModel)


def _validated(model: type[_M], body: Any) -> _M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise BadPayload(f"{where}: {err['msg']}") from None


def _relative(loc: Location, bucket: str, key: str) -> str | None:
    """The key relative to the driver's prefix; None for another bucket or a key outside it."""
    if bucket != loc.bucket or not key.startswith(loc.prefix):
        return None
    return key[len(loc.prefix) :] or None


def _time(raw: str | None, where: str) -> float | None:
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise BadPayload(f"{where}: {raw!r} is not an ISO 8601 time") from None


def s3_events(body: Any, loc: Location) -> tuple[list[Event], int]:
    """S3 event records -> events (and how many were ignored)."""
    note = _validated(S3Notification, body)
    out: list[Event] = []
    ignored = 0
    for i, rec in enumerate(note.Records):
        name = rec.eventName
        if "ObjectRemoved" in name or "LifecycleExpiration" in name:
            kind = EventKind.REMOVED
        elif "ObjectCreated" in name or "ObjectRestore" in name or name.startswith(("s3:Object", "Object")):
            kind = EventKind.CHANGED  # tags, ACLs, restores: a HEAD says what changed
        else:
            raise BadPayload(f"Records.{i}.eventName: {name!r} is not an S3 object event")
        key = _relative(loc, rec.s3.bucket.name, unquote_plus(rec.s3.object.key))
        if key is None:
            ignored += 1
            continue
        seq = rec.s3.object.sequencer
        if seq is not None and not _is_hex(seq):
            raise BadPayload(f"Records.{i}.s3.object.sequencer: {seq!r} is not hexadecimal")
        token = seq.upper().rjust(32, "0") if seq else None  # compare hex of any length as text
        out.append(Event(key, kind, token, _etag(rec.s3.object.eTag), rec.s3.object.size,
                         _time(rec.eventTime, f"Records.{i}.eventTime")))  # fmt: skip
    return out, ignored


_GCS_KINDS = {
    "OBJECT_FINALIZE": EventKind.CHANGED,
    "OBJECT_METADATA_UPDATE": EventKind.CHANGED,
    "OBJECT_DELETE": EventKind.REMOVED,
    "OBJECT_ARCHIVE": EventKind.REMOVED,  # a versioned bucket's live version became noncurrent
}


def gcs_events(body: Any, loc: Location) -> tuple[list[Event], int]:
    """A Pub/Sub push of a Cloud Storage notification -> one event (or it is ignored)."""
    push = _validated(PubSubPush, body)
    attrs = push.message.attributes
    kind_name = attrs.get("eventType")
    if kind_name is None:
        raise BadPayload("message.attributes.eventType: missing")
    if kind_name not in _GCS_KINDS:
        raise BadPayload(f"message.attributes.eventType: {kind_name!r} is not one of {', '.join(_GCS_KINDS)}")
    fmt = attrs.get("payloadFormat", "JSON_API_V1")
    if fmt not in ("JSON_API_V1", "NONE"):
        raise BadPayload(f"message.attributes.payloadFormat: {fmt!r}; use JSON_API_V1 (or NONE)")
    resource: dict[str, Any] = {}
    if push.message.data:
        try:
            resource = json.loads(base64.b64decode(push.message.data, validate=True))
        except (binascii.Error, ValueError):
            raise BadPayload("message.data: not base64 of a JSON object") from None
        if not isinstance(resource, dict):
            raise BadPayload("message.data: not a JSON object")
    bucket = attrs.get("bucketId") or resource.get("bucket")
    name = attrs.get("objectId") or resource.get("name")
    if not bucket or not name:
        raise BadPayload("message.attributes.bucketId and objectId: missing")
    key = _relative(loc, str(bucket), str(name))
    if key is None:
        return [], 1
    generation = attrs.get("objectGeneration") or resource.get("generation")
    if generation is not None and not str(generation).isdigit():
        raise BadPayload(f"message.attributes.objectGeneration: {generation!r} is not a number")
    token = str(generation).rjust(20, "0") if generation is not None else None
    size = resource.get("size")
    at = _time(attrs.get("eventTime") or push.message.publishTime, "message.attributes.eventTime")
    ev = Event(key, _GCS_KINDS[kind_name], token, resource.get("md5Hash"),
               int(size) if isinstance(size, str | int) and str(size).isdigit() else None, at)  # fmt: skip
    return [ev], 0


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
    except ValueError:
        return False
    return True


def _etag(raw: str | None) -> str | None:
    return raw.strip('"') if raw else None


def to_inbox(events: list[Event]) -> list[InboxEvent]:
    return [(e.key, str(e.kind), e.token, e.etag, e.size, e.at) for e in events]


# -- the source: the inbox, read in order ---------------------------------------------


class WebhookSource:
    name = "webhook"

    def __init__(self, ledger: Ledger, dataset_id: int, wake: asyncio.Event) -> None:
        self.ledger = ledger
        self.dataset_id = dataset_id
        self.wake = wake
        self.after = 0  # the last entry handed out (not yet acknowledged, maybe)

    def batches(self) -> AsyncIterator[Batch]:
        return self._batches()

    async def _batches(self) -> AsyncIterator[Batch]:
        while True:
            self.wake.clear()
            rows = await self.ledger.inbox_take(self.dataset_id, self.after, INBOX_BATCH)
            if not rows:
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=IDLE)
                except TimeoutError:
                    yield Batch([])
                continue
            self.after = rows[-1][0]
            ids = [r[0] for r in rows]
            events = [Event(k, EventKind(kind), tok, etag, size, at) for _, (k, kind, tok, etag, size, at) in rows]
            yield Batch(events, ack=_deleting(self.ledger, ids))

    async def aclose(self) -> None:
        return None


def _deleting(ledger: Ledger, ids: list[int]) -> Any:
    async def ack() -> None:
        await ledger.inbox_done(ids)

    return ack


def open_source(ctx: SourceContext) -> WebhookSource:
    return WebhookSource(ctx.ledger, ctx.dataset_id, ctx.inbox)
