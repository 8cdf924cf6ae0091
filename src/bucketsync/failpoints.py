"""Failpoints: crash the process at a named point, for crash-recovery tests.

``BUCKETSYNC_FAILPOINT=outbox.after_storage`` makes the process ``os._exit(137)``
the first time it reaches that point: the same as ``kill -9`` there, but exactly
between two steps instead of wherever a signal happens to land. Unset, a
failpoint is one dict lookup.
"""

from __future__ import annotations

import os
import sys

POINTS = ("outbox.before_storage", "outbox.after_storage", "sync.after_batch")


def hit(name: str) -> None:
    if os.environ.get("BUCKETSYNC_FAILPOINT") == name:
        sys.stderr.write(f"failpoint {name}: exiting as if killed\n")
        sys.stderr.flush()
        os._exit(137)
