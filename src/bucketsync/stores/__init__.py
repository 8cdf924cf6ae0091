"""The Store protocol and the registry from URL scheme to store.

A store is bound to one driver location (bucket + prefix, or folder). Every key it
takes or yields is relative to that prefix. ``list`` yields indexable objects only
(see ``keys.indexable``) in ascending code-point order of key.
"""

from __future__ import annotations

import importlib
import itertools
import operator
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from bucketsync.core.errors import OrderError, StorageError
from bucketsync.core.model import OVERWRITE, ListingGap, ObjectInfo, PutMode

if TYPE_CHECKING:
    from bucketsync.config import DriverConfig, Integration, Settings


@runtime_checkable
class Store(Protocol):
    #: the driver URL, for messages and logs (never carries credentials)
    url: str
    #: whether ``put`` honours ``PutMode.matching`` / ``delete(if_match=...)`` natively
    conditional_writes: bool

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every indexable object whose key starts with ``prefix``, ascending.

        Raises ``NotFound`` when the driver root (bucket, container, folder) does
        not exist: an absent root is an error, never an empty listing.
        """
        ...

    async def head(self, key: str) -> ObjectInfo:
        """The object's info, or ``NotFound``."""
        ...

    def open(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """The object's bytes in chunks; ``NotFound`` on the first iteration.

        ``offset``/``length`` read one byte range natively (an HTTP Range, a seek):
        ``0 <= offset < size`` (or 0 for an empty object); ``length`` None means to
        the end, and a range past the end stops at the end.
        """
        ...

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        mode: PutMode = OVERWRITE,
        content_type: str | None = None,
    ) -> ObjectInfo:
        """Write the object; return what storage now has (etag as ``list`` reports it)."""
        ...

    async def delete(self, key: str, if_match: str | None = None) -> None:
        """Delete the object. Idempotent: a missing key is not an error."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class PartialListing(Protocol):
    """Optional: a store that can scope a listing failure to the part it affects.

    ``list_with_gaps`` is ``list`` (same objects, same order, same errors for the
    driver root), except that when one part of the listing cannot be read (a local
    sub-folder the agent may not open, a file it cannot hash, or later one prefix of a
    parallel cloud listing that keeps failing), the store yields a ``ListingGap`` for
    that part *in key order*, at the position of its prefix, and goes on with the
    rest. The contract:

    - a gap covers every key starting with ``gap.prefix`` (or, with ``exact``, that
      one key); the listing never yields a key the gap covers;
    - gaps are ordered with the keys by their prefix, like a key;
    - an error that is not confined to a part (the root is gone, credentials are
      refused, the connection is down) still ends the listing with an exception.

    The sync then keeps every ledger key under a gap as it was (no removal, no
    change), syncs everything else (removals included), and ends the run
    ``partial``, naming the gaps.
    """

    def list_with_gaps(self, prefix: str = "") -> AsyncIterator[ObjectInfo | ListingGap]: ...


@runtime_checkable
class SplitListing(Protocol):
    """Optional: a store that lists in parallel parts cut at split points (``stores.parallel``).

    ``list_split`` is ``list`` (same objects, same order, same errors), with ``splits`` as a
    hint: ascending keys (relative to the driver) where the listing may be cut into parts,
    the quantiles of the last run's keys. Any keys are correct; good ones make even parts.
    ``page_size``: the keys one list request returns at most. A part holding fewer still costs
    a request, so callers give no more than a split point per ``page_size`` keys.
    """

    page_size: int

    def list_split(self, prefix: str, splits: Sequence[str]) -> AsyncIterator[ObjectInfo]: ...


@runtime_checkable
class PagedListing(Protocol):
    """Optional: a store that hands its listing over a page at a time (a list per request, per
    folder, per slice), for ``diff_pages``: one await per page instead of per object.

    ``list_pages`` is ``listing_with_gaps(store, prefix, splits)`` (same objects, gaps, order
    and errors), cut into lists; where the pages are cut carries no meaning. An empty page may
    come and is skipped.
    """

    def list_pages(
        self, prefix: str = "", splits: Sequence[str] = ()
    ) -> AsyncIterator[Sequence[ObjectInfo | ListingGap]]: ...


@runtime_checkable
class ChecksKeys(Protocol):
    """A store with limits of its own on keys (a local filesystem's name length)."""

    def check_key(self, key: str) -> None:
        """Raise ``KeyNotStorable`` naming the reason when this store cannot hold ``key``."""
        ...


@runtime_checkable
class KnowsContentMd5(Protocol):
    """A store that can say what MD5 the provider vouches for, for an object's content."""

    async def content_md5(self, key: str) -> tuple[ObjectInfo, bytes | None]:
        """The object's info and its content MD5, or None where the provider has none it
        vouches for (an S3 multipart or SSE-KMS ETag, a GCS composite object); ``NotFound``."""
        ...


def check_page(where: str, keys: Sequence[str], last: str | None, prefix: str) -> str:
    """A page of a listing that must ascend in code point order after ``last`` and stay under
    ``prefix`` (every key of it, hidden ones too): OrderError naming the first key out of order,
    StorageError the first outside. The page's last key, the next call's ``last``. One pass at C
    speed; the culprit is looked for only when the page is wrong."""
    if (last is not None and keys[0] <= last) or not all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
        for key in keys:
            if last is not None and key <= last:
                raise OrderError(f"list {where}: the server returned {key!r} after {last!r}")
            last = key
    if not (keys[0].startswith(prefix) and keys[-1].startswith(prefix)):  # ascending: the ends bound the rest
        outside = next(k for k in keys if not k.startswith(prefix))
        raise StorageError(f"list {where}: the server returned {outside!r}, outside the prefix {prefix!r}")
    return keys[-1]


def check_storable(store: Store, key: str) -> None:
    """Refuse, before anything is staged, a key the store cannot hold."""
    if isinstance(store, ChecksKeys):
        store.check_key(key)


# scheme -> "module:function"; cloud SDKs are imported only when a driver needs them.
_FACTORIES = {
    "mem": "bucketsync.stores.memory:open_memory",
    "file": "bucketsync.stores.local:open_local",
    "s3": "bucketsync.stores.s3:open_s3",
    "gs": "bucketsync.stores.gcs:open_gcs",
    "az": "bucketsync.stores.azure:open_azure",
}


#: stores that keep a cache of their own beside the ledger (the local content-hash memo)
_KEEP_STATE = {"file"}


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """What it takes to build a driver's store, and nothing bound to this process: a sync worker
    process (upstream/workers) gets one through a pipe and opens the same store there."""

    driver: DriverConfig
    integration: Integration | None
    #: the content-hash memos live beside the SQLite ledger, or in the local state folder
    memo_base: Path

    def open(self) -> Store:
        loc = self.driver.location
        module, _, func = _FACTORIES[loc.scheme].partition(":")
        factory = getattr(importlib.import_module(module), func)
        extra = {"ledger": self.memo_base} if loc.scheme in _KEEP_STATE else {}
        store: Store = factory(loc, self.driver, self.integration, **extra)
        return store


def store_spec(driver: DriverConfig, settings: Settings) -> StoreSpec:
    """The driver's ``StoreSpec``; the integration (credentials) comes from ``settings``."""
    integration = settings.integrations.get(driver.integration) if driver.integration else None
    conf = settings.agent
    memo_base = conf.ledger_file if conf.ledger_file is not None else conf.local_state / "ledger"
    return StoreSpec(driver, integration, memo_base)


def open_store(driver: DriverConfig, settings: Settings) -> Store:
    """Build the store for ``driver``; the integration (credentials) comes from ``settings``."""
    return store_spec(driver, settings).open()


def listing_with_gaps(
    store: Store, prefix: str = "", splits: Sequence[str] = ()
) -> AsyncIterator[ObjectInfo | ListingGap]:
    """The store's listing with failures scoped to sub-trees (``PartialListing``) where the
    store can do that; otherwise its plain ``list``, where any failure ends the listing.
    ``splits`` go to a store that lists in parts (``SplitListing``)."""
    if isinstance(store, PartialListing):
        return store.list_with_gaps(prefix)
    if splits and isinstance(store, SplitListing):
        return store.list_split(prefix, splits)
    return store.list(prefix)


#: objects per page when a store's listing is cut into pages for it (``listing_pages``)
PAGE = 1000


def listing_pages(
    store: Store, prefix: str = "", splits: Sequence[str] = ()
) -> AsyncIterator[Sequence[ObjectInfo | ListingGap]]:
    """``listing_with_gaps`` in pages (``PagedListing``): the store's own pages where it has them,
    otherwise its listing cut every ``PAGE`` objects."""
    if isinstance(store, PagedListing):
        return store.list_pages(prefix, splits)
    return _paged(listing_with_gaps(store, prefix, splits))


async def _paged(listing: AsyncIterator[ObjectInfo | ListingGap]) -> AsyncIterator[list[ObjectInfo | ListingGap]]:
    page: list[ObjectInfo | ListingGap] = []
    try:
        async for entry in listing:
            page.append(entry)
            if len(page) >= PAGE:
                yield page
                page = []
    except Exception:
        if page:  # what was listed before a failure is synced, as it was object by object
            yield page
        raise
    if page:
        yield page


async def read_all(store: Store, key: str) -> bytes:
    """Convenience for tests and small files: the whole object as bytes."""
    return b"".join([chunk async for chunk in store.open(key)])


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data
