"""The permission probe behind ``bucketsync check`` and the daemon's first-sync check.

It lists the driver's prefix, writes a test-file in the hidden folder, reads it
back, and deletes it. list, get and put are mandatory; delete only when the driver
has ``allow_delete`` on. A failure names the permission and the driver.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from bucketsync.gate import DELETE_OBJECT, decide_delete
from bucketsync.keys import HIDDEN
from bucketsync.model import CREATE
from bucketsync.stores import Store, listing_with_gaps, one_chunk, read_all


@dataclass(slots=True)
class Check:
    ok: bool
    required: bool
    error: str | None = None


@dataclass(slots=True)
class ProbeResult:
    driver: str
    url: str
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values() if c.required)

    def missing(self) -> list[str]:
        return [name for name, c in self.checks.items() if c.required and not c.ok]

    def summary(self) -> str:
        if self.ok:
            return f"driver {self.driver!r} ({self.url}): all required permissions present"
        details = "; ".join(f"{n}: {self.checks[n].error}" for n in self.missing())
        return f"driver {self.driver!r} ({self.url}) lacks permission: {', '.join(self.missing())} ({details})"

    def as_json(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "url": self.url,
            "ok": self.ok,
            "permissions": {n: {"ok": c.ok, "required": c.required, "error": c.error} for n, c in self.checks.items()},
        }


def _err(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


async def probe(store: Store, driver: str, allow_delete: bool) -> ProbeResult:
    result = ProbeResult(driver, store.url)
    try:
        async for _ in listing_with_gaps(store):  # an unreadable sub-folder is a gap, not a failed list
            break
        result.checks["list"] = Check(True, True)
    except Exception as exc:
        result.checks["list"] = Check(False, True, _err(exc))

    key = f"{HIDDEN}probe-{secrets.token_hex(8)}.txt"
    body = b"bucketsync permission probe\n"
    try:
        await store.put(key, one_chunk(body), CREATE, "text/plain")
        result.checks["put"] = Check(True, True)
    except Exception as exc:
        result.checks["put"] = Check(False, True, _err(exc))
        result.checks["get"] = Check(False, True, "not tested: the test-file could not be written")
        result.checks["delete"] = Check(False, allow_delete, "not tested: the test-file could not be written")
        return result
    try:
        got = await read_all(store, key)
        ok = got == body
        result.checks["get"] = Check(ok, True, None if ok else "read back different bytes than were written")
    except Exception as exc:
        result.checks["get"] = Check(False, True, _err(exc))
    try:
        # The test-file is bucketsync's own (hidden folder): the gate always lets it go.
        if decide_delete(key=key, read_only=False, allow_delete=allow_delete).action != DELETE_OBJECT:
            raise AssertionError("the gate must allow deleting the probe's own test-file")
        await store.delete(key)
        result.checks["delete"] = Check(True, allow_delete)
    except Exception as exc:
        note = "" if allow_delete else " (not required: allow_delete is off; the test-file stays in the hidden folder)"
        result.checks["delete"] = Check(False, allow_delete, _err(exc) + note)
    return result
