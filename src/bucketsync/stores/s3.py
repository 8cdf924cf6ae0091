"""AWS S3 and S3-compatible stores (``s3://bucket/prefix``) on aiobotocore.

Behaviour that is ours, not the SDK's:

- botocore's own retries are off (one attempt per call). Every idempotent call
  (one list page, head, get, delete, a conditional put, one multipart part) goes
  through ``bucketsync.core.retry.retrying`` on ``Transient``, so backoff is the same
  for every store and tests can predict it.
- ``translate`` is the one place botocore/aiohttp errors become bucketsync errors.
- Listings are checked: ascending keys on every page and across pages (else
  ``OrderError``), and a truncated page must carry a continuation token (else
  ``StorageError``): an incomplete listing is never mistaken for the end.
- ListObjectsV2 carries no version id, so ``version`` is always ``None`` here and
  an S3 version is identified by its ETag; ``list``, ``head`` and ``put`` then
  report the same ``ObjectInfo`` for the same object. ``modified`` is whole
  seconds for the same reason: HEAD's ``Last-Modified`` has no fraction.
- Two hot paths skip the SDK's per-request machinery (milliseconds of CPU a request):
  listing pages (``_page_raw``), reads, HEADs and small PUTs (``_lean``); what they read
  and where they go is ``s3_lean``. botocore still decides where requests go and which
  credentials sign them; errors still go through ``translate``; anything unexpected is
  handed back to the SDK.
- botocore is imported, and its client made, on first need (``_get_client``,
  ``_sdk_errors``): 0.35 s of CPU a process. A store with an ``endpoint_url`` and keys of
  its own (an S3-compatible server) knows where requests go without it
  (``s3_lean.Target.for_endpoint``), so a sync that only lists and reads never loads it.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
import contextlib
import functools
import hashlib
import heapq
import itertools
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import structlog
import yarl

from bucketsync.core.errors import (
    AlreadyExists,
    BadEndpoint,
    ConfigError,
    NotFound,
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
from bucketsync.stores import check_page, sigv4
from bucketsync.stores.lean import error_body
from bucketsync.stores.parallel import (
    BUFFER,
    PARTS_PER_LISTER,
    SPLIT_LEVELS,
    Cut,
    Part,
    Slots,
    gather_bounded,
    given,
    in_order,
    range_parts,
)
from bucketsync.stores.s3_lean import (
    PROBE_KEY,
    Entry,
    Page,
    StaticKeys,
    Target,
    scan_list,
    status_answer,
)

if TYPE_CHECKING:
    from aiobotocore.session import AioSession
    from botocore.config import Config

    from bucketsync.config import AwsIntegration, DriverConfig

log = structlog.get_logger(__name__)

MiB = 1 << 20
#: Multipart part size. S3 wants >= 5 MiB for every part but the last; a body
#: smaller than one part is sent with a single PutObject.
PART_SIZE = 8 * MiB
#: the largest body a PutObject sends as a lean request: its SHA-256 is computed on the event loop
#: (well under a millisecond at this size); a larger one goes through the SDK, whose per-request
#: cost is small next to its transfer
LEAN_PUT_MAX = 1 * MiB
#: Parts uploaded at once: memory held by one put is about (PARTS_IN_FLIGHT + 2) * part_size.
PARTS_IN_FLIGHT = 4
CHUNK = 1 * MiB
#: ListObjectsV2's arguments (``_page``) as the query parameters of a lean listing
_LIST_QUERY = {
    "Prefix": "prefix",
    "MaxKeys": "max-keys",
    "ContinuationToken": "continuation-token",
    "Delimiter": "delimiter",
    "StartAfter": "start-after",
}
#: connections kept for lean reads (the SDK's pool has 16; enrichment reads many small heads at once)
READ_CONNECTIONS = 32

_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchVersion", "NoSuchUpload"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidObjectState",  # archived (Glacier) object: not readable with these rights
    }
)
_TRANSIENT = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",  # a conflicting operation is in progress; AWS says retry
        "BadDigest",  # body corrupted in transit
        "IncompleteBody",
        "500",
        "502",
        "503",
        "504",
    }
)
#: PutObject's arguments (``_write_args``) as the headers of a lean PUT
_LEAN_PUT_HEADERS = {
    "StorageClass": "x-amz-storage-class",
    "ContentType": "content-type",
    "IfNoneMatch": "if-none-match",
    "IfMatch": "if-match",
}
#: the request reached a server that says it belongs elsewhere (another region or endpoint)
_WRONG_PLACE = frozenset(
    {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "InvalidRegion"}
)
_LOADER: Any = None
_MD5_HEX = re.compile(r"[0-9a-fA-F]{32}")
_USERINFO = re.compile(r"://[^/@\s]+@")
_SIGNED_QUERY = re.compile(r"(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s'\"]+", re.IGNORECASE)


@functools.cache
def _sdk_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    """botocore's two error roots (and ``more``), for ``except`` clauses of the SDK's paths.
    Imported on first need (an ``except`` clause is evaluated only when an exception reaches
    it): a store that never calls the SDK never loads botocore."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, *more)


def _session(profile: str | None) -> AioSession:
    """A botocore session; the model loader (parsed service JSON, about 0.1 s to build)
    is shared by every store in the process. Credentials and config stay per session."""
    from aiobotocore.session import AioSession

    global _LOADER
    session = AioSession(profile=profile)
    if _LOADER is None:
        _LOADER = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _LOADER)
    return session


def _redact(text: str) -> str:
    """Drop ``user:password@`` and presigned-URL credentials from any URL a message may quote (invariant 9)."""
    return _SIGNED_QUERY.sub(r"\1***", _USERINFO.sub("://***@", text))


def translate(
    exc: BaseException, where: str, op: str, *, key: str | None = None, mode: PutMode | None = None
) -> StorageError:
    """The one mapping from botocore/aiohttp errors to bucketsync's hierarchy.

    ``where`` names the object (``s3://bucket/prefix/key``), ``op`` what was being
    done. ``mode`` is the put mode of a conditional write: there a 412 (or 409
    ``ConditionalRequestConflict``) means ``AlreadyExists`` for create-only and
    ``PreconditionFailed`` for if-match, and a missing key under if-match is a
    failed precondition too (AWS answers 404 there, not 412).
    """
    if isinstance(exc, StorageError):
        return exc
    named = f"{type(exc).__name__}: {_redact(str(exc))}"
    # A process that never loaded botocore cannot hold one of its errors (and need not load it to know).
    if "botocore.exceptions" in sys.modules:
        from botocore import exceptions as sdk

        if isinstance(exc, sdk.ClientError):
            return _translate_answer(exc.response or {}, where, op, key, mode)
        if isinstance(
            exc,
            (sdk.NoCredentialsError, sdk.PartialCredentialsError, sdk.CredentialRetrievalError, sdk.ProfileNotFound),
        ):
            return PermissionDenied(
                f"{op} {where}: no usable AWS credentials ({named}); set access_key_id/secret_access_key or "
                "profile on the aws integration, or configure the default chain",
                key=key,
            )
        if isinstance(exc, sdk.SSLError):  # a certificate problem does not heal by retrying
            return StorageError(f"{op} {where}: TLS error: {_redact(str(exc))}", key=key)
        if isinstance(exc, (sdk.EndpointConnectionError, sdk.ConnectTimeoutError)):
            return Unreachable(f"{op} {where}: storage is unreachable ({named})", key=key)
        if isinstance(exc, (sdk.ConnectionError, sdk.HTTPClientError, sdk.IncompleteReadError)):
            return Transient(f"{op} {where}: {named}", key=key)
        if isinstance(exc, sdk.BotoCoreError):
            return StorageError(f"{op} {where}: {named}", key=key)
    if isinstance(exc, aiohttp.ClientConnectorError):  # never reached a server: DNS, refused, connect timeout
        return Unreachable(f"{op} {where}: storage is unreachable ({named})", key=key)
    if isinstance(exc, (aiohttp.ClientError, TimeoutError)):
        return Transient(f"{op} {where}: {named}", key=key)
    return StorageError(f"{op} {where}: unexpected {named}", key=key)


class BucketNotFound(NotFound):
    """The bucket itself is missing (``NoSuchBucket``), not just one key."""


def _translate_answer(
    response: dict[str, Any], where: str, op: str, key: str | None, mode: PutMode | None
) -> StorageError:
    """An error answer (a ``ClientError``'s ``response``, or ``status_answer``'s) as bucketsync's error."""
    err = response.get("Error") or {}
    code = str(err.get("Code") or "")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    server_msg = str(err.get("Message") or "")[:200]
    what = f"{code or 'error'} (HTTP {status})" if status else code or "error"
    msg = _redact(f"{op} {where}: {what}" + (f": {server_msg}" if server_msg else ""))

    if code == "NoSuchBucket":
        return BucketNotFound(msg, key=key)
    if code in _WRONG_PLACE or 300 <= status < 400:
        return BadEndpoint(f"{msg} (wrong region or endpoint: check the driver's region and endpoint_url)", key=key)
    if op == "list" and (not code or code.isdigit()) and status in (400, 404, 405):
        # A listing's errors always carry an S3 error code in an XML body; botocore falls back to
        # the bare status (or nothing) when there is none: whatever answered is not an S3 API.
        return BadEndpoint(f"{msg} (the endpoint does not answer as S3: check endpoint_url)", key=key)
    if code == "NoSuchUpload":  # our multipart upload is gone (completed or aborted), whatever the mode
        return NotFound(msg, key=key)
    conflict = status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict")
    if conflict and mode is not None and mode.create:
        return AlreadyExists(f"{msg} (the object already exists)", key=key)
    if conflict:
        return PreconditionFailed(f"{msg} (the object changed in storage)", key=key)
    if code in _NOT_FOUND or status == 404:
        if mode is not None and mode.if_match is not None:
            return PreconditionFailed(f"{msg} (the object no longer exists)", key=key)
        return NotFound(msg, key=key)
    if code in _DENIED or status in (401, 403):
        return PermissionDenied(msg, key=key)
    if code in _TRANSIENT or status == 429 or status >= 500:
        return Transient(msg, key=key)
    return StorageError(msg, key=key)


def _entry(key: str, size: int, modified: datetime, etag: str | None) -> tuple[str, int, float, str | None]:
    # Whole seconds: HEAD's Last-Modified has no fraction, so list and head agree.
    return key, int(size), float(int(modified.timestamp())), normalize_etag(etag)


def _info(key: str, size: int, modified: datetime, etag: str | None) -> ObjectInfo:
    return ObjectInfo(*_entry(key, size, modified, etag))


def _quoted(etag: str) -> str:
    # ETags are stored normalised (no quotes); HTTP conditional headers want them quoted.
    return f'"{normalize_etag(etag) or etag}"'


def _multipart_etag(part_etags: list[str]) -> str | None:
    """The ETag S3 gives a completed multipart upload: md5(md5(part1)..md5(partN))-N.

    Only known when every part's ETag is its MD5 (not with SSE-KMS or on some
    S3-compatible servers); ``None`` then.
    """
    try:
        digests = b"".join(bytes.fromhex(etag) for etag in part_etags)
    except ValueError:
        return None
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(part_etags)}"


async def _parts(chunks: AsyncIterable[bytes], size: int) -> AsyncGenerator[bytes, None]:
    """Re-cut a stream of chunks into parts of exactly ``size`` bytes (the last may be
    smaller). Yields at least one part (``b""`` for an empty body)."""
    buf = bytearray()
    yielded = False
    async for chunk in chunks:
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
            yielded = True
    if buf or not yielded:
        yield bytes(buf)


#: ``Server`` headers of servers that list a folder's subtree at the folder's bare
#: name (``a/b`` before ``a-c``), not in S3 key order: listed folder by folder.
_FOLDER_ORDERED_SERVERS = ("SeaweedFS",)
#: the most keys a part of a walk lists flat and sorts in memory (``_subtree_pages``): as many as
#: a part may hold ahead of the reader anyway (``BUFFER``)
FLAT_PART = BUFFER


def _page_from_sdk(resp: dict[str, Any]) -> Page:
    """A ListObjectsV2 page as the SDK parsed it."""
    entries = [_entry(o["Key"], o["Size"], o["LastModified"], o.get("ETag")) for o in resp.get("Contents") or ()]
    headers = (resp.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    return Page(
        entries,
        [p["Prefix"] for p in resp.get("CommonPrefixes") or ()],
        bool(resp.get("IsTruncated")),
        resp.get("NextContinuationToken"),
        str(headers.get("server") or ""),
    )


def _entry_key(entry: Entry) -> str:
    return entry[0]


#: a run of a folder level, as it is walked: objects between two subfolders, or a subfolder's key
_Run = builtins.list[Entry] | str


def _runs(chunk: builtins.list[tuple[str, Entry | None]]) -> Iterator[_Run]:
    """Entries of one folder level in key order (``(key, entry)``, or ``(folder, None)``) as runs."""
    batch: builtins.list[Entry] = []
    for key, entry in chunk:
        if entry is not None:
            batch.append(entry)
            continue
        if batch:
            yield batch
            batch = []
        yield key
    if batch:
        yield batch


class _SdkBody:
    """A GetObject body from the SDK, its errors translated."""

    __slots__ = ("key", "raw", "where")

    def __init__(self, raw: Any, where: str, key: str) -> None:
        self.raw, self.where, self.key = raw, where, key

    async def read(self, n: int) -> bytes:
        try:
            chunk: bytes = await self.raw.read(n)
        except _sdk_errors(aiohttp.ClientError, TimeoutError) as exc:
            raise translate(exc, self.where, "get", key=self.key) from exc
        return chunk

    def close(self) -> None:
        self.raw.close()


class _LeanBody:
    """A lean GET's body, its errors translated. A body cut short (fewer bytes than its
    ``Content-Length``) raises ``ClientPayloadError``, so ``Transient``: ``open`` resumes."""

    __slots__ = ("key", "resp", "where")

    def __init__(self, resp: aiohttp.ClientResponse, where: str, key: str) -> None:
        self.resp, self.where, self.key = resp, where, key

    async def read(self, n: int) -> bytes:
        try:
            return await self.resp.content.read(n)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise translate(exc, self.where, "get", key=self.key) from exc

    def close(self) -> None:
        # A body read to its end gives its connection back to the pool; an abandoned one closes it.
        if self.resp.content.at_eof():
            self.resp.release()
        else:
            self.resp.close()


class S3Store:
    """One bucket + prefix on AWS S3 or an S3-compatible server (``endpoint_url``)."""

    #: AWS honours If-None-Match (since Aug 2024) and If-Match (since Nov 2024) on
    #: PutObject/CompleteMultipartUpload and If-Match on DeleteObject. A server that
    #: silently ignores them cannot be detected cheaply; the conformance suite tells.
    conditional_writes = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        storage_class: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        page_size: int = 1000,
        listing: Literal["auto", "flat", "walk"] = "auto",
        fast_list: bool = True,
        lean_get: bool = True,
        list_concurrency: int = 8,
        part_size: int = PART_SIZE,
        attempts: int = 5,
        retry_base: float = 0.2,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigError("aws integration: set both access_key_id and secret_access_key, or neither")
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}"
        self.endpoint_url = endpoint_url
        self.region = region or ("us-east-1" if endpoint_url else None)
        self.storage_class = storage_class
        self.page_size = page_size
        #: "flat": one recursive listing (S3 order); "walk": folder by folder (any server);
        #: "auto": flat, unless the first page comes from a server known to need "walk".
        self._listing = listing
        #: keys of walk parts listed flat and used, and listed flat then dropped (``_subtree_pages``)
        self._flat_listed = self._flat_dropped = 0
        #: parse ListObjectsV2 responses ourselves (see ``_page_raw``)
        self.fast_list = fast_list
        #: read objects (GET, HEAD) and write small ones (a single PutObject) with our own signed
        #: requests (see ``_lean``); off: through the SDK
        self.lean_get = lean_get
        self._target: Target | None = None
        #: the credentials the client signs with (refreshable ones refresh themselves), for lean reads
        self._signing: Any = None
        self._botocore_session: AioSession | None = None
        #: list requests in flight at once (``stores.parallel``); 1 lists one page after another
        self.list_concurrency = max(1, list_concurrency)
        self.part_size = part_size
        self.attempts = attempts
        self.retry_base = retry_base
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._profile = profile
        self._credentials = {
            k: v
            for k, v in (
                ("aws_access_key_id", access_key_id),
                ("aws_secret_access_key", secret_access_key),
                ("aws_session_token", session_token),
            )
            if v is not None
        }
        self._client: Any = None
        self._http_session: aiohttp.ClientSession | None = None
        self._read_session: aiohttp.ClientSession | None = None
        self._client_lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

    def __repr__(self) -> str:  # never the credentials
        return f"S3Store({self.url!r})"

    # -- plumbing ---------------------------------------------------------------

    def _botocore_config(self) -> Config:
        from botocore.config import Config

        options: dict[str, Any] = {
            # One attempt: retries are ours (see module docstring).
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            # Per request (a read timeout is per socket read, not per transfer): a
            # stalled server costs seconds, then a Transient and our retry.
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_pool_connections": 16,
            "tcp_keepalive": True,
            # SigV4 for presigned URLs too (the fast listing path); some configurations default to SigV2.
            "signature_version": "s3v4",
        }
        if self.endpoint_url:
            options["s3"] = {"addressing_style": "path"}
            # botocore >= 1.36 adds CRC checksums to every upload by default; several
            # S3-compatible servers reject or mishandle them, so only when required.
            # (Older botocore has neither the default nor the option.)
            if "request_checksum_calculation" in Config.OPTION_DEFAULTS:
                options["request_checksum_calculation"] = "when_required"
                options["response_checksum_validation"] = "when_required"
        return Config(**options)

    async def _get_client(self) -> Any:
        # The factory is sync, so the client (which needs a running loop) is made here.
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    try:
                        session = _session(self._profile)
                        self._botocore_session = session
                        self._client = await self._stack.enter_async_context(
                            session.create_client(
                                "s3",
                                region_name=self.region,
                                endpoint_url=self.endpoint_url,
                                config=self._botocore_config(),
                                **self._credentials,
                            )
                        )
                    except _sdk_errors() as exc:
                        raise translate(exc, self.url, "connect") from exc
        return self._client

    def _where(self, key: str | None) -> str:
        return self.url if key is None else f"{self.url}{key}"

    async def _call(self, method: str, op: str, key: str | None, mode: PutMode | None = None, **kwargs: Any) -> Any:
        """One SDK call with errors translated; ``Bucket`` is filled in."""
        client = await self._get_client()
        try:
            return await getattr(client, method)(Bucket=self.bucket, **kwargs)
        except _sdk_errors(aiohttp.ClientError, TimeoutError) as exc:
            raise translate(exc, self._where(key), op, key=key, mode=mode) from exc

    async def _retry(self, call: Callable[[], Awaitable[Any]]) -> Any:
        return await retrying(call, attempts=self.attempts, base=self.retry_base)

    # -- reading ----------------------------------------------------------------

    async def _page(
        self, prefix: str, token: str | None, delimiter: str | None = None, start_after: str | None = None
    ) -> Page:
        """One ListObjectsV2 page (retried on its own): parsed by us when possible, else by the SDK."""
        kwargs: dict[str, Any] = {"Prefix": prefix, "MaxKeys": self.page_size}
        if token is not None:
            kwargs["ContinuationToken"] = token
        if delimiter is not None:
            kwargs["Delimiter"] = delimiter
        if start_after is not None and token is None:  # a token carries its own position
            kwargs["StartAfter"] = start_after
        if self.fast_list:
            page: Page | None = await self._retry(lambda: self._page_raw(kwargs))
            if page is not None:
                return page
        resp = await self._retry(lambda: self._call("list_objects_v2", "list", None, **kwargs))
        return _page_from_sdk(resp)

    async def _page_raw(self, kwargs: dict[str, Any]) -> Page | None:
        """The fast path: a lean request (``_lean``: signed by ``sigv4``, on the kept-alive pool)
        or, with lean requests off, a URL botocore presigns; ``scan_list`` reads the XML
        (botocore's parser is most of a listing's time). ``None`` hands the page to the SDK:
        a presigned request answered with anything but 200 (errors, redirects) and TLS trouble
        (the SDK may know a CA bundle we do not). The URL carries a signature: it is never logged.

        Lean, a request costs about 2 ms of CPU less than presigned (0.6 ms of botocore's signing
        chain, 1.3 ms of aiohttp's per-request proxy lookup in a thread), which a walk of many
        small folders pays once per folder (bench/listing_peers.py).
        """
        if self.lean_get:
            query = {_LIST_QUERY[k]: str(v) for k, v in kwargs.items()}
            resp = await self._lean("GET", None, {}, "list", query={"list-type": "2", "encoding-type": "url", **query})
            if resp is not None:
                try:
                    body = await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise translate(exc, self.url, "list") from exc
                finally:
                    resp.release()
                return self._scanned(body, resp.headers.get("Server", ""))
        client = await self._get_client()
        params = {"Bucket": self.bucket, "EncodingType": "url", **kwargs}
        try:
            url = await client.generate_presigned_url("list_objects_v2", Params=params, ExpiresIn=900)
            async with (await self._http()).get(url) as resp:
                if resp.status != 200:
                    return None
                body = await resp.read()
                server = resp.headers.get("Server", "")
        except aiohttp.ClientSSLError as exc:
            log.warning(
                "fast listing disabled: TLS error; listing through the SDK", url=self.url, error=type(exc).__name__
            )
            self.fast_list = False
            return None
        except _sdk_errors(aiohttp.ClientError, TimeoutError) as exc:
            raise translate(exc, self.url, "list") from exc
        return self._scanned(body, server)

    def _scanned(self, body: bytes, server: str) -> Page:
        try:
            return scan_list(body, server)
        except (ET.ParseError, ValueError, TypeError) as exc:
            raise BadEndpoint(f"list {self.url}: unreadable ListObjectsV2 response, not an S3 API? ({exc})") from None

    async def _http(self) -> aiohttp.ClientSession:
        if self._http_session is None:
            # trust_env: the same HTTP(S)_PROXY / NO_PROXY botocore honours.
            timeout = aiohttp.ClientTimeout(sock_connect=self.connect_timeout, sock_read=self.read_timeout)
            self._http_session = aiohttp.ClientSession(timeout=timeout, trust_env=True)
        return self._http_session

    async def _reads(self) -> aiohttp.ClientSession:
        """The session of lean reads: a pool of kept-alive connections; no ``trust_env``, whose
        per-request lookups (in a thread) cost more than the request (``Target`` has the proxy)."""
        if self._read_session is None:
            timeout = aiohttp.ClientTimeout(sock_connect=self.connect_timeout, sock_read=self.read_timeout)
            connector = aiohttp.TCPConnector(limit=READ_CONNECTIONS, keepalive_timeout=30)
            self._read_session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        return self._read_session

    def _next_token(self, page: Page) -> str:
        if not page.token:
            # Stopping here would look like a complete listing and turn every
            # later key into a removal (invariant 1).
            raise StorageError(f"list {self.url}: truncated page without a continuation token")
        return page.token

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        return self.list_split(prefix, ())

    async def list_split(self, prefix: str, splits: Sequence[str]) -> AsyncIterator[ObjectInfo]:
        """``list``, cut into parts listed ``list_concurrency`` at a time (``stores.parallel``).

        ``splits`` (keys relative to the driver, ascending; a hint) cut a flat listing into key
        ranges: ``StartAfter`` the lower bound, stopped past the upper one. Without them, a
        listing longer than one page is cut at the folders of its first levels. A server that
        lists out of S3 key order (``walk``) is listed folder by folder, a folder per part.
        """
        async for page in self.list_pages(prefix, splits):
            for info in page:
                yield info

    async def list_pages(
        self, prefix: str = "", splits: Sequence[str] = ()
    ) -> AsyncIterator[builtins.list[ObjectInfo]]:
        """``list_split`` a page at a time (``PagedListing``): one list per ListObjectsV2 page."""
        full = self.prefix + prefix
        plen = len(self.prefix)
        last: str | None = None
        async for page in self._pages(full, [self.prefix + s for s in splits]):
            if not page:
                continue
            last = check_page(self.url, [e[0] for e in page], last, full)
            yield [
                ObjectInfo(key[plen:], size, modified, etag)
                for key, size, modified, etag in page
                if indexable(key[plen:])
            ]

    async def _pages(self, prefix: str, splits: builtins.list[str]) -> AsyncIterator[builtins.list[Entry]]:
        """Every object under ``prefix``, in pages: flat by key ranges, or folder by folder (``listing``)."""
        first: Page | None = None
        if self._listing == "auto":
            first = await self._page(prefix, None)
            self._listing = "walk" if first.server.startswith(_FOLDER_ORDERED_SERVERS) else "flat"
            if self._listing == "walk":
                log.info("server lists folders out of S3 key order; listing folder by folder", url=self.url)
                first = None  # the flat page is dropped, once per store
        width = self.list_concurrency
        parts: AsyncIterator[Part[Entry]] | builtins.list[Part[Entry]]
        if self._listing == "walk":
            if width > 1:
                parts = self._walk_parts(prefix, 0, Slots(width))
            else:
                parts = [functools.partial(self._walk_pages, prefix)]
        else:
            if first is None and not splits and width > 1:
                first = await self._page(prefix, None)
            if first is not None and not first.truncated:  # one page is the whole listing
                if first.entries:
                    yield first.entries
                return
            discover = functools.partial(self._discover_splits, prefix) if not splits and width > 1 else None
            parts = range_parts(functools.partial(self._range_pages, prefix), splits, prefix, width, first, discover)
        async for page in in_order(parts, width):
            yield page

    async def _range_pages(
        self, prefix: str, after: str | None, upto: str | None, first: Page | None = None, cut: Cut | None = None
    ) -> AsyncIterator[builtins.list[Entry]]:
        """The keys in ``(after, upto]`` (None: unbounded), a page at a time; with ``cut``, ``upto``
        is decided while the part lists (``parallel.cut_parts``)."""
        page = first if first is not None else await self._page(prefix, None, start_after=after)
        while True:
            entries = page.entries
            if after is not None and entries and entries[0][0] <= after:
                entries = [e for e in entries if e[0] > after]  # a server that ignores StartAfter: slow, not wrong
            if cut is not None:
                upto = cut.upto
            if upto is not None and entries and entries[-1][0] >= upto:  # the part ends in this page
                yield entries[: bisect.bisect_right(entries, upto, key=_entry_key)]
                return
            if cut is not None and entries:
                cut.seen = entries[-1][0]
            yield entries
            if not page.truncated:
                return
            page = await self._page(prefix, self._next_token(page))

    async def _discover_splits(self, prefix: str) -> builtins.list[str]:
        """Split points for a listing with no history: the folders of its first levels (the first
        page of each, breadth first), down until there are enough of them to keep every lister busy."""
        level = [prefix]
        found: builtins.list[str] = []
        for _ in range(SPLIT_LEVELS):
            pages = await gather_bounded(
                [functools.partial(self._page, p, None, "/") for p in level], self.list_concurrency
            )
            found = sorted({f for page in pages for f in page.folders if f != self.prefix + HIDDEN})
            if len(found) >= self.list_concurrency * PARTS_PER_LISTER // 2 or not found:
                break
            level = found[: self.list_concurrency * PARTS_PER_LISTER]
        return found

    async def _level(self, prefix: str, slots: Slots | None = None) -> AsyncIterator[builtins.list[_Run]]:
        """One folder level (``Delimiter="/"``) in key order, a chunk of runs per page (``_runs``):
        the objects between two subfolders as a list, each subfolder as its key (the hidden
        folder left out). Each request takes one of ``slots`` (a parallel walk's bound), if given.

        Correct whether the server orders a level by key (S3: ``a-c`` < ``a/``) or by
        bare name (SeaweedFS: folder ``a`` first). Entries wait in a heap until the
        server has gone past them: ``bound`` is the largest name seen so far, a folder
        counted without its ``/``; nothing unseen can sort below it in either order.
        The heap holds about one page. A page of objects only, with nothing waiting, is
        already in key order in both: it is one run, with no per-object work.
        """
        hidden = self.prefix + HIDDEN
        heap: builtins.list[tuple[str, int, Entry | None]] = []  # (key, arrival, entry or None for a folder)
        arrival = itertools.count()
        bound = ""
        token: str | None = None
        while True:
            async with slots.take(prefix) if slots is not None else contextlib.nullcontext():
                page = await self._page(prefix, token, "/")
            if page.truncated:
                token = self._next_token(page)
            if not page.folders and not heap:
                if page.entries:
                    bound = max(bound, page.entries[-1][0])
                    yield [page.entries]
            else:
                for entry in page.entries:
                    heapq.heappush(heap, (entry[0], next(arrival), entry))
                    bound = max(bound, entry[0])
                for folder in page.folders:
                    heapq.heappush(heap, (folder, next(arrival), None))
                    bound = max(bound, folder[:-1])
                chunk = []
                while heap and (not page.truncated or heap[0][0] <= bound):
                    key, _, item = heapq.heappop(heap)
                    if item is not None or key != hidden:
                        chunk.append((key, item))
                if chunk:
                    yield list(_runs(chunk))
            if not page.truncated:
                return

    async def _walk_pages(
        self, prefix: str, slots: Slots | None = None, fan: int = 1
    ) -> AsyncIterator[builtins.list[Entry]]:
        """A folder's whole subtree in key order, descending into each subfolder at its place.

        With ``fan`` > 1, up to ``fan`` of the folder's subfolders are walked at once and read
        back in order (``in_order``), each of them one folder after another: a part of a
        parallel walk (a month of day folders) is then not 28 requests one after another.
        ``slots`` keeps the whole walk to ``list_concurrency`` requests at a time, the folders
        that come first in key order served first."""
        async for runs in self._level(prefix, slots):
            if fan > 1:
                parts = [
                    given(run) if isinstance(run, list) else functools.partial(self._walk_pages, run, slots)
                    for run in runs
                ]
                # A subfolder may run BUFFER // fan entries ahead: a part holds about 2 x BUFFER at most.
                async for page in in_order(parts, fan, max(1, BUFFER // fan)):
                    yield page
                continue
            for run in runs:
                if isinstance(run, list):
                    yield run
                else:
                    async for page in self._walk_pages(run, slots):
                        yield page

    async def _walk_parts(self, prefix: str, depth: int, slots: Slots) -> AsyncIterator[Part[Entry]]:
        """``_walk_pages`` cut into parts: a subfolder per part, the objects between them as
        parts of their own. A level with fewer folders than listers is looked into, down to
        ``SPLIT_LEVELS``, so that one big folder does not make a sequential listing. The
        levels looked into are listed by the reader itself (one request each, in turn), so
        only the first levels are; each part then walks its own subfolders ``list_concurrency``
        at a time (``fan``), all of them within the ``slots`` of the listing."""
        async for runs in self._level(prefix, slots):
            folders = sum(1 for run in runs if isinstance(run, str))
            for run in runs:
                if isinstance(run, list):
                    yield given(run)
                elif depth + 1 < SPLIT_LEVELS and folders < self.list_concurrency:
                    async for part in self._walk_parts(run, depth + 1, slots):
                        yield part
                else:
                    yield functools.partial(self._subtree_pages, run, slots)

    def _flat_worth_it(self) -> bool:
        """Whether a walk part should be tried flat: while the keys listed flat and dropped (parts
        over ``FLAT_PART``) stay within one part's worth and a tenth of those listed flat and
        used, over the store's life. The parts already running finish their try, so a listing
        drops at most about ``list_concurrency`` x ``FLAT_PART`` keys more than that."""
        return self._flat_dropped <= FLAT_PART + self._flat_listed // 10

    async def _subtree_pages(self, prefix: str, slots: Slots) -> AsyncIterator[builtins.list[Entry]]:
        """A part of a walk (a folder's whole subtree) listed flat, without a delimiter, and put in
        key order in memory: one request for each 1,000 keys instead of one for each folder (a
        month of 28 day folders, 4,200 keys: 5 requests, not 29). The server's flat order is its
        own (folder ``a`` before ``a.txt``), so the part is sorted whole, which it can be only up to
        ``FLAT_PART`` keys; a bigger one is walked folder by folder after all (``_walk_pages``,
        its subfolders ``list_concurrency`` at a time), the pages listed so far dropped.

        Those dropped pages are work for nothing, so the store stops trying once they outweigh
        what flat parts saved (``_flat_worth_it``): a tree of parts just over ``FLAT_PART`` keys
        is otherwise listed about twice."""
        entries = await self._flat_subtree(prefix, slots) if self._flat_worth_it() else None
        if entries is None:
            async for walked in self._walk_pages(prefix, slots, self.list_concurrency):
                yield walked
            return
        entries.sort(key=_entry_key)  # equal keys stay side by side: check_page then refuses them
        for start in range(0, len(entries), self.page_size):
            yield entries[start : start + self.page_size]

    async def _flat_subtree(self, prefix: str, slots: Slots) -> builtins.list[Entry] | None:
        """Every key under ``prefix`` from a listing without a delimiter, in the server's order;
        None once it passes ``FLAT_PART`` keys (counted as dropped)."""
        entries: builtins.list[Entry] = []
        token: str | None = None
        while True:
            async with slots.take(prefix):
                page = await self._page(prefix, token)
            entries += page.entries
            if not page.truncated:
                self._flat_listed += len(entries)
                return entries
            if len(entries) >= FLAT_PART:
                self._flat_dropped += len(entries)
                return None
            token = self._next_token(page)

    async def head(self, key: str) -> ObjectInfo:
        if self.lean_get:
            info: ObjectInfo | None = await self._retry(lambda: self._lean_head(key))
            if info is not None:
                return info
        full = self.prefix + key
        resp = await self._retry(lambda: self._call("head_object", "head", key, Key=full))
        return _info(key, resp["ContentLength"], resp["LastModified"], resp.get("ETag"))

    async def content_md5(self, key: str) -> tuple[ObjectInfo, bytes | None]:
        """HEAD, and the ETag as an MD5 where S3 vouches that it is one: a single-part
        upload without SSE-KMS or SSE-C (a multipart ETag ``md5-N`` is not a content MD5)."""
        full = self.prefix + key
        resp = await self._retry(lambda: self._call("head_object", "head", key, Key=full))
        info = _info(key, resp["ContentLength"], resp["LastModified"], resp.get("ETag"))
        encrypted = str(resp.get("ServerSideEncryption") or "").startswith("aws:kms") or resp.get(
            "SSECustomerAlgorithm"
        )
        if info.etag is None or encrypted or not _MD5_HEX.fullmatch(info.etag):
            return info, None
        return info, bytes.fromhex(info.etag)

    async def _get(
        self, key: str, offset: int = 0, etag: str | None = None, end: int | None = None
    ) -> tuple[str | None, _SdkBody | _LeanBody]:
        """GetObject of bytes ``offset..end`` (inclusive; None: to the end), retried; when resuming,
        pinned to ``etag`` so two versions are never spliced. Returns (ETag, body)."""
        rng = f"bytes={offset}-{'' if end is None else end}" if offset or end is not None else None
        try:
            got: tuple[str | None, _SdkBody | _LeanBody] = await self._retry(lambda: self._get_once(key, rng, etag))
        except PreconditionFailed:
            raise PreconditionFailed(f"get {self._where(key)}: the object changed while it was read", key=key) from None
        return got

    async def _get_once(self, key: str, rng: str | None, etag: str | None) -> tuple[str | None, _SdkBody | _LeanBody]:
        if self.lean_get and (got := await self._lean_get(key, rng, etag)) is not None:
            return got
        kwargs: dict[str, Any] = {"Key": self.prefix + key}
        if rng is not None:
            kwargs["Range"] = rng
        if etag is not None:
            kwargs["IfMatch"] = _quoted(etag)
        resp = await self._call("get_object", "get", key, **kwargs)
        return resp.get("ETag"), _SdkBody(resp["Body"], self._where(key), key)

    async def _lean_get(self, key: str, rng: str | None, etag: str | None) -> tuple[str | None, _LeanBody] | None:
        """GetObject as a lean request (``_lean``); None hands it to the SDK."""
        headers: dict[str, str] = {}
        if rng is not None:
            headers["range"] = rng
        if etag is not None:
            headers["if-match"] = _quoted(etag)
        resp = await self._lean("GET", key, headers, "get")
        if resp is None:
            return None
        return resp.headers.get("ETag"), _LeanBody(resp, self._where(key), key)

    async def _lean_head(self, key: str) -> ObjectInfo | None:
        """HeadObject as a lean request (``_lean``): after every put outside the hidden folder
        (``_stat_written``) and for each event's check, where the SDK's machinery cost more than the request.
        None hands it to the SDK (also when an answer lacks a header it should have)."""
        resp = await self._lean("HEAD", key, {}, "head")
        if resp is None:
            return None
        try:
            length, modified = resp.headers.get("Content-Length"), resp.headers.get("Last-Modified")
            if length is None or modified is None:
                return None
            try:
                return _info(key, int(length), parsedate_to_datetime(modified), resp.headers.get("ETag"))
            except (TypeError, ValueError):
                return None
        finally:
            resp.release()

    async def _lean_put(self, key: str, body: bytes, headers: dict[str, str], mode: PutMode) -> dict[str, Any] | None:
        """PutObject of a buffered body as a lean request (``_lean``), as the SDK's answer: the ETag.
        A thumbnail is one, and the SDK's machinery cost more than sending it. None hands it to the SDK."""
        resp = await self._lean("PUT", key, headers, "put", body, mode)
        if resp is None:
            return None
        try:
            return {"ETag": resp.headers.get("ETag")}
        finally:
            resp.release()

    async def _lean(
        self,
        method: str,
        key: str | None,
        headers: dict[str, str],
        op: str,
        body: bytes | None = None,
        mode: PutMode | None = None,
        query: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse | None:
        """A request (GET, HEAD, a PUT of ``body``) without the SDK's per-request machinery (most of
        a small read's or write's CPU): signed by ``sigv4`` with the client's own credentials (refreshed as the SDK
        would), sent on the shared aiohttp session (a pool of kept-alive connections), to where
        botocore said (``_lean_target``). A 200 or 206 answer is returned; errors become what the
        SDK's would (``status_answer``, ``_translate_answer``).

        None hands the request to the SDK: no target, TLS trouble (the SDK may know a CA bundle
        we do not), or a redirect (a bucket in another region: the SDK follows it). Those turn
        lean requests off for the store, logged once. The signed request is never logged.

        ``key`` None is a request to the bucket itself, with ``query`` (a listing).
        """
        target = await self._lean_target()
        if target is None:
            return None
        where = self._where(key)
        # key None: the bucket itself, /bucket (path style) or / (virtual-hosted)
        path = (target.path.rstrip("/") or "/") if key is None else target.path + sigv4.encode_key(self.prefix + key)
        qs = sigv4.encode_query(query) if query else ""
        try:
            creds = await self._signing.get_frozen_credentials()
        except _sdk_errors() as exc:  # only botocore's refreshing credentials fail here
            raise translate(exc, where, op, key=key) from exc
        payload = sigv4.EMPTY_SHA256 if body is None else hashlib.sha256(body).hexdigest()
        signed = target.signer.sign(
            target.host,
            path,
            headers,
            creds.access_key,
            creds.secret_key,
            creds.token,
            time.time(),
            method,
            payload,
            query=qs,
        )
        signed["accept-encoding"] = "identity"  # the stored bytes, never a compressed transfer of them
        try:
            resp = await (await self._reads()).request(
                method,
                yarl.URL(target.origin + path + (f"?{qs}" if qs else ""), encoded=True),
                headers=signed,
                data=body,
                skip_auto_headers=("Content-Type",),  # none unless asked, as the SDK: storage picks its default
                allow_redirects=False,
                auto_decompress=False,
                proxy=target.proxy,
                proxy_auth=target.proxy_auth,
            )
        except aiohttp.ClientSSLError as exc:
            self._lean_off("TLS error", error=type(exc).__name__)
            return None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise translate(exc, where, op, key=key, mode=mode) from exc
        if resp.status in (200, 206):
            return resp
        answer = status_answer(resp.status, await error_body(resp))
        code = answer["Error"].get("Code")
        # A HEAD has no body to name its error: AWS answers one sent to the wrong region with a bare 400.
        if 300 <= resp.status < 400 or code in _WRONG_PLACE or (method == "HEAD" and resp.status == 400):
            self._lean_off("the server sends requests elsewhere", status=resp.status, code=code)
            return None
        raise _translate_answer(answer, where, op, key, mode)

    async def _lean_target(self) -> Target | None:
        """Where lean reads go. With an ``endpoint_url`` and keys of its own, the store knows
        (``Target.for_endpoint``: path style, its region) and never needs botocore. Otherwise it is
        learned once from a URL botocore presigns for a probe key (so its endpoint rules,
        addressing style and region apply), with the credentials its client uses."""
        if self._target is None and self.lean_get and (static := self._static_target()) is not None:
            self._signing, self._target = StaticKeys(*self._keys()), static
        if self._target is None and self.lean_get:
            client = await self._get_client()
            try:
                url = await client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": PROBE_KEY}, ExpiresIn=60
                )
                assert self._botocore_session is not None
                # explicit keys are exactly what the client signs with; else the session's (cached) chain
                creds: Any = (
                    StaticKeys(*self._keys()) if self._credentials else await self._botocore_session.get_credentials()
                )
            except _sdk_errors():  # no credentials and the like: the SDK says so
                url, creds = "", None
            target = Target.from_presigned(url) if url and creds is not None else None
            if target is None:
                self._lean_off("no presignable GetObject URL")
                return None
            self._signing, self._target = creds, target
        return self._target if self.lean_get else None

    def _keys(self) -> tuple[str, str, str | None]:
        c = self._credentials
        return c["aws_access_key_id"], c["aws_secret_access_key"], c.get("aws_session_token")

    def _static_target(self) -> Target | None:
        """The target without botocore, where botocore would decide nothing: an ``endpoint_url``
        (always path style here, ``_botocore_config``), keys of the store's own (``_keys``) and
        no profile (whose config could say more)."""
        if not (self.endpoint_url and self._credentials and self._profile is None and self.region):
            return None
        return Target.for_endpoint(self.endpoint_url, self.bucket, self.region)

    def _lean_off(self, why: str, **fields: Any) -> None:
        if self.lean_get:
            log.info(f"lean reads disabled: {why}; reading through the SDK", url=self.url, **fields)
        self.lean_get = False

    async def open(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream the body in chunks; a connection lost mid-body resumes with a ranged GET."""
        end = None if length is None else offset + length - 1
        etag, body = await self._get(key, offset, None, end)
        pos, failures = offset, 0
        while True:
            try:
                while chunk := await body.read(CHUNK):
                    pos += len(chunk)
                    failures = 0
                    yield chunk
                return
            except Transient:
                failures += 1
                if failures >= self.attempts or etag is None:
                    raise
                log.info("resuming an interrupted download", url=self._where(key), offset=pos)
            finally:
                body.close()
            _, body = await self._get(key, pos, etag, end)

    # -- writing ----------------------------------------------------------------

    def _write_args(self, mode: PutMode, content_type: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(arguments for the call that creates the upload, arguments for the call that commits it)."""
        create: dict[str, Any] = {}
        commit: dict[str, Any] = {}
        if self.storage_class:
            create["StorageClass"] = self.storage_class
        if content_type:
            create["ContentType"] = content_type
        if mode.create:
            commit["IfNoneMatch"] = "*"
        elif mode.if_match is not None:
            commit["IfMatch"] = _quoted(mode.if_match)
        return create, commit

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        mode: PutMode = OVERWRITE,
        content_type: str | None = None,
    ) -> ObjectInfo:
        async with contextlib.aclosing(_parts(chunks, self.part_size)) as parts:
            first = await anext(parts)
            second = await anext(parts, None)
            if second is None:
                etag, size = await self._put_single(key, first, mode, content_type), len(first)
            else:
                etag, size = await self._put_multipart(key, [first, second], parts, mode, content_type)
        return await self._stat_written(key, etag, size)

    async def _committed(
        self, key: str, call: Callable[[], Awaitable[Any]], expected: Callable[[], str | None]
    ) -> str | None:
        """Run the committing call of a write (retried when that is safe) and return the new ETag.

        Retries: a conditional commit is idempotent, and so in effect is an
        unconditional one here: the body is fully buffered (one PutObject) or
        already uploaded (CompleteMultipartUpload), so a retry writes the same
        bytes again; OVERWRITE means "replace whatever is there" anyway.

        When a retried commit then fails its precondition (or finds the multipart
        upload gone), an earlier attempt may have succeeded with its response
        lost; if storage now holds exactly our bytes (``expected`` ETag), it did.
        """
        tries = 0

        async def once() -> Any:
            nonlocal tries
            tries += 1
            return await call()

        try:
            resp = await self._retry(once)
        except (AlreadyExists, PreconditionFailed, NotFound):
            if tries > 1 and (want := expected()) is not None:
                with contextlib.suppress(NotFound):
                    if (await self.head(key)).etag == want:
                        return want
            raise
        return normalize_etag(resp.get("ETag"))

    async def _put_single(self, key: str, body: bytes, mode: PutMode, content_type: str | None) -> str | None:
        full = self.prefix + key
        create, commit = self._write_args(mode, content_type)

        async def put() -> Any:
            args = {**create, **commit}
            if self.lean_get and len(body) <= LEAN_PUT_MAX and args.keys() <= _LEAN_PUT_HEADERS.keys():
                headers = {_LEAN_PUT_HEADERS[name]: str(value) for name, value in args.items()}
                if (resp := await self._lean_put(key, body, headers, mode)) is not None:
                    return resp
            return await self._call("put_object", "put", key, mode, Key=full, Body=body, **create, **commit)

        return await self._committed(key, put, lambda: hashlib.md5(body, usedforsecurity=False).hexdigest())

    async def _check_before_upload(self, key: str, mode: PutMode) -> None:
        """Fail a conditional multipart put before uploading gigabytes; the
        conditional commit stays the real guard against races."""
        if not mode.create and mode.if_match is None:
            return
        try:
            current = await self.head(key)
        except NotFound:
            if mode.if_match is not None:
                raise PreconditionFailed(f"put {self._where(key)}: the object no longer exists", key=key) from None
            return
        if mode.create:
            raise AlreadyExists(f"put {self._where(key)}: already exists", key=key)
        if current.etag != normalize_etag(mode.if_match):
            raise PreconditionFailed(f"put {self._where(key)}: changed in storage (etag mismatch)", key=key)

    async def _put_multipart(
        self, key: str, head: builtins.list[bytes], rest: AsyncIterator[bytes], mode: PutMode, content_type: str | None
    ) -> tuple[str | None, int]:
        full = self.prefix + key
        await self._check_before_upload(key, mode)
        create, commit = self._write_args(mode, content_type)
        # Not idempotent, but a duplicate only leaves an empty upload behind (no
        # parts, no storage cost; lifecycle rules or abort clean it up).
        started = await self._retry(lambda: self._call("create_multipart_upload", "put", key, Key=full, **create))
        upload_id: str = started["UploadId"]
        try:
            etags, size = await self._upload_parts(key, upload_id, head, rest)
            listing = {"Parts": [{"PartNumber": n, "ETag": _quoted(e)} for n, e in enumerate(etags, 1)]}
            etag = await self._committed(
                key,
                lambda: self._call(
                    "complete_multipart_upload",
                    "put",
                    key,
                    mode,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload=listing,
                    **commit,
                ),
                lambda: _multipart_etag(etags),
            )
        except BaseException:
            await self._abort(key, upload_id)
            raise
        return etag, size

    async def _upload_parts(
        self, key: str, upload_id: str, head: builtins.list[bytes], rest: AsyncIterator[bytes]
    ) -> tuple[builtins.list[str], int]:
        """Upload ``head`` then ``rest`` as parts 1..N, at most PARTS_IN_FLIGHT at once.

        Returns the parts' ETags in order and the total size. Each part is
        retried on its own: re-uploading a part number replaces it.
        """
        full = self.prefix + key
        etags: dict[int, str] = {}
        pending: set[asyncio.Task[None]] = set()
        size = number = 0

        async def upload(number: int, data: bytes) -> None:
            resp = await self._retry(
                lambda: self._call(
                    "upload_part", "put", key, Key=full, UploadId=upload_id, PartNumber=number, Body=data
                )
            )
            etags[number] = normalize_etag(resp.get("ETag")) or ""

        async def submit(data: bytes) -> None:
            nonlocal pending, size, number
            number += 1
            size += len(data)
            if len(pending) >= PARTS_IN_FLIGHT:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raises the first failure
            pending.add(asyncio.create_task(upload(number, data)))

        try:
            while head:
                await submit(head.pop(0))  # pop: do not hold the first parts for the whole upload
            async for data in rest:
                await submit(data)
            if pending:
                done, pending = await asyncio.wait(pending)
                for task in done:
                    task.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        return [etags[n] for n in sorted(etags)], size

    async def _abort(self, key: str, upload_id: str) -> None:
        """Best effort: a failed upload must not leave parts (and their cost) behind."""
        try:
            await self._retry(
                lambda: self._call("abort_multipart_upload", "abort", key, Key=self.prefix + key, UploadId=upload_id)
            )
        except StorageError as exc:
            log.warning("could not abort multipart upload", url=self._where(key), error=str(exc))

    async def _stat_written(self, key: str, etag: str | None, size: int) -> ObjectInfo:
        """What a listing will report for the object just written (PutObject returns
        no Last-Modified). If someone replaced or deleted it in between, describe
        our write rather than theirs.

        A key no listing reports (``indexable``: the hidden folder's thumbnails and probes) asks
        no HEAD for what nothing will compare; the write is described from what was sent."""
        if not indexable(key):
            return ObjectInfo(key, size, float(int(time.time())), etag)
        try:
            info = await self.head(key)
        except NotFound:
            info = None
        if info is None or (etag is not None and info.etag != etag):
            return ObjectInfo(key, size, float(int(time.time())), etag)
        return info

    async def delete(self, key: str, if_match: str | None = None) -> None:
        full = self.prefix + key
        kwargs: dict[str, Any] = {"Key": full}
        if if_match is not None:
            kwargs["IfMatch"] = _quoted(if_match)
        try:
            await self._retry(lambda: self._call("delete_object", "delete", key, **kwargs))
        except BucketNotFound:
            raise
        except NotFound:
            return  # AWS answers 404 to if-match on a missing key: already gone is fine
        except PreconditionFailed:
            # Some servers (SeaweedFS) answer 412 to if-match on a missing key too.
            try:
                await self.head(key)
            except NotFound:
                return
            raise

    # -- bucket notifications (``bucketsync events setup``) ------------------------

    async def notification_configuration(self) -> dict[str, Any]:
        """The bucket's event notification configuration, as PutBucketNotificationConfiguration takes it."""
        resp = await self._retry(
            lambda: self._call("get_bucket_notification_configuration", "read notifications", None)
        )
        return {k: v for k, v in resp.items() if k != "ResponseMetadata"}

    async def set_notification_configuration(self, config: dict[str, Any]) -> None:
        """Replace the bucket's notification configuration (S3 checks it can deliver to each target)."""
        await self._call(
            "put_bucket_notification_configuration", "configure notifications", None, NotificationConfiguration=config
        )

    async def aclose(self) -> None:
        async with self._client_lock:
            self._client = None
            await self._stack.aclose()
            self._stack = contextlib.AsyncExitStack()
            for session in (self._http_session, self._read_session):
                if session is not None:
                    await session.close()
            self._http_session = self._read_session = None


def aws_credentials(integration: AwsIntegration | None) -> tuple[dict[str, str], str | None]:
    """(botocore client keyword arguments, profile) from the aws integration; both empty: the default chain.

    The one place an integration's AWS secrets are read, for the store and for the
    SQS event source alike.
    """
    if integration is None:
        return {}, None
    secrets = {
        f"aws_{name}": value
        for name in ("access_key_id", "secret_access_key", "session_token")
        if (value := integration.secret(name)) is not None
    }
    return secrets, integration.profile


def aws_session(profile: str | None) -> AioSession:
    """A botocore session sharing the process's model loader (see ``_session``), for other AWS services."""
    return _session(profile)


def open_s3(loc: Location, driver: DriverConfig, integration: AwsIntegration | None) -> S3Store:
    """The registry's factory: credentials from the aws integration, else botocore's default chain."""
    secrets, profile = aws_credentials(integration)
    return S3Store(
        loc.bucket,
        loc.prefix,
        endpoint_url=driver.endpoint_url,
        region=driver.region,
        storage_class=driver.storage_class,
        access_key_id=secrets.get("aws_access_key_id"),
        secret_access_key=secrets.get("aws_secret_access_key"),
        session_token=secrets.get("aws_session_token"),
        profile=profile,
        connect_timeout=driver.connect_timeout,
        read_timeout=driver.read_timeout,
        list_concurrency=driver.list_concurrency,
    )
