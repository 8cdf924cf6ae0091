"""Plain records shared by stores, the diff, the ledger and the gate."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing (or head, or put) reports it.

    ``key`` is relative to the driver's prefix. ``modified`` is POSIX seconds (UTC)
    as a float: cheap to compare and store, converted to ISO 8601 only at the edges.
    ``etag`` is normalised (no quotes); ``version`` is the S3/Azure version id or
    the GCS generation, when the provider has one.
    """

    key: str
    size: int
    modified: float
    etag: str | None = None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class ListingGap:
    """A part of a listing that could not be read, reported in place of its objects.

    It covers every key that starts with ``prefix`` (a sub-folder ``a/b/``, or one
    prefix of a parallel cloud listing), or, when ``exact``, the one key ``prefix``
    (an object that was seen but could not be read). A store yields it in key order
    at ``prefix``, where the covered keys would have been. What the ledger holds
    under a gap keeps its last known state: nothing there is removed or changed.
    """

    prefix: str
    error: str
    exact: bool = False

    def covers(self, key: str) -> bool:
        return key == self.prefix if self.exact else key.startswith(self.prefix)

    def as_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "exact": self.exact, "error": self.error}


@dataclass(frozen=True, slots=True)
class PutMode:
    """How a put treats an object that may already be there.

    ``OVERWRITE`` replaces anything; ``CREATE`` fails with ``AlreadyExists`` when
    the key exists; ``PutMode.matching(etag)`` fails with ``PreconditionFailed``
    unless the stored etag is ``etag``.
    """

    create: bool = False
    if_match: str | None = None

    @classmethod
    def matching(cls, etag: str) -> PutMode:
        return cls(if_match=etag)

    def __post_init__(self) -> None:
        if self.create and self.if_match is not None:
            raise ValueError("a put is create-only or if-match, not both")


OVERWRITE = PutMode()
CREATE = PutMode(create=True)


class ItemState(enum.StrEnum):
    LIVE = "live"
    TOMBSTONE = "tombstone"
    #: a pointer item (clone) whose source item was removed by its dataset's sync
    ORPHANED = "orphaned"
    #: a pointer item whose source object changed since it was cloned
    STALE = "stale"


#: the states every dataset's counts show (pointer states appear once a dataset has them)
COUNTED_STATES = (ItemState.LIVE, ItemState.TOMBSTONE)


@dataclass(slots=True)
class Indexed:
    """One row of a dataset's ledger snapshot: what was last seen under a key.

    Not frozen, like ``Change``: one is built per item per run, and a frozen
    dataclass's ``__init__`` costs 5x more (measured: 5.1 -> 3.9 s on a 1M re-sync).
    """

    id: int
    key: str
    size: int
    modified: float
    etag: str | None
    version: str | None
    state: ItemState


#: an ``Indexed`` as the ledger's snapshot reads it, before any object is built:
#: (id, key, size, modified, etag, version, state); ``Indexed(*row)`` when one is needed
SnapshotRow = tuple[int, str, int, float, str | None, str | None, str]


def indexed(row: SnapshotRow) -> Indexed:
    """The ``Indexed`` of a snapshot row."""
    return Indexed(row[0], row[1], row[2], row[3], row[4], row[5], ItemState(row[6]))


class ChangeKind(enum.StrEnum):
    ADDED = "added"
    MODIFIED = "modified"
    REMOVED = "removed"
    UNCHANGED = "unchanged"


@dataclass(slots=True)
class Change:
    """One step of the diff. ``new`` is None for removals, ``old`` for additions."""

    kind: ChangeKind
    key: str
    new: ObjectInfo | None
    old: Indexed | None


@dataclass(slots=True)
class Counts:
    """What a run did; the live progress of a running one."""

    listed: int = 0
    added: int = 0
    modified: int = 0
    removed: int = 0
    renamed: int = 0
    unchanged: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        # Spelled out: dataclasses.asdict deep-copies field by field, and this runs for
        # every run of every dataset on each GET /datasets (it was most of its cost).
        return {
            "listed": self.listed,
            "added": self.added,
            "modified": self.modified,
            "removed": self.removed,
            "renamed": self.renamed,
            "unchanged": self.unchanged,
            "errors": self.errors,
        }


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    ABORTED = "aborted"
    #: the listing completed except for sub-trees it could not read (``RunRecord.gaps``):
    #: everything else was synced, removals included; keys under a gap kept their state
    PARTIAL = "partial"


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: int
    dataset: str
    started: float
    ended: float | None
    status: RunStatus
    counts: Counts
    error: str | None
    forced: bool
    #: the sub-trees the run could not list (status ``partial``)
    gaps: tuple[ListingGap, ...] = ()
    #: ``listing`` (a poll or a reconcile) or ``events`` (changes applied from events)
    kind: str = "listing"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dataset": self.dataset,
            "status": str(self.status),
            "started": iso(self.started),
            "ended": iso(self.ended),
            **self.counts.as_dict(),
            "error": self.error,
            "forced": self.forced,
            "gaps": [g.as_json() for g in self.gaps],
            "kind": self.kind,
        }


@dataclass(frozen=True, slots=True)
class Item:
    """An item as the ledger holds it, for the CLI and the API."""

    id: int
    key: str
    size: int
    modified: float
    etag: str | None
    version: str | None
    state: ItemState
    content_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    updated: float | None = None
    #: a linked item's target (https://..., s3://...): its binary is there, not in the bucket
    ref: str | None = None
    #: how a linked item came: "api" (POST .../links, a CSV import) or "file" (a synced *.link.json)
    link: str | None = None

    def as_json(self, full: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "key": self.key,
            "size": self.size,
            "etag": self.etag,
            "modified": iso(self.modified),
            "state": str(self.state),
        }
        if full:
            out |= {
                "version": self.version,
                "content_type": self.content_type,
                "metadata": self.meta,
                "updated": iso(self.updated),
            }
        if self.link is not None:  # only linked items carry it: other items look as they always did
            out["link"] = {"ref": self.ref, "from": self.link}
        return out


class OpKind(enum.StrEnum):
    PUT = "put"
    DELETE = "delete"


class OpState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Op:
    """One durable downstream operation in the outbox."""

    id: int
    dataset: str
    kind: OpKind
    key: str
    state: OpState
    attempts: int
    create_only: bool
    if_match: str | None
    staged: str | None  # the uploaded body, fsynced on disk until the op completes
    sha256: str | None
    content_type: str | None
    error: str | None
    error_code: str | None
    created: float
    updated: float
    next_at: float

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dataset": self.dataset,
            "kind": str(self.kind),
            "key": self.key,
            "state": str(self.state),
            "attempts": self.attempts,
            "error": self.error,
            "error_code": self.error_code,
            "created": iso(self.created),
            "updated": iso(self.updated),
        }


def iso(ts: float | None) -> str | None:
    """POSIX seconds -> ISO 8601 UTC, for JSON and humans."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def normalize_etag(raw: str | None, *, origin: Literal["http", "hash"] = "http") -> str | None:
    """The one place ETags are normalised; ``origin`` says what the value is.

    ``"http"``: an HTTP ETag (a header, or an S3/Azure XML field holding one): no
    surrounding quotes, no weak ``W/`` marker. Azure lists ETags unquoted but
    returns them quoted elsewhere; S3 quotes them everywhere, and ``copy_object``
    on some servers does not. Multipart S3 ETags (``md5-N``) are kept as they are:
    they identify a version, they are not MD5s.

    ``"hash"``: a provider's hash or version field (GCS ``md5Hash``, the JSON
    ``etag``), base64 text that may itself begin with ``W/`` (1 MD5 in 4,096):
    only surrounding whitespace goes, never a character of the value.
    """
    if raw is None:
        return None
    etag = raw.strip()
    if origin == "hash":
        return etag or None
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"') or None
