"""Google Cloud Storage store (``gs://bucket/prefix``, also ``gcs://``) on gcloud-aio-storage.

gcloud-aio-storage gives us the endpoint handling, credentials (service account,
application default credentials, the GCE metadata server) and the list, get and
delete calls. Uploads are done here on the same aiohttp session, because the
library's ``upload`` needs the whole body as a seekable file and retries on its own:

- a body of at most ``UPLOAD_CHUNK`` bytes (8 MiB) is buffered and sent as one
  multipart upload (metadata + media), which every server checks preconditions on;
- a larger body goes through a resumable upload session in 8 MiB chunks, so a
  multi-GB put never holds more than about one chunk in memory.

Etags: the object's ``md5Hash`` (base64, as GCS reports it). It names the content,
so a copy or rename keeps it and a metadata-only change does not alter it.
Composite objects have no MD5; for them the object's ``etag`` is used. ``list``,
``head`` and ``put`` all read the same resource fields, so they always agree.
The version is the object's generation; GCS preconditions are on generation, so
an if-match put or delete reads the generation that goes with the etag first.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import functools
import hashlib
import io
import json
import mimetypes
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

import aiohttp

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
from bucketsync.core.keys import indexable
from bucketsync.core.location import Location
from bucketsync.core.model import OVERWRITE, ObjectInfo, PutMode, normalize_etag
from bucketsync.core.retry import retrying
from bucketsync.stores import check_page
from bucketsync.stores.parallel import (
    PARTS_PER_LISTER,
    SPLIT_LEVELS,
    Cut,
    gather_bounded,
    in_order,
    range_parts,
)

if TYPE_CHECKING:
    from gcloud.aio.auth import Token

    from bucketsync.config import DriverConfig, GcpIntegration

T = TypeVar("T")

DEFAULT_API_ROOT = "https://storage.googleapis.com"
# read_write covers list, get, create and delete; full_control (the library's
# default) would also allow changing ACLs, which bucketsync never does.
SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
UPLOAD_CHUNK = 8 << 20  # a multiple of 256 KiB, as resumable uploads require
READ_CHUNK = 1 << 20


def client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    """No total timeout: a multi-GB download or upload may take as long as it takes;
    a stalled connection is caught by the per-request connect and per-read timeouts."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)


TIMEOUT = client_timeout(5.0, 30.0)  # the defaults of a driver's connect_timeout / read_timeout
_FIELDS = "name,size,updated,md5Hash,etag,generation"
_LIST_FIELDS = f"items({_FIELDS}),nextPageToken"
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SDK_ERRORS = (aiohttp.ClientError, TimeoutError)


# --- errors ---------------------------------------------------------------------------------------


def _detail(exc: aiohttp.ClientResponseError) -> str:
    """Google's own error message (``error.message`` of the JSON body), short.

    gcloud-aio-auth puts ``"<reason>: <body>"`` in ``exc.message``. The body names
    the bucket, the object or the principal, never a token. We take only the
    message and never ``exc.request_info``, whose headers carry the bearer token.
    """
    text = exc.message or ""
    _, _, body = text.partition(": ")
    with contextlib.suppress(ValueError, KeyError, TypeError):
        text = str(json.loads(body)["error"]["message"]) or text
    text = " ".join(text.split())
    return text[:300]


def _is_google_error(exc: aiohttp.ClientResponseError) -> bool:
    """Whether the error body is the JSON API's ``{"error": {...}}``."""
    _, _, body = (exc.message or "").partition(": ")
    try:
        return isinstance(json.loads(body).get("error"), dict)
    except (ValueError, AttributeError):
        return False


def _connector_reason(exc: aiohttp.ClientConnectorError) -> str:
    # The host and port, and the OS's words (no request info: it carries the token).
    return f"{exc.host}:{exc.port}: {exc.os_error.strerror or type(exc.os_error).__name__}"


def translate(exc: BaseException, what: str, *, key: str | None = None, create: bool = False) -> StorageError:
    """The one mapping from aiohttp / gcloud-aio errors to bucketsync's hierarchy.

    ``what`` names the operation and the object (``"put gs://b/p/k"``); ``create``
    says the call was a create-only write, where 409 and 412 mean "already there".
    Callers raise the result ``from None`` so the SDK exception (and the
    ``Authorization`` header in its request info) is not chained into logs.
    """
    if isinstance(exc, aiohttp.ClientResponseError):
        status = exc.status
        msg = f"{what}: HTTP {status}: {_detail(exc)}"
        if (
            what.startswith("list ")
            and 400 <= status < 500
            and status not in _TRANSIENT_STATUS
            and not (_is_google_error(exc))
        ):
            # objects.list answers errors with a JSON body; anything else is not the JSON API.
            # (Only listings: a media download's 404 may be plain text on the real service.)
            return BadEndpoint(f"{what}: HTTP {status}: the endpoint does not answer as the GCS JSON API", key=key)
        if status == 404:
            return NotFound(msg, key=key)
        if status in (401, 403):
            return PermissionDenied(msg, key=key)
        if status in (409, 412) and create:
            return AlreadyExists(f"{what}: already exists", key=key)
        if status == 412:
            return PreconditionFailed(f"{what}: changed in storage (generation mismatch)", key=key)
        if status in _TRANSIENT_STATUS:
            return Transient(msg, key=key)
        return StorageError(msg, key=key)
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts subclass it too
        return Transient(f"{what}: timed out", key=key)
    if isinstance(exc, aiohttp.ClientConnectorError):  # DNS failure, connection refused, connect timeout
        return Unreachable(f"{what}: storage is unreachable ({_connector_reason(exc)})", key=key)
    if isinstance(exc, aiohttp.ClientError):  # connection reset, payload cut short, ...
        return Transient(f"{what}: {type(exc).__name__}", key=key)
    return StorageError(f"{what}: {type(exc).__name__}", key=key)


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    """Like gcloud-aio-auth's check, so ``translate`` sees the same error shape."""
    if resp.status >= 400:
        body = await resp.text(errors="replace")
        resp.release()
        raise aiohttp.ClientResponseError(
            resp.request_info, resp.history, status=resp.status, message=f"{resp.reason}: {body}"
        )


# --- credentials and endpoint ---------------------------------------------------------------------


@functools.cache
def _token_class() -> type[Token]:
    """gcloud-aio-auth's Token, fetching once per call: bucketsync's ``retrying`` is the retry policy.

    The library retries a failed token fetch 5 times with waits of up to 60 s (tenacity); calling
    the undecorated method keeps the behaviour ours. Made on first use: gcloud-aio (and the JWT and
    cryptography libraries under it) is imported only by a driver that needs a token or the SDK's
    calls, not by every start (0.1-0.2 s); a listing goes through ``_request``.
    """
    from gcloud.aio.auth import Token

    class _Token(Token):
        # The library's signature, hence the timeout argument and the override.
        async def acquire_access_token(self, timeout: int = 10) -> None:  # type: ignore[override]
            await getattr(Token.acquire_access_token, "__wrapped__")(self, timeout)  # noqa: B009

    return _Token


def endpoint(endpoint_url: str | None) -> tuple[str, bool]:
    """(API root, emulator?) — an emulator gets no credentials at all.

    ``endpoint_url`` wins over ``STORAGE_EMULATOR_HOST``. A plain ``http://``
    endpoint is treated as an emulator: a bearer token is never sent in clear text.
    """
    if endpoint_url:
        return endpoint_url.rstrip("/"), endpoint_url.startswith("http://")
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        root = host if host.startswith(("http://", "https://")) else f"http://{host}"
        return root.rstrip("/"), True
    return DEFAULT_API_ROOT, False


def service_file(integration: GcpIntegration | None, name: str) -> str | IO[str] | None:
    """What gcloud-aio-auth's Token reads: a path, the JSON itself, or None for ADC."""
    if integration is None:
        return None
    if integration.service_account_file is not None:
        return str(integration.service_account_file)
    raw = integration.secret("service_account_json")  # reads service_account_json_file if given
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        # Never echo the text: it is a private key.
        raise ConfigError(f"integrations.{name}.service_account_json: not valid JSON") from None
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(f"integrations.{name}.service_account_json: not a Google credentials file (no 'type')")
    return io.StringIO(raw)


def _make_token(source: str | IO[str] | None, session: Any, field: str) -> Token:
    # ``session`` is our aiohttp.ClientSession; the library annotates it as a union
    # that mypy resolves to requests' Session, hence Any.
    try:
        return _token_class()(service_file=cast(Any, source), scopes=SCOPES, session=session)
    except (OSError, ValueError, KeyError) as exc:
        where = f" {source!r}" if isinstance(source, str) else ""
        reason = getattr(exc, "strerror", None) or "not a usable Google credentials file"
        # Only the path and the reason: the exception text could quote the file.
        raise ConfigError(f"{field}: cannot use the credentials{where}: {type(exc).__name__}: {reason}") from None


def _credentials_field(integration: GcpIntegration | None, name: str | None) -> str:
    """Which setting the credentials came from, for error messages."""
    if integration is None or name is None:
        return "application default credentials"
    if integration.service_account_file is not None:
        return f"integrations.{name}.service_account_file"
    if integration.service_account_json is not None or integration.service_account_json_file is not None:
        return f"integrations.{name}.service_account_json"
    return f"integrations.{name} (application default credentials)"


def _token_error(exc: BaseException, token: Token, what: str) -> StorageError:
    from gcloud.aio.auth.token import Type as TokenType

    err = translate(exc, what)
    if isinstance(exc, aiohttp.ClientConnectorError) and token.token_type == TokenType.GCE_METADATA:
        # No key and no ADC file: the library fell back to the GCE metadata server,
        # which does not exist off Google Cloud. Say so instead of "connection error".
        return PermissionDenied(
            f"{what}: no credentials: no service account in the integration, no application default "
            "credentials (GOOGLE_APPLICATION_CREDENTIALS or gcloud's file), and no GCE metadata server"
        )
    if not isinstance(err, Transient):  # 400 invalid_grant, 401 ... from the token endpoint
        return PermissionDenied(str(err))
    return err


# --- resources ------------------------------------------------------------------------------------


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def object_info(key: str, res: Mapping[str, Any]) -> ObjectInfo:
    """A GCS object resource as bucketsync sees it (see the module docstring on etags)."""
    generation = res.get("generation")
    return ObjectInfo(
        key=key,
        size=int(res.get("size", 0)),
        modified=_ts(res["updated"]),
        # Resource fields, not HTTP headers: base64 that may start with "W/" (see normalize_etag).
        etag=normalize_etag(res.get("md5Hash") or res.get("etag"), origin="hash"),
        version=str(generation) if generation is not None else None,
    )


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _multipart(metadata: Mapping[str, Any], data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = os.urandom(16).hex()
    head = (
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json.dumps(metadata)}\r\n"
        f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/related; boundary={boundary}"


# --- the store ------------------------------------------------------------------------------------


class GcsStore:
    conditional_writes = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        integration: GcpIntegration | None = None,
        integration_name: str | None = None,
        storage_class: str | None = None,
        page_size: int = 1000,
        list_concurrency: int = 8,
        timeout: aiohttp.ClientTimeout = TIMEOUT,
    ) -> None:
        # "service_account_file and _json together" is refused by config validation.
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"gs://{bucket}/{prefix}"
        self.page_size = page_size
        #: list requests in flight at once (``stores.parallel``); 1 lists one page after another
        self.list_concurrency = max(1, list_concurrency)
        self.storage_class = storage_class
        self.timeout = timeout
        self._api_root, self._emulator = endpoint(endpoint_url)
        self._integration = integration
        self._integration_name = integration_name
        self._session: aiohttp.ClientSession | None = None
        self._token: Token | None = None
        self._storage: Any = None  # gcloud.aio.storage.Storage; Any at the SDK boundary

    # -- plumbing

    def _where(self, key: str = "") -> str:
        return f"{self.url}{key}"

    async def _http(self) -> aiohttp.ClientSession:
        """The session (and the token, when there is one), created on first use (the factory is
        sync; aiohttp needs a loop)."""
        if self._session is None:
            session = aiohttp.ClientSession(timeout=self.timeout)
            try:
                if not self._emulator:
                    source = service_file(self._integration, self._integration_name or "")
                    field = _credentials_field(self._integration, self._integration_name)
                    self._token = _make_token(source, session, field)
            except BaseException:
                await session.close()
                raise
            self._session = session
        return self._session

    async def _client(self) -> Any:
        """The Storage client, created on first use, on the store's session."""
        if self._storage is None:
            session = await self._http()
            from gcloud.aio.storage import Storage

            # An emulator gets a token that is never asked for: Storage calls the
            # token only outside dev mode, and building a real one would read
            # GOOGLE_APPLICATION_CREDENTIALS for nothing.
            self._storage = Storage(
                token=self._token or _UNUSED_TOKEN,
                session=cast(Any, session),  # see _make_token
                api_root=self._api_root,
                api_is_dev=self._emulator,
            )
        return self._storage

    async def _auth(self) -> dict[str, str]:
        """Authorization headers, fetching (or refreshing) the token under our retry policy.

        gcloud-aio-storage asks the same Token before each request; having fetched
        it here first, it finds it cached.
        """
        if self._token is None:
            return {}
        token = self._token
        what = f"get a Google access token for {self.url}"

        async def get() -> str | None:
            try:
                return await token.get()
            except _SDK_ERRORS as exc:
                raise _token_error(exc, token, what) from None
            except (ValueError, KeyError, RuntimeError) as exc:  # malformed key, unknown credential type
                raise PermissionDenied(f"{what}: {type(exc).__name__}") from None

        value = await retrying(get)
        return {"Authorization": f"Bearer {value}"} if value else {}

    async def _call(
        self, call: Callable[[Any], Awaitable[T]], what: str, *, key: str | None = None, create: bool = False
    ) -> T:
        """One idempotent SDK call with translated errors, retried on Transient."""
        storage = await self._client()

        async def once() -> T:
            await self._auth()  # refreshes the cached token under our policy before the SDK asks for it
            try:
                return await call(storage)
            except _SDK_ERRORS as exc:
                raise translate(exc, what, key=key, create=create) from None

        return await retrying(once)

    async def _retry(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """One idempotent request of our own (``_request``), errors translated, retried on Transient."""

        async def once() -> T:
            try:
                return await call()
            except _SDK_ERRORS as exc:
                raise translate(exc, what) from None

        return await retrying(once)

    async def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        data: bytes | str | None = None,
    ) -> aiohttp.ClientResponse:
        """A raw request on the store's session (uploads); raises like the SDK does.

        Bytes go in a fresh BytesIO per request: aiohttp then writes large bodies
        without blocking the loop, and a retried request re-reads from the start.
        """
        session = await self._http()
        resp = await session.request(
            method,
            url,
            params=params,
            headers={**(await self._auth()), **(headers or {})},
            data=io.BytesIO(data) if isinstance(data, bytes) else data,
            # A resumable chunk answers 308 "Resume Incomplete"; it is not a redirect.
            allow_redirects=False,
        )
        await _raise_for_status(resp)
        return resp

    # -- reads

    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        return self.list_split(prefix, ())

    async def list_split(self, prefix: str, splits: Sequence[str]) -> AsyncIterator[ObjectInfo]:
        """``list``, cut into parts listed ``list_concurrency`` at a time (``stores.parallel``):
        the part between two split points is ``startOffset`` (inclusive) to ``endOffset``
        (exclusive). Without split points (``splits``, keys relative to the driver), a listing
        longer than one page is cut at the folders of its first levels."""
        async for page in self.list_pages(prefix, splits):
            for info in page:
                yield info

    async def list_pages(
        self, prefix: str = "", splits: Sequence[str] = ()
    ) -> AsyncIterator[builtins.list[ObjectInfo]]:
        """``list_split`` a page at a time (``PagedListing``, for ``diff_pages``): one list per
        objects.list page, checked and converted in a few passes, with no generator per object."""
        full = self.prefix + prefix
        plen = len(self.prefix)
        last: str | None = None
        async for page in self._pages(full, [self.prefix + s for s in splits]):
            if not page:
                continue
            # GCS sorts by UTF-8 bytes, which is code point order
            last = check_page(self.url, [res["name"] for res in page], last, full)
            yield [object_info(key, res) for res in page if indexable(key := res["name"][plen:])]

    async def _pages(self, prefix: str, splits: builtins.list[str]) -> AsyncIterator[builtins.list[dict[str, Any]]]:
        width = self.list_concurrency
        first: dict[str, Any] | None = None
        discover = None
        if not splits and width > 1:
            first = await self._list_page(self._list_params(prefix))
            if not first.get("nextPageToken"):  # one page is the whole listing
                yield first.get("items") or []
                return
            discover = functools.partial(self._discover_splits, prefix)
        parts = range_parts(functools.partial(self._range_pages, prefix), splits, prefix, width, first, discover)
        async for page in in_order(parts, width):
            yield page

    def _list_params(self, prefix: str, **extra: str) -> dict[str, str]:
        params = {"maxResults": str(self.page_size), "fields": _LIST_FIELDS, **extra}
        if prefix:
            params["prefix"] = prefix
        return params

    async def _range_pages(
        self,
        prefix: str,
        lo: str | None,
        hi: str | None,
        first: dict[str, Any] | None = None,
        cut: Cut | None = None,
    ) -> AsyncIterator[builtins.list[dict[str, Any]]]:
        """The objects named in ``[lo, hi)`` (None: unbounded), a page at a time; with ``cut``,
        ``hi`` is decided while the part lists (``parallel.cut_parts``): its pages go on with the
        first page's parameters, since a page token only holds for the request that gave it."""
        bounds = {k: v for k, v in (("startOffset", lo), ("endOffset", hi)) if v is not None}
        params = self._list_params(prefix, **bounds)
        page = first if first is not None else await self._list_page(dict(params))
        while True:
            items: builtins.list[dict[str, Any]] = page.get("items") or []
            # A server that ignores the offsets costs pages, never correctness.
            if lo is not None and items and items[0]["name"] < lo:
                items = [i for i in items if i["name"] >= lo]
            if cut is not None:
                hi = cut.upto
            if hi is not None and items and items[-1]["name"] >= hi:
                yield [i for i in items if i["name"] < hi]
                return
            if cut is not None and items:
                cut.seen = items[-1]["name"]
            yield items
            token = page.get("nextPageToken")
            if not token:
                return
            params["pageToken"] = token
            page = await self._list_page(dict(params))

    async def _discover_splits(self, prefix: str) -> builtins.list[str]:
        """Split points for a listing with no history: the folders of its first levels."""
        level = [prefix]
        found: builtins.list[str] = []
        want = self.list_concurrency * PARTS_PER_LISTER
        for _ in range(SPLIT_LEVELS):
            pages = await gather_bounded(
                [
                    functools.partial(
                        self._list_page, self._list_params(p, delimiter="/", fields="prefixes,nextPageToken")
                    )
                    for p in level
                ],
                self.list_concurrency,
            )
            found = sorted({f for page in pages for f in page.get("prefixes") or ()})
            if len(found) >= want // 2 or not found:
                break
            level = found[:want]
        return found

    async def _list_page(self, params: dict[str, str]) -> dict[str, Any]:
        """One objects.list page: the request gcloud-aio-storage's ``list_objects`` sends, on the same
        session with the same token, without loading the library for it (see ``_token_class``)."""
        url = f"{self._api_root}/storage/v1/b/{self.bucket}/o"
        what = f"list {self.url}"

        async def get() -> dict[str, Any]:
            resp = await self._request("GET", url, params=params)
            try:
                got: dict[str, Any] = await resp.json(content_type=None)
            except ValueError:  # not JSON
                raise BadEndpoint(f"{what}: the endpoint does not answer as the GCS JSON API (not JSON)") from None
            finally:
                resp.release()
            return got

        try:
            page: dict[str, Any] = await self._retry(get, what)
        except NotFound:
            # objects.list answers 404 only when the bucket is missing: an error, never an empty listing.
            raise NotFound(f"list {self.url}: bucket {self.bucket!r} does not exist") from None
        return page

    async def head(self, key: str) -> ObjectInfo:
        name = self.prefix + key
        res: dict[str, Any] = await self._call(
            lambda s: s.download_metadata(self.bucket, name, timeout=self.timeout), f"head {self._where(key)}", key=key
        )
        return object_info(key, res)

    async def content_md5(self, key: str) -> tuple[ObjectInfo, bytes | None]:
        """The object and its ``md5Hash`` (composite objects have none)."""
        name = self.prefix + key
        res: dict[str, Any] = await self._call(
            lambda s: s.download_metadata(self.bucket, name, timeout=self.timeout), f"head {self._where(key)}", key=key
        )
        md5 = res.get("md5Hash")
        try:
            digest = base64.b64decode(md5, validate=True) if md5 else None
        except ValueError:
            digest = None
        return object_info(key, res), digest if digest is not None and len(digest) == 16 else None

    async def open(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        what = f"read {self._where(key)}"
        name = self.prefix + key
        headers = None
        if offset or length is not None:
            headers = {"Range": f"bytes={offset}-{'' if length is None else offset + length - 1}"}
        stream = await self._call(
            lambda s: s.download_stream(self.bucket, name, headers=headers, timeout=self.timeout), what, key=key
        )
        async with stream:
            while True:
                try:
                    chunk: bytes = await stream.read(READ_CHUNK)
                except _SDK_ERRORS as exc:
                    # Mid-body failures are not retried here: the caller restarts the read.
                    raise translate(exc, what, key=key) from None
                if not chunk:
                    return
                yield chunk

    # -- writes

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        mode: PutMode = OVERWRITE,
        content_type: str | None = None,
    ) -> ObjectInfo:
        ctype = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        generation = await self._precondition(key, mode)
        ait = aiter(chunks)
        buf = bytearray()
        # Read one byte past a chunk before choosing: a body of exactly UPLOAD_CHUNK stays small.
        while len(buf) <= UPLOAD_CHUNK:
            chunk = await anext(ait, None)
            if chunk is None:
                return await self._put_small(key, bytes(buf), ctype, mode, generation)
            buf += chunk
        if mode.create:
            # Fail before sending gigabytes. GCS also checks ifGenerationMatch=0 when the
            # session completes; fake-gcs-server does not check it on resumable uploads.
            await self._check_absent(key)
        return await self._put_resumable(key, buf, ait, ctype, mode, generation)

    async def _precondition(self, key: str, mode: PutMode) -> str | None:
        """The ifGenerationMatch value for ``mode``: "0" for create-only, the current generation for if-match."""
        if mode.create:
            return "0"
        if mode.if_match is None:
            return None
        try:
            current = await self.head(key)
        except NotFound:
            raise PreconditionFailed(f"put {self._where(key)}: no longer exists (etag mismatch)", key=key) from None
        if current.etag != mode.if_match or current.version is None:
            raise PreconditionFailed(f"put {self._where(key)}: changed in storage (etag mismatch)", key=key)
        return current.version

    async def _check_absent(self, key: str) -> None:
        try:
            await self.head(key)
        except NotFound:
            return
        raise AlreadyExists(f"put {self._where(key)}: already exists", key=key)

    def _metadata(self, key: str, ctype: str) -> dict[str, str]:
        meta = {"name": self.prefix + key, "contentType": ctype}
        if self.storage_class:
            meta["storageClass"] = self.storage_class
        return meta

    def _upload_params(self, upload_type: str, generation: str | None) -> dict[str, str]:
        params = {"uploadType": upload_type, "fields": _FIELDS}
        if generation is not None:
            params["ifGenerationMatch"] = generation
        return params

    async def _put_small(self, key: str, data: bytes, ctype: str, mode: PutMode, generation: str | None) -> ObjectInfo:
        """One multipart upload: fake-gcs-server enforces ifGenerationMatch only on this kind."""
        what = f"put {self._where(key)}"
        body, body_type = _multipart(self._metadata(key, ctype), data, ctype)
        url = f"{self._api_root}/upload/storage/v1/b/{self.bucket}/o"
        params = self._upload_params("multipart", generation)
        attempts = 0

        async def upload(_: Any) -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            resp = await self._request("POST", url, params=params, data=body, headers={"Content-Type": body_type})
            res: dict[str, Any] = await resp.json(content_type=None)
            return res

        try:
            res = await self._call(upload, what, key=key, create=mode.create)
        except (AlreadyExists, PreconditionFailed):
            if attempts > 1 and (ours := await self._landed(key, data)) is not None:
                return ours
            raise
        return object_info(key, res)

    async def _landed(self, key: str, data: bytes) -> ObjectInfo | None:
        """After a retried conditional put failed its precondition: did our first attempt land?

        When an attempt succeeds but its response is lost (a reset, a timeout), the
        retry finds the object already written, by us. If storage holds exactly our
        bytes, the put succeeded; otherwise the conflict is real.
        """
        try:
            current = await self.head(key)
        except NotFound:
            return None
        return current if current.etag == _md5(data) else None

    async def _put_resumable(
        self,
        key: str,
        buf: bytearray,
        ait: AsyncIterator[bytes],
        ctype: str,
        mode: PutMode,
        generation: str | None,
    ) -> ObjectInfo:
        what = f"put {self._where(key)}"
        session_uri = await self._call(
            lambda _: self._start_session(key, ctype, generation), what, key=key, create=mode.create
        )
        offset = 0
        done = False
        try:
            while True:
                while len(buf) <= UPLOAD_CHUNK and not done:
                    chunk = await anext(ait, None)
                    if chunk is None:
                        done = True
                    else:
                        buf += chunk
                if done and len(buf) <= UPLOAD_CHUNK:  # the last chunk: at least one byte, by construction
                    total = offset + len(buf)
                    res = await self._send_chunk(session_uri, bytes(buf), offset, total, what, key, mode)
                    assert res is not None
                    return object_info(key, res)
                await self._send_chunk(session_uri, bytes(buf[:UPLOAD_CHUNK]), offset, None, what, key, mode)
                del buf[:UPLOAD_CHUNK]
                offset += UPLOAD_CHUNK
        except BaseException:
            await self._cancel_session(session_uri)
            raise

    async def _start_session(self, key: str, ctype: str, generation: str | None) -> str:
        url = f"{self._api_root}/upload/storage/v1/b/{self.bucket}/o"
        resp = await self._request(
            "POST",
            url,
            params=self._upload_params("resumable", generation),
            data=json.dumps(self._metadata(key, ctype)),
            headers={"Content-Type": "application/json; charset=UTF-8", "X-Upload-Content-Type": ctype},
        )
        resp.release()
        location = resp.headers.get("Location")
        if not location:
            raise StorageError(f"put {self._where(key)}: the server started no upload session", key=key)
        return location

    async def _send_chunk(
        self,
        session_uri: str,
        data: bytes,
        offset: int,
        total: int | None,
        what: str,
        key: str,
        mode: PutMode,
    ) -> dict[str, Any] | None:
        """PUT one chunk; the object resource when ``total`` is given (the last chunk).

        Not retried: resending a chunk safely needs a status query first, and
        fake-gcs-server appends resent bytes and treats the query as completion,
        so that path could not be tested. A failed chunk fails the put
        (``Transient`` for network trouble) and the outbox retries the whole op.
        """
        end = offset + len(data) - 1
        size = "*" if total is None else str(total)
        try:
            resp = await self._request(
                "PUT", session_uri, data=data, headers={"Content-Range": f"bytes {offset}-{end}/{size}"}
            )
            if total is None:
                resp.release()
                if resp.status != 308:
                    raise StorageError(f"{what}: upload session ended early (HTTP {resp.status})", key=key)
                return None
            res: dict[str, Any] = await resp.json(content_type=None)
            return res
        except _SDK_ERRORS as exc:
            raise translate(exc, what, key=key, create=mode.create) from None

    async def _cancel_session(self, session_uri: str) -> None:
        """Best effort: an abandoned session would otherwise linger for a week (it never becomes an object)."""
        try:
            resp = await self._request("DELETE", session_uri)
            resp.release()
        except (*_SDK_ERRORS, StorageError):
            pass  # 499 is GCS's normal answer to a cancel

    async def delete(self, key: str, if_match: str | None = None) -> None:
        what = f"delete {self._where(key)}"
        params: dict[str, str] = {}
        if if_match is not None:
            try:
                current = await self.head(key)
            except NotFound:
                return
            if current.etag != if_match or current.version is None:
                raise PreconditionFailed(f"{what}: changed in storage (etag mismatch)", key=key)
            params["ifGenerationMatch"] = current.version
        name = self.prefix + key
        try:
            await self._call(lambda s: s.delete(self.bucket, name, params=params, timeout=self.timeout), what, key=key)
        except NotFound:
            return  # idempotent: already gone (also after a retry whose first attempt landed)

    async def aclose(self) -> None:
        session, self._session, self._storage, self._token = self._session, None, None, None
        if session is not None:
            await session.close()


# Storage(token=None) would build a real Token; in dev mode it is never called.
_UNUSED_TOKEN: Any = object()


def open_gcs(loc: Location, driver: DriverConfig, integration: GcpIntegration | None) -> GcsStore:
    return GcsStore(
        loc.bucket,
        loc.prefix,
        endpoint_url=driver.endpoint_url,
        integration=integration,
        integration_name=driver.integration,
        storage_class=driver.storage_class,
        list_concurrency=driver.list_concurrency,
        timeout=client_timeout(driver.connect_timeout, driver.read_timeout),
    )
