"""The permission probe behind ``bucketsync check`` and the daemon's start of each dataset.

It checks what the dataset needs, and only that:

- ``list`` and ``get`` always (upstream sync needs them). ``get`` reads a little of
  the first listed object, or the probe's test-file when one was written; an empty
  location with no test-file cannot test it ("not tested", which does not fail).
- ``put`` only when the dataset accepts writes (not ``read_only``): it writes a
  test-file in the hidden folder.
- ``delete`` only when the driver has ``allow_delete``. Otherwise the test-file is
  still cleaned up (the hidden folder is bucketsync's own), but that is not a check.

Upstream and downstream are judged apart: a location that can be listed and read
but not written is *ready* (the dataset syncs) with *downstream unavailable* (writes
through bucketsync are refused up front). Each failure is classified, so the user
reads "permission denied", "bucket or folder not found", "storage unreachable" or
"bad region or endpoint", not one catch-all.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bucketsync.core.errors import BadEndpoint, NotFound, PermissionDenied, Unreachable
from bucketsync.core.gate import DELETE_OBJECT, decide_delete
from bucketsync.core.keys import HIDDEN
from bucketsync.core.model import CREATE, ObjectInfo
from bucketsync.stores import Store, listing_with_gaps, one_chunk, read_all

if TYPE_CHECKING:
    from bucketsync.config import Settings

# What a check found: "ok", one of the failure kinds, or why it was not run.
OK = "ok"
DENIED = "denied"
NOT_FOUND = "not_found"
UNREACHABLE = "unreachable"
BAD_ENDPOINT = "bad_endpoint"
FAILED = "error"
NOT_TESTED = "not_tested"  # could not be tested (an empty location for get); does not fail the probe
SKIPPED = "not_required"  # the dataset does not need it

_WORDS = {
    DENIED: "permission denied",
    NOT_FOUND: "bucket or folder not found",
    UNREACHABLE: "storage unreachable",
    BAD_ENDPOINT: "bad region or endpoint",
    FAILED: "failed",
    NOT_TESTED: "not tested",
    SKIPPED: "not required",
}
UPSTREAM = ("list", "get")
DOWNSTREAM = ("put", "delete")
PEEK = 64 << 10  # get reads at most about this much of an existing object
MAX_GAPS = 100  # listing entries looked at for an object get can read


@dataclass(slots=True)
class Check:
    status: str
    required: bool
    detail: str | None = None

    @property
    def ok(self) -> bool:
        """Passed, or could not fail: not tested, or not required."""
        return self.status in (OK, NOT_TESTED, SKIPPED)

    def describe(self) -> str:
        words = _WORDS.get(self.status, self.status)
        return f"{words} ({self.detail})" if self.detail and self.status != OK else words


@dataclass(slots=True)
class ProbeResult:
    driver: str
    url: str
    checks: dict[str, Check] = field(default_factory=dict)
    #: the test-file left behind in the hidden folder when cleaning it up failed
    leftover: str | None = None

    def _failed(self, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if n in self.checks and self.checks[n].required and not self.checks[n].ok]

    @property
    def upstream_ok(self) -> bool:
        """The dataset can be synced: list (and get, when it could be tested) work."""
        return not self._failed(UPSTREAM)

    @property
    def downstream_ok(self) -> bool:
        """Writes (and deletes, with ``allow_delete``) through bucketsync can reach storage."""
        return not self._failed(DOWNSTREAM)

    @property
    def ok(self) -> bool:
        return self.upstream_ok and self.downstream_ok

    def failures(self) -> tuple[tuple[str, str], ...]:
        """(check, status) of every required check that failed: what is wrong, without the texts."""
        return tuple((n, self.checks[n].status) for n in self._failed((*UPSTREAM, *DOWNSTREAM)))

    def _problems(self, names: tuple[str, ...]) -> str:
        return "; ".join(f"{n}: {self.checks[n].describe()}" for n in self._failed(names))

    def downstream_summary(self) -> str:
        return f"downstream unavailable: {self._problems(DOWNSTREAM)}"

    def summary(self) -> str:
        where = f"driver {self.driver!r} ({self.url})"
        if not self.upstream_ok:
            return f"{where} cannot be synced: {self._problems(UPSTREAM)}"
        if not self.downstream_ok:
            return f"{where} can be synced, but {self.downstream_summary()}; writes through bucketsync are refused"
        passed = ", ".join(n for n, c in self.checks.items() if c.status == OK)
        return f"{where}: all required permissions present ({passed})"

    def as_json(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "url": self.url,
            "ok": self.ok,
            "upstream_ok": self.upstream_ok,
            "downstream_ok": self.downstream_ok,
            "permissions": {
                n: {
                    "ok": c.ok,
                    "status": c.status,
                    "required": c.required,
                    "error": c.detail if c.status != OK else None,
                }
                for n, c in self.checks.items()
            },
            "summary": self.summary(),
        }


def classify(exc: Exception) -> str:
    """The failure kind of a store error (the order matters: Unreachable is a Transient)."""
    if isinstance(exc, PermissionDenied):
        return DENIED
    if isinstance(exc, NotFound):
        return NOT_FOUND
    if isinstance(exc, Unreachable):
        return UNREACHABLE
    if isinstance(exc, BadEndpoint):
        return BAD_ENDPOINT
    return FAILED


def _failure(exc: Exception, required: bool = True) -> Check:
    return Check(classify(exc), required, str(exc) or type(exc).__name__)


async def _peek(store: Store, key: str) -> None:
    """Read the start of an object (``get`` needs no more), then let the stream go."""
    stream = store.open(key)
    try:
        got = 0
        async for chunk in stream:
            got += len(chunk)
            if got >= PEEK:
                break
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def driver_takes_writes(settings: Settings, driver: str) -> bool:
    """Whether a dataset on ``driver`` accepts writes (then ``put`` is required); True for an unused driver."""
    using = [ds for ds in settings.datasets.values() if ds.driver == driver]
    return not using or any(not ds.read_only for ds in using)


async def probe(store: Store, driver: str, allow_delete: bool, *, writes: bool = True) -> ProbeResult:
    """Probe ``store`` for what a dataset needs. ``writes``: the dataset accepts writes (not read-only)."""
    result = ProbeResult(driver, store.url)
    checks = result.checks
    first: str | None = None
    try:
        # An unreadable sub-folder is a gap, not a failed list; get peeks at the first object
        # listed, but a listing that starts with many gaps is not read to its end for one.
        seen = 0
        async for entry in listing_with_gaps(store):
            seen += 1
            if isinstance(entry, ObjectInfo):
                first = entry.key
            elif seen < MAX_GAPS:
                continue
            break
        checks["list"] = Check(OK, True)
    except Exception as exc:
        checks["list"] = _failure(exc)
    if not checks["list"].ok and checks["list"].status != DENIED:
        # Nothing there to talk to (or not the right thing): the other checks would only repeat it.
        why = f"not tested: list failed ({_WORDS[checks['list'].status]})"
        checks["get"] = Check(NOT_TESTED, True, why)
        checks["put"] = Check(NOT_TESTED if writes else SKIPPED, writes, why if writes else "the dataset is read-only")
        checks["delete"] = Check(NOT_TESTED if allow_delete else SKIPPED, allow_delete, _delete_note(allow_delete, why))
        # A check that could not run must not pass: without list nothing can be synced anyway.
        return result

    key = f"{HIDDEN}probe-{secrets.token_hex(8)}.txt"
    body = b"bucketsync permission probe\n"
    written = False
    if writes:
        try:
            await store.put(key, one_chunk(body), CREATE, "text/plain")
            checks["put"] = Check(OK, True)
            written = True
        except Exception as exc:
            checks["put"] = _failure(exc)
    else:
        checks["put"] = Check(SKIPPED, False, "the dataset is read-only")

    try:
        if first is not None:
            await _peek(store, first)
            checks["get"] = Check(OK, True)
        elif written:
            got = await read_all(store, key)
            ok = got == body
            checks["get"] = Check(OK if ok else FAILED, True, None if ok else "read back different bytes than written")
        else:
            checks["get"] = Check(NOT_TESTED, True, "the location is empty and no test-file was written")
    except Exception as exc:
        checks["get"] = _failure(exc)

    if written:
        await _remove_test_file(store, key, allow_delete, result)
    elif allow_delete:
        checks["delete"] = Check(NOT_TESTED, True, "not tested: no test-file could be written")
    else:
        checks["delete"] = Check(SKIPPED, False, _delete_note(False, ""))
    return result


def _delete_note(allow_delete: bool, why: str) -> str:
    return why if allow_delete else "allow_delete is off: deletes through bucketsync make tombstones"


async def _remove_test_file(store: Store, key: str, allow_delete: bool, result: ProbeResult) -> None:
    """Delete the test-file: the ``delete`` check with ``allow_delete``, mere cleaning without.

    The test-file is bucketsync's own (hidden folder): the gate always lets it go.
    """
    if decide_delete(key=key, read_only=False, allow_delete=allow_delete).action != DELETE_OBJECT:
        raise AssertionError("the gate must allow deleting the probe's own test-file")
    try:
        await store.delete(key)
        failure = None
    except Exception as exc:
        failure = exc
        result.leftover = key
    if allow_delete:
        result.checks["delete"] = Check(OK, True) if failure is None else _failure(failure)
    else:
        result.checks["delete"] = Check(SKIPPED, False, _delete_note(False, ""))
