"""Failpoints: crash the process at a named point, for crash-recovery tests.

``BUCKETSYNC_FAILPOINT=outbox.after_storage`` makes the process ``os._exit(137)``
the first time it reaches that point: the same as ``kill -9`` there, but exactly
between two steps instead of wherever a signal happens to land. Unset, a
failpoint is one dict lookup.
"""

from __future__ import annotations

import os
import sys

POINTS = ("outbox.before_storage", "outbox.after_storage", "sync.after_batch", "events.before_apply")
#: points where ``BUCKETSYNC_RAISEPOINT=name:N`` raises instead, the first N times
#: (``events.source.DATASET``: the dataset's event source fails as it delivers, raising SourceFailed)
RAISE_POINTS = ("supervisor.dataset_start", "events.source.DATASET")
_raised: dict[str, int] = {}


class FailpointError(RuntimeError):
    """Raised at a raise point: stands for a bug that escapes a task."""


def hit(name: str) -> None:
    if os.environ.get("BUCKETSYNC_FAILPOINT") == name:
        sys.stderr.write(f"failpoint {name}: exiting as if killed\n")
        sys.stderr.flush()
        os._exit(137)


def raises(name: str) -> None:
    """Raise ``FailpointError`` the first N times ``name`` is reached (``BUCKETSYNC_RAISEPOINT=name:N``)."""
    spec = os.environ.get("BUCKETSYNC_RAISEPOINT")
    if not spec or spec.partition(":")[0] != name:
        return
    limit = int(spec.partition(":")[2] or 1)
    n = _raised[name] = _raised.get(name, 0) + 1
    if n <= limit:
        raise FailpointError(f"raise point {name} ({n} of {limit})")
