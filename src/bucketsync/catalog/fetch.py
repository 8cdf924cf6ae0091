"""SSRF-safe server-side fetches of URLs: a linked item's content, a CSV ``upload`` row.

The agent runs next to things an outside URL must never reach through it: its own API on
loopback, the cloud's metadata service (169.254.169.254 hands out credentials), private
networks. So a fetch (invariant 14):

- takes ``https://`` only, unless ``[links] allow_http``;
- refuses loopback, private, link-local, multicast, unspecified, reserved and metadata-service
  addresses, unless a network in ``[links] allow`` holds the address;
- resolves the name ONCE, checks every address it got, and connects to the checked one (a
  resolver that answers aiohttp with that address only): a second lookup, which a rebinding
  DNS server would answer with 127.0.0.1, never happens. TLS still checks the certificate
  against the name (SNI and Host are the URL's);
- follows redirects itself, each target checked again as a new URL, at most
  ``max_redirects``;
- reads at most ``max_bytes`` and takes at most ``timeout`` seconds, redirects included.

The checks (:func:`check_url`, :func:`classify`, :func:`check_address`) are pure; the I/O is
in :func:`fetch`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from bucketsync import metrics
from bucketsync.core.errors import FetchRefused

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: cloud metadata services: AWS/GCP/Azure/OpenStack, AWS over IPv6, ECS task credentials, Alibaba
METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class Policy:
    """What a fetch may reach; ``Policy.of(settings.links)`` builds it from the config."""

    allow: tuple[Network, ...] = ()
    allow_http: bool = False
    max_bytes: int = 1024 * 1024 * 1024
    timeout: float = 60.0
    max_redirects: int = 5
    ca_file: Path | None = None

    @classmethod
    def of(cls, conf: Any) -> Policy:
        return cls(
            allow=tuple(ipaddress.ip_network(n, strict=False) for n in conf.allow),
            allow_http=conf.allow_http,
            max_bytes=conf.max_bytes,
            timeout=conf.timeout,
            max_redirects=conf.max_redirects,
            ca_file=conf.ca_file,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL: its scheme, host (a name or an address literal, no brackets) and port."""

    url: str
    scheme: str
    host: str
    port: int

    @property
    def literal(self) -> IP | None:
        if not (self.host[:1].isdigit() or ":" in self.host):  # a name: spare the failing parse (CSV rows)
            return None
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None


# -- pure checks -------------------------------------------------------------------------


def check_url(url: str, policy: Policy) -> Target:
    """The URL's target, or FetchRefused: a scheme other than https (http when allowed), no
    host, credentials in the URL (they would be sent to whoever answers)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchRefused("invalid_url", f"{url!r} is not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    allowed = ("https", "http") if policy.allow_http else ("https",)
    if scheme not in allowed:
        more = "" if policy.allow_http or scheme != "http" else " (set [links] allow_http = true to fetch http)"
        raise FetchRefused("scheme", f"{url!r}: only {' or '.join(allowed)} URLs are fetched{more}")
    if not parts.hostname:
        raise FetchRefused("invalid_url", f"{url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused("invalid_url", f"{url.split('@')[-1]!r}: credentials in a URL are not sent")
    return Target(url, scheme, parts.hostname, port or (443 if scheme == "https" else 80))


def classify(addr: IP) -> str | None:
    """Why an address is off limits (a FetchRefused reason), or None for a public one.
    An IPv4 address written as IPv6 (``::ffff:127.0.0.1``) is judged as the IPv4 one."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return classify(addr.ipv4_mapped)
    if addr in METADATA:
        return "metadata"
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_link_local:
        return "link_local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_private:
        return "private"
    if addr.is_reserved or not addr.is_global:
        return "reserved"  # shared (100.64/10), documentation, benchmarking, ...: nothing to fetch from
    return None


def check_address(addr: IP, policy: Policy, url: str = "") -> None:
    """FetchRefused unless the address is public or a network in ``[links] allow`` holds it."""
    reason = classify(addr)
    if reason is None or any(addr in net for net in policy.allow if net.version == addr.version):
        return
    what = reason.replace("_", "-")
    raise FetchRefused(
        reason, f'{url or addr}: {addr} is a {what} address; allow it in [links] allow (e.g. "{addr}/32") if intended'
    )


def redirect_target(base: str, location: str | None) -> str:
    """Where a redirect points (a relative Location joins the URL it came from)."""
    if not location:
        raise FetchRefused("redirects", f"{base!r} redirected without a Location")
    return urljoin(base, location)


# -- I/O ------------------------------------------------------------------------------

Resolve = Callable[[str, int], Awaitable[list[IP]]]


async def system_resolve(host: str, port: int) -> list[IP]:
    """Every address the system resolver gives for ``host`` (one lookup)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchRefused("dns", f"{host!r} does not resolve: {exc.strerror}") from None
    out: list[IP] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        addr = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if addr not in out:
            out.append(addr)
    return out


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one fetch: the name resolves to the address already checked, and
    nothing else resolves at all."""

    def __init__(self, host: str, addr: IP) -> None:
        self.host, self.addr = host, addr

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self.host:  # cannot happen: one session per checked target
            raise OSError(f"{host!r} was not checked for this fetch")
        fam = socket.AF_INET6 if self.addr.version == 6 else socket.AF_INET
        return [
            ResolveResult(
                hostname=host, host=str(self.addr), port=port, family=fam, proto=0, flags=socket.AI_NUMERICHOST
            )
        ]

    async def close(self) -> None:
        return None


async def pin(target: Target, policy: Policy, resolve: Resolve) -> IP:
    """The one address to connect to: the literal, or the name resolved once with every answer
    checked (one refused answer refuses the fetch: the connection could land on any of them)."""
    literal = target.literal
    if literal is not None:
        check_address(literal, policy, target.url)
        return literal
    found = await resolve(target.host, target.port)
    if not found:
        raise FetchRefused("dns", f"{target.host!r} resolves to no address")
    for addr in found:
        check_address(addr, policy, target.url)
    return found[0]


def tls_context(policy: Policy) -> ssl.SSLContext:
    """The system's CAs, plus ``[links] ca_file``; certificate and hostname checks stay on."""
    ctx = ssl.create_default_context()
    if policy.ca_file is not None:
        ctx.load_verify_locations(cafile=policy.ca_file)
    return ctx


@dataclass(slots=True)
class Fetched:
    """A response being read: the final URL (after redirects), its type and length if it said."""

    url: str
    content_type: str | None
    length: int | None
    chunks: AsyncIterator[bytes]


@asynccontextmanager
async def fetch(url: str, policy: Policy, *, resolve: Resolve = system_resolve) -> AsyncIterator[Fetched]:
    """GET ``url`` under the policy; the body streams from ``Fetched.chunks`` inside the block.
    FetchRefused for every refusal and every failure (``upstream`` for the target's own);
    each fetch is counted by its result (``bucketsync_link_fetches_total``)."""
    try:
        async with _fetch(url, policy, resolve) as got:
            yield got
    except FetchRefused as exc:
        metrics.LINK_FETCHES.labels(exc.reason).inc()
        raise
    metrics.LINK_FETCHES.labels("ok").inc()


@asynccontextmanager
async def _fetch(url: str, policy: Policy, resolve: Resolve) -> AsyncIterator[Fetched]:
    ctx = tls_context(policy)
    reading = False  # inside the caller's block: its own errors are not the fetch's
    try:
        async with asyncio.timeout(policy.timeout):
            for _hop in range(policy.max_redirects + 1):
                target = check_url(url, policy)
                addr = await pin(target, policy, resolve)
                connector = aiohttp.TCPConnector(
                    resolver=PinnedResolver(target.host, addr), use_dns_cache=False, ssl=ctx, force_close=True
                )
                async with (
                    aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session,
                    session.get(url, allow_redirects=False, auto_decompress=False) as resp,
                ):
                    if resp.status in REDIRECTS:
                        url = redirect_target(url, resp.headers.get("Location"))
                        continue
                    if resp.status >= 400:
                        raise FetchRefused("upstream", f"{target.url!r} answered {resp.status} {resp.reason or ''}")
                    length = resp.content_length
                    if length is not None and length > policy.max_bytes:
                        raise FetchRefused(
                            "too_large",
                            f"{target.url!r} is {length} bytes, more than [links] max_bytes={policy.max_bytes}",
                        )
                    reading = True
                    yield Fetched(url, resp.headers.get("Content-Type"), length, _capped(resp, policy, url))
                    return
            raise FetchRefused("redirects", f"more than [links] max_redirects={policy.max_redirects} redirects")
    except TimeoutError:
        raise FetchRefused("too_slow", f"{url!r} took longer than [links] timeout={policy.timeout:g}s") from None
    except aiohttp.ClientError as exc:
        if reading:
            raise
        raise FetchRefused("upstream", f"{url!r}: {exc}") from None
    except ssl.SSLError as exc:
        raise FetchRefused("upstream", f"{url!r}: TLS failed: {exc.reason or exc}") from None


async def _capped(resp: aiohttp.ClientResponse, policy: Policy, url: str) -> AsyncIterator[bytes]:
    """The body, refused (too_large) as soon as it passes ``max_bytes``, whatever its header said."""
    seen = 0
    chunks = resp.content.iter_chunked(CHUNK)
    while True:
        try:
            chunk = await anext(chunks, None)
        except aiohttp.ClientError as exc:
            raise FetchRefused("upstream", f"{url!r}: the body broke off: {exc}") from None
        if chunk is None:
            return
        seen += len(chunk)
        if seen > policy.max_bytes:
            raise FetchRefused("too_large", f"{url!r} sent more than [links] max_bytes={policy.max_bytes} bytes")
        yield chunk
