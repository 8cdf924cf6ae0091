"""Driver URLs: one parser, so config validation and the store registry agree."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az", "azure": "az", "file": "file", "mem": "mem"}
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_AZ_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")


@dataclass(frozen=True, slots=True)
class Location:
    """A parsed driver URL.

    ``scheme`` is canonical (``s3``, ``gs``, ``az``, ``file``, ``mem``). ``bucket``
    is the bucket, the Azure container, or the memory store's name; ``account``
    the Azure storage account; ``path`` the absolute local folder. ``prefix`` is
    empty or ends with ``/``; keys are relative to it.
    """

    scheme: str
    bucket: str = ""
    prefix: str = ""
    account: str = ""
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        if self.scheme == "az":
            return f"az://{self.account}/{self.bucket}/{self.prefix}"
        return f"{self.scheme}://{self.bucket}/{self.prefix}"


def _prefix(raw: str) -> str:
    raw = raw.lstrip("/")
    if not raw:
        return ""
    parts = raw.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"prefix {raw!r} has an empty, '.' or '..' segment")
    return "/".join(parts) + "/"


def parse_location(url: str) -> Location:
    """Parse a driver URL or raise ValueError with a message naming what is wrong."""
    scheme, sep, _ = url.partition(":")
    canonical = SCHEMES.get(scheme.lower()) if sep else None
    if canonical is None:
        raise ValueError(
            f"unsupported URL {url!r}: expected one of s3://, gs://, gcs://, az://, azure://, file://, mem://"
        )
    if canonical == "file":
        rest = url[len(scheme) + 1 :]
        if rest.startswith("//"):
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"file URL {url!r} names a host; use file:///absolute/path")
            path = unquote(parts.path)
        else:  # file:relative/path, resolved against the working directory
            path = os.path.abspath(unquote(rest))
        if not path.startswith("/"):
            raise ValueError(f"file URL {url!r} needs an absolute path (file:///abs/path)")
        return Location("file", path=os.path.normpath(path))
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"URL {url!r} must not have a query or fragment")
    host = parts.netloc
    if canonical == "mem":
        if not host:
            raise ValueError(f"memory URL {url!r} needs a name: mem://NAME")
        return Location("mem", bucket=host, prefix=_prefix(unquote(parts.path)))
    if canonical == "az":
        segs = unquote(parts.path).lstrip("/").split("/", 1)
        if not _AZ_ACCOUNT.match(host):
            raise ValueError(f"Azure URL {url!r}: account {host!r} must be 3-24 lowercase letters or digits")
        if not segs[0]:
            raise ValueError(f"Azure URL {url!r} needs a container: az://ACCOUNT/CONTAINER/prefix")
        return Location("az", account=host, bucket=segs[0], prefix=_prefix(segs[1] if len(segs) > 1 else ""))
    if not _BUCKET.match(host):
        raise ValueError(f"URL {url!r}: {host!r} is not a valid bucket name")
    return Location(canonical, bucket=host, prefix=_prefix(unquote(parts.path)))
