"""In-memory store: a sorted key list plus a dict, etags from a counter.

For fast unit tests and benchmarks; never a stand-in for the emulator tests.
Stores are shared per name within a process, so ``mem://x`` means one store.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

from bucketsync.core.errors import AlreadyExists, NotFound, PreconditionFailed
from bucketsync.core.keys import indexable
from bucketsync.core.location import Location
from bucketsync.core.model import OVERWRITE, ObjectInfo, PutMode
from bucketsync.stores import PAGE

_BUCKETS: dict[str, _Bucket] = {}


def _after(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``; None when there is none."""
    head = prefix.rstrip("\U0010ffff")
    return head[:-1] + chr(ord(head[-1]) + 1) if head else None


def _rekey(info: ObjectInfo, key: str) -> ObjectInfo:
    """``info`` with ``key`` relative to this store's prefix (another prefix's store may have written it)."""
    return info if info.key == key else dataclasses.replace(info, key=key)


class _Bucket:
    def __init__(self) -> None:
        self.keys: list[str] = []  # sorted, code-point order
        self.objects: dict[str, tuple[ObjectInfo, bytes]] = {}
        self.counter = 0

    def next_etag(self) -> str:
        self.counter += 1
        return f"{self.counter:x}"


class MemoryStore:
    conditional_writes = True

    def __init__(self, name: str, prefix: str = "") -> None:
        self.url = f"mem://{name}/{prefix}"
        self.prefix = prefix
        self._b = _BUCKETS.setdefault(name, _Bucket())

    @classmethod
    def drop(cls, name: str) -> None:
        """Forget a named store (tests)."""
        _BUCKETS.pop(name, None)

    def load(self, items: Iterable[tuple[str, bytes, float]]) -> int:
        """Bulk-add ``(key, data, modified)`` without per-put sorting; for benchmarks."""
        b = self._b
        n = 0
        for key, data, modified in items:
            full = self.prefix + key
            b.objects[full] = (ObjectInfo(key, len(data), modified, b.next_etag()), data)
            n += 1
        b.keys = sorted(b.objects)
        return n

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async for page in self.list_pages(prefix):
            for info in page:
                yield info

    async def list_pages(
        self, prefix: str = "", splits: Sequence[str] = ()
    ) -> AsyncIterator[builtins.list[ObjectInfo]]:
        """``list`` a page of ``PAGE`` objects at a time (``PagedListing``), giving the loop up
        between pages as a real store's requests would."""
        b = self._b
        full = self.prefix + prefix
        lo = bisect.bisect_left(b.keys, full)
        after = _after(full)
        hi = bisect.bisect_left(b.keys, after) if after is not None else len(b.keys)
        plen = len(self.prefix)
        keys = b.keys[lo:hi]  # a copy: puts during the listing are safe
        get = b.objects.get
        for start in range(0, len(keys), PAGE):
            full_keys = keys[start : start + PAGE]
            # One comprehension per page: this is the in-memory benchmark's whole listing, and a
            # statement per key cost 30% more instructions (bench/sync_memory.py --instructions).
            # Its first line is ``_rekey`` inlined: the call alone is 10% of this listing.
            page = [
                info if (info := entry[0]).key == key else dataclasses.replace(info, key=key)
                for full_key, key in zip(full_keys, [k[plen:] for k in full_keys] if plen else full_keys, strict=True)
                if (entry := get(full_key)) is not None and indexable(key)
            ]
            yield page
            await asyncio.sleep(0)

    async def head(self, key: str) -> ObjectInfo:
        entry = self._b.objects.get(self.prefix + key)
        if entry is None:
            raise NotFound(f"{self.url}{key} not found", key=key)
        return _rekey(entry[0], key)

    async def content_md5(self, key: str) -> tuple[ObjectInfo, bytes | None]:
        info = await self.head(key)
        return info, hashlib.md5(self._b.objects[self.prefix + key][1], usedforsecurity=False).digest()

    async def open(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        entry = self._b.objects.get(self.prefix + key)
        if entry is None:
            raise NotFound(f"{self.url}{key} not found", key=key)
        data = entry[1][offset : None if length is None else offset + length]
        for i in range(0, len(data), 1 << 20):
            yield data[i : i + (1 << 20)]
        if not data:
            yield b""

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        mode: PutMode = OVERWRITE,
        content_type: str | None = None,
    ) -> ObjectInfo:
        data = b"".join([c async for c in chunks])
        b = self._b
        full = self.prefix + key
        current = b.objects.get(full)
        if mode.create and current is not None:
            raise AlreadyExists(f"{self.url}{key} already exists", key=key)
        if mode.if_match is not None and (current is None or current[0].etag != mode.if_match):
            raise PreconditionFailed(f"{self.url}{key} changed in storage (etag mismatch)", key=key)
        info = ObjectInfo(key, len(data), time.time(), b.next_etag())
        if current is None:
            bisect.insort(b.keys, full)
        b.objects[full] = (info, data)
        return info

    async def delete(self, key: str, if_match: str | None = None) -> None:
        b = self._b
        full = self.prefix + key
        current = b.objects.get(full)
        if current is None:
            return
        if if_match is not None and current[0].etag != if_match:
            raise PreconditionFailed(f"{self.url}{key} changed in storage (etag mismatch)", key=key)
        del b.objects[full]
        del b.keys[bisect.bisect_left(b.keys, full)]

    async def aclose(self) -> None:
        return None


def open_memory(loc: Location, driver: object, integration: object) -> MemoryStore:
    return MemoryStore(loc.bucket, loc.prefix)
