"""The ``watch`` source: a local folder's changes through watchfiles (inotify on Linux).

Every file created, written, moved or deleted under the driver's folder becomes an
event for its key. A folder that appears (moved in, or unpacked) is walked, so each
file in it gets its own event; a folder that disappears is one event for its path,
which the consumer expands to the items it held. bucketsync's own files in the
hidden folder (staged uploads) are not reported.

watchfiles reports no time of change: ``at`` is when the watcher saw it, so the
latency histogram leaves out the watcher's own delay (``DEBOUNCE_MS`` at most).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import watchfiles

from bucketsync.core.keys import HIDDEN
from bucketsync.upstream.events import Batch, Event, EventKind, SourceContext, SourceFailed

#: watchfiles groups changes until none came for ``STEP_MS``, or for ``DEBOUNCE_MS`` at most
DEBOUNCE_MS = 200
STEP_MS = 20
#: an empty batch at least this often, so the consumer notices a stop without a change
IDLE_MS = 1000


class WatchSource:
    name = "watch"

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._stop = asyncio.Event()

    def batches(self) -> AsyncIterator[Batch]:
        return self._batches()

    async def _batches(self) -> AsyncIterator[Batch]:
        if not os.path.isdir(self.root):
            raise SourceFailed(f"cannot watch {self.root}: it is not a folder")
        try:
            async for changes in watchfiles.awatch(
                self.root,
                watch_filter=None,  # every file is an item, .git and node_modules too
                debounce=DEBOUNCE_MS,
                step=STEP_MS,
                stop_event=self._stop,
                rust_timeout=IDLE_MS,
                yield_on_timeout=True,
                recursive=True,
            ):
                events = await asyncio.to_thread(self._events, changes)
                yield Batch(events)
        except (OSError, RuntimeError) as exc:  # the folder went away, the watcher limit, ...
            raise SourceFailed(f"watching {self.root} failed: {exc}") from exc
        if not self._stop.is_set():
            raise SourceFailed(f"the watcher of {self.root} stopped")

    def _events(self, changes: set[tuple[watchfiles.Change, str]]) -> list[Event]:
        """Blocking (walks new folders): one event per key, in the order seen."""
        now = time.time()
        out: list[Event] = []
        for change, path in sorted(changes, key=lambda c: c[1]):
            key = self._key(path)
            if key is None:
                continue
            if change is not watchfiles.Change.deleted and os.path.isdir(path):
                out.extend(Event(k, EventKind.CHANGED, at=now) for k in self._walk(path))
                continue
            kind = EventKind.REMOVED if change is watchfiles.Change.deleted else EventKind.CHANGED
            out.append(Event(key, kind, at=now))
        return out

    def _key(self, path: str) -> str | None:
        rel = os.path.relpath(path, self.root)
        if rel == "." or rel.startswith(".." + os.sep):
            return None
        key = rel.replace(os.sep, "/")
        return None if key.startswith(HIDDEN) or key == HIDDEN[:-1] else key

    def _walk(self, folder: str) -> list[str]:
        keys = []
        for dirpath, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if self._key(os.path.join(dirpath, d)) is not None]
            for f in files:
                if (k := self._key(os.path.join(dirpath, f))) is not None:
                    keys.append(k)
        return keys

    async def aclose(self) -> None:
        self._stop.set()


def open_source(ctx: SourceContext) -> WatchSource:
    loc = ctx.driver.location
    if loc.scheme != "file":
        raise SourceFailed(f"the watch source serves file:// drivers, not {ctx.driver.url}")
    return WatchSource(loc.path)
