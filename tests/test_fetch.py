"""The SSRF-safe fetcher (catalog/fetch.py): every refusal of the pure checks, and the I/O
against a real https server on loopback (tests/linkserver.py) allow-listed for the test."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from bucketsync import metrics
from bucketsync.catalog import fetch
from bucketsync.catalog.fetch import Policy, check_address, check_url, classify
from bucketsync.core.errors import FetchRefused
from linkserver import BODY, NAME, LinkServer

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


def ip(text: str) -> fetch.IP:
    return ipaddress.ip_address(text)


def refused(reason: str) -> pytest.RaisesContext[FetchRefused]:
    return pytest.raises(FetchRefused, match=rf"^fetch refused \({reason}\)")


# -- pure checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com/a.jpg", "scheme"),
        ("ftp://example.com/a.jpg", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "scheme"),
        ("https:///no-host", "invalid_url"),
        ("https://user:secret@example.com/a", "invalid_url"),
        ("https://example.com:99999/a", "invalid_url"),
    ],
)
def test_urls_other_than_plain_https_are_refused(url: str, reason: str) -> None:
    with refused(reason) as info:
        check_url(url, Policy())
    assert "secret" not in str(info.value)  # credentials in a URL are never echoed


def test_http_is_fetched_only_when_allowed() -> None:
    with refused("scheme") as info:
        check_url("http://example.com/a", Policy())
    assert "allow_http" in str(info.value)
    target = check_url("http://example.com/a", Policy(allow_http=True))
    assert (target.scheme, target.host, target.port) == ("http", "example.com", 80)
    assert check_url("https://[::1]:8443/x", Policy()).literal == ip("::1")


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4 written as IPv6 is judged as IPv4
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link_local"),
        ("fe80::1", "link_local"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("::ffff:169.254.169.254", "metadata"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "reserved"),  # shared address space (carrier NAT)
    ],
)
def test_every_kind_of_internal_address_is_refused(addr: str, reason: str) -> None:
    assert classify(ip(addr)) == reason
    with refused(reason) as info:
        check_address(ip(addr), Policy(), "https://x/")
    assert "[links] allow" in str(info.value)  # and says how to allow it


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "172.32.0.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(addr: str) -> None:
    assert classify(ip(addr)) is None
    check_address(ip(addr), Policy())


def test_the_allow_list_lets_exactly_its_networks_through() -> None:
    policy = Policy(allow=(ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("::1/128")))
    check_address(ip("10.1.2.3"), policy)
    check_address(ip("::1"), policy)
    with refused("private"):
        check_address(ip("10.2.0.1"), policy)
    with refused("loopback"):
        check_address(ip("127.0.0.1"), policy)  # an IPv6 entry does not hold IPv4
    with refused("metadata"):
        check_address(ip("169.254.169.254"), policy)


def test_a_redirect_without_a_target_is_refused_and_a_relative_one_joins() -> None:
    with refused("redirects"):
        fetch.redirect_target("https://a.example/x", None)
    assert fetch.redirect_target("https://a.example/x/y", "../z") == "https://a.example/z"


# -- against a real https server on loopback --------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LinkServer]:
    with LinkServer(tmp_path_factory.mktemp("links")) as s:
        yield s


def allowed(server: LinkServer, **kw: object) -> Policy:
    return Policy(allow=LOOPBACK, ca_file=server.cert, **kw)  # type: ignore[arg-type]


class Resolver:
    """A resolver that answers from a list, one answer per call, and counts the calls."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = [[ip(a) for a in answer] for answer in answers]
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[fetch.IP]:
        self.calls.append(host)
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


async def read(url: str, policy: Policy, resolve: fetch.Resolve = fetch.system_resolve) -> bytes:
    async with fetch.fetch(url, policy, resolve=resolve) as got:
        return b"".join([c async for c in got.chunks])


async def test_an_allow_listed_tls_server_on_loopback_is_fetched(server: LinkServer) -> None:
    assert await read(server.url("/files/a"), allowed(server)) == BODY


async def test_without_the_allow_list_loopback_is_refused_before_connecting(server: LinkServer) -> None:
    before = len(server.hits)
    with refused("loopback"):
        await read(server.url("/files/a"), Policy(ca_file=server.cert))
    with refused("loopback"):
        await read(server.url("/files/a", host="localhost"), Policy(ca_file=server.cert))  # a name for loopback
    assert len(server.hits) == before


async def test_the_name_is_resolved_once_and_the_connection_pinned_to_it(server: LinkServer) -> None:
    # links.test exists in no DNS: the fetch succeeds only because aiohttp connects to the
    # address our one lookup checked. A rebinding server's second answer (10.0.0.1) is never asked.
    rebinding = Resolver(["127.0.0.1"], ["10.0.0.1"])
    assert await read(server.url("/files/pinned", host=NAME), allowed(server), rebinding) == BODY
    assert rebinding.calls == [NAME]
    # TLS checked the certificate against the name (SNI), and the Host header is the name too.
    assert server.hits[-1] == f"{NAME}:{server.port}/files/pinned"


async def test_one_refused_answer_among_several_refuses_the_name(server: LinkServer) -> None:
    with refused("private"):
        await read(server.url("/files/a", host=NAME), allowed(server), Resolver(["127.0.0.1", "10.0.0.1"]))


async def test_every_redirect_is_checked_again(server: LinkServer) -> None:
    for target, reason in (
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("https://10.0.0.5/x", "private"),
        ("https://[::1]/x", "loopback"),
        ("https://[fc00::5]/x", "private"),
        ("http://example.com/x", "scheme"),
    ):
        with refused(reason):
            await read(server.url(f"/to?url={target}"), allowed(server))
    # An allowed target after a redirect is fetched.
    assert await read(server.url(f"/to?url={server.url('/files/after')}"), allowed(server)) == BODY


async def test_a_redirect_that_rebinds_the_name_is_refused(server: LinkServer) -> None:
    # Each hop is a new URL: resolved and checked again, never reusing an earlier answer.
    rebinding = Resolver(["127.0.0.1"], ["10.9.9.9"])
    with refused("private"):
        await read(server.url(f"/to?url={server.url('/files/b', host=NAME)}", host=NAME), allowed(server), rebinding)
    assert rebinding.calls == [NAME, NAME]


async def test_redirects_are_capped(server: LinkServer) -> None:
    with refused("redirects"):
        await read(server.url("/loop"), allowed(server, max_redirects=3))


async def test_a_body_past_max_bytes_is_refused_by_its_length_or_as_it_streams(server: LinkServer) -> None:
    with refused("too_large"):
        await read(server.url("/big"), allowed(server, max_bytes=4096))
    with refused("too_large"):
        await read(server.url("/chunked-big"), allowed(server, max_bytes=4096))


async def test_a_target_slower_than_the_timeout_is_refused(server: LinkServer) -> None:
    with refused("too_slow"):
        await read(server.url("/slow"), allowed(server, timeout=0.3))


async def test_an_untrusted_certificate_and_a_missing_name_fail_cleanly(server: LinkServer, tmp_path: Path) -> None:
    with refused("upstream"):  # the test CA is not trusted without ca_file
        await read(server.url("/files/a"), Policy(allow=LOOPBACK))
    with refused("dns"):
        await read("https://no-such-name.invalid/x", Policy())


def fetches(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("bucketsync_link_fetches_total", {"result": result}) or 0.0


async def test_each_fetch_is_counted_by_its_result(server: LinkServer) -> None:
    ok, loopback = fetches("ok"), fetches("loopback")
    await read(server.url("/files/counted"), allowed(server))
    with refused("loopback"):
        await read(server.url("/files/counted"), Policy())
    assert (fetches("ok"), fetches("loopback")) == (ok + 1, loopback + 1)
    metrics.init({})
    for result in metrics.FETCH_RESULTS:  # every series exists from the start, at 0 if nothing happened
        assert metrics.REGISTRY.get_sample_value("bucketsync_link_fetches_total", {"result": result}) is not None
