"""Configuration: a TOML file overridden by ``BUCKETSYNC_*`` env vars.

Where the file comes from: ``-c/--config``, else ``$BUCKETSYNC_CONFIG``, else
``./bucketsync.toml``. Env vars use ``__`` for nesting, e.g.
``BUCKETSYNC_DATASETS__PHOTOS__INTERVAL=30s``. Every model forbids unknown keys,
and every problem is reported as a ``ConfigError`` naming the dotted field.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bucketsync.catalog import query
from bucketsync.core.errors import ConfigError
from bucketsync.core.keys import validate_glob
from bucketsync.core.location import Location, parse_location

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: Any) -> float:
    """``"60s"``, ``"5m"``, ``"1h"``, ``"250ms"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '60s', '5m' or '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"invalid duration {value!r}: expected a number with a unit, such as '60s', '5m' or '1h'")
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


def credential_path(path: Path) -> Path:
    """A ``*_file`` given as a bare name (no ``/``) is a systemd credential when the agent runs with
    ``LoadCredential=``: it resolves to ``$CREDENTIALS_DIRECTORY/NAME``. Anything else is a path as given."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and "/" not in str(path) and str(path) not in (".", ".."):
        return Path(creds) / path
    return path


#: A path to a file holding a secret; a bare name means a systemd credential (see ``credential_path``).
SecretFile = Annotated[Path, AfterValidator(credential_path)]


def _doc(description: str, **kw: Any) -> Any:
    """``Field(description=...)``: the text docs/configuration.md is generated from."""
    return Field(description=description, **kw)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_secret_file(path: Path, field: str) -> SecretStr:
    try:
        return SecretStr(path.read_text().strip())
    except OSError as exc:
        raise ConfigError(f"{field}_file: cannot read {str(path)!r}: {exc.strerror}") from None


class _Integration(_Strict):
    """Secrets may be given inline, by env, or as ``*_file`` paths; never both."""

    SECRETS: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _one_of_value_or_file(self) -> _Integration:
        for name in self.SECRETS:
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"set {name} or {name}_file, not both")
        return self

    def secret(self, name: str) -> str | None:
        """The secret's value, read from its ``*_file`` when that is how it was given."""
        value: SecretStr | None = getattr(self, name)
        path: Path | None = getattr(self, f"{name}_file")
        if path is not None:
            value = _read_secret_file(path, name)
        return value.get_secret_value() if value is not None else None


class AwsIntegration(_Integration):
    SECRETS = ("access_key_id", "secret_access_key", "session_token")
    kind: Literal["aws"] = _doc("`aws`: credentials for S3 and S3-compatible stores.")
    access_key_id: SecretStr | None = _doc(
        "Access key id; with `secret_access_key`, or neither for the default chain.", default=None
    )
    access_key_id_file: SecretFile | None = _doc(
        "File holding the access key id (a bare name is a systemd credential).", default=None
    )
    secret_access_key: SecretStr | None = _doc("Secret access key.", default=None)
    secret_access_key_file: SecretFile | None = _doc("File holding the secret access key.", default=None)
    session_token: SecretStr | None = _doc("Session token for temporary credentials.", default=None)
    session_token_file: SecretFile | None = _doc("File holding the session token.", default=None)
    profile: str | None = _doc("A profile of the AWS shared config/credentials files.", default=None)

    @model_validator(mode="after")
    def _key_pair(self) -> AwsIntegration:
        has_id = self.access_key_id is not None or self.access_key_id_file is not None
        has_secret = self.secret_access_key is not None or self.secret_access_key_file is not None
        if has_id != has_secret:
            raise ValueError("set access_key_id and secret_access_key together (or neither, for the default chain)")
        return self


class GcpIntegration(_Integration):
    SECRETS = ("service_account_json",)
    kind: Literal["gcp"] = _doc("`gcp`: credentials for Google Cloud Storage.")
    service_account_file: SecretFile | None = _doc(
        "Service-account key file (JSON); else the default chain.", default=None
    )
    service_account_json: SecretStr | None = _doc("The service-account key itself, as JSON text.", default=None)
    service_account_json_file: SecretFile | None = _doc("File holding the service-account JSON.", default=None)
    project: str | None = _doc("Google Cloud project id.", default=None)

    @model_validator(mode="after")
    def _one_key_source(self) -> GcpIntegration:
        if self.service_account_file is not None and (
            self.service_account_json is not None or self.service_account_json_file is not None
        ):
            raise ValueError("set service_account_file or service_account_json(_file), not both")
        return self


class AzureIntegration(_Integration):
    SECRETS = ("connection_string", "account_key", "sas_token")
    kind: Literal["azure"] = _doc("`azure`: credentials for Azure Blob Storage.")
    connection_string: SecretStr | None = _doc("A storage account connection string.", default=None)
    connection_string_file: SecretFile | None = _doc("File holding the connection string.", default=None)
    account_key: SecretStr | None = _doc("The storage account key.", default=None)
    account_key_file: SecretFile | None = _doc("File holding the account key.", default=None)
    sas_token: SecretStr | None = _doc("A shared access signature token.", default=None)
    sas_token_file: SecretFile | None = _doc("File holding the SAS token.", default=None)


Integration = Annotated[AwsIntegration | GcpIntegration | AzureIntegration, Field(discriminator="kind")]
_KIND_FOR_SCHEME = {"s3": "aws", "gs": "gcp", "az": "azure"}


#: which event source can serve which storage scheme (``file`` needs no table: ``watch``)
EVENT_SOURCES: dict[str, tuple[str, ...]] = {
    "watch": ("file",),
    "sqs": ("s3",),
    "azure-queue": ("az",),
    "webhook": ("s3", "gs"),
}
#: the fix a ConfigError suggests for each scheme
_SOURCE_FOR_SCHEME = {"s3": "sqs (or webhook)", "gs": "webhook", "az": "azure-queue", "file": "watch"}


class EventsConfig(_Strict):
    """``[drivers.NAME.events]``: where change notifications for the driver come from."""

    source: Literal["watch", "sqs", "azure-queue", "webhook"] = _doc(
        "`watch` (local folder), `sqs` (S3 Event Notifications in SQS), `azure-queue` (Event Grid to a "
        "Storage Queue) or `webhook` (GCS Pub/Sub push, MinIO/Ceph RGW S3 records)."
    )
    queue: str | None = _doc("`sqs`: the queue URL; `azure-queue`: the queue name.", default=None)
    endpoint_url: str | None = _doc("http(s) endpoint of the queue service (emulators, VPC endpoints).", default=None)
    secret: SecretStr | None = _doc(
        "`webhook`: the shared secret a poster sends in the `X-Bucketsync-Secret` header (for tests; prefer "
        "`secret_file`). The API token is accepted too.",
        default=None,
    )
    secret_file: SecretFile | None = _doc(
        "`webhook`: file holding the shared secret (a bare name is a systemd credential).", default=None
    )
    inbox_max: int = _doc(
        "`webhook`: most events a dataset's inbox holds before they are applied (events are small rows in "
        "the ledger). Past it, a post is answered 202 with its events counted as `deferred`, not kept, and a "
        "reconcile listing is asked for instead: it brings in what they said. Bounds the ledger while a "
        "dataset is not ready and nothing drains its inbox.",
        default=100_000,
        ge=1,
    )

    @model_validator(mode="after")
    def _one_secret(self) -> EventsConfig:
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("set secret or secret_file, not both")
        return self

    @model_validator(mode="after")
    def _queue_for_queues(self) -> EventsConfig:
        if self.source in ("sqs", "azure-queue") and not (self.queue or "").strip():
            what = "the queue URL" if self.source == "sqs" else "the queue's name"
            raise ValueError(f"source {self.source!r} needs queue ({what})")
        return self

    def shared_secret(self) -> str | None:
        """The webhook's shared secret, read from its file when given so; None (or blank): none."""
        if self.secret_file is not None:
            value = _read_secret_file(self.secret_file, "events.secret").get_secret_value()
        else:
            value = self.secret.get_secret_value() if self.secret is not None else ""
        return value.strip() or None


class DriverConfig(_Strict):
    url: str = _doc(
        "Where the objects are: `s3://bucket/prefix`, `gs://` (`gcs://`), `az://account/container/prefix` "
        "(`azure://`), `file:///abs/path` or `mem://name`."
    )
    integration: str | None = _doc(
        "Name of the `[integrations.NAME]` with its credentials; none: the default chain.", default=None
    )
    endpoint_url: str | None = _doc("http(s) endpoint of an S3-compatible store (MinIO, SeaweedFS, ...).", default=None)
    region: str | None = _doc("The bucket's region.", default=None)
    storage_class: str | None = _doc("Storage class for objects written through bucketsync.", default=None)
    allow_delete: bool = _doc(
        "Let deletes through bucketsync delete objects in storage; off: items become tombstones.", default=False
    )
    verify: Literal["stat", "hash"] = _doc(
        "How a local folder's changes are detected: `stat` (size, mtime, inode and change time) or `hash` "
        "(a content hash, re-read only when the change time moves); `file://` drivers only.",
        default="stat",
    )
    connect_timeout: Duration = _doc("Seconds to open a connection to storage, per request.", default=5.0)
    read_timeout: Duration = _doc(
        "Seconds to wait for each read of a storage response (not a whole transfer); a stall past it is "
        "a transient error, retried.",
        default=30.0,
    )
    events: EventsConfig | None = _doc(
        '`[drivers.NAME.events]`: the event source of datasets with `sync = "events"`; a `file://` driver '
        "needs none (it watches the folder).",
        default=None,
    )

    list_concurrency: int = _doc(
        "List requests in flight at once for one listing: the listing is cut into parts listed in parallel "
        "and read back in key order. S3 and GCS cut it into key ranges (split where the last run's keys fall, "
        "or at the first folder levels); Azure into the folders of its first levels, each listed under its own "
        "prefix. 1: one page after another (still fetching the next page while the current one is diffed).",
        default=8,
        ge=1,
        le=64,
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_location(v)
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"endpoint_url {v!r} must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _verify_local_only(self) -> DriverConfig:
        if self.verify == "hash" and self.location.scheme != "file":
            raise ValueError(
                "verify = 'hash' applies to local folders (file://) only; cloud stores already "
                "compare the provider's own etag or version"
            )
        return self

    @property
    def location(self) -> Location:
        return parse_location(self.url)

    def event_source(self) -> str | None:
        """The event source this driver's events come from: its table's, else ``watch`` for a
        local folder; None when it has none."""
        if self.events is not None:
            return self.events.source
        return "watch" if self.location.scheme == "file" else None


TriggerEvent = Literal["created", "updated", "removed", "enriched"]


class TriggerConfig(_Strict):
    """A user's hook on item events: a signed webhook (``url``) or a local command (``exec``)."""

    name: Name | None = _doc("Name shown in deliveries and metrics; default: `trigger-N` (its position).", default=None)
    on: list[TriggerEvent] = _doc(
        "Item events that fire it: `created`, `updated` (new etag), `removed`, `enriched`.", min_length=1
    )
    include: list[str] = _doc("Globs of keys it fires for (as a dataset's `include`); empty: all.", default=[])
    exclude: list[str] = _doc("Globs of keys it never fires for.", default=[])
    url: str | None = _doc(
        "Webhook: POST the event as JSON here, signed with `X-Bucketsync-Signature: sha256=HEX` "
        "(HMAC-SHA256 of the body with `secret`).",
        default=None,
    )
    secret: SecretStr | None = _doc("The webhook's HMAC secret.", default=None)
    secret_file: SecretFile | None = _doc("File holding the webhook's HMAC secret.", default=None)
    exec: list[str] | None = _doc(
        "Local command (argv, no shell) run with the event as JSON on stdin; exit 0 is success.", default=None
    )
    timeout: Duration = _doc("Seconds one delivery may take before it counts as failed.", default=10.0)
    max_attempts: int = _doc(
        "Attempts (with exponential backoff) before a delivery is dead-lettered.", default=8, ge=1, le=100
    )
    retry_base: Duration = _doc(
        "Backoff base: attempt N waits up to `retry_base * 2^(N-1)`, capped at 1h.", default=2.0
    )

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        return [validate_glob(p) for p in v]

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"url {v!r} must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> TriggerConfig:
        if (self.url is None) == (self.exec is None):
            raise ValueError("set url (a webhook) or exec (a local command): exactly one")
        if self.exec is not None and not self.exec:
            raise ValueError("exec must name a command: a non-empty list such as ['/usr/local/bin/hook']")
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("set secret or secret_file, not both")
        if self.exec is not None and (self.secret is not None or self.secret_file is not None):
            raise ValueError("secret applies to webhooks (url) only")
        return self

    def secret_value(self) -> str | None:
        if self.secret_file is not None:
            return _read_secret_file(self.secret_file, "secret").get_secret_value()
        return self.secret.get_secret_value() if self.secret is not None else None


class DatasetConfig(_Strict):
    driver: str = _doc("Name of the `[drivers.NAME]` this dataset catalogs.")
    sync: Literal["poll", "events", "manual"] = _doc(
        "`poll`: every `interval`; `events`: as the driver's event source reports changes (within about a "
        "second), with a full listing (the reconcile) at start-up and every `reconcile_interval`; `manual`: "
        "only when asked.",
        default="poll",
    )
    interval: Duration = _doc(
        "Time between polls (`500ms`, `30s`, `5m`, `1h`; jittered by ±10%); in `events` mode, while the event "
        "source is failing.",
        default=60.0,
    )
    reconcile_interval: Duration = _doc(
        "`events` mode: time between full listings that fix what events missed (the drift).", default=3600.0
    )
    include: list[str] = _doc(
        "Globs of keys to index; a pattern without `/` matches at any depth. Empty: all.", default=[]
    )
    exclude: list[str] = _doc("Globs of keys never to index.", default=[])
    read_only: bool = _doc("Refuse every write through bucketsync (metadata stays editable).", default=False)
    quota: int | None = _doc("Max items; writes and upstream additions stop there.", default=None, ge=1)
    max_delete_ratio: float = _doc(
        "A run that would remove more than this share of the items aborts.", default=0.5, gt=0, le=1
    )
    max_delete_count: int = _doc(
        "A run that would remove more than this many items aborts (0: no cap).", default=0, ge=0
    )
    enrich: bool | None = _doc(
        "Enrich this dataset's items (mimetype, dimensions, EXIF, thumbnails); default: `enrich.enabled`.",
        default=None,
    )
    triggers: list[TriggerConfig] = _doc(
        "`[[datasets.NAME.triggers]]`: hooks on item events, delivered at least once (see docs/enrichment.md).",
        default=[],
    )
    indexes: list[str] = _doc(
        "Fields to index for fast catalog filters and sorts (`metadata.NAME` or a system field such as "
        "`size`); SQLite expression indexes, created at start-up. An unindexed filter works too, slower.",
        default=[],
    )

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        return [validate_glob(p) for p in v]

    @model_validator(mode="after")
    def _trigger_names(self) -> DatasetConfig:
        names = self.trigger_names()
        if len(set(names)) != len(names):
            raise ValueError(f"triggers: names must be unique, got {names}")
        return self

    def trigger_names(self) -> list[str]:
        return [t.name or f"trigger-{i + 1}" for i, t in enumerate(self.triggers)]

    @field_validator("indexes")
    @classmethod
    def _indexes(cls, v: list[str]) -> list[str]:
        for name in v:
            query.field(name)  # InvalidFilter (a ValueError) names the field and what is allowed
        return v


class EnrichConfig(_Strict):
    enabled: bool = _doc(
        "Enrich every dataset's items (a dataset's `enrich` overrides): off by default, because it reads "
        "objects and writes thumbnails into the hidden folder of the bucket.",
        default=False,
    )
    thumbnails: bool = _doc(
        "Make a thumbnail of each image (reads the whole object, up to `max_bytes`) and video (its first frame).",
        default=True,
    )
    thumbnail_size: int = _doc("Longest side of a thumbnail, in pixels.", default=256, ge=16, le=4096)
    thumbnail_format: Literal["jpeg", "webp"] = _doc("`jpeg` or `webp`.", default="jpeg")
    max_bytes: int = _doc(
        "Largest object read whole for a thumbnail (bytes); a larger one gets metadata only. A video is never "
        "read whole: this caps what is read of it in all (its index and first frame).",
        default=64 * 1024 * 1024,
        ge=65536,
    )
    max_pixels: int = _doc(
        "Decompression-bomb cap: an image with more pixels is never decoded (it fails, with its size recorded).",
        default=64_000_000,
        ge=1,
    )
    max_memory: int = _doc(
        "Memory limit per item for decoding (bytes): an image whose decoded pixels would need more (after "
        "JPEG's draft scaling) gets metadata but no thumbnail. Peak memory is about "
        "`agent.enrich_concurrency` x (`max_bytes` + `max_memory`).",
        default=256 * 1024 * 1024,
        ge=1024 * 1024,
    )
    timeout: Duration = _doc("Time limit per item; past it the item fails with a reason.", default=60.0)
    max_attempts: int = _doc(
        "Attempts of an item whose enrichment crashes or meets a transient storage error before it is "
        "recorded as failed.",
        default=3,
        ge=1,
        le=100,
    )
    cache_dir: Path = _doc(
        "Where thumbnails of read-only datasets (or drivers that refuse writes) are kept, one folder per dataset.",
        default=Path("var/thumbnails"),
    )


#: how ``agent.ledger`` names a PostgreSQL database rather than a SQLite file
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
#: where the password of a PostgreSQL ledger comes from when no ``agent.ledger_password_file`` is set
LEDGER_PASSWORD_ENV = "BUCKETSYNC_LEDGER_PASSWORD"


class LinksConfig(_Strict):
    """Server-side fetches of URLs (linked items' content, CSV ``upload`` rows): see docs/catalog.md."""

    allow: list[str] = _doc(
        "Networks (CIDR, e.g. `10.1.0.0/16`, `127.0.0.1/32`) a fetch may reach although they are loopback, "
        "private, link-local, multicast, unspecified or a metadata service; empty: none of those.",
        default=[],
    )
    allow_http: bool = _doc(
        "Fetch `http://` URLs too; off by default, so only `https://` (with certificate checks) is fetched.",
        default=False,
    )
    max_bytes: int = _doc(
        "Largest body a fetch reads (bytes); a larger target is refused (`too_large`).",
        default=1024 * 1024 * 1024,
        ge=1,
    )
    timeout: Duration = _doc("Time limit of one fetch, redirects and body included (`too_slow` past it).", default=60.0)
    max_redirects: int = _doc("Redirects followed (each re-checked) before a fetch is refused.", default=5, ge=0, le=20)
    ca_file: Path | None = _doc(
        "Extra PEM CA certificates trusted for https fetches (a private CA), besides the system's.", default=None
    )

    @field_validator("allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"links.allow: {net!r} is not a network such as 10.0.0.0/8 or ::1/128") from None
        return v


class AgentConfig(_Strict):
    ledger: Path | str = _doc(
        "The ledger: a SQLite file (WAL, synchronous=FULL), or a PostgreSQL database as "
        "`postgresql://USER@HOST:PORT/DATABASE` (libpq's URL; its password is never written in it: it comes "
        "from `agent.ledger_password_file`, else the env var BUCKETSYNC_LEDGER_PASSWORD, else libpq's "
        "PGPASSWORD or ~/.pgpass).",
        default=Path("var/bucketsync.db"),
    )
    ledger_password_file: SecretFile | None = _doc(
        "File holding the PostgreSQL ledger's password (a bare name is a systemd credential).", default=None
    )
    id: str | None = _doc(
        "This agent's name among the agents sharing a PostgreSQL ledger (shown as the owner of its leases). "
        "Default: hostname-pid-random, new at every start.",
        default=None,
        min_length=1,
        max_length=200,
    )
    lease_seconds: Duration = _doc(
        "PostgreSQL ledger: how long a dataset's lease lasts unrenewed (renewed every third of it). A dead "
        "agent's datasets move to another within this time; a paused one cannot write after it.",
        default=15.0,
        ge=1.0,
        le=3600.0,
    )
    max_datasets: int = _doc(
        "PostgreSQL ledger: the most datasets this agent syncs at once (0: no cap beyond its fair share, "
        "the datasets divided by the live agents).",
        default=0,
        ge=0,
    )
    state_dir: Path | None = _doc(
        "Where local state is kept besides the ledger (staged uploads, content-hash memos). Default: the "
        "SQLite ledger's folder; `var` with a PostgreSQL ledger.",
        default=None,
    )
    listen: str = _doc("HOST:PORT of the HTTP server: /metrics, /healthz, /readyz, /api/v1.", default="127.0.0.1:9810")
    api_token: SecretStr | None = _doc(
        "Bearer token for /api/v1; required when `listen` is not loopback.", default=None
    )
    api_token_file: SecretFile | None = _doc(
        "File holding the API token (a bare name is a systemd credential).", default=None
    )
    log_level: Literal["debug", "info", "warning", "error"] = _doc("Lowest level logged.", default="info")
    log_format: Literal["auto", "json", "console"] = _doc("`auto`: console on a TTY, JSON otherwise.", default="auto")
    no_change_log_level: Literal["debug", "info"] = _doc(
        "Level of the one line a run that changed nothing logs (`debug` hides busy polls).", default="info"
    )
    grace: Duration = _doc("How long SIGTERM (or a reload) waits for running batches before cancelling.", default=10.0)
    # Retention, per dataset: the newest keep_* are kept, and anything younger than keep_*_for;
    # older history is pruned in the background. Running runs and pending ops are never pruned.
    keep_runs: int = _doc("Runs kept per dataset however old (the newest ones).", default=1000, ge=1)
    keep_runs_for: Duration = _doc("Runs younger than this are kept whatever their number.", default=30 * 86400.0)
    keep_ops: int = _doc(
        "Done/failed outbox ops kept per dataset however old (the newest ones); also finished trigger deliveries "
        "(in all).",
        default=1000,
        ge=1,
    )
    keep_ops_for: Duration = _doc(
        "Done/failed ops younger than this are kept whatever their number.", default=30 * 86400.0
    )
    prune_interval: Duration = _doc(
        "How often old runs and ops are pruned in the background (never running runs or pending ops).",
        default=3600.0,
    )
    reprobe_interval: Duration = _doc(
        "How often a dataset whose storage refused writes (downstream unavailable) is probed again.",
        default=300.0,
    )
    tls_cert_file: Path | None = _doc(
        "PEM certificate chain: serve HTTPS (with tls_key_file). The CLI trusts it when it talks to the agent.",
        default=None,
    )
    tls_key_file: SecretFile | None = _doc(
        "PEM private key of tls_cert_file (a bare name is a systemd credential).", default=None
    )
    enrich_concurrency: int = _doc(
        "Items enriched at once (reads and image decodes); peak memory grows with it, not with the dataset.",
        default=4,
        ge=1,
        le=64,
    )
    trigger_concurrency: int = _doc("Trigger deliveries (webhooks, commands) made at once.", default=4, ge=1, le=64)
    outbox_concurrency: int = _doc(
        "Outbox ops (writes to storage) executed at once; ops on the same dataset and key run one after another.",
        default=8,
        ge=1,
        le=256,
    )
    sync_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = _doc(
        "Processes that list storage and diff it against the ledger for the daemon's sync runs (0: the agent's "
        "own process does it). Listing and diffing every key is CPU work; in the agent's process it competes "
        "with the API, /healthz and the other runs. `auto`: one per usable core (the CPU affinity, capped by a "
        "cgroup v2 quota: a container's --cpus, a systemd CPUQuota=), at most 2, and 0 with fewer than 2 cores. "
        "Each worker is a Python process of about 55 MB resident that serves many runs at once, at a lower CPU "
        "priority (`sync_workers_nice`); writes to the ledger stay in the agent. 0 saves that memory where the "
        "API's latency under load does not matter.",
        default="auto",
    )
    sync_workers_nice: int = _doc(
        "How much lower the sync workers' CPU priority is than the agent's (`nice`, 0-19): when the cores are "
        "busy, the API and the agent's writes go first and the listing takes what is left. Where a sandbox "
        "forbids it (the shipped systemd unit's SystemCallFilter), the workers warn and run at the agent's.",
        default=10,
        ge=0,
        le=19,
    )

    @field_validator("ledger", mode="before")
    @classmethod
    def _ledger(cls, v: Any) -> Path | str:
        """A PostgreSQL URL stays text; anything else is a SQLite file. A password written in the
        URL is refused: the URL is shown in logs, errors and status, the password never."""
        if isinstance(v, str) and v.startswith(POSTGRES_SCHEMES):
            try:
                password = urllib.parse.urlsplit(v).password
            except ValueError:
                raise ValueError("agent.ledger is not a valid postgresql:// URL") from None
            if password is not None:
                raise ValueError(
                    "agent.ledger: leave the password out of the URL (it would show in logs and errors); give it "
                    f"in agent.ledger_password_file or the env var {LEDGER_PASSWORD_ENV}"
                )
            return v
        return Path(v) if isinstance(v, str) else v

    @property
    def ledger_file(self) -> Path | None:
        """The SQLite ledger file; None when the ledger is a PostgreSQL database."""
        return self.ledger if isinstance(self.ledger, Path) else None

    @property
    def local_state(self) -> Path:
        """The folder for local state beside the ledger (see ``state_dir``)."""
        if self.state_dir is not None:
            return self.state_dir
        return self.ledger.parent if isinstance(self.ledger, Path) else Path("var")

    def ledger_present(self) -> bool:
        """Whether there is a ledger to read (a SQLite file that exists; a database always)."""
        return not isinstance(self.ledger, Path) or self.ledger.exists()

    def ledger_password(self) -> str | None:
        """The PostgreSQL ledger's password from its file or env; None lets libpq's own ways apply."""
        if self.ledger_password_file is not None:
            return _read_secret_file(self.ledger_password_file, "agent.ledger_password").get_secret_value()
        return os.environ.get(LEDGER_PASSWORD_ENV) or None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"listen {v!r} must be HOST:PORT, such as 127.0.0.1:9810")
        return v

    @model_validator(mode="after")
    def _token_once(self) -> AgentConfig:
        if self.api_token is not None and self.api_token_file is not None:
            raise ValueError("set api_token or api_token_file, not both")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set tls_cert_file and tls_key_file together (or neither, for plain HTTP)")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def token(self) -> str | None:
        """The API token, or None when none is set. An empty or blank token is no token:
        comparing against ``Bearer `` would let anyone in who sends an empty one."""
        if self.api_token_file is not None:
            value = _read_secret_file(self.api_token_file, "agent.api_token").get_secret_value()
        else:
            value = self.api_token.get_secret_value() if self.api_token is not None else ""
        return value.strip() or None

    def token_field(self) -> str:
        """The config field the token comes from, for messages."""
        return "agent.api_token_file" if self.api_token_file is not None else "agent.api_token"

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BUCKETSYNC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    agent: AgentConfig = _doc("The agent itself: ledger, HTTP server, logs.", default=AgentConfig())
    integrations: dict[Name, Integration] = _doc("Credentials for one cloud account each, by name.", default={})
    drivers: dict[Name, DriverConfig] = _doc("Storage locations, by name.", default={})
    datasets: dict[Name, DatasetConfig] = _doc("Catalogs, one per driver location, by name.", default={})
    enrich: EnrichConfig = _doc(
        "Enrichment: system metadata (mimetype, dimensions, EXIF orientation) and thumbnails.", default=EnrichConfig()
    )
    links: LinksConfig = _doc(
        "Server-side fetches for linked items and CSV imports: what they may reach, size and time caps.",
        default=LinksConfig(),
    )

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for name, driver in self.drivers.items():
            scheme = driver.location.scheme
            if driver.integration is not None:
                integ = self.integrations.get(driver.integration)
                if integ is None:
                    raise ValueError(f"drivers.{name}.integration: no integration named {driver.integration!r}")
                want = _KIND_FOR_SCHEME.get(scheme)
                if want != integ.kind:
                    raise ValueError(
                        f"drivers.{name}.integration: {driver.integration!r} is kind {integ.kind!r}, "
                        f"but {scheme}:// needs {want or 'no integration'}"
                    )
        for name, ds in self.datasets.items():
            if ds.driver not in self.drivers:
                known = ", ".join(sorted(self.drivers)) or "none defined"
                raise ValueError(f"datasets.{name}.driver: no driver named {ds.driver!r} (drivers: {known})")
            if ds.sync == "events":
                _check_events(name, ds.driver, self.drivers[ds.driver])
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init > env > TOML; the TOML file is set per load (see load_settings).
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    def dataset(self, name: str) -> DatasetConfig:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none configured"
            raise ConfigError(f"no dataset named {name!r} (datasets: {known})") from None

    def enriches(self, dataset: str) -> bool:
        """Whether ``dataset``'s items are enriched (its own switch, else ``enrich.enabled``)."""
        own = self.dataset(dataset).enrich
        return self.enrich.enabled if own is None else own

    def driver_of(self, dataset: str) -> DriverConfig:
        return self.drivers[self.dataset(dataset).driver]


def _check_events(dataset: str, driver_name: str, driver: DriverConfig) -> None:
    """A dataset in events mode needs a source that can serve its driver's storage."""
    scheme = driver.location.scheme
    source = driver.event_source()
    suggest = _SOURCE_FOR_SCHEME.get(scheme)
    if source is None:
        fix = (
            f'add [drivers.{driver_name}.events] with source = "{suggest.split()[0]}"'
            if suggest
            else f'{scheme}:// has no event source; use sync = "poll"'
        )
        raise ValueError(f'datasets.{dataset}.sync: "events" needs an event source for driver {driver_name!r}: {fix}')
    if scheme not in EVENT_SOURCES[source]:
        fix = f"use source = {suggest}" if suggest else f'{scheme}:// has no event source; use sync = "poll"'
        raise ValueError(
            f"drivers.{driver_name}.events.source: {source!r} cannot serve {scheme}:// (dataset {dataset!r}); {fix}"
        )


DEFAULT_CONFIG = Path("bucketsync.toml")


def config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Where the config comes from, and whether the user named it (then it must exist)."""
    if explicit is not None:
        return Path(explicit), True
    if env := os.environ.get("BUCKETSYNC_CONFIG"):
        return Path(env), True
    return DEFAULT_CONFIG, False


def _not_found() -> ConfigError:
    # Starting anyway would run an empty agent writing a ledger wherever it was started.
    return ConfigError(
        "no config file found; looked for: -c/--config (not given), $BUCKETSYNC_CONFIG (not set), "
        f"{DEFAULT_CONFIG} in {Path.cwd()} (no such file). "
        "Write a starter config with `bucketsync init`, or name one with -c PATH"
    )


_KINDS = ("aws", "gcp", "azure")


def _field(loc: tuple[int | str, ...]) -> str:
    # The integrations union adds its tag after the name (integrations.NAME.aws.field); it is
    # not a field. Only there: an integration, driver or dataset may itself be called "aws".
    parts = [str(p) for i, p in enumerate(loc) if not (i == 2 and loc[0] == "integrations" and p in _KINDS)]
    return ".".join(parts) or "config"


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = _field(err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {msg}" if field != "config" or ":" not in msg else msg)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load and validate the configuration or raise ``ConfigError``."""
    file, named = config_path(path)
    if file.exists() and not file.is_file():
        raise ConfigError(f"config {str(file)!r} is not a file")
    if not file.exists():
        raise ConfigError(f"config file {str(file)!r} does not exist") if named else _not_found()
    # A subclass per load carries the file.
    bound = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": file}})
    try:
        settings: Settings = bound()
        return settings
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"{file}: {exc}") from None
