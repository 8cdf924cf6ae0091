"""The API's bodies as typed models: the OpenAPI document is generated from these.

The handlers still build plain dicts (``as_json``) on the hot paths; these models are
the contract those dicts keep, and the fuzzer in the test suite checks every response
against the schemas generated from them. Field names and shapes here must match the
``as_json`` methods in model.py, sync.py, downstream.py and agent.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bucketsync.catalog.query import SYSTEM, field_pattern
from bucketsync.core.keys import KEY_PATTERN, MAX_KEY_BYTES
from bucketsync.upstream.events.webhook import Accepted as Accepted
from bucketsync.upstream.events.webhook import PubSubPush as PubSubPush
from bucketsync.upstream.events.webhook import S3Notification as S3Notification

Timestamp = str  # ISO 8601 UTC, "2024-05-01T12:00:00Z"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Body):
    code: str = Field(description="stable, machine-readable: invalid_key, not_found, read_only, ...")
    message: str = Field(description="for humans; names what is wrong")


class Error(_Body):
    """Every 4xx and 5xx of the API."""

    error: ErrorDetail


class LinkInfo(_Body):
    """A linked item's target: its binary is there, not in the driver's bucket."""

    ref: str = Field(description="https://... (fetched SSRF-safely), or s3:// gs:// az:// read through a driver")
    from_: Literal["api", "file"] = Field(
        alias="from", description="api: POST .../links or a CSV import; file: a synced *.link.json object"
    )


class Item(_Body):
    id: int
    key: str
    size: int
    etag: str | None
    modified: Timestamp | None
    state: Literal["live", "tombstone"]
    version: str | None
    content_type: str | None
    metadata: dict[str, str | int | float | bool]
    updated: Timestamp | None
    link: LinkInfo | None = Field(default=None, description="present on linked items only")
    system: SystemMetadata | None = Field(
        default=None,
        description="read-only: what enrichment found (null until the item is queued); absent when the "
        "dataset does not enrich",
    )


class SystemMetadata(BaseModel):
    """What enrichment found (read-only to users); image fields for images and videos, video fields for videos."""

    model_config = ConfigDict(extra="allow")
    enrichment: Literal["pending", "done", "failed"]
    enrichment_error: str | None
    thumbnail: str | None = Field(description="the thumbnail's key in the hidden folder (or the local cache)")
    mimetype: str | None = Field(default=None, description="sniffed from the bytes, not the key's extension")
    encoding: str | None = Field(default=None, description="text only: us-ascii or utf-8")
    format: str | None = None
    width: int | None = None
    height: int | None = None
    orientation: int | None = Field(
        default=None, description="EXIF orientation, 1-8 (1 when absent); a video's rotation as EXIF says it"
    )
    display_width: int | None = Field(default=None, description="width once turned upright per EXIF (or rotation)")
    display_height: int | None = Field(default=None, description="height once turned upright per EXIF (or rotation)")
    duration: float | None = Field(default=None, description="video: seconds")
    frame_rate: float | None = Field(default=None, description="video: frames per second")
    codec: str | None = Field(default=None, description="video: FFmpeg's name of the video codec (h264, vp9, ...)")
    rotation: int | None = Field(
        default=None, description="video: degrees clockwise a player turns the picture (0, 90, 180, 270)"
    )


class EnrichStatus(_Body):
    dataset: str
    enabled: bool
    pending: int
    done: int
    failed: int
    queued: int | None = Field(default=None, description="POST only: items queued by this request")


class Delivery(_Body):
    id: int
    dataset: str
    trigger: str
    event: Literal["created", "updated", "removed", "enriched"]
    key: str
    state: Literal["pending", "done", "dead"]
    attempts: int
    error: str | None
    created: Timestamp | None
    updated: Timestamp | None
    next_attempt: Timestamp | None


class DeliveryList(_Body):
    deliveries: list[Delivery]
    counts: dict[str, dict[str, int]] = Field(description="deliveries per dataset and state")


class ItemPage(_Body):
    items: list[Item]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class IndexList(_Body):
    indexes: list[str] = Field(description="indexed fields: system fields and metadata.NAME")


class IndexRequest(_Body):
    field: str = Field(
        description="metadata.NAME or a system field of the item's row (key, size, modified, mimetype, ...); "
        "enrichment's fields (width, height, ...) are kept beside the item and cannot be indexed",
        pattern=f"^{field_pattern({n: f for n, f in SYSTEM.items() if not f.beside})}$",
    )


class IndexCreated(IndexList):
    field: str
    created: bool = Field(description="false when the index was there already")


class Op(_Body):
    id: int
    dataset: str
    kind: Literal["put", "delete"]
    key: str
    state: Literal["pending", "done", "failed", "cancelled"]
    attempts: int
    error: str | None
    error_code: str | None
    created: Timestamp | None
    updated: Timestamp | None


class OpList(_Body):
    ops: list[Op]
    backlog: int = Field(description="ops still pending")


class Outcome(_Body):
    """What a write did; ``op`` is null when no storage operation was needed."""

    result: Literal[
        "created", "overwritten", "deleted", "tombstoned", "restored", "unchanged", "updated", "pending", "unlinked"
    ]
    item: Item | None
    op: Op | None


class _Counts(_Body):
    listed: int
    added: int
    modified: int
    removed: int
    renamed: int
    unchanged: int
    errors: int


RunState = Literal["running", "ok", "partial", "failed", "aborted"]


class Gap(_Body):
    """A part of storage a listing could not read; its items kept their last known state."""

    prefix: str = Field(description="the sub-tree (or, when exact, the one key) that could not be listed")
    exact: bool = Field(description="the gap is exactly this key, not a prefix")
    error: str


class Run(_Counts):
    id: int
    dataset: str
    status: RunState
    started: Timestamp | None
    ended: Timestamp | None
    error: str | None
    forced: bool
    gaps: list[Gap] = Field(description="what a partial run could not list")
    kind: Literal["listing", "events"] = Field(
        description="`listing`: a full listing (a poll, or an events-mode reconcile); `events`: changes applied "
        "from events, batched (about one run per second of activity)"
    )


class RunList(_Body):
    runs: list[Run]


class WouldRemove(_Body):
    count: int = Field(description="every key the run would remove")
    keys: list[str] = Field(description="the first 1,000 of them")
    truncated: bool = Field(description="true when keys lists fewer than count")


class Rename(_Body):
    # "from" is a Python keyword: the field is declared by alias
    old: str = Field(alias="from")
    to: str


class WouldRename(_Body):
    count: int = Field(description="every rename the run would record")
    renames: list[Rename] = Field(description="the first 1,000 of them")
    truncated: bool = Field(description="true when renames lists fewer than count")


class RunResult(_Counts):
    """A finished run (``wait=true`` or ``dry_run=true``)."""

    dataset: str
    run: int | None = Field(description="null for a dry run, which records nothing")
    status: RunState
    error: str | None
    gaps: list[Gap] = Field(description="what a partial run could not list")
    dry_run: bool
    seconds: float
    would_remove: WouldRemove | None = Field(default=None, description="dry runs only: the keys a run would remove")
    would_rename: WouldRename | None = Field(default=None, description="dry runs only: the renames a run would record")


class RunStarted(_Body):
    dataset: str
    run: int | None
    status: Literal["running"]


class Running(_Counts):
    run: int | None


class DatasetStatus(_Body):
    dataset: str
    kind: Literal["synced", "clone", "merge"] = Field(description="synced from a driver, or created at run time")
    source: str | None = Field(description="the dataset a clone's pointer items point into")
    driver: str | None = Field(description="null for a runtime dataset: it has no driver of its own")
    url: str | None
    sync: str
    interval: float
    read_only: bool
    allow_delete: bool
    items: dict[str, int] = Field(description="item counts by state")
    last_run: Run | None
    next_run: Timestamp | None
    running: Running | None
    ready: bool | None
    not_ready_reason: str | None
    downstream: Literal["available", "unavailable"] | None = Field(
        description="whether storage takes the dataset's writes (its probe's put, and delete with allow_delete); "
        "null when no agent runs"
    )
    downstream_reason: str | None
    guard_blocked: bool = Field(description="the last run was stopped by the mass-delete guard")
    metadata: dict[str, str | int | float | bool] = Field(description="the dataset's user metadata")


class DatasetList(_Body):
    datasets: list[DatasetStatus]


class MetadataPatch(_Body):
    """User metadata to merge; null removes a name. Names are 1-64 of [A-Za-z0-9_.-]."""

    metadata: dict[str, str | int | float | bool | None] = Field(
        json_schema_extra={"propertyNames": {"pattern": "^[A-Za-z0-9_.-]{1,64}$"}}
    )


class DatasetMetadata(_Body):
    dataset: str
    metadata: dict[str, str | int | float | bool] = Field(description="all of the dataset's user metadata now")


class Folder(_Body):
    name: str
    path: str = Field(description="the folder's path, ending in '/'")
    items: int = Field(description="live items under it, at any depth")
    size: int = Field(description="their bytes")


class FolderListing(_Body):
    parent: str
    folders: list[Folder]
    items: int = Field(description="items directly in parent")
    size: int = Field(description="their bytes")


class FolderCreate(_Body):
    # The key pattern has lookaheads the validator's regex engine lacks: it is for the document only.
    path: str = Field(
        description="a/b: the key rules, no trailing '/'",
        json_schema_extra={"minLength": 1, "maxLength": MAX_KEY_BYTES, "pattern": KEY_PATTERN},
    )


class FolderCreated(_Body):
    folder: str
    created: bool


class FolderDeleted(_Body):
    folder: str
    result: Literal["deleted", "tombstoned", "unlinked"] = Field(
        description="deleted: delete ops queued (allow_delete); tombstoned: the objects stay; "
        "unlinked: a clone's or merge's pointers removed, storage untouched"
    )
    items: int
    ops: list[int] = Field(description="the queued delete ops (see /ops)")


_KEY = {"minLength": 1, "maxLength": MAX_KEY_BYTES, "pattern": KEY_PATTERN}


class MoveRequest(_Body):
    """Exactly one of keys and filter."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"oneOf": [{"required": ["to", "keys"]}, {"required": ["to", "filter"]}]}
    )
    to: str = Field(
        description="the folder to move into: a/b ('' is the top)",
        json_schema_extra={"maxLength": MAX_KEY_BYTES, "pattern": f"(?:^$)|(?:{KEY_PATTERN})"},
    )
    keys: list[Annotated[str, Field(json_schema_extra=_KEY)]] = Field(
        default=[], min_length=1, max_length=10_000, description="the items' keys (or give filter)"
    )
    filter: dict[str, Any] = Field(default={}, description="every live item this catalog filter matches")


class Moved(_Body):
    key: str
    to: str
    result: Literal["moved", "unchanged", "failed"]
    error: str | None
    op: int | None = Field(description="the delete op of the old object")


class MoveResults(_Body):
    to: str
    results: list[Moved]


class LinkRequest(_Body):
    name: str = Field(description="the item's key (not ending in .link.json: that suffix is a link file's)")
    ref: str = Field(description="https://... (http:// with [links] allow_http), or s3:// gs:// az:// in a driver")
    mimetype: str | None = Field(default=None, description="the item's content type (type/subtype)")
    metadata: dict[str, str | int | float | bool] | None = Field(default=None, description="user metadata")


class LinkCreated(_Body):
    result: Literal["created", "exists"] = Field(description="exists: the key held a link to the same ref already")
    item: Item


class ImportReport(_Body):
    folder: str
    rows: int
    created: int
    exists: int
    failed: int


class ImportRow(_Body):
    """One line of the import's NDJSON stream: a row's result, or (last) the report."""

    row: int | None = Field(default=None, description="1 is the first row after the header")
    key: str | None = None
    action: Literal["link", "upload"] | None = None
    result: Literal["created", "exists", "failed"] | None = None
    reason: str | None = Field(default=None, description="why a row failed")
    report: ImportReport | None = Field(default=None, description="on the last line only")


class CloneRequest(_Body):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    with_metadata: bool = False
    filter: dict[str, Any] | None = Field(default=None, description="a catalog filter; null: every live item")


class Cloned(_Body):
    dataset: str
    kind: Literal["clone"]
    source: str
    items: int = Field(description="pointer items created")


class DatasetDeleted(_Body):
    dataset: str
    deleted: bool
    items: int = Field(description="pointer items unlinked with it")


class MergeRequest(_Body):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    sources: list[str] = Field(
        min_length=2, description="two or more synced datasets", json_schema_extra={"uniqueItems": True}
    )
    on_conflict: Literal["folder", "suffix", "merge"]


class Merged(_Body):
    dataset: str
    kind: Literal["merge"]
    source: str = Field(description="the sources, comma-separated")
    items: int = Field(description="pointer items created")


class ReloadPlan(_Body):
    """What a reload did, by dataset name."""

    added: list[str] = Field(description="datasets that started")
    removed: list[str] = Field(description="datasets that stopped; their catalog is kept")
    changed: list[str] = Field(description="datasets restarted with their new settings")
    unchanged: list[str] = Field(description="datasets left running untouched")
    needs_restart: list[str] = Field(description="[agent] options that changed and take effect only after a restart")


class OpenApiDocument(BaseModel):
    """This document: OpenAPI 3.1."""

    model_config = ConfigDict(extra="allow")
    openapi: str
    info: dict[str, str]
    paths: dict[str, dict[str, object]]
    components: dict[str, dict[str, object]]


#: every model that appears in the document, so each gets a component schema
MODELS: tuple[type[BaseModel], ...] = (
    Error,
    Item,
    SystemMetadata,
    EnrichStatus,
    Delivery,
    DeliveryList,
    ItemPage,
    IndexList,
    IndexRequest,
    IndexCreated,
    DatasetMetadata,
    Folder,
    FolderListing,
    FolderCreate,
    FolderCreated,
    FolderDeleted,
    MoveRequest,
    Moved,
    MoveResults,
    CloneRequest,
    MergeRequest,
    DatasetDeleted,
    Merged,
    Cloned,
    LinkInfo,
    LinkRequest,
    LinkCreated,
    ImportRow,
    ImportReport,
    Op,
    OpList,
    Outcome,
    Run,
    RunList,
    RunResult,
    RunStarted,
    DatasetList,
    MetadataPatch,
    ReloadPlan,
    OpenApiDocument,
    S3Notification,
    PubSubPush,
    Accepted,
)
