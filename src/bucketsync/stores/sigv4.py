"""AWS Signature Version 4 for the S3 store's lean requests: GET and HEAD (no body), PUT of a buffered body,
and ListObjectsV2 (a GET with a query string).

botocore signs each request through an event chain, a request model and its own header
classes, and aiobotocore parses the answer the same way: 4 ms of CPU for one small ranged GET
on a loaded machine, most of what enriching an item cost (issue 8; 0.7-1 ms on this path).
This is the same algorithm over ``hashlib``/``hmac``, with the signing key (four HMACs)
cached per day, region, service and secret. Pure: no I/O, the time is an argument.
``tests/test_store_s3_reads.py`` checks its output against botocore's ``S3SigV4Auth``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
#: SHA-256 of an empty body: what a GET signs as its payload (valid on every S3 API, TLS or not)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def encode_key(key: str) -> str:
    """An object key as it goes into the request path, exactly as botocore serializes it for S3
    (and as S3 expects it in the canonical request: encoded once, ``/`` kept)."""
    return quote(key, safe="/~")


def encode_query(params: dict[str, str]) -> str:
    """A query string in SigV4's canonical form, which is also what is sent: names sorted, names
    and values percent-encoded except ``A-Z a-z 0-9 - _ . ~`` (so ``/`` and space are encoded)."""
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))


def amz_date(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


@dataclass(slots=True)
class Signer:
    """Signs requests for one region and service; the derived key is cached per day and secret."""

    region: str
    service: str = "s3"
    _key: tuple[str, str, bytes] = field(default=("", "", b""), repr=False)

    def signing_key(self, secret: str, day: str) -> bytes:
        cached_day, cached_secret, key = self._key
        if cached_day == day and hmac.compare_digest(cached_secret, secret):
            return key
        key = _hmac(("AWS4" + secret).encode(), day)
        for part in (self.region, self.service, "aws4_request"):
            key = _hmac(key, part)
        self._key = (day, secret, key)
        return key

    def sign(
        self,
        host: str,
        path: str,
        headers: dict[str, str],
        access_key: str,
        secret_key: str,
        token: str | None,
        now: float,
        method: str = "GET",
        payload: str = EMPTY_SHA256,
        query: str = "",
    ) -> dict[str, str]:
        """The headers of a signed ``GET host path?query`` (or ``method``), whose body has the
        SHA-256 ``payload`` (hex; none by default): ``headers`` (names in lower case, all signed)
        plus ``host``, ``x-amz-date``, ``x-amz-content-sha256``, the session token if any, and
        ``authorization``. ``path`` is already encoded (``encode_key``), ``query`` too (``encode_query``)."""
        stamp = amz_date(now)
        day = stamp[:8]
        signed = {
            **headers,
            "host": host,
            "x-amz-content-sha256": payload,
            "x-amz-date": stamp,
        }
        if token:
            signed["x-amz-security-token"] = token
        names = sorted(signed)
        canonical_headers = "".join(f"{n}:{' '.join(signed[n].split())}\n" for n in names)
        signed_names = ";".join(names)
        canonical = f"{method}\n{path}\n{query}\n{canonical_headers}\n{signed_names}\n{payload}"
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = f"{ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self.signing_key(secret_key, day), to_sign.encode(), hashlib.sha256).hexdigest()
        signed["authorization"] = (
            f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed_names}, Signature={signature}"
        )
        return signed


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()
