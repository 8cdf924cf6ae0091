"""``sync = "events"`` with the queue sources, end to end against a real daemon.

S3 on moto with real bucket notifications to SQS (wired by ``events setup``'s apply),
and Azure Blob on Azurite with Event Grid messages in Azurite's Queue service (Event
Grid itself is not emulated: the test writes the message Event Grid would). The
datasets poll only once an hour, so whatever reaches the catalog after the start-up
reconcile came through the queue.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from bucketsync.config import load_settings
from bucketsync.upstream.events import setup as events_setup
from e2e import Daemon, ledger_of, poll, query_ledger, write_config
from emulators.azure import ACCOUNT, Azurite, AzuriteQueue
from emulators.s3 import PREFIX, REGION, S3Emulator

pytestmark = pytest.mark.slow
# max_delete_ratio 1: a lone removal is not a mass delete (the guard has its own tests)
QUIET = {"interval": "1h", "reconcile_interval": "1h", "sync": "events", "max_delete_ratio": 1.0}


def catalog(config: Path) -> dict[str, tuple[str, str | None]]:
    """{key: (state, etag)} of the dataset ``raw``, straight from the ledger file."""
    rows = query_ledger(
        ledger_of(config),
        "SELECT key, state, etag FROM items JOIN datasets d ON d.id = dataset_id WHERE d.name = 'raw'",
    )
    return {key: (state, etag) for key, state, etag in rows}


def listing_runs(config: Path) -> int:
    rows = query_ledger(ledger_of(config), "SELECT count(*) FROM runs WHERE kind = 'listing'")
    return int(rows[0][0]) if rows else 0


def sqs_in_queue(moto: S3Emulator, queue: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attrs = moto.sqs().get_queue_attributes(QueueUrl=queue, AttributeNames=names)["Attributes"]
    return sum(int(attrs[n]) for n in names)


@pytest.fixture
def s3_events_config(moto_s3: S3Emulator, tmp_path: Path) -> tuple[Path, str, str]:
    """(config, bucket, queue URL): a dataset in events mode on moto, notifications set up by ``events setup``."""
    bucket, queue = moto_s3.new_bucket(), moto_s3.new_queue(VisibilityTimeout="2")
    config = write_config(
        tmp_path,
        integrations={"aws": {"kind": "aws", "access_key_id": "k", "secret_access_key": "s"}},
        drivers={
            "raw": {
                "url": f"s3://{bucket}/{PREFIX}",
                "integration": "aws",
                "endpoint_url": moto_s3.endpoint_url,
                "region": REGION,
                "events": {"source": "sqs", "queue": queue},
            }
        },
        datasets={"raw": {"driver": "raw", **QUIET}},
    )
    settings = load_settings(config)
    asyncio.run(events_setup.apply(settings, events_setup.plan(settings, "raw")))
    return config, bucket, queue


def test_s3_sqs_create_overwrite_delete_reach_the_catalog_without_a_poll(
    moto_s3: S3Emulator, s3_events_config: tuple[Path, str, str]
) -> None:
    config, bucket, queue = s3_events_config
    s3 = moto_s3.client()
    key = "photos/a b.jpg"
    with Daemon(config):
        poll(lambda: listing_runs(config) >= 1, what="the start-up reconcile")
        first = s3.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=b"one")["ETag"].strip('"')
        poll(lambda: catalog(config).get(key) == ("live", first), what="the created item")
        second = s3.put_object(Bucket=bucket, Key=f"{PREFIX}{key}", Body=b"two!")["ETag"].strip('"')
        poll(lambda: catalog(config).get(key) == ("live", second), what="the overwritten item")
        s3.delete_object(Bucket=bucket, Key=f"{PREFIX}{key}")
        poll(lambda: catalog(config).get(key, ("gone",))[0] != "live", what="the removal")
        poll(lambda: sqs_in_queue(moto_s3, queue) == 0, what="every message acknowledged")
        assert listing_runs(config) == 1  # the start-up reconcile only: the rest came as events


def test_s3_sqs_kill_9_mid_batch_loses_nothing(moto_s3: S3Emulator, s3_events_config: tuple[Path, str, str]) -> None:
    """Killed with a batch taken from the queue and not yet applied (the consumer's failpoint): the
    messages stay in the queue, come back after the visibility timeout, and are applied and deleted then."""
    config, bucket, queue = s3_events_config
    s3 = moto_s3.client()
    with Daemon(config, env={"BUCKETSYNC_FAILPOINT": "events.before_apply"}) as doomed:
        poll(lambda: listing_runs(config) >= 1, what="the start-up reconcile")
        etag = s3.put_object(Bucket=bucket, Key=f"{PREFIX}survivor", Body=b"x")["ETag"].strip('"')
        assert doomed.wait(timeout=30) == 137, doomed.log
    assert "survivor" not in catalog(config)
    assert sqs_in_queue(moto_s3, queue) >= 1  # received, never deleted
    with Daemon(config):
        # The start-up reconcile finds the object too; what matters is that the redelivered
        # message is then applied (a no-op) and acknowledged, so the queue drains.
        poll(lambda: catalog(config).get("survivor") == ("live", etag), what="the item after the restart")
        poll(lambda: sqs_in_queue(moto_s3, queue) == 0, timeout=30, what="the redelivered message acknowledged")


def b64_event(kind: str, url: str, sequencer: int, etag: str | None = None, size: int | None = None) -> str:
    data: dict[str, Any] = {"api": "PutBlob", "url": url, "sequencer": f"{sequencer:032x}"}
    if etag is not None:
        data |= {"eTag": etag, "contentLength": size}
    event = {
        "topic": f"/subscriptions/s/resourceGroups/g/providers/Microsoft.Storage/storageAccounts/{ACCOUNT}",
        "subject": "/blobServices/default/containers/c/blobs/x",
        "eventType": kind,
        "eventTime": "2026-11-29T17:04:20.9584103Z",
        "id": str(uuid.uuid4()),
        "data": data,
        "dataVersion": "",
        "metadataVersion": "1",
    }
    return base64.b64encode(json.dumps(event).encode()).decode()


def test_azure_queue_create_overwrite_delete_reach_the_catalog_without_a_poll(
    azurite: Azurite, azurite_queue: AzuriteQueue, azure_container: str, tmp_path: Path
) -> None:
    queue = azurite_queue.new_queue()
    config = write_config(
        tmp_path,
        integrations={"az": {"kind": "azure", "connection_string": azurite.connection_string}},
        drivers={
            "raw": {
                "url": f"az://{ACCOUNT}/{azure_container}/{PREFIX}",
                "integration": "az",
                "events": {"source": "azure-queue", "queue": queue, "endpoint_url": azurite_queue.endpoint},
            }
        },
        datasets={"raw": {"driver": "raw", **QUIET}},
    )
    container, messages = azurite.container(azure_container), azurite_queue.queue(queue)
    key = "docs/report 1.pdf"
    blob = container.get_blob_client(f"{PREFIX}{key}")
    url = blob.url  # percent-encoded, as Event Grid writes it
    created, deleted = "Microsoft.Storage.BlobCreated", "Microsoft.Storage.BlobDeleted"
    with Daemon(config):
        poll(lambda: listing_runs(config) >= 1, what="the start-up reconcile")
        props = blob.upload_blob(b"one")
        messages.send_message(b64_event(created, url, 1, props["etag"], 3))
        poll(lambda: (catalog(config).get(key) or ("", ""))[0] == "live", what="the created item")
        before = catalog(config)[key][1]
        blob.upload_blob(b"two!", overwrite=True)
        messages.send_message(b64_event(created, url, 2))
        poll(lambda: catalog(config)[key][1] != before, what="the overwritten item")
        blob.delete_blob()
        messages.send_message(b64_event(deleted, url, 3))
        poll(lambda: catalog(config).get(key, ("gone",))[0] != "live", what="the removal")
        poll(
            lambda: messages.get_queue_properties().approximate_message_count == 0,
            what="every message acknowledged",
        )
        assert listing_runs(config) == 1
