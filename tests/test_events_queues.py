"""The queue event sources at the protocol level, on real queues: moto's SQS (with real S3
bucket notifications) and Azurite's Queue service (with the messages Event Grid would write).

What each test proves: the right events from real messages in every delivery form, a
message deleted only by ``ack``, an unacknowledged one delivered again after its
visibility timeout, a malformed one dropped without stopping the source, a missing
queue as ``SourceFailed`` naming it, and ``events setup --apply`` creating a working
S3 -> SQS pipeline on moto.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from bucketsync.config import AwsIntegration, AzureIntegration, DriverConfig, EventsConfig, Settings, load_settings
from bucketsync.core.errors import ConfigError, NotSupported
from bucketsync.upstream.events import Batch, Event, EventKind, EventSource, SourceFailed
from bucketsync.upstream.events import setup as events_setup
from bucketsync.upstream.events.azure_queue import AzureQueueSource, open_azure_queue
from bucketsync.upstream.events.azure_queue import parse_message as parse_azure
from bucketsync.upstream.events.scope import Scope
from bucketsync.upstream.events.sqs import SqsSource, open_sqs
from bucketsync.upstream.events.sqs import parse_message as parse_sqs
from e2e import cli, describe, write_config
from emulators import free_port
from emulators.azure import ACCOUNT, AzuriteQueue
from emulators.s3 import PREFIX, REGION, S3Emulator

#: a guard against a hang, never an assertion about speed
PATIENCE = 30.0

# --------------------------------------------------------------------------- helpers


def s3_driver(moto: S3Emulator, bucket: str, queue: str) -> DriverConfig:
    return DriverConfig(
        url=f"s3://{bucket}/{PREFIX}",
        integration="aws",
        endpoint_url=moto.endpoint_url,
        region=REGION,
        events=EventsConfig(source="sqs", queue=queue, endpoint_url=moto.endpoint_url),
    )


def aws(moto: S3Emulator) -> AwsIntegration:
    return AwsIntegration(
        kind="aws",
        access_key_id=SecretStr(moto.access_key_id),
        secret_access_key=SecretStr(moto.secret_access_key),
    )


def sqs_source(moto: S3Emulator, bucket: str, queue: str, **options: Any) -> SqsSource:
    source = open_sqs(s3_driver(moto, bucket, queue), aws(moto), queue=queue, endpoint_url=moto.endpoint_url)
    source.wait_seconds = options.get("wait_seconds", 1)  # short long polls: the tests end sooner
    source.attempts = options.get("attempts", 2)
    # one long poll at a time: a second one may hold messages the test counts as left over
    source.receivers = options.get("receivers", 1)
    source.retry_base = 0.01
    return source


async def take(source: EventSource, want: int) -> tuple[list[Event], list[Batch]]:
    """Batches until ``want`` events came (empty batches are skipped), without acknowledging."""
    events: list[Event] = []
    batches: list[Batch] = []
    async with asyncio.timeout(PATIENCE):
        async for batch in source.batches():
            if batch.events or batches:
                batches.append(batch)
            events.extend(batch.events)
            if len(events) >= want:
                return events, batches
    raise AssertionError("the source ended")


async def ack_all(batches: list[Batch]) -> None:
    for batch in batches:
        await batch.ack()


def sqs_in_queue(moto: S3Emulator, queue: str) -> int:
    """Messages still in the queue, visible or not (i.e. not deleted)."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attrs = moto.sqs().get_queue_attributes(QueueUrl=queue, AttributeNames=names)["Attributes"]
    return sum(int(attrs[n]) for n in names)


def s3_record(bucket: str, key: str, name: str = "ObjectCreated:Put", sequencer: str = "0A1B") -> dict[str, Any]:
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventTime": "2026-11-29T17:04:20.355Z",
        "eventName": name,
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": key, "size": 3, "eTag": "abc", "sequencer": sequencer},
        },
    }


# --------------------------------------------------------------------------- parsing (pure)


def test_s3_records_map_to_events_relative_to_the_prefix() -> None:
    scope = Scope("bkt", "some/prefix/")
    body = json.dumps(
        {
            "Records": [
                s3_record("bkt", "some/prefix/a+b%2Bc.txt"),  # '+' is a space, %2B a plus
                s3_record("bkt", "some/prefix/gone", "ObjectRemoved:DeleteMarkerCreated", "FF"),
                s3_record("bkt", "other/x"),  # outside the prefix
                s3_record("other-bucket", "some/prefix/y"),  # another bucket on the same queue
                s3_record("bkt", "some/prefix/folder/"),  # a folder marker is not an item
                s3_record("bkt", "some/prefix/.bucketsync/thumb"),  # the hidden folder neither
                s3_record("bkt", "some/prefix/tagged", "ObjectTagging:Put"),  # content unchanged
            ]
        }
    )
    events = parse_sqs(body, scope)
    assert [(e.key, e.kind) for e in events] == [("a b+c.txt", EventKind.CHANGED), ("gone", EventKind.REMOVED)]
    assert events[0].size == 3 and events[0].etag == "abc" and events[0].at is not None
    assert events[1].size is None  # a removal has no size to trust


def test_sequencers_of_different_lengths_order_as_hex_numbers() -> None:
    scope = Scope("b", "")

    def token(seq: str) -> str:
        (event,) = parse_sqs(json.dumps({"Records": [s3_record("b", "k", sequencer=seq)]}), scope)
        assert event.token is not None
        return event.token

    assert len({len(token(s)) for s in ("F", "0A1B", "0055AED6DCD90281E5")}) == 1  # fixed width
    assert token("F") < token("0A1B") < token("0055AED6DCD90281E5")  # 15 < 2587 < ...
    assert token("0a1b") == token("0A1B")


# --------------------------------------------------------------------------- sqs on moto


@pytest.fixture
async def s3_bucket_and_queue(moto_s3: S3Emulator) -> tuple[str, str]:
    """A fresh bucket and queue (1 s visibility timeout) wired together by ``events setup``'s own apply."""
    bucket, queue = moto_s3.new_bucket(), moto_s3.new_queue(VisibilityTimeout="1")
    settings = Settings(
        integrations={"aws": aws(moto_s3)}, drivers={"raw": s3_driver(moto_s3, bucket, queue)}, datasets={}
    )
    plan = events_setup.plan(settings, "raw")
    await events_setup.apply(settings, plan)
    return bucket, queue


async def test_sqs_real_notifications_become_events_and_ack_deletes_them(
    moto_s3: S3Emulator, s3_bucket_and_queue: tuple[str, str]
) -> None:
    bucket, queue = s3_bucket_and_queue
    s3 = moto_s3.client()
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}new file+1.txt", Body=b"abc")
    s3.put_object(Bucket=bucket, Key="elsewhere/skip", Body=b"x")  # filtered by the notification's prefix
    s3.delete_object(Bucket=bucket, Key=f"{PREFIX}new file+1.txt")
    source = sqs_source(moto_s3, bucket, queue)
    try:
        events, batches = await take(source, 2)
        assert [(e.key, e.kind) for e in events] == [
            ("new file+1.txt", EventKind.CHANGED),
            ("new file+1.txt", EventKind.REMOVED),
        ]
        assert events[0].size == 3
        assert sqs_in_queue(moto_s3, queue) > 0  # taken, not yet deleted
        await ack_all(batches)
    finally:
        await source.aclose()
    # the s3:TestEvent that setup caused went with the first batch's ack; everything is gone
    assert sqs_in_queue(moto_s3, queue) == 0


async def test_sqs_unacknowledged_message_comes_back_after_the_visibility_timeout(moto_s3: S3Emulator) -> None:
    bucket, queue = moto_s3.new_bucket(), moto_s3.new_queue(VisibilityTimeout="1")
    body = json.dumps({"Records": [s3_record(bucket, f"{PREFIX}k")]})
    moto_s3.sqs().send_message(QueueUrl=queue, MessageBody=body)
    source = sqs_source(moto_s3, bucket, queue)
    try:
        first, _ = await take(source, 1)  # not acked: as if the agent died before its commit
        again, batches = await take(source, 1)
        assert first == again
        await ack_all(batches)
    finally:
        await source.aclose()
    assert sqs_in_queue(moto_s3, queue) == 0


async def test_sqs_sns_and_eventbridge_forms_test_event_and_a_malformed_message(
    moto_s3: S3Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    bucket, queue = moto_s3.new_bucket(), moto_s3.new_queue(VisibilityTimeout="30")
    sns = {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:t",
        "Message": json.dumps({"Records": [s3_record(bucket, f"{PREFIX}via+sns")]}),
    }
    eventbridge = {
        "version": "0",
        "detail-type": "Object Deleted",
        "source": "aws.s3",
        "time": "2026-11-29T17:04:21Z",
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": {"key": f"{PREFIX}via%20eventbridge", "sequencer": "617f08299329d189"},
            "reason": "DeleteObject",
        },
    }
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": bucket}
    for body in (json.dumps(test_event), "{not json", json.dumps(sns), json.dumps(eventbridge)):
        moto_s3.sqs().send_message(QueueUrl=queue, MessageBody=body)
    source = sqs_source(moto_s3, bucket, queue)
    try:
        events, batches = await take(source, 2)
        assert sorted((e.key, e.kind) for e in events) == [
            ("via eventbridge", EventKind.REMOVED),
            ("via sns", EventKind.CHANGED),
        ]
        await ack_all(batches)
    finally:
        await source.aclose()
    assert sqs_in_queue(moto_s3, queue) == 0  # the malformed and the test message went with their batch


async def test_sqs_missing_queue_and_unreachable_endpoint_fail_naming_the_queue(moto_s3: S3Emulator) -> None:
    bucket, queue = moto_s3.new_bucket(), moto_s3.new_queue()
    moto_s3.sqs().delete_queue(QueueUrl=queue)
    source = sqs_source(moto_s3, bucket, queue)
    with pytest.raises(SourceFailed, match="does not exist") as gone:
        await take(source, 1)
    await source.aclose()
    assert queue in str(gone.value)

    nowhere = f"http://127.0.0.1:{free_port()}/123456789012/q"
    source = sqs_source(moto_s3, bucket, nowhere)
    source.endpoint_url = nowhere.rsplit("/", 2)[0]
    with pytest.raises(SourceFailed, match="unreachable") as down:
        await take(source, 1)
    await source.aclose()
    assert nowhere in str(down.value)


def test_events_setup_apply_on_moto_then_a_put_notifies(moto_s3: S3Emulator, tmp_path: Path) -> None:
    """The CLI end to end: print, apply (queue created, policy, notification), and a real put arrives."""
    bucket = moto_s3.new_bucket()
    queue = f"{moto_s3.endpoint_url}/123456789012/q-{uuid.uuid4().hex[:12]}"  # absent: --apply creates it
    config = write_config(
        tmp_path,
        integrations={"aws": {"kind": "aws", "access_key_id": "k", "secret_access_key": "s"}},
        drivers={
            "raw": {
                "url": f"s3://{bucket}/{PREFIX}",
                "integration": "aws",
                "endpoint_url": moto_s3.endpoint_url,
                "region": REGION,
                "events": {"source": "sqs", "queue": queue},  # endpoint from the queue URL
            }
        },
        datasets={"raw": {"driver": "raw"}},
    )
    doc = events_setup.plan(load_settings(config), "raw").as_json()  # what `events setup raw --json` prints
    assert doc["applied"] == [] and doc["can_apply"] is True
    (entry,) = doc["bucket_notification"]["QueueConfigurations"]
    assert entry["Events"] == ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
    assert entry["Filter"]["Key"]["FilterRules"] == [{"Name": "prefix", "Value": PREFIX}]
    with pytest.raises(Exception, match=r"NonExistentQueue|does not exist"):
        moto_s3.sqs().get_queue_url(QueueName=queue.rsplit("/", 1)[1])  # printing created nothing

    applied = cli(config, "events", "setup", "raw", "--apply")
    assert applied.returncode == 0, describe(applied)
    assert f"created the queue {queue}" in applied.stdout
    settings = load_settings(config)  # a second apply replaces its own entries instead of adding more
    asyncio.run(events_setup.apply(settings, events_setup.plan(settings, "raw")))
    conf = moto_s3.client().get_bucket_notification_configuration(Bucket=bucket)
    assert len(conf["QueueConfigurations"]) == 1
    policy = json.loads(
        moto_s3.sqs().get_queue_attributes(QueueUrl=queue, AttributeNames=["Policy"])["Attributes"]["Policy"]
    )
    assert [s["Sid"] for s in policy["Statement"]] == ["bucketsync-events"]

    moto_s3.client().put_object(Bucket=bucket, Key=f"{PREFIX}after-setup", Body=b"1")
    bodies: list[str] = []
    for _ in range(10):
        messages = moto_s3.sqs().receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        bodies += [m["Body"] for m in messages.get("Messages", [])]
        if any("after-setup" in b for b in bodies):
            break
    events = [e for b in bodies for e in parse_sqs(b, Scope(bucket, PREFIX))]
    assert ("after-setup", EventKind.CHANGED) in [(e.key, e.kind) for e in events]


# --------------------------------------------------------------------------- azure-queue on Azurite


def eventgrid(kind: str, url: str, sequencer: str = "00000000000000010000000000000001", **data: Any) -> dict[str, Any]:
    """One Event Grid schema event as Event Grid writes it for a blob."""
    return {
        "topic": f"/subscriptions/s/resourceGroups/g/providers/Microsoft.Storage/storageAccounts/{ACCOUNT}",
        "subject": "/blobServices/default/containers/c/blobs/x",
        "eventType": kind,
        "eventTime": "2026-11-29T17:04:20.9584103Z",
        "id": str(uuid.uuid4()),
        "data": {"api": "PutBlob", "eTag": "0x8D4BCC2E4835CD0", "contentLength": 5, "url": url,
                 "sequencer": sequencer, **data},
        "dataVersion": "",
        "metadataVersion": "1",
    }  # fmt: skip


def cloudevent(kind: str, url: str) -> dict[str, Any]:
    """The same event in the CloudEvents 1.0 schema."""
    return {
        "specversion": "1.0",
        "type": kind,
        "source": f"/subscriptions/s/resourceGroups/g/providers/Microsoft.Storage/storageAccounts/{ACCOUNT}",
        "subject": "/blobServices/default/containers/c/blobs/x",
        "id": str(uuid.uuid4()),
        "time": "2026-11-29T17:04:21Z",
        "data": {"api": "DeleteBlob", "url": url, "sequencer": "00000000000000020000000000000001"},
    }


def b64(doc: object) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def test_azure_blob_urls_in_both_styles_and_renames() -> None:
    scope = Scope("c", "some/prefix/")
    public = f"https://{ACCOUNT}.blob.core.windows.net/c/some/prefix/a%20b+c.txt"
    emulator = f"http://127.0.0.1:10000/{ACCOUNT}/c/some/prefix/d"
    other_account = "https://other.blob.core.windows.net/c/some/prefix/e"
    renamed = eventgrid(
        "Microsoft.Storage.BlobRenamed",
        "",
        sourceUrl=f"https://{ACCOUNT}.dfs.core.windows.net/c/some/prefix/old",
        destinationUrl=f"https://{ACCOUNT}.dfs.core.windows.net/c/some/prefix/new",
    )
    message = [
        eventgrid("Microsoft.Storage.BlobCreated", public),
        cloudevent("Microsoft.Storage.BlobDeleted", emulator),
        eventgrid("Microsoft.Storage.BlobCreated", other_account),
        eventgrid("Microsoft.Storage.BlobTierChanged", public),
        renamed,
    ]
    events = parse_azure(b64(message), ACCOUNT, scope)
    assert [(e.key, e.kind) for e in events] == [
        ("a b+c.txt", EventKind.CHANGED),  # a URL path: %20 is a space, '+' a plus
        ("d", EventKind.REMOVED),
        ("old", EventKind.REMOVED),
        ("new", EventKind.CHANGED),
    ]
    assert events[0].token == "00000000000000010000000000000001" and events[0].size == 5


@pytest.fixture
async def azure_source(azurite_queue: AzuriteQueue) -> AsyncIterator[tuple[AzureQueueSource, str]]:
    """A source on a fresh queue (1 s visibility timeout), built from a driver and integration as the agent would."""
    queue = azurite_queue.new_queue()
    driver = DriverConfig(url=f"az://{ACCOUNT}/c/{PREFIX}", integration="azure")
    integration = AzureIntegration(kind="azure", connection_string=SecretStr(azurite_queue.connection_string))
    source = open_azure_queue(driver, integration, queue=queue)  # QueueEndpoint from the connection string
    source.visibility_timeout = 1
    source.poll_interval = 0.1
    source.retry_base = 0.01
    try:
        yield source, queue
    finally:
        await source.aclose()


def blob_url(key: str) -> str:
    return f"http://127.0.0.1:1/{ACCOUNT}/c/{PREFIX}{key}"


def azure_in_queue(azurite_queue: AzuriteQueue, queue: str) -> int:
    count: int = azurite_queue.queue(queue).get_queue_properties().approximate_message_count
    return count


async def test_azure_queue_events_ack_and_malformed(
    azurite_queue: AzuriteQueue, azure_source: tuple[AzureQueueSource, str]
) -> None:
    source, queue = azure_source
    client = azurite_queue.queue(queue)
    client.send_message(b64(eventgrid("Microsoft.Storage.BlobCreated", blob_url("one"))))
    client.send_message("bm90IGpzb24=")  # base64 of "not json"
    client.send_message(b64(cloudevent("Microsoft.Storage.BlobDeleted", blob_url("two"))))
    events, batches = await take(source, 2)
    assert sorted((e.key, e.kind) for e in events) == [("one", EventKind.CHANGED), ("two", EventKind.REMOVED)]
    assert azure_in_queue(azurite_queue, queue) == 3  # nothing deleted before the ack
    await ack_all(batches)
    assert azure_in_queue(azurite_queue, queue) == 0  # the malformed one went with its batch


async def test_azure_queue_unacknowledged_message_comes_back(
    azurite_queue: AzuriteQueue, azure_source: tuple[AzureQueueSource, str]
) -> None:
    source, queue = azure_source
    azurite_queue.queue(queue).send_message(b64(eventgrid("Microsoft.Storage.BlobCreated", blob_url("k"))))
    first, _ = await take(source, 1)
    again, batches = await take(source, 1)  # after the 1 s visibility timeout
    assert first == again
    await ack_all(batches)
    assert azure_in_queue(azurite_queue, queue) == 0


async def test_azure_queue_deleted_queue_or_wrong_key_fails_naming_it(
    azurite_queue: AzuriteQueue, azure_source: tuple[AzureQueueSource, str]
) -> None:
    source, queue = azure_source
    wrong_key = AzureIntegration(kind="azure", account_key=SecretStr(base64.b64encode(b"not the key").decode()))
    driver = DriverConfig(url=f"az://{ACCOUNT}/c/{PREFIX}", integration="azure")
    denied = open_azure_queue(driver, wrong_key, queue=queue, endpoint_url=azurite_queue.endpoint)
    try:
        with pytest.raises(SourceFailed, match="access denied") as refused:
            await take(denied, 1)
    finally:
        await denied.aclose()
    assert queue in str(refused.value)

    azurite_queue.queue(queue).delete_queue()
    with pytest.raises(SourceFailed, match="does not exist") as gone:
        await take(source, 1)
    assert queue in str(gone.value)


def test_events_setup_prints_az_and_gcloud_commands_and_apply_says_why_not(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        drivers={
            "blobs": {"url": f"az://{ACCOUNT}/c/{PREFIX}", "events": {"source": "azure-queue", "queue": "raw-events"}},
            "gcs": {"url": "gs://bkt/p/", "events": {"source": "webhook"}},
        },
        datasets={"photos": {"driver": "gcs"}},
    )
    # --apply cannot create an Event Grid subscription: it prints the way, then says why not
    refused = cli(config, "events", "setup", "blobs", "--apply")
    assert refused.returncode == 2, describe(refused)
    assert "Azure Resource Manager" in refused.stderr
    assert "az eventgrid event-subscription create" in refused.stdout
    assert "--endpoint-type storagequeue" in refused.stdout
    assert "/queueservices/default/queues/raw-events" in refused.stdout
    assert "Microsoft.Storage.BlobCreated Microsoft.Storage.BlobDeleted" in refused.stdout
    assert f"--subject-begins-with /blobServices/default/containers/c/blobs/{PREFIX}" in refused.stdout

    # what `events setup gcs --public-url https://agent.example.com` prints (one CLI start is enough)
    gcs = events_setup.plan(load_settings(config), "gcs", public_url="https://agent.example.com").text()
    assert "gcloud storage buckets notifications create gs://bkt" in gcs
    assert "--push-endpoint=https://agent.example.com/api/v1/events/gcs/photos" in gcs
    with pytest.raises(NotSupported, match="Google Cloud project rights"):
        asyncio.run(events_setup.apply(load_settings(config), events_setup.plan(load_settings(config), "gcs")))


def test_a_queue_source_without_a_queue_is_a_config_error_naming_it() -> None:
    for source, what in (("sqs", "the queue URL"), ("azure-queue", "the queue's name")):
        with pytest.raises(ValueError, match=f"source '{source}' needs queue \\({what}\\)"):
            EventsConfig(source=source)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs the queue URL"):
        SqsSource("raw-events", Scope("b", ""))  # a name is not enough: SQS addresses queues by URL
