"""S3's lean path, without botocore: where requests go, the keys that sign them, a ListObjectsV2
page read by one regular expression, and an error answer read as botocore would.

``S3Store`` sends the requests (``S3Store._lean``: signed by ``sigv4``, on a pool of kept-alive
connections) and decides what an answer means (``translate``, the one place for that); what is
here reads and addresses, with no I/O. Azure's counterpart is ``azure_lean``.
"""

from __future__ import annotations

import functools
import http.client
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

import aiohttp
import yarl
from aiohttp.helpers import get_env_proxy_for_url

from bucketsync.core.model import normalize_etag
from bucketsync.stores import sigv4
from bucketsync.stores.lean import tag_text, unescape

#: (key, size, modified, etag) of one listed object, key relative to the bucket
Entry = tuple[str, int, float, str | None]


@dataclass(slots=True)
class Page:
    """One ListObjectsV2 page, reduced to what listing needs."""

    entries: list[Entry]
    folders: list[str]
    truncated: bool
    token: str | None
    server: str


def parse_list(body: bytes, server: str) -> Page:
    """A ListObjectsV2 response body -> ``Page``, as botocore would parse it (keys
    url-decoded when the server says it encoded them), minus the cost."""
    root = ET.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    decode = unquote_plus if root.findtext(f"{ns}EncodingType") == "url" else str
    key_tag, size_tag, modified_tag, etag_tag = (f"{ns}{t}" for t in ("Key", "Size", "LastModified", "ETag"))
    entries: list[Entry] = []
    for el in root.iterfind(f"{ns}Contents"):
        fields = {child.tag: child.text for child in el}
        entries.append(
            (
                decode(fields[key_tag] or ""),
                int(fields[size_tag] or 0),
                float(int(timestamp(fields[modified_tag] or ""))),
                normalize_etag(fields.get(etag_tag)),
            )
        )
    folders = [decode(el.findtext(f"{ns}Prefix") or "") for el in root.iterfind(f"{ns}CommonPrefixes")]
    truncated = (root.findtext(f"{ns}IsTruncated") or "").strip().lower() == "true"
    return Page(entries, folders, truncated, root.findtext(f"{ns}NextContinuationToken"), server)


#: an ``<ETag>``: the usual quoted hex (``&quot;md5&quot;``, ``&#34;md5-2&#34;``, bare quotes or
#: none) in the first group, already as ``normalize_etag`` leaves it; any other text in the second
_ETAG = r'<ETag>(?:(?:&quot;|&#34;|")?([0-9A-Za-z-]+)(?:&quot;|&#34;|")?|([^<]*))</ETag>'

#: one ``<Contents>`` element's fields as S3 and the servers we know write them; another
#: layout (other order, a namespace prefix, CDATA) goes to ``parse_list``
_CONTENTS = re.compile(
    r"<Contents>\s*<Key>([^<]*)</Key>\s*<LastModified>([^<]*)</LastModified>\s*" + _ETAG + r"\s*"
    r"(?:<Checksum\w*>[^<]*</Checksum\w*>\s*)*<Size>(\d+)</Size>"
)

#: the same fields as SeaweedFS writes them (Key, ETag, Size, then simple fields such as StorageClass, then
#: LastModified): without it every SeaweedFS page went to the XML parser, 12 ms a page on the event loop
_CONTENTS_KES = re.compile(
    r"<Contents>\s*<Key>([^<]*)</Key>\s*" + _ETAG + r"\s*<Size>(\d+)</Size>\s*"
    r"(?:<(\w+)>[^<]*</\5>\s*)*?<LastModified>([^<]*)</LastModified>"
)

_FOLDER = re.compile(r"<CommonPrefixes><Prefix>([^<]*)</Prefix></CommonPrefixes>")

#: an ETag that ``normalize_etag`` leaves as it is (no quotes, no ``W/``, no spaces)
_PLAIN_ETAG = re.compile(r"[0-9A-Za-z-]+").fullmatch


def listed_etag(text: str) -> str | None:
    """A listed ``<ETag>``'s text as ``normalize_etag`` leaves it: for the usual ``&quot;md5&quot;``
    (``&#34;`` on SeaweedFS, or bare quotes), the md5 itself, in one step instead of three."""
    for quote in ("&quot;", "&#34;", '"'):
        if text.startswith(quote) and text.endswith(quote) and _PLAIN_ETAG(inner := text[len(quote) : -len(quote)]):
            return inner
    if _PLAIN_ETAG(text):
        return text
    return normalize_etag(unescape(text))


def url_decode(text: str) -> str:
    """``unquote_plus`` (6 us a key) with the common cases first: ``+`` and an encoded ``/``."""
    if "+" in text:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    text = text.replace("%2F", "/")
    return unquote(text) if "%" in text else text


def scan_list(raw: bytes, server: str) -> Page:
    """``parse_list`` at a third of the cost: one regex over the page for the objects, plain
    string searches for the rest. It accepts only the usual layout and checks that it saw
    every ``<Contents>`` and ``<CommonPrefixes>``; anything else goes to the XML parser."""
    body = raw.decode("utf-8")
    if "<![CDATA[" in body or "<!ENTITY" in body:
        return parse_list(raw, server)
    url = tag_text(body, "EncodingType") == "url"
    esc = "&" in body  # entities anywhere (an ETag's &quot;): unescape every field
    entries: list[Entry] = []
    append = entries.append
    found = _CONTENTS.findall(body)
    if not found and "<Contents>" in body:
        found = [
            (key, modified, plain, etag, size) for key, plain, etag, size, _, modified in _CONTENTS_KES.findall(body)
        ]
    for key, modified, plain, etag, size in found:
        if esc:
            key, modified = unescape(key), unescape(modified)
        if url:
            key = url_decode(key)
        append((key, int(size), seconds(modified), plain or listed_etag(etag)))
    folders = [unescape(f) for f in _FOLDER.findall(body)]
    if url:
        folders = [url_decode(f) for f in folders]
    if len(entries) != body.count("<Contents>") or len(folders) != body.count("<CommonPrefixes>"):
        return parse_list(raw, server)  # a layout the scan does not know: the parser reads it all
    truncated = (tag_text(body, "IsTruncated") or "").strip().lower() == "true"
    return Page(entries, folders, truncated, tag_text(body, "NextContinuationToken"), server)


@functools.lru_cache(maxsize=4096)
def seconds(text: str) -> float:
    """A listed ``LastModified`` in whole seconds (as ``ObjectInfo.modified`` keeps it). Cached:
    objects written together share their timestamps, and a listing meets each many times."""
    return float(int(timestamp(text)))


def timestamp(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()  # 2024-05-01T12:00:00.000Z (Python >= 3.11)
    except ValueError:
        from botocore.utils import parse_timestamp

        return float(parse_timestamp(text).timestamp())  # whatever else botocore accepts


#: the key botocore presigns once to show where a store's reads go (never requested)
PROBE_KEY = "bucketsync-where-reads-go"

#: the query parameters of a presigned URL; any other means a layout the lean reads do not sign
_PRESIGN_PARAMS = frozenset(
    {
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
        "X-Amz-Security-Token",
    }
)

_DEFAULT_PORT = {"http": ":80", "https": ":443"}

_ERROR_FIELD = re.compile(r"<(Code|Message)>([^<]*)</\1>")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a store's lean requests go (endpoint, addressing style, signing region): as botocore
    resolved it (``from_presigned``), or as it would for an endpoint (``for_endpoint``)."""

    #: ``scheme://netloc`` of every read
    origin: str
    #: the ``Host`` header, as signed (no default port)
    host: str
    #: the encoded path before the key: ``/bucket/`` (path style) or ``/`` (virtual-hosted)
    path: str
    signer: sigv4.Signer
    #: the proxy from HTTP(S)_PROXY / NO_PROXY, as botocore honours them; looked up once here,
    #: not per request (aiohttp's ``trust_env`` asks a thread for it, and for .netrc, each time)
    proxy: yarl.URL | None = None
    proxy_auth: aiohttp.BasicAuth | None = None

    @classmethod
    def from_presigned(cls, url: str) -> Target | None:
        """From a GetObject URL botocore presigned for ``PROBE_KEY``; None when its layout is not
        the one ``sigv4`` signs (another algorithm, the key not at the end of the path, more query)."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        scope = (query.get("X-Amz-Credential") or [""])[0].split("/")
        suffix = "/" + PROBE_KEY
        if (
            query.get("X-Amz-Algorithm") != [sigv4.ALGORITHM]
            or len(scope) != 5
            or not set(query) <= _PRESIGN_PARAMS
            or not parts.path.endswith(suffix)
            or "@" in parts.netloc
        ):
            return None
        return cls._at(parts.scheme, parts.netloc, parts.path[: -len(PROBE_KEY)], sigv4.Signer(scope[2], scope[3]))

    @classmethod
    def for_endpoint(cls, endpoint_url: str, bucket: str, region: str) -> Target | None:
        """Where a path-style client of ``endpoint_url`` sends requests for ``bucket``, signed for
        ``region``: what ``from_presigned`` learns from botocore there (a test holds the two
        equal), without loading it. None for an endpoint botocore would read otherwise."""
        parts = urlsplit(endpoint_url)
        if parts.scheme not in _DEFAULT_PORT or not parts.hostname or "@" in parts.netloc or parts.query:
            return None
        if parts.fragment or not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", bucket):
            return None
        path = parts.path.rstrip("/") + f"/{bucket}/"
        return cls._at(parts.scheme, parts.netloc, path, sigv4.Signer(region, "s3"))

    @classmethod
    def _at(cls, scheme: str, netloc: str, path: str, signer: sigv4.Signer) -> Target:
        host = netloc
        default = _DEFAULT_PORT.get(scheme, "")
        if default and host.endswith(default):
            host = host[: -len(default)]
        origin = f"{scheme}://{netloc}"
        try:
            proxy, proxy_auth = get_env_proxy_for_url(yarl.URL(origin))
        except LookupError:
            proxy, proxy_auth = None, None
        return cls(origin, host, path, signer, proxy, proxy_auth)


@dataclass(frozen=True, slots=True)
class StaticKeys:
    """Keys that never change (the store's own), shaped as botocore's frozen credentials."""

    access_key: str
    secret_key: str
    token: str | None

    async def get_frozen_credentials(self) -> StaticKeys:
        return self


def status_answer(status: int, body: bytes) -> dict[str, Any]:
    """What botocore's parser makes of an S3 error answer (a ``ClientError``'s ``response``), for
    ``s3._translate_answer``: the ``Code`` and ``Message`` of its XML body, or the bare status when
    there is none (as botocore)."""
    fields = dict(_ERROR_FIELD.findall(body.decode("utf-8", "replace")))
    code = unescape(fields.get("Code", "")) or str(status)
    message = unescape(fields.get("Message", "")) or http.client.responses.get(status, "")
    return {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
