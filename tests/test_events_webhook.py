"""Parsing what storage posts to the webhook routes (pure functions), and the inbox's bound."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from bucketsync import metrics
from bucketsync.agent import Agent
from bucketsync.config import Settings
from bucketsync.core.location import parse_location
from bucketsync.server.api import make_app
from bucketsync.upstream.events import EventKind
from bucketsync.upstream.events.webhook import BadPayload, gcs_events, s3_events
from emulators.gcs import FakeGcs

S3 = parse_location("s3://bkt/in/")
GS = parse_location("gs://bkt/in/")


def rec(name: str, key: str, bucket: str = "bkt", seq: str | None = "0A") -> dict[str, Any]:
    obj: dict[str, Any] = {"key": key, "size": 3, "eTag": '"abc"'}
    if seq is not None:
        obj["sequencer"] = seq
    return {"eventName": name, "eventTime": "2026-01-01T00:00:01Z", "s3": {"bucket": {"name": bucket}, "object": obj}}


def test_s3_records_decode_keys_order_tokens_and_ignore_other_places() -> None:
    events, ignored = s3_events(
        {
            "EventName": "s3:ObjectCreated:Put",  # MinIO's extra top-level fields are fine
            "Records": [
                rec("s3:ObjectCreated:Put", "in/a+b%2Bc.txt", seq="FF"),
                rec("ObjectRemoved:Delete", "in/x", seq="0100"),  # AWS spells it without "s3:"
                rec("s3:ObjectCreated:Put", "out/x"),  # outside the prefix
                rec("s3:ObjectCreated:Put", "in/x", bucket="other"),  # another bucket
                rec("s3:ObjectTagging:Put", "in/t", seq=None),
            ],
        },
        S3,
    )
    assert ignored == 2
    assert [(e.key, e.kind, e.etag, e.size) for e in events] == [
        ("a b+c.txt", EventKind.CHANGED, "abc", 3),
        ("x", EventKind.REMOVED, "abc", 3),
        ("t", EventKind.CHANGED, "abc", 3),
    ]
    assert events[0].token is not None and events[1].token is not None
    assert events[0].token < events[1].token  # 0xFF < 0x100 once padded: text order is number order
    assert events[2].token is None and events[0].at == 1767225601.0


def test_an_s3_test_event_has_no_records() -> None:
    assert s3_events({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "bkt"}, S3) == ([], 0)


@pytest.mark.parametrize(
    ("body", "culprit"),
    [
        ({"Records": [{"eventName": "s3:ObjectCreated:Put"}]}, "Records.0.s3"),
        ({"Records": [rec("s3:Replication:OperationFailed", "in/a")]}, "Records.0.eventName"),
        ({"Records": [rec("s3:ObjectCreated:Put", "in/a", seq="xyz")]}, "Records.0.s3.object.sequencer"),
        ({"Records": [{**rec("s3:ObjectCreated:Put", "in/a"), "eventTime": "yesterday"}]}, "Records.0.eventTime"),
        ({"Records": "nope"}, "Records"),
    ],
)
def test_bad_s3_payloads_name_the_culprit(body: Any, culprit: str) -> None:
    with pytest.raises(BadPayload, match=culprit.replace(".", r"\.")):
        s3_events(body, S3)


def push(event: str, name: str, generation: str = "7", bucket: str = "bkt", **extra: Any) -> dict[str, Any]:
    resource = {"bucket": bucket, "name": name, "generation": generation, "size": "12", "md5Hash": "bWQ1"}
    attrs = {"eventType": event, "bucketId": bucket, "objectId": name, "objectGeneration": generation,
             "payloadFormat": "JSON_API_V1", "eventTime": "2026-01-01T00:00:02.5Z"}  # fmt: skip
    return {"message": {"attributes": attrs, "data": base64.b64encode(json.dumps(resource).encode()).decode(), **extra}}


def test_gcs_push_kinds_generations_and_places() -> None:
    (fin,), _ = gcs_events(push("OBJECT_FINALIZE", "in/p q.png", "9"), GS)
    (dele,), _ = gcs_events(push("OBJECT_DELETE", "in/p q.png", "10"), GS)
    (meta,), _ = gcs_events(push("OBJECT_METADATA_UPDATE", "in/m"), GS)
    (arch,), _ = gcs_events(push("OBJECT_ARCHIVE", "in/m"), GS)
    assert (fin.key, fin.kind, fin.size, fin.etag, fin.at) == ("p q.png", EventKind.CHANGED, 12, "bWQ1", 1767225602.5)
    assert dele.kind is EventKind.REMOVED and arch.kind is EventKind.REMOVED and meta.kind is EventKind.CHANGED
    assert fin.token is not None and dele.token is not None and fin.token < dele.token  # 9 < 10
    assert gcs_events(push("OBJECT_FINALIZE", "elsewhere/x"), GS) == ([], 1)
    assert gcs_events(push("OBJECT_FINALIZE", "in/x", bucket="nope"), GS) == ([], 1)


@pytest.mark.parametrize(
    ("body", "culprit"),
    [
        ({}, "message"),
        (push("OBJECT_EXPLODE", "in/x"), "eventType"),
        ({"message": {"attributes": {"eventType": "OBJECT_FINALIZE"}, "data": "!!"}}, "message.data"),
        (push("OBJECT_FINALIZE", "in/x", "g7"), "objectGeneration"),
        ({"message": {"attributes": {"eventType": "OBJECT_FINALIZE", "payloadFormat": "XML"}}}, "payloadFormat"),
        ({"message": {"attributes": {"eventType": "OBJECT_FINALIZE", "payloadFormat": "NONE"}}}, "objectId"),
    ],
)
def test_bad_gcs_pushes_name_the_culprit(body: Any, culprit: str) -> None:
    with pytest.raises(BadPayload, match=culprit):
        gcs_events(body, GS)


# -- the inbox is bounded (a real ledger and agent, real HTTP, fake-gcs-server) ----------------


def push_of(key: str, generation: int) -> dict[str, Any]:
    resource = {"kind": "storage#object", "bucket": "bkt", "name": f"in/{key}", "generation": str(generation)}
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": "bkt", "objectId": f"in/{key}",
                  "objectGeneration": str(generation), "payloadFormat": "JSON_API_V1"}  # fmt: skip
    data = base64.b64encode(json.dumps(resource).encode()).decode()
    return {"message": {"attributes": attributes, "data": data, "messageId": str(generation)}}


async def test_a_full_inbox_keeps_nothing_more_counts_the_events_and_asks_for_a_reconcile(
    tmp_path: Path, fake_gcs: FakeGcs
) -> None:
    """Nothing drains an inbox while its dataset is not ready; past ``inbox_max`` a post keeps
    nothing (202, ``deferred``), the events are counted and a reconcile listing is asked for,
    and the warning is logged once per episode, not once per post."""
    fake_gcs.create_bucket("bkt")
    events = {"source": "webhook", "inbox_max": 3}
    settings = Settings(
        agent={"ledger": tmp_path / "ledger.db"},
        drivers={"g": {"url": "gs://bkt/in/", "endpoint_url": fake_gcs.url, "events": events}},
        datasets={"cat": {"driver": "g", "sync": "events"}},
    )
    metrics.init(settings.datasets)
    deferred = metrics.EVENTS_DROPPED.labels("cat", "inbox_full")
    before = deferred._value.get()
    async with Agent(settings) as agent, TestClient(TestServer(make_app(agent, asyncio.Event()))) as client:
        assert agent.ledger is not None
        ds = await agent.ledger.dataset_id("cat")

        async def post(*keys: str) -> dict[str, Any]:
            resp = await client.post("/api/v1/events/gcs/cat", json=push_of(keys[0], 1))
            for key in keys[1:]:  # one push is one event; the rest one by one
                assert (await client.post("/api/v1/events/gcs/cat", json=push_of(key, 1))).status == 202
            assert resp.status == 202
            body: dict[str, Any] = await resp.json()
            return body

        assert await post("a", "b", "c") == {"accepted": 1, "ignored": 0}
        loop = agent.loop("cat")
        loop.wake.clear()
        with capture_logs() as logs:
            assert await post("d") == {"accepted": 0, "ignored": 0, "deferred": 1}
            assert await post("e") == {"accepted": 0, "ignored": 0, "deferred": 1}
        taken = await agent.ledger.inbox_take(ds, 0, 10)
        assert [e[0] for _, e in taken] == ["a", "b", "c"], "nothing past the cap is kept"
        assert deferred._value.get() == before + 2
        assert loop.wake.is_set(), "a reconcile listing is asked for"
        assert [r["event"] for r in logs if r["log_level"] == "warning"] == [
            "event inbox full: events are counted, not kept, and a reconcile listing is requested"
        ]
        await agent.ledger.inbox_done([i for i, _ in taken])  # the consumer applied them
        with capture_logs() as logs:
            assert await post("f") == {"accepted": 1, "ignored": 0}
        assert [r["event"] for r in logs] == ["event inbox takes events again"]
