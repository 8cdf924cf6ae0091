"""Is the object in storage our own write? Asked of every conflicting put before it fails.

A write can land while its answer is lost: the connection resets after the
server stored the object. The next attempt then meets the op's own write and
gets "already exists" (create-only) or "precondition failed" (if-match). That
next attempt is not always ours to count: aiohttp (under aiobotocore, Azure's
transport and our GCS session) silently resends a PUT or DELETE once when a
reused connection resets, so even a first attempt can see its own write. So
every ``AlreadyExists`` / ``PreconditionFailed`` on a put is checked here,
whatever the attempt counter says.

The check: same size, then the content MD5 where the provider vouches for one
(``KnowsContentMd5``); where it has none, the stored bytes are read back and
compared with the staged body, stopping at the first difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

from bucketsync.core.errors import NotFound
from bucketsync.core.model import ObjectInfo
from bucketsync.stores import KnowsContentMd5, Store

CHUNK = 1 << 20


def _md5_of_file(path: str) -> bytes:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.digest()


async def landed(store: Store, key: str, staged: str) -> ObjectInfo | None:
    """What storage reports for ``key`` if it holds exactly the bytes of ``staged``; else None."""
    try:
        if isinstance(store, KnowsContentMd5):
            info, md5 = await store.content_md5(key)
        else:
            info, md5 = await store.head(key), None
    except NotFound:
        return None
    if info.size != await asyncio.to_thread(os.path.getsize, staged):
        return None
    if md5 is not None:
        return info if md5 == await asyncio.to_thread(_md5_of_file, staged) else None
    return info if await _same_bytes(store, key, staged) else None


async def _same_bytes(store: Store, key: str, staged: str) -> bool:
    """Read the object back and compare it with the staged file, chunk by chunk."""
    f = await asyncio.to_thread(open, staged, "rb")
    chunks = store.open(key)
    try:
        async for chunk in chunks:
            if await asyncio.to_thread(f.read, len(chunk)) != chunk:
                return False
        return await asyncio.to_thread(f.read, 1) == b""
    except NotFound:
        return False
    finally:
        f.close()
        close = getattr(chunks, "aclose", None)  # stop a download we no longer need
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
