"""A seekable, read-only file over an object's ranged reads, for libraries that want a file.

PyAV (FFmpeg) reads a video through a file object: it reads the head, seeks to wherever the
container keeps its index (an MP4's ``moov`` is often at the very end), and back to the first
frame. ``RangeFile`` gives it that file without downloading the object: each read it cannot
answer from its cache becomes one ranged read of the store (``Store.open(key, offset, length)``).

It is used from a worker thread (the library blocks) while the store is async: every fetch is
run on the event loop (``run_coroutine_threadsafe``) and the thread waits for it. Bounded on
every side: blocks of ``BLOCK`` bytes, at most ``CACHE_BLOCKS`` of them kept (least recently
used go first), at most ``budget`` bytes fetched in all (``ReadBudget`` past it), and ``close``
from the loop (a timed-out item) makes the next read fail at once, so the thread ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

#: the unit of fetch and cache (bytes)
BLOCK = 64 * 1024
#: blocks kept per file: 2 MiB, whatever the object's size
CACHE_BLOCKS = 32
#: a run of sequential reads doubles its fetch up to this many blocks (1 MiB): fewer round trips
#: for a decoder reading a frame, and still bounded
MAX_RUN = 16

Fetch = Callable[[int, int], Coroutine[Any, Any, bytes]]


class ReadBudget(OSError):
    """The reader would fetch more than its budget (``enrich.max_bytes``)."""


class ReadStopped(OSError):
    """The file was closed from the event loop (the item ran out of time)."""


class RangeFile(io.RawIOBase):
    """A read-only binary file of ``size`` bytes whose content comes from ``fetch(offset, length)``
    coroutines run on ``loop``. For use from a thread other than the loop's."""

    def __init__(self, fetch: Fetch, size: int, loop: asyncio.AbstractEventLoop, budget: int) -> None:
        super().__init__()
        self._fetch = fetch
        self.size = size
        self._loop = loop
        self.budget = budget
        #: bytes fetched from storage (the ``enrich_read_bytes`` metric counts them)
        self.fetched = 0
        self.fetches = 0
        self._pos = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        #: ``stop`` (the loop's thread) and a fetch starting (the reader's) agree under it
        self._lock = threading.Lock()
        self._stopped = False
        self._pending: concurrent.futures.Future[bytes] | None = None
        #: the block after the last fetch, and that fetch's length in blocks (read-ahead)
        self._next_block = -1
        self._run = 1

    # -- the file ---------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        pos = base + offset
        if pos < 0:
            raise OSError(f"seek to {pos}, before the start")
        self._pos = pos
        return pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        end = min(self._pos + len(buffer), self.size)
        if end <= self._pos:
            return 0
        view = memoryview(buffer).cast("B")
        done = 0
        pos = self._pos
        while pos < end:
            index, skip = divmod(pos, BLOCK)
            block = self._block(index)
            if len(block) <= skip:  # the object is shorter than it was listed: stop here
                break
            part = block[skip : skip + end - pos]
            view[done : done + len(part)] = part
            done += len(part)
            pos += len(part)
        self._pos = pos
        return done

    def stop(self) -> None:
        """From the loop's thread: fail the reader's next (or pending) read, so its thread ends."""
        with self._lock:
            self._stopped = True
            pending = self._pending
        if pending is not None:
            pending.cancel()

    # -- blocks ---------------------------------------------------------------------

    def _block(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        # Sequential reading (a decoder walking through frames) doubles the run, up to MAX_RUN;
        # a jump (a seek to the index at the end) starts again at one block.
        self._run = min(self._run * 2, MAX_RUN) if index == self._next_block else 1
        blocks = max(1, min(self._run, -(-self.size // BLOCK) - index))
        data = self._get(index * BLOCK, blocks * BLOCK)
        self._next_block = index + blocks
        for i in range(blocks):
            part = data[i * BLOCK : (i + 1) * BLOCK]
            if not part:
                break
            self._cache[index + i] = part
            while len(self._cache) > CACHE_BLOCKS:
                self._cache.popitem(last=False)
        return data[:BLOCK]

    def _get(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if self.fetched + length > self.budget:
            raise ReadBudget(
                f"reading it needs more than enrich.max_bytes={self.budget} bytes "
                f"({self.fetched} read, {length} more wanted at offset {offset})"
            )
        with self._lock:  # else a stop between the check and the fetch would find nothing to cancel
            if self._stopped:
                raise ReadStopped("stopped: the item ran out of time")
            pending = self._pending = asyncio.run_coroutine_threadsafe(self._fetch(offset, length), self._loop)
        try:
            data = pending.result()
        except concurrent.futures.CancelledError:
            raise ReadStopped("stopped: the item ran out of time") from None
        finally:
            self._pending = None
        self.fetched += len(data)
        self.fetches += 1
        return data
