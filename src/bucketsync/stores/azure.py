"""Azure Blob store (``az://ACCOUNT/CONTAINER/prefix``) on azure-storage-blob's aio client.

Two paths. With a shared key or a SAS, listings and reads are our own signed GETs
(``azure_lean``: the SDK's pipeline and XML models were most of their cost); head,
writes, deletes, and everything with a token credential go through the SDK, which is
imported only then. Both paths give the same objects and the same errors: the SDK
path is the reference in the tests.

Listing order. Azure (and Azurite) list blob names in UTF-16 code-unit order, not
in code-point order: a character above U+FFFF is sent as a surrogate pair
(0xD800-0xDFFF), so it sorts *before* U+E000..U+FFFF, where code-point order puts
it after. The two orders agree everywhere else (ASCII, accents, NFC or NFD, CJK,
``a-c`` < ``a/b`` < ``a0``). ``CodePointOrder`` turns the server's stream into
code-point order with bounded memory; see its docstring for why it is correct.

Errors. ``translate`` is the one place azure.core exceptions become bucketsync's
``StorageError`` hierarchy. Messages name the store URL and key, the HTTP status
and Azure's error code, never the SDK's own text (it can carry request URLs with
SAS tokens), and the SDK exception is not chained.

Retries are ours (``bucketsync.core.retry``): the SDK's retry policy is switched off
(``retry_total=0``) so a call fails fast into ``Transient`` and the backoff is in
one place.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import functools
import hashlib
import heapq
import itertools
import operator
import re
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import structlog
from azure.core import MatchConditions
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from bucketsync.core.errors import (
    AlreadyExists,
    BadEndpoint,
    ConfigError,
    NotFound,
    NotSupported,
    OrderError,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
    Unreachable,
)
from bucketsync.core.keys import HIDDEN, indexable
from bucketsync.core.location import Location
from bucketsync.core.model import OVERWRITE, ObjectInfo, PutMode, normalize_etag
from bucketsync.core.retry import retrying
from bucketsync.stores.azure_lean import API_VERSION, Entry, Rest, RestError, Target, UnreadablePage
from bucketsync.stores.parallel import PARTS_PER_LISTER, SPLIT_LEVELS, Part, given, in_order
from bucketsync.stores.sharedkey import SharedKey

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.storage.blob import ContentSettings, StandardBlobTier
    from azure.storage.blob.aio import BlobClient, ContainerClient

    from bucketsync.config import AzureIntegration, DriverConfig

    Credential = AzureNamedKeyCredential | AzureSasCredential | AsyncTokenCredential

T = TypeVar("T")
log = structlog.get_logger(__name__)

MiB = 1 << 20
#: bodies up to one block go up in a single Put Blob; larger ones are staged block by block
BLOCK_SIZE = 8 * MiB
#: Azure's limit on blocks per blob (so 8 MiB blocks cap a put at ~390 GiB)
MAX_BLOCKS = 50_000
#: ``open`` reads with ranged GETs: a small first one (quick first byte, one request for small
#: objects), then larger ones for throughput. The SDK's default first GET would buffer 32 MiB.
FIRST_READ = 1 * MiB
READ_CHUNK = 4 * MiB
#: the most a lean read hands over at once (what has arrived, up to this)
CHUNK = 1 * MiB
#: default seconds to connect, and to wait for each read of a response (no limit on a whole
#: transfer); a driver's ``connect_timeout`` / ``read_timeout`` override them
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
#: keys held back by ``CodePointOrder`` before it gives up with ``OrderError``
REORDER_LIMIT = 100_000
#: access tiers by lower-case name (the SDK's ``StandardBlobTier`` values; the SDK itself is imported only
#: where it is used: a listing or a read with a key or a SAS never loads it, 0.2-0.5 s of start-up)
TIERS = {t.lower(): t for t in ("Hot", "Cool", "Cold", "Archive")}

# Errors the SDK (or aiohttp underneath it) raises for one call; anything else is a bug and propagates.
_SDK_ERRORS = (AzureError, aiohttp.ClientError, TimeoutError, ConnectionError, RestError, UnreadablePage)
_NETWORK_ERRORS = (
    ServiceRequestError,
    ServiceResponseError,
    HttpResponseError,  # without a status: the response broke off (IncompleteReadError, DecodeError)
    aiohttp.ClientError,
    TimeoutError,
    ConnectionError,
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({"ServerBusy", "OperationTimedOut", "InternalError"})
# A 412 for a lease is not an etag mismatch: say what it is instead of PreconditionFailed.
_LEASE_CODES = frozenset({"LeaseIdMissing", "LeaseIdMismatchWithBlobOperation", "LeaseNotPresentWithBlobOperation"})
_URL_QUERY = re.compile(r"\?[^\s'\"<>)]*")  # SAS tokens travel in URL queries
_SECRET_SETTING = re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|sig)=[^;&\s'\"]*")


def _scrub(text: str) -> str:
    """An exception's text without anything that can hold a credential, cut short."""
    text = _URL_QUERY.sub("?<redacted>", text)
    return _SECRET_SETTING.sub(r"\1=<redacted>", text)[:300]


def _code(exc: HttpResponseError) -> str:
    code = getattr(exc, "error_code", None)  # set by azure-storage's error processing, not by azure-core
    return str(getattr(code, "value", code) or "")


def translate(exc: BaseException, action: str, where: str, key: str | None = None) -> StorageError:
    """One azure.core (or aiohttp) exception -> the bucketsync error for it.

    ``action`` is a verb ("list", "read", "write", ...), ``where`` the store URL
    plus key. HTTP errors are described by status and error code only: the SDK's
    text quotes the request. Other errors keep a scrubbed, shortened text.
    """
    msg = f"cannot {action} {where}"
    if isinstance(exc, RestError):  # an error answer to a lean request: the same rules as the SDK's
        return _translate_status(exc.status, exc.code, msg, key, listing=action == "list")
    if isinstance(exc, UnreadablePage):
        return BadEndpoint(f"{msg}: an unreadable List Blobs answer, not Azure Blob storage? ({exc})", key=key)
    if isinstance(exc, HttpResponseError) and exc.status_code is not None and exc.status_code >= 400:
        return _translate_status(
            exc.status_code,
            _code(exc),
            msg,
            key,
            listing=action == "list",
            missing=isinstance(exc, ResourceNotFoundError),
            denied=isinstance(exc, ClientAuthenticationError),
            modified=isinstance(exc, ResourceModifiedError),
            exists=isinstance(exc, ResourceExistsError),
        )
    reason = f"{type(exc).__name__}: {_scrub(str(exc)) or 'no details'}"
    if isinstance(exc, ClientAuthenticationError):  # no HTTP status: a token credential found nothing to use
        return PermissionDenied(f"{msg}: no usable Azure credential ({reason})", key=key)
    if isinstance(exc, ServiceRequestError | aiohttp.ClientConnectorError):
        # The request never left: DNS failure, connection refused, connect timeout.
        return Unreachable(f"{msg}: storage is unreachable ({reason})", key=key)
    if isinstance(exc, _NETWORK_ERRORS):
        # Connection reset, read timeouts, a body cut short (IncompleteReadError): all retryable.
        return Transient(f"{msg}: {reason}", key=key)
    return StorageError(f"{msg}: {reason}", key=key)


def _translate_status(
    status: int,
    code: str,
    msg: str,
    key: str | None,
    *,
    listing: bool = False,
    missing: bool = False,
    denied: bool = False,
    modified: bool = False,
    exists: bool = False,
) -> StorageError:
    """An error answer (status, Azure's error code) -> the bucketsync error; the flags say what the
    SDK's exception class said besides (a lean request has only the status and the code)."""
    detail = f"HTTP {status}{' ' + code if code else ''}"
    if code == "ContainerNotFound":
        return NotFound(f"{msg}: the container does not exist ({detail})", key=key)
    if listing and not code and status in (400, 404, 405):
        # Blob storage names every error of a listing (x-ms-error-code): a bare 4xx came from
        # something that is not Blob storage, or from a wrong account path.
        return BadEndpoint(f"{msg}: the endpoint does not answer as Azure Blob storage ({detail})", key=key)
    if status == 404 or missing:
        return NotFound(f"{msg}: not found ({detail})", key=key)
    if status in (401, 403) or denied:
        return PermissionDenied(f"{msg}: permission denied, check the azure integration ({detail})", key=key)
    if status == 412 and code in _LEASE_CODES:
        return StorageError(f"{msg}: the blob is leased by another client ({detail})", key=key)
    if status == 412 or modified:
        return PreconditionFailed(f"{msg}: changed in storage, etag mismatch ({detail})", key=key)
    if code in ("BlobAlreadyExists", "ContainerAlreadyExists") or (exists and not code):
        return AlreadyExists(f"{msg}: already exists ({detail})", key=key)
    if code == "BlobArchived":
        return NotSupported(f"{msg}: the blob is in the Archive tier; rehydrate it first ({detail})", key=key)
    if code == "SnapshotsPresent":
        return StorageError(f"{msg}: the blob has snapshots; bucketsync does not delete them ({detail})", key=key)
    if status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
        return Transient(f"{msg}: the service is busy or failing, will retry ({detail})", key=key)
    return StorageError(f"{msg}: {detail}", key=key)


# --------------------------------------------------------------------------- listing order

_SUPPLEMENTARY = re.compile("[\U00010000-\U0010ffff]")


def _guard(key: str) -> str | None:
    """The part of ``key`` before its first character above U+FFFF (None if it has none)."""
    if key.isascii():
        return None
    m = _SUPPLEMENTARY.search(key)
    return key[: m.start()] if m else None


class CodePointOrder:
    """Re-order a listing that arrives in UTF-16 order into code-point order.

    Why this is enough: two keys compare differently in the two orders only when,
    at the first character where they differ, one has a character in
    U+E000..U+FFFF and the other one above U+FFFF (a surrogate pair in UTF-16).
    So a key ``x`` with no character above U+FFFF can never be preceded (in
    code-point order) by a key the server sends later, and is released at once.
    A key with one, whose text before the first such character is ``g``, can be
    preceded later only by keys that start with ``g`` (they share the prefix and
    then carry a U+E000..U+FFFF character); once the server has moved past every
    key starting with ``g`` — the latest key it sent does not start with ``g`` —
    nothing smaller can come. Held keys wait in a min-heap ordered by code point.

    Memory: only keys with a character above U+FFFF (emoji, rare CJK) are held,
    and only while the server is still listing under their ``g``. More than
    ``limit`` held keys raise ``OrderError`` instead of growing without bound.
    The same logic is correct when the input is already in code-point order
    (then nothing smaller ever arrives), and every key released is checked to be
    strictly greater than the previous one, so any other order (a hierarchical
    namespace account lists folder by folder) fails loudly, never silently.
    """

    def __init__(self, where: str, limit: int = REORDER_LIMIT) -> None:
        self._where = where
        self._limit = limit
        self._heap: list[tuple[str, int, str | None, ObjectInfo]] = []
        self._seq = 0
        self._last: str | None = None

    def push(self, key: str, info: ObjectInfo | None) -> Iterator[ObjectInfo]:
        """Take the server's next key (``info`` None: not an item, but it still moves the position)."""
        if info is not None:
            guard = _guard(key)
            if guard is None and not self._heap:
                yield self._release(info)
                return
            self._seq += 1
            heapq.heappush(self._heap, (key, self._seq, guard, info))
        while self._heap:
            _, _, top_guard, top = self._heap[0]
            if top_guard is not None and key.startswith(top_guard):
                break
            heapq.heappop(self._heap)
            yield self._release(top)
        if len(self._heap) > self._limit:
            raise OrderError(
                f"{self._where}: more than {self._limit} keys held back under {self._heap[0][2]!r}, where keys with "
                "characters above U+FFFF sit; Azure lists them in UTF-16 order and they cannot be put in "
                "code-point order within the memory bound"
            )

    def page(self, entries: Sequence[tuple[str, ObjectInfo | None]]) -> list[ObjectInfo]:
        """``push`` of a page of the server's keys at once. The usual page (nothing held, no item
        with a character above U+FFFF, ascending) is released whole after a few C-level passes;
        any other goes key by key, and fails there if it is out of order."""
        if not self._heap:
            infos = [info for _, info in entries if info is not None]
            keys = [info.key for info in infos]
            if (
                (all(map(str.isascii, keys)) or all(_guard(k) is None for k in keys))
                and (not keys or self._last is None or keys[0] > self._last)
                and all(map(operator.lt, keys, itertools.islice(keys, 1, None)))
            ):
                if keys:
                    self._last = keys[-1]
                return infos
        return [out for key, info in entries for out in self.push(key, info)]

    def finish(self) -> Iterator[ObjectInfo]:
        """The listing ended: everything held is safe now."""
        while self._heap:
            yield self._release(heapq.heappop(self._heap)[3])

    def _release(self, info: ObjectInfo) -> ObjectInfo:
        if self._last is not None and info.key <= self._last:
            raise OrderError(
                f"{self._where}: the listing is not in key order ({self._last!r} came before {info.key!r}); "
                "accounts with a hierarchical namespace (Data Lake Gen2) list folder by folder and are not supported"
            )
        self._last = info.key
        return info


# --------------------------------------------------------------------------- the store


def _info(key: str, size: int, modified: datetime, etag: str | None, version: str | None) -> ObjectInfo:
    return ObjectInfo(key, size, modified.timestamp(), normalize_etag(etag), version)


def _quoted(etag: str) -> str:
    # Our etags are normalised (unquoted); If-Match wants the quoted HTTP form.
    return etag if etag.startswith('"') else f'"{etag}"'


def _conditions(mode: PutMode) -> dict[str, Any]:
    if mode.create:
        return {"match_condition": MatchConditions.IfMissing}
    if mode.if_match is not None:
        return {"etag": _quoted(mode.if_match), "match_condition": MatchConditions.IfNotModified}
    return {}


async def _blocks(chunks: AsyncIterable[bytes], size: int) -> AsyncIterator[bytes]:
    """Re-cut a byte stream into blocks of exactly ``size`` (the last shorter; one empty block for no data)."""
    buf = bytearray()
    sent = False
    async for chunk in chunks:
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
            sent = True
    if buf or not sent:
        yield bytes(buf)


def _lean_auth(credential: Credential) -> SharedKey | str | None:
    """What lean requests sign with: the shared key, or the SAS; None for a token credential
    (Entra ID tokens stay with the SDK, which fetches and refreshes them)."""
    if isinstance(credential, AzureNamedKeyCredential):
        name, key = credential.named_key
        try:
            return SharedKey(name, key)
        except ValueError:  # not base64: the SDK reports it as it always has
            return None
    if isinstance(credential, AzureSasCredential):
        return credential.signature
    return None


class AzureStore:
    """One container + prefix. The SDK client is created on first use, closed by ``aclose``."""

    conditional_writes = True

    def __init__(
        self,
        account: str,
        container: str,
        prefix: str = "",
        *,
        account_url: str,
        credential: Credential,
        tier: str | None = None,
        close_credential: bool = False,
        page_size: int = 1000,
        block_size: int = BLOCK_SIZE,
        max_concurrency: int = 4,
        retry_attempts: int = 5,
        retry_base: float = 0.2,
        reorder_limit: int = REORDER_LIMIT,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        lean: bool = True,
        list_concurrency: int = 8,
    ) -> None:
        self.url = f"az://{account}/{container}/{prefix}"
        self.account = account
        self.container = container
        self.prefix = prefix
        self.page_size = page_size
        self.block_size = block_size
        self.max_concurrency = max_concurrency
        self.tier = tier
        self._account_url = account_url.rstrip("/")
        self._credential = credential
        self._close_credential = close_credential
        self._attempts = retry_attempts
        self._retry_base = retry_base
        self._reorder_limit = reorder_limit
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._client: ContainerClient | None = None
        #: list and read with our own signed GETs (``azure_lean``) where the credential allows it
        #: (a shared key or a SAS); off, or with a token credential: through the SDK
        self.lean = lean and _lean_auth(credential) is not None and "?" not in self._account_url
        self._rest_client: Rest | None = None
        #: List Blobs requests of one listing in flight at once (``list_pages``)
        self.list_concurrency = max(1, list_concurrency)

    def __repr__(self) -> str:
        return f"AzureStore({self.url!r})"

    def _rest(self) -> Rest:
        """The lean requests' client, signed with the credential the SDK client holds."""
        if self._rest_client is None:
            auth = _lean_auth(self._credential)
            assert auth is not None
            self._rest_client = Rest(
                Target.of(self._account_url, self.container),
                api_version=API_VERSION,
                key=auth if isinstance(auth, SharedKey) else None,
                sas=auth if isinstance(auth, str) else None,
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
            )
        return self._rest_client

    def _lean_off(self, why: str) -> None:
        if self.lean:
            log.warning(f"lean Azure requests disabled: {why}; listing and reading through the SDK", url=self.url)
        self.lean = False

    # -- plumbing

    def _container(self) -> ContainerClient:
        if self._client is None:
            from azure.storage.blob.aio import ContainerClient

            self._client = ContainerClient(
                self._account_url,
                self.container,
                credential=self._credential,
                retry_total=0,  # retries are ours (bucketsync.core.retry), on Transient only
                connection_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
                max_single_put_size=max(self.block_size, 1) + 1,  # our single puts never get split by the SDK
                max_block_size=self.block_size,
                max_single_get_size=READ_CHUNK,  # one GET per range we ask for
            )
        return self._client

    def _blob(self, key: str) -> BlobClient:
        return self._container().get_blob_client(self.prefix + key)

    async def _call(self, action: str, key: str | None, call: Callable[[], Awaitable[T]]) -> T:
        """Await one SDK call, translating its errors (and dropping the SDK exception: it may quote secrets)."""
        try:
            return await call()
        except _SDK_ERRORS as exc:
            error = translate(exc, action, self.url + (key or ""), key)
        raise error

    async def _retry(self, action: str, key: str | None, call: Callable[[], Awaitable[T]]) -> T:
        """``_call`` retried on Transient; only for idempotent calls."""
        return await retrying(lambda: self._call(action, key, call), attempts=self._attempts, base=self._retry_base)

    # -- listing

    async def _sdk_page(self, start: str, token: str | None) -> tuple[list[Entry], str | None]:
        pages = (
            self._container()
            .list_blobs(name_starts_with=start or None, results_per_page=self.page_size)
            .by_page(continuation_token=token)
        )
        page = await pages.__anext__()
        entries: list[Entry] = [
            (b.name, b.size, b.last_modified.timestamp(), normalize_etag(b.etag), b.version_id) async for b in page
        ]
        token_after: str | None = getattr(pages, "continuation_token", None)  # AsyncPageIterator's, untyped
        return entries, token_after or None

    async def _page(self, start: str, token: str | None) -> tuple[list[Entry], str | None]:
        """One page of blobs (names relative to the container) and the token of the next: lean
        where it can be (the marker is the same token either way), else through the SDK."""
        if self.lean:
            try:
                return await self._rest().list_page(start, token, self.page_size)
            except aiohttp.ClientSSLError as exc:  # the SDK may know a CA bundle we do not
                self._lean_off(f"TLS error ({type(exc).__name__})")
        return await self._sdk_page(start, token)

    async def _pages(self, start: str) -> AsyncIterator[list[Entry]]:
        token: str | None = None
        while True:
            # Each page is retried on its own, from its continuation token: a blip never restarts the listing.
            entries, token = await self._retry("list", None, functools.partial(self._page, start, token))
            yield entries
            if token is None:
                return

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async for page in self.list_pages(prefix):
            for info in page:
                yield info

    async def _level(self, prefix: str, marker: str | None) -> tuple[builtins.list[Entry | str], str | None] | None:
        """One page of a folder level; None after a TLS error (lean requests are then off)."""
        try:
            return await self._rest().list_level(prefix, marker, self.page_size)
        except aiohttp.ClientSSLError as exc:  # the SDK may know a CA bundle we do not
            self._lean_off(f"TLS error ({type(exc).__name__})")
            return None

    async def _walk_parts(
        self, prefix: str, depth: int, page: tuple[builtins.list[Entry | str], str | None] | None = None
    ) -> AsyncIterator[Part[Entry]]:
        """The parts of a listing of ``prefix``, in the server's order, from its folder level
        (``delimiter=/``; ``page``, if already listed): each subfolder listed flat under its own
        ``prefix`` (paged by its own markers), and the blobs between two subfolders as parts of
        their own. A level with fewer subfolders than listers is looked into, down to
        ``SPLIT_LEVELS``. A level longer than one page, or with more subfolders than
        ``PARTS_PER_LISTER`` per lister, is one part listed flat instead: a part per folder
        costs a request even for a folder of three blobs, and a wide level of small folders
        would cost a request per folder where the flat listing costs one per thousand blobs.

        Read one after another, the parts are the flat listing exactly: the keys under a folder
        are contiguous in any order, the server's UTF-16 one included, so ``CodePointOrder``
        puts them in code-point order as it does a flat listing."""
        if page is None:
            page = await self._retry("list", None, functools.partial(self._level, prefix, None))
            if page is None:  # parts are listed already: the SDK cannot take over from here
                raise StorageError(f"cannot list {self.url}: a TLS error in the middle of the listing")
        items, marker = page
        hidden = self.prefix + HIDDEN
        folders = sum(1 for item in items if isinstance(item, str) and item != hidden)
        if marker is not None or folders > self.list_concurrency * PARTS_PER_LISTER:
            yield functools.partial(self._pages, prefix)
            return
        run: builtins.list[Entry] = []
        for item in items:
            if not isinstance(item, str):
                run.append(item)
                continue
            if run:
                yield given(run)
                run = []
            if item == hidden:
                continue  # bucketsync's own folder: nothing in it is an item
            if depth + 1 < SPLIT_LEVELS and folders < self.list_concurrency:
                async for part in self._walk_parts(item, depth + 1):
                    yield part
            else:
                yield functools.partial(self._pages, item)
        if run:
            yield given(run)

    async def _parts(self, start: str) -> AsyncIterator[Part[Entry]] | builtins.list[Part[Entry]]:
        """The parts of a listing of ``start`` on the lean path: the first flat page and the top
        folder level are asked for at once. A first page with no marker is the whole listing
        (one request, as before there were parts); otherwise the walk goes on from the level."""
        flat = asyncio.ensure_future(self._retry("list", None, functools.partial(self._page, start, None)))
        level = asyncio.ensure_future(self._retry("list", None, functools.partial(self._level, start, None)))
        try:
            entries, token = await flat
            if token is None:
                return [given(entries)]
            page = await level
            if page is None:  # a TLS error, nothing listed yet: the SDK lists it all, one page after another
                return [functools.partial(self._pages, start)]
            return self._walk_parts(start, 0, page)
        finally:
            for task in (flat, level):
                task.cancel()
            await asyncio.gather(flat, level, return_exceptions=True)

    async def list_pages(
        self, prefix: str = "", splits: Sequence[str] = ()
    ) -> AsyncIterator[builtins.list[ObjectInfo]]:
        """``list`` a page at a time (``PagedListing``), for ``diff_pages``. ``splits`` are not used:
        List Blobs has neither a start key nor an end key. Parallel by folders instead
        (``_walk_parts``, ``list_concurrency`` requests at a time) on the lean path; through the
        SDK, or with ``list_concurrency = 1``, one page after another."""
        start = self.prefix + prefix
        cut = len(self.prefix)
        order = CodePointOrder(self.url, self._reorder_limit)
        width = self.list_concurrency if self.lean else 1
        parts: AsyncIterator[Part[Entry]] | builtins.list[Part[Entry]]
        parts = await self._parts(start) if width > 1 else [functools.partial(self._pages, start)]
        # Pipelined (``stores.parallel``): the next pages are on the wire while this one is read.
        async for entries in in_order(parts, width):
            names = [e[0] for e in entries]
            if not all(map(str.startswith, names, itertools.repeat(start))):  # never trust a page to honour it
                outside = next(n for n in names if not n.startswith(start))
                raise StorageError(f"cannot list {self.url}: the service returned {outside!r} outside {start!r}")
            yield order.page(
                [
                    (key := name[cut:], ObjectInfo(key, size, modified, etag, version) if indexable(key) else None)
                    for name, size, modified, etag, version in entries
                ]
            )
        yield list(order.finish())

    # -- reads

    async def head(self, key: str) -> ObjectInfo:
        props = await self._retry("read the properties of", key, self._blob(key).get_blob_properties)
        return _info(key, props.size, props.last_modified, props.etag, props.version_id)

    async def content_md5(self, key: str) -> tuple[ObjectInfo, bytes | None]:
        """The blob and its Content-MD5: set by Azure for single puts, and by bucketsync
        on block commits (``_settings``); absent on blobs others committed without one."""
        props = await self._retry("read the properties of", key, self._blob(key).get_blob_properties)
        stored = props.content_settings.content_md5
        info = _info(key, props.size, props.last_modified, props.etag, props.version_id)
        return info, bytes(stored) if stored else None

    async def open(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        last = None if length is None else offset + length - 1
        got = await self._retry("read", key, functools.partial(self._lean_get, key, offset, last, None))
        if got is None:  # lean requests are off (a token credential, or TLS trouble): the SDK reads
            async for chunk in self._sdk_open(key, offset, length):
                yield chunk
            return
        resp, etag = got
        pos, failures = offset, 0
        while resp is not None:
            # One GET streamed to its end. A body cut short (or a reset) resumes from where it broke,
            # pinned to the first answer's ETag: a blob rewritten in between fails the read
            # (PreconditionFailed) instead of splicing two versions.
            try:
                while chunk := await self._chunk(resp, key):
                    pos += len(chunk)
                    failures = 0
                    yield chunk
                return
            except Transient:
                failures += 1
                if failures >= self._attempts or etag is None:
                    raise
                log.info("resuming an interrupted download", url=self.url + key, offset=pos)
            finally:
                # A body read to its end gives its connection back to the pool; an abandoned one closes it.
                if resp.content.at_eof():
                    resp.release()
                else:
                    resp.close()
            got = await self._retry("read", key, functools.partial(self._lean_get, key, pos, last, etag))
            resp = got[0] if got is not None else None
            if resp is None:
                raise Transient(f"cannot read {self.url}{key}: the service returned no data at byte {pos}", key=key)

    async def _lean_get(
        self, key: str, first: int, last: int | None, etag: str | None
    ) -> tuple[aiohttp.ClientResponse | None, str | None] | None:
        """Get Blob lean: (the answer, or None for an empty blob's; its ETag), or None when lean
        requests are off."""
        if not self.lean:
            return None
        try:
            resp = await self._rest().get(self.prefix + key, first, last, _quoted(etag) if etag else None)
        except aiohttp.ClientSSLError as exc:  # the SDK may know a CA bundle we do not
            self._lean_off(f"TLS error ({type(exc).__name__})")
            return None
        except RestError as exc:
            if exc.status == 416 and first == 0 and etag is None:  # a range of an empty blob: "0 bytes"
                return None, None
            raise
        return resp, resp.headers.get("ETag")

    async def _chunk(self, resp: aiohttp.ClientResponse, key: str) -> bytes:
        try:
            return await resp.content.read(CHUNK)
        except _SDK_ERRORS as exc:
            error = translate(exc, "read", self.url + key, key)
        raise error

    async def _sdk_open(self, key: str, offset: int, length: int | None) -> AsyncIterator[bytes]:
        # Ranged GETs we drive ourselves: a small first one, then READ_CHUNK at a time, each
        # pinned to the first response's etag (a blob rewritten mid-read fails with
        # PreconditionFailed instead of mixing versions) and each retried on its own.
        blob = self._blob(key)
        first = FIRST_READ if length is None else min(FIRST_READ, length)
        data, size, etag = await self._retry("read", key, functools.partial(self._first_range, blob, offset, first))
        if data:
            yield data
        total = size if length is None else min(size, offset + length)
        pos = offset + len(data)
        while pos < total:
            n = min(READ_CHUNK, total - pos)
            data = await self._retry("read", key, functools.partial(self._range, blob, pos, n, etag))
            if not data:
                raise Transient(f"cannot read {self.url}{key}: the service returned no data at byte {pos}", key=key)
            pos += len(data)
            yield data

    async def _first_range(self, blob: BlobClient, offset: int, length: int) -> tuple[bytes, int, str | None]:
        """(``length`` bytes from ``offset``, the blob's size, its etag)."""
        try:
            downloader = await blob.download_blob(offset=offset, length=length, max_concurrency=1)
        except HttpResponseError as exc:
            if exc.status_code == 416:  # a range of an empty blob: Azure's way of saying "0 bytes"
                return b"", 0, None
            raise
        data: bytes = await downloader.readall()
        props = downloader.properties
        # Content-Range is "bytes 0-1048575/3000000": the blob's size is after the slash.
        total = int(str(props.content_range).rpartition("/")[2]) if props.content_range else offset + len(data)
        return data, total, props.etag

    async def _range(self, blob: BlobClient, offset: int, length: int, etag: str | None) -> bytes:
        cond: dict[str, Any] = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        downloader = await blob.download_blob(offset=offset, length=length, max_concurrency=1, **cond)
        data: bytes = await downloader.readall()
        return data

    # -- writes

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        mode: PutMode = OVERWRITE,
        content_type: str | None = None,
    ) -> ObjectInfo:
        blob = self._blob(key)
        blocks = _blocks(chunks, self.block_size)
        head = [await anext(blocks)]
        more = await anext(blocks, None)
        if more is None:
            return await self._put_single(blob, key, head.pop(), mode, content_type)
        head.append(more)
        del more  # no frame keeps a block alive once it is staged
        await self._precheck(key, mode)
        return await self._put_blocks(blob, key, _drain(head, blocks), mode, content_type)

    async def _precheck(self, key: str, mode: PutMode) -> None:
        """Refuse a conditional block upload before sending gigabytes that the final commit would refuse.

        Only an early answer: the condition itself is enforced by the commit (Put Block List).
        """
        if not mode.create and mode.if_match is None:
            return
        try:
            current: ObjectInfo | None = await self.head(key)
        except NotFound:
            current = None
        if mode.create and current is not None:
            raise AlreadyExists(f"cannot write {self.url}{key}: already exists", key=key)
        if mode.if_match is not None and (current is None or current.etag != normalize_etag(mode.if_match)):
            raise PreconditionFailed(f"cannot write {self.url}{key}: changed in storage, etag mismatch", key=key)

    def _blob_tier(self) -> StandardBlobTier | None:
        from azure.storage.blob import StandardBlobTier

        return StandardBlobTier(self.tier) if self.tier is not None else None

    def _settings(self, content_type: str | None, md5: bytes) -> ContentSettings:
        # The MD5 is stored with the blob (x-ms-blob-content-md5) for block uploads too: it
        # lets a retried conditional write recognise that its first attempt had landed.
        from azure.storage.blob import ContentSettings

        return ContentSettings(content_type=content_type or "application/octet-stream", content_md5=bytearray(md5))

    async def _put_single(
        self, blob: BlobClient, key: str, data: bytes, mode: PutMode, ctype: str | None
    ) -> ObjectInfo:
        md5 = hashlib.md5(data).digest()

        async def upload() -> dict[str, Any]:
            return await blob.upload_blob(
                data,
                length=len(data),
                overwrite=not mode.create,
                content_settings=self._settings(ctype, md5),
                standard_blob_tier=self._blob_tier(),
                **_conditions(mode),
            )

        return await self._write(key, len(data), md5, mode, upload)

    async def _put_blocks(
        self, blob: BlobClient, key: str, blocks: AsyncIterator[bytes], mode: PutMode, ctype: str | None
    ) -> ObjectInfo:
        from azure.storage.blob import BlobBlock

        upload_id = uuid.uuid4().hex  # per upload: two writers of one key never mix their uncommitted blocks
        ids: list[BlobBlock] = []
        md5 = hashlib.md5()
        size = 0
        pending: deque[asyncio.Task[None]] = deque()
        try:
            async for block in blocks:
                if len(ids) >= MAX_BLOCKS:
                    raise StorageError(
                        f"cannot write {self.url}{key}: more than {MAX_BLOCKS} blocks of {self.block_size} bytes",
                        key=key,
                    )
                block_id = base64.b64encode(f"{upload_id}-{len(ids):06d}".encode()).decode()
                ids.append(BlobBlock(block_id=block_id))
                md5.update(block)
                size += len(block)
                if len(pending) >= self.max_concurrency:
                    await pending.popleft()  # at most max_concurrency blocks in memory and in flight
                pending.append(asyncio.create_task(self._stage(blob, key, block_id, block)))
            while pending:
                await pending.popleft()
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        digest = md5.digest()

        async def commit() -> dict[str, Any]:
            return await blob.commit_block_list(
                ids,
                content_settings=self._settings(ctype, digest),
                standard_blob_tier=self._blob_tier(),
                **_conditions(mode),
            )

        return await self._write(key, size, digest, mode, commit)

    async def _stage(self, blob: BlobClient, key: str, block_id: str, block: bytes) -> None:
        # Staging the same id with the same bytes again is harmless, so it is retried.
        await self._retry("write", key, lambda: blob.stage_block(block_id, block, length=len(block)))

    async def _write(
        self, key: str, size: int, md5: bytes, mode: PutMode, call: Callable[[], Awaitable[dict[str, Any]]]
    ) -> ObjectInfo:
        """Run the final write call with retries; map a lost-response retry of a conditional write to success."""
        attempt = 0

        async def once() -> ObjectInfo:
            nonlocal attempt
            attempt += 1
            try:
                r = await self._call("write", key, call)
            except (AlreadyExists, PreconditionFailed) as exc:
                if attempt > 1 and (landed := await self._landed(key, md5)) is not None:
                    return landed  # our earlier attempt succeeded; only its response was lost
                if mode.create and isinstance(exc, PreconditionFailed):
                    raise AlreadyExists(str(exc), key=key) from None
                raise
            return _info(key, size, r["last_modified"], r["etag"], r.get("version_id"))

        return await retrying(once, attempts=self._attempts, base=self._retry_base)

    async def _landed(self, key: str, md5: bytes) -> ObjectInfo | None:
        props = await self._retry("read the properties of", key, self._blob(key).get_blob_properties)
        stored = props.content_settings.content_md5
        if stored is None or bytes(stored) != md5:
            return None
        return _info(key, props.size, props.last_modified, props.etag, props.version_id)

    async def delete(self, key: str, if_match: str | None = None) -> None:
        cond: dict[str, Any] = {}
        if if_match is not None:
            cond = {"etag": _quoted(if_match), "match_condition": MatchConditions.IfNotModified}
        try:
            # One request per key, as the Store protocol deletes (the batch API fails against Azurite anyway).
            await self._retry("delete", key, lambda: self._blob(key).delete_blob(**cond))
        except NotFound:
            return  # idempotent; also what a retry after a lost 202 sees

    async def aclose(self) -> None:
        rest, self._rest_client = self._rest_client, None
        if rest is not None:
            await rest.aclose()
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        if self._close_credential:
            close = getattr(self._credential, "close", None)
            if close is not None:
                await close()


async def _drain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``head`` (emptied as it goes, so blocks are freed once staged), then ``rest``."""
    while head:
        yield head.pop(0)
    async for block in rest:
        yield block


# --------------------------------------------------------------------------- factory: credentials and endpoint

_SECRETS = ("connection_string", "account_key", "sas_token")


def _parse_connection_string(text: str) -> dict[str, str]:
    """``Name=Value;...`` -> {lowercased name: value}. Errors never quote the text (it holds the key)."""
    settings: dict[str, str] = {}
    for part in text.strip().split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(
                "azure integration: connection_string is malformed (expected Name=Value pairs joined by ';')"
            )
        settings[name.strip().lower()] = value.strip()
    return settings


def _from_connection_string(
    loc: Location, endpoint_url: str | None, text: str, service: str = "blob"
) -> tuple[str, Credential]:
    s = _parse_connection_string(text)
    if s.get("usedevelopmentstorage", "").lower() == "true":
        raise ConfigError(
            "azure integration: UseDevelopmentStorage=true is not supported; give the emulator's full connection "
            "string (AccountName, AccountKey, BlobEndpoint)"
        )
    account = s.get("accountname")
    if account is not None and account != loc.account:
        raise ConfigError(
            f"azure integration: the connection string is for account {account!r} but the driver URL {loc} "
            f"names {loc.account!r}"
        )
    credential: Credential
    if s.get("accountkey"):
        credential = AzureNamedKeyCredential(loc.account, s["accountkey"])
    elif s.get("sharedaccesssignature"):
        credential = AzureSasCredential(s["sharedaccesssignature"].lstrip("?"))
    else:
        raise ConfigError("azure integration: connection_string has neither AccountKey nor SharedAccessSignature")
    if endpoint_url:
        url = endpoint_url
    elif s.get(f"{service}endpoint"):
        url = s[f"{service}endpoint"]
    else:
        scheme = s.get("defaultendpointsprotocol", "https")
        url = f"{scheme}://{loc.account}.{service}.{s.get('endpointsuffix', 'core.windows.net')}"
    return url, credential


def _default_credential() -> Credential:
    try:
        from azure.identity.aio import DefaultAzureCredential
    except ImportError:
        raise ConfigError(
            "no Azure credentials: set connection_string, account_key or sas_token (or its *_file) in an azure "
            "integration and name it in the driver, or install azure-identity to use DefaultAzureCredential"
        ) from None
    credential: AsyncTokenCredential = DefaultAzureCredential()
    return credential


def _is_set(integration: AzureIntegration, name: str) -> bool:
    return getattr(integration, name) is not None or getattr(integration, f"{name}_file") is not None


def credentials(
    loc: Location,
    driver: DriverConfig,
    integration: AzureIntegration | None,
    *,
    service: str = "blob",
    endpoint_url: str | None = None,
) -> tuple[str, Credential, bool]:
    """(account URL, credential, whether the caller owns and must close the credential).

    ``service`` is ``blob`` for the store, ``queue`` for the azure-queue event source: the
    same account and credential, another endpoint. The driver's ``endpoint_url`` is the
    Blob endpoint; another service's comes from ``endpoint_url``, the connection string's
    ``QueueEndpoint``, or the account's public name.
    """
    endpoint = driver.endpoint_url if service == "blob" else endpoint_url
    default_url = endpoint or f"https://{loc.account}.{service}.core.windows.net"
    given = [n for n in _SECRETS if integration is not None and _is_set(integration, n)]
    if len(given) > 1:
        raise ConfigError(f"azure integration: set only one of connection_string, account_key, sas_token (got {given})")
    if integration is None or not given:
        if not default_url.startswith("https://"):  # the SDK refuses to send bearer tokens in the clear
            raise ConfigError(f"endpoint_url {default_url!r}: DefaultAzureCredential needs an https:// endpoint")
        return default_url, _default_credential(), True
    value = integration.secret(given[0]) or ""
    if not value.strip():
        raise ConfigError(f"azure integration: {given[0]} is empty")
    if given[0] == "connection_string":
        url, credential = _from_connection_string(loc, endpoint, value, service)
        return url, credential, False
    if given[0] == "account_key":
        return default_url, AzureNamedKeyCredential(loc.account, value.strip()), False
    return default_url, AzureSasCredential(value.strip().lstrip("?")), False


def _tier(storage_class: str | None) -> str | None:
    if storage_class is None:
        return None
    tier = TIERS.get(storage_class.strip().lower())
    if tier is None:
        raise ConfigError(
            f"storage_class {storage_class!r} is not an Azure access tier (use Hot, Cool, Cold or Archive)"
        )
    return tier


def open_azure(loc: Location, driver: DriverConfig, integration: AzureIntegration | None, **options: Any) -> AzureStore:
    """The registry's factory for ``az://`` (and ``azure://``). ``options`` go to ``AzureStore`` (tests)."""
    tier = _tier(driver.storage_class)
    url, credential, owned = credentials(loc, driver, integration)
    return AzureStore(
        loc.account,
        loc.bucket,
        loc.prefix,
        account_url=url,
        credential=credential,
        tier=tier,
        close_credential=owned,
        **(
            {
                "connect_timeout": driver.connect_timeout,
                "read_timeout": driver.read_timeout,
                "list_concurrency": driver.list_concurrency,
            }
            | options
        ),
    )
