"""The one error hierarchy.

Every store translates its SDK's errors into these classes in one place, so the
engine, the gate and the API reason about *what* went wrong, never about which
backend raised it.
"""

from __future__ import annotations


class BucketsyncError(Exception):
    """Base of every error bucketsync raises on purpose."""


class ConfigError(BucketsyncError):
    """The configuration is invalid; the message names the field."""


class LedgerLocked(BucketsyncError):
    """Another agent holds the single-instance lock on this ledger."""


class LedgerError(BucketsyncError):
    """The ledger cannot be opened, read or written; the message names the file and the fix."""


class LeaseLost(BucketsyncError):
    """This agent no longer holds the lease of the dataset it writes for (it expired, or another
    agent took it): the write was refused in its own transaction and nothing of it committed.
    The dataset's loop stops; the lease's new owner does the work."""


class DiskFull(LedgerError):
    """A write to the ledger (or its staging folder) failed for lack of space.

    Nothing half-written stays: the transaction rolled back. Writes work again as soon
    as there is space, with no restart.
    """


class OrderError(BucketsyncError):
    """A listing or snapshot was not in ascending code-point order of key."""


class WorkerDied(BucketsyncError):
    """A sync worker process (``agent.sync_workers``) ended while it listed for a run: the run
    fails like a failed listing (nothing removed) and the next one goes to a new worker."""


class ListingFailed(BucketsyncError):
    """A sync worker's listing failed with an error of no class here (an SDK's, a bug): the
    message is the one the run records, ``"TypeName: text"``, as if it had failed in the agent."""


class InvalidKey(BucketsyncError, ValueError):
    """A key that could escape its folder or is otherwise unusable."""


class Refused(BucketsyncError):
    """The gate refused a downstream operation; ``reason`` is its stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FetchRefused(BucketsyncError):
    """A server-side fetch of a URL (a linked item's content, a CSV ``upload`` row) that the
    SSRF policy refused or that could not complete within its caps (invariant 14).

    ``reason`` is stable: ``scheme``, ``invalid_url``, ``loopback``, ``private``, ``link_local``,
    ``multicast``, ``unspecified``, ``metadata``, ``reserved``, ``redirects`` (too many, or a
    redirect without a target), ``dns`` (the name does not resolve), ``too_large``,
    ``too_slow``, ``upstream`` (the target answered an error or could not be reached).
    """

    #: every reason, the policy's refusals first (the caller asked for something not allowed)
    REASONS = (
        "scheme",
        "invalid_url",
        "loopback",
        "private",
        "link_local",
        "multicast",
        "unspecified",
        "metadata",
        "reserved",
        "redirects",
        "dns",
        "too_large",
        "too_slow",
        "upstream",
    )

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"fetch refused ({reason}): {message}")
        self.reason = reason


class StorageError(BucketsyncError):
    """Something went wrong talking to storage.

    ``key`` names the object (relative to the driver prefix) when there is one.
    Messages never carry credentials.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class NotFound(StorageError):
    """The object (or the driver root, or the bucket) does not exist."""


class AlreadyExists(StorageError):
    """A create-only write found an object already there."""


class PreconditionFailed(StorageError):
    """An if-match write or delete found a different etag in storage."""


class PermissionDenied(StorageError):
    """The credentials may not do this."""


class NotSupported(StorageError):
    """The provider cannot do this (for example a conditional write)."""


class Transient(StorageError):
    """A retryable failure: throttling, 5xx, timeouts, connection resets."""


class Unreachable(Transient):
    """Storage could not be reached at all: a DNS failure, a refused connection, a connect timeout.

    Retryable (the network may come back), but told apart from a server that answered
    badly, so the probe can say "unreachable" rather than "lacks permission".
    """


class BadEndpoint(StorageError):
    """Something answered, but not as this kind of storage does, or it says the request went to the
    wrong place: a wrong ``endpoint_url`` or ``region``. Retrying does not help; the config must change.
    """


class KeyNotStorable(StorageError):
    """The store cannot hold this key (a segment too long for a local filesystem, ...).

    Permanent: retrying cannot help. Refused up front where the store can tell
    (``check_key``), else it fails the op.
    """


class FileFolderConflict(StorageError):
    """A file where a folder is needed, or a folder where a file is (local folders:
    ``a/b`` when ``a`` is a file, ``a`` when ``a/`` holds files). Permanent."""


class KeyFiltered(InvalidKey):
    """The key is outside the dataset's include/exclude filters: a sync would drop it."""


class OpStateError(BucketsyncError):
    """An op cannot be retried or cancelled in its state; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Stable codes for storage errors that cross the outbox: an op records the code of what
# failed it, and the waiting caller gets the same error class back from it.
_CODES: dict[type[StorageError], str] = {
    AlreadyExists: "already_exists",
    PreconditionFailed: "precondition_failed",
    NotFound: "not_found",
    KeyNotStorable: "key_not_storable",
    FileFolderConflict: "file_folder_conflict",
}
REFUSAL_CODES = frozenset({"read_only", "quota", "allow_delete_off", "storage_denied_writes"})


def code_of(exc: StorageError) -> str:
    return _CODES.get(type(exc), "storage_error")


def from_code(code: str, message: str, key: str | None = None) -> BucketsyncError:
    """The error an op recorded as ``code``, rebuilt for whoever waits on it."""
    if code == "cancelled":
        return OpStateError("op_cancelled", message)
    if code in REFUSAL_CODES:
        return Refused(code, message)
    for cls, known in _CODES.items():
        if known == code:
            return cls(message, key=key)
    return StorageError(message, key=key)


class InvalidFilter(BucketsyncError, ValueError):
    """A catalog filter, sort or index field that cannot be compiled.

    ``at`` points at the offending part of the filter document (``$and[1].size.$gt``),
    so a 400 says exactly what to fix.
    """

    def __init__(self, at: str, message: str) -> None:
        super().__init__(f"filter at {at}: {message}" if at else message)
        self.at = at
