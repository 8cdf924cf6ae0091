"""``bucketsync events setup DRIVER [--apply]``: the provider-side configuration a source needs.

- ``sqs``: the queue, a queue policy letting the bucket send to it, and the bucket's
  notification configuration (``ObjectCreated:*`` and ``ObjectRemoved:*`` to the queue,
  filtered by the driver's prefix). ``--apply`` creates all three through the S3 and SQS
  APIs with the driver's credentials, idempotently and without touching the bucket's
  other notification targets or the queue policy's other statements.
- ``azure-queue`` and GCS ``webhook``: the ``az`` / ``gcloud`` commands. Event Grid
  subscriptions and Pub/Sub notifications are made through the management plane
  (Azure Resource Manager, Google Cloud APIs with a project), which the driver's storage
  credentials cannot reach: ``--apply`` refuses and says so.
- ``watch`` needs nothing; other webhooks (MinIO, Ceph) are configured on the server.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bucketsync.config import AwsIntegration
from bucketsync.core.errors import ConfigError, NotFound, NotSupported
from bucketsync.stores.s3 import open_s3
from bucketsync.upstream.events.sqs import open_sqs, region_of

if TYPE_CHECKING:
    from bucketsync.config import DriverConfig, Settings

#: Names what bucketsync adds (the notification's Id, the policy statement's Sid), so a
#: second ``--apply`` replaces its own entries instead of adding more.
MARK = "bucketsync-events"
S3_EVENTS = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
AZURE_EVENTS = ["Microsoft.Storage.BlobCreated", "Microsoft.Storage.BlobDeleted"]
GCS_EVENTS = "OBJECT_FINALIZE,OBJECT_DELETE,OBJECT_METADATA_UPDATE"


@dataclass
class Setup:
    """What one driver's source needs, and (after ``apply``) what was done."""

    driver: str
    source: str
    #: sqs: the queue URL, its ARN, the policy and the bucket notification configuration
    documents: dict[str, Any] = field(default_factory=dict)
    #: shell commands for what bucketsync cannot create itself
    commands: list[str] = field(default_factory=list)
    #: why ``--apply`` cannot create it (None: it can)
    cannot_apply: str | None = None
    applied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "source": self.source,
            **self.documents,
            "commands": self.commands,
            "can_apply": self.cannot_apply is None,
            "applied": self.applied,
            "notes": self.notes,
        }

    def text(self) -> str:
        lines: list[str] = []
        for name, doc in self.documents.items():
            lines.append(f"# {name}")
            lines.append(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
        lines.extend(self.commands)
        lines.extend(f"# done: {what}" for what in self.applied)
        lines.extend(f"# note: {note}" for note in self.notes)
        return "\n".join(lines)


def plan(settings: Settings, name: str, public_url: str | None = None) -> Setup:
    """The configuration driver ``name``'s event source needs (nothing is contacted)."""
    driver = settings.drivers.get(name)
    if driver is None:
        known = ", ".join(sorted(settings.drivers)) or "none configured"
        raise ConfigError(f"no driver named {name!r} (drivers: {known})")
    events = driver.events
    if events is None:
        raise ConfigError(f"driver {name!r} has no [drivers.{name}.events] table: set source (and queue) first")
    setup = Setup(name, events.source)
    scheme = driver.location.scheme
    if events.source == "sqs":
        assert events.queue is not None  # the config requires it
        setup.documents = sqs_documents(driver, events.queue)
    elif events.source == "azure-queue":
        assert events.queue is not None
        setup.commands = azure_commands(driver, events.queue)
        setup.cannot_apply = (
            "an Event Grid subscription is created through Azure Resource Manager (a subscription, a resource "
            "group, a role to create it), which the driver's storage credentials cannot reach; run the az "
            "commands above"
        )
    elif events.source == "webhook" and scheme == "gs":
        datasets = [ds for ds, conf in settings.datasets.items() if conf.driver == name]
        url = (public_url or _agent_url(settings)).rstrip("/")
        setup.commands = gcloud_commands(driver, datasets, url)
        setup.cannot_apply = (
            "a Pub/Sub topic, bucket notification and push subscription are created with Google Cloud project "
            "rights (pubsub.topics.create, storage.buckets.update) the driver's storage credentials should not "
            "have; run the gcloud commands above"
        )
    elif events.source == "webhook":
        datasets = [ds for ds, conf in settings.datasets.items() if conf.driver == name]
        url = (public_url or _agent_url(settings)).rstrip("/")
        setup.commands = [f"# POST S3 event records to {url}/api/v1/events/s3/{ds}" for ds in datasets]
        setup.cannot_apply = "webhooks of S3-compatible servers (MinIO, Ceph RGW) are configured on that server"
    else:
        setup.notes.append("the watch source needs no provider configuration")
        setup.cannot_apply = "there is nothing to create"
    return setup


def _agent_url(settings: Settings) -> str:
    return f"{'https' if settings.agent.tls else 'http'}://{settings.agent.listen}"


# --------------------------------------------------------------------------- sqs


def queue_arn(queue_url: str, region: str) -> str:
    """``arn:aws:sqs:REGION:ACCOUNT:NAME`` from a queue URL (``.../ACCOUNT/NAME``)."""
    _, account, name = urlsplit(queue_url).path.split("/")
    return f"arn:aws:sqs:{region}:{account}:{name}"


def _region(driver: DriverConfig, queue: str) -> str:
    return driver.region or region_of(queue) or "us-east-1"


def sqs_documents(driver: DriverConfig, queue: str, arn: str | None = None) -> dict[str, Any]:
    """The queue, its policy and the bucket notification configuration, as the AWS APIs take them."""
    loc = driver.location
    if loc.scheme != "s3":
        raise ConfigError(f"events source 'sqs' needs an s3:// driver, not {driver.url!r}")
    arn = arn or queue_arn(queue, _region(driver, queue))
    entry: dict[str, Any] = {"Id": MARK, "QueueArn": arn, "Events": S3_EVENTS}
    if loc.prefix:
        entry["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": loc.prefix}]}}
    return {
        "queue_url": queue,
        "queue_arn": arn,
        "queue_policy": {"Version": "2012-10-17", "Statement": [_statement(arn, loc.bucket)]},
        "bucket_notification": {"QueueConfigurations": [entry]},
    }


def _statement(arn: str, bucket: str) -> dict[str, Any]:
    return {
        "Sid": MARK,
        "Effect": "Allow",
        "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": arn,
        "Condition": {"ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{bucket}"}},
    }


def merged_policy(existing: str | None, statement: dict[str, Any]) -> dict[str, Any]:
    """The queue's policy with our statement in it: replaced if there, added if not; others kept."""
    policy: dict[str, Any] = json.loads(existing) if existing else {"Version": "2012-10-17", "Statement": []}
    statements = policy.get("Statement") or []
    if isinstance(statements, dict):
        statements = [statements]
    policy["Statement"] = [s for s in statements if s.get("Sid") != statement["Sid"]] + [statement]
    return policy


def merged_notification(existing: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The bucket's notification configuration with our queue entry: other targets are kept."""
    config = {k: v for k, v in existing.items() if k != "ResponseMetadata"}
    queues = [
        q
        for q in config.get("QueueConfigurations") or []
        if q.get("Id") != MARK and q.get("QueueArn") != entry["QueueArn"]
    ]
    config["QueueConfigurations"] = [*queues, entry]
    return config


async def apply_sqs(setup: Setup, driver: DriverConfig, integration: AwsIntegration | None) -> None:
    """Create the queue (if absent), set its policy, and point the bucket's notifications at it."""
    assert driver.events is not None and driver.events.queue is not None
    queue = driver.events.queue
    source = open_sqs(driver, integration, queue=queue, endpoint_url=driver.events.endpoint_url)
    store = open_s3(driver.location, driver, integration)
    _, owner, name = urlsplit(queue).path.split("/")
    try:
        try:
            url = (
                await source.request(
                    "find", lambda sqs: sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=owner)
                )
            )["QueueUrl"]
        except NotFound:
            url = (await source.request("create", lambda sqs: sqs.create_queue(QueueName=name)))["QueueUrl"]
            setup.applied.append(f"created the queue {url}")
        if url != queue:
            setup.notes.append(f"the queue's URL is {url}: set queue = {url!r} in [drivers.{setup.driver}.events]")
        attrs = await source.request(
            "read attributes",
            lambda sqs: sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn", "Policy"]),
        )
        attributes = attrs.get("Attributes") or {}
        docs = sqs_documents(driver, url, attributes.get("QueueArn"))
        setup.documents = docs
        policy = merged_policy(attributes.get("Policy"), docs["queue_policy"]["Statement"][0])
        await source.request(
            "set the policy",
            lambda sqs: sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)}),
        )
        setup.applied.append(f"queue policy: s3.amazonaws.com may send from bucket {driver.location.bucket}")
        entry = docs["bucket_notification"]["QueueConfigurations"][0]
        config = merged_notification(await store.notification_configuration(), entry)
        await store.set_notification_configuration(config)
        setup.applied.append(f"bucket {driver.location.bucket}: ObjectCreated:* and ObjectRemoved:* go to {url}")
    finally:
        await source.aclose()
        await store.aclose()


async def apply(settings: Settings, setup: Setup) -> None:
    """Create what ``setup`` describes, or ``NotSupported`` saying why it cannot."""
    if setup.cannot_apply is not None:
        raise NotSupported(f"events setup --apply for {setup.source} driver {setup.driver!r}: {setup.cannot_apply}")
    driver = settings.drivers[setup.driver]
    integration = settings.integrations.get(driver.integration) if driver.integration else None
    assert integration is None or isinstance(integration, AwsIntegration)  # the config checks kinds
    await apply_sqs(setup, driver, integration)


# --------------------------------------------------------------------------- azure-queue, gcs


def azure_commands(driver: DriverConfig, queue: str) -> list[str]:
    """``az`` commands: the queue, an Event Grid subscription delivering blob events to it, the agent's role."""
    loc = driver.location
    if loc.scheme != "az":
        raise ConfigError(f"events source 'azure-queue' needs an az:// driver, not {driver.url!r}")
    q = shlex.quote
    account_id = f'"$(az storage account show --name {q(loc.account)} --query id --output tsv)"'
    subject = f"/blobServices/default/containers/{loc.bucket}/blobs/{loc.prefix}"
    return [
        f"az storage queue create --name {q(queue)} --account-name {q(loc.account)} --auth-mode login",
        f"az eventgrid event-subscription create --name {q(f'bucketsync-{loc.bucket}-{queue}'[:64])} \\",
        f"  --source-resource-id {account_id} \\",
        "  --endpoint-type storagequeue \\",
        f'  --endpoint "$(az storage account show --name {q(loc.account)} --query id --output tsv)'
        f'/queueservices/default/queues/{queue}" \\',
        f"  --included-event-types {' '.join(AZURE_EVENTS)} \\",
        f"  --subject-begins-with {q(subject)} \\",
        "  --event-delivery-schema eventgridschema",
        "# the agent's identity reads and deletes the messages:",
        "az role assignment create --role 'Storage Queue Data Message Processor' --assignee AGENT_PRINCIPAL_ID \\",
        f"  --scope {account_id}/queueServices/default/queues/{q(queue)}",
    ]


def gcloud_commands(driver: DriverConfig, datasets: list[str], agent_url: str) -> list[str]:
    """``gcloud`` commands: a topic, the bucket's notification to it, a push subscription per dataset."""
    loc = driver.location
    if loc.scheme != "gs":
        raise ConfigError(f"a gcloud setup needs a gs:// driver, not {driver.url!r}")
    q = shlex.quote
    topic = f"bucketsync-{loc.bucket}"
    lines = [
        f"gcloud pubsub topics create {q(topic)}",
        f"gcloud storage buckets notifications create gs://{loc.bucket} --topic={q(topic)} --payload-format=json \\",
        f"  --event-types={GCS_EVENTS}" + (f" --object-prefix={q(loc.prefix)}" if loc.prefix else ""),
    ]
    for ds in datasets or ["DATASET"]:
        lines += [
            f"gcloud pubsub subscriptions create {q(f'bucketsync-{ds}')} --topic={q(topic)} \\",
            f"  --push-endpoint={q(f'{agent_url}/api/v1/events/gcs/{ds}')} --ack-deadline=60",
        ]
    lines.append("# the push endpoint must be reachable from Pub/Sub over https; see docs/events.md (webhook auth)")
    return lines
