"""
Tests for L{ollamaproxy.web.client_address}: the client's address behind a
trusted proxy, and only behind one.
"""

from __future__ import annotations

import pytest
from twisted.logger import capturedLogs
from twisted.web.http_headers import Headers

from ollamaproxy.config import Config, ConfigError
from ollamaproxy.web.client_address import TrustedProxies, parse_trusted_proxies
from tests.fakes.chain import Chain

TRUSTED = parse_trusted_proxies("10.0.0.5, 10.1.0.0/16, fd00::/8")


def headers(**values: str | list[str]) -> Headers:
    """
    Request headers; C{x_forwarded_for=} is C{X-Forwarded-For}.
    """
    result = Headers()
    for name, value in values.items():
        result.setRawHeaders(
            name.replace("_", "-"),
            [value] if isinstance(value, str) else value,
        )
    return result


@pytest.mark.parametrize(
    ("peer", "given", "client"),
    [
        # A trusted peer's header names the client.
        ("10.0.0.5", headers(x_forwarded_for="192.0.2.7"), "192.0.2.7"),
        ("10.1.2.3", headers(x_forwarded_for="192.0.2.7"), "192.0.2.7"),
        # Anyone else's header is ignored.
        ("192.0.2.99", headers(x_forwarded_for="192.0.2.7"), "192.0.2.99"),
        ("10.0.0.6", headers(forwarded="for=192.0.2.7"), "10.0.0.6"),
        # A trusted peer without a header is the client.
        ("10.0.0.5", headers(), "10.0.0.5"),
        # The right-most address that is not a trusted proxy: what the
        # client prepends is never taken.
        ("10.0.0.5", headers(x_forwarded_for="6.6.6.6, 192.0.2.7"), "192.0.2.7"),
        ("10.0.0.5", headers(x_forwarded_for="6.6.6.6, 192.0.2.7, 10.1.0.9"), "192.0.2.7"),
        ("10.0.0.5", headers(x_forwarded_for=["6.6.6.6", "192.0.2.7, 10.1.0.9"]), "192.0.2.7"),
        ("10.0.0.5", headers(forwarded="for=6.6.6.6, for=192.0.2.7;proto=https"), "192.0.2.7"),
        # Only trusted proxies in the chain: the first of them.
        ("10.0.0.5", headers(x_forwarded_for="10.1.0.1, 10.1.0.2"), "10.1.0.1"),
        # IPv6, with and without brackets and ports.
        ("fd00::1", headers(x_forwarded_for="2001:db8::7"), "2001:db8::7"),
        ("fd00::1", headers(x_forwarded_for="[2001:db8::7]:4711"), "2001:db8::7"),
        ("10.0.0.5", headers(forwarded='for="[2001:db8::7]:4711"'), "2001:db8::7"),
        ("10.0.0.5", headers(forwarded='For="[2001:DB8::7]"'), "2001:db8::7"),
        ("::ffff:10.0.0.5", headers(x_forwarded_for="192.0.2.7"), "192.0.2.7"),
        # Quotes and ports in Forwarded, other parameters around for=.
        ("10.0.0.5", headers(forwarded='proto=https;for="192.0.2.7:4711";by=10.0.0.5'),
         "192.0.2.7"),
        ("10.0.0.5", headers(forwarded='for=192.0.2.7;host="a,b"'), "192.0.2.7"),
        ("10.0.0.5", headers(x_forwarded_for="192.0.2.7:4711"), "192.0.2.7"),
        # X-Forwarded-For is read when both are present.
        ("10.0.0.5", headers(x_forwarded_for="192.0.2.7", forwarded="for=6.6.6.6"),
         "192.0.2.7"),
        # Malformed headers give the peer.
        ("10.0.0.5", headers(x_forwarded_for="not-an-address"), "10.0.0.5"),
        ("10.0.0.5", headers(x_forwarded_for="192.0.2.7,,"), "10.0.0.5"),
        ("10.0.0.5", headers(x_forwarded_for=""), "10.0.0.5"),
        ("10.0.0.5", headers(x_forwarded_for="192.0.2.7:http"), "10.0.0.5"),
        ("10.0.0.5", headers(x_forwarded_for="[2001:db8::7"), "10.0.0.5"),
        ("10.0.0.5", headers(forwarded="for=unknown"), "10.0.0.5"),
        ("10.0.0.5", headers(forwarded="for=_hidden"), "10.0.0.5"),
        ("10.0.0.5", headers(forwarded="by=10.0.0.5"), "10.0.0.5"),
        ("10.0.0.5", headers(forwarded='for="192.0.2.7'), "10.0.0.5"),
        ("10.0.0.5", headers(forwarded="for=192.0.2.7 junk"), "10.0.0.5"),
        ("10.0.0.5", headers(forwarded="for=192.0.2.7;for=6.6.6.6"), "10.0.0.5"),
        # A malformed item left of the client's address is never read: the
        # client cannot make itself the balancer by prepending one.
        ("10.0.0.5", headers(x_forwarded_for="not-an-address, 192.0.2.7"), "192.0.2.7"),
        ("10.0.0.5", headers(x_forwarded_for=", 192.0.2.7, 10.1.0.9"), "192.0.2.7"),
        ("10.0.0.5", headers(x_forwarded_for='", 192.0.2.7'), "192.0.2.7"),
        ("10.0.0.5", headers(x_forwarded_for=["\u00e9t\u00e9", "192.0.2.7"]), "192.0.2.7"),
        ("10.0.0.5", headers(forwarded="for=unknown, for=192.0.2.7"), "192.0.2.7"),
        ("10.0.0.5", headers(forwarded='for=", for=192.0.2.7'), "192.0.2.7"),
        ("10.0.0.5", headers(forwarded="junk;;, for=6.6.6.6, for=192.0.2.7"), "192.0.2.7"),
        # A malformed item the walk reaches stops it at the last address it
        # trusted: the trusted proxy that reported the item.
        ("10.0.0.5", headers(x_forwarded_for="192.0.2.7, not-an-address, 10.1.0.9"),
         "10.1.0.9"),
        ("10.0.0.5", headers(forwarded="for=192.0.2.7, for=_hidden, for=10.1.0.9"),
         "10.1.0.9"),
        ("10.0.0.5", headers(x_forwarded_for="192.0.2.7, not-an-address"), "10.0.0.5"),
        # A peer that is no IP address (a Unix socket) is never trusted.
        ("/run/ollamaproxy.sock", headers(x_forwarded_for="192.0.2.7"), "/run/ollamaproxy.sock"),
    ],
)
def test_client_address(peer: str, given: Headers, client: str) -> None:
    """
    The client is the right-most address in a trusted peer's forwarding
    header that is not itself a trusted proxy; anyone else's header is
    ignored; a malformed item stops the walk from the right at the last
    trusted address (the peer, when it is the right-most item), and one left
    of the client's address is never read.
    """
    assert TRUSTED.client_address(peer, given) == client


def test_nobody_is_trusted_by_default() -> None:
    """Without --trusted-proxies, a forwarding header from anywhere is ignored."""
    given = headers(x_forwarded_for="192.0.2.7", forwarded="for=192.0.2.8")
    assert TrustedProxies().client_address("127.0.0.1", given) == "127.0.0.1"


def test_parse() -> None:
    """Addresses and networks, IPv4 and IPv6, comma- or space-separated; '' trusts nobody."""
    parsed = parse_trusted_proxies("10.0.0.5 ,[::1] 10.1.0.0/16,fd00::/8")
    assert [str(n) for n in parsed.networks] == ["10.0.0.5/32", "::1/128", "10.1.0.0/16",
                                                 "fd00::/8"]
    assert parse_trusted_proxies("").networks == ()


@pytest.mark.parametrize("value", ["10.0.0.300", "proxy.example", "10.0.0.0/33"])
def test_parse_rejects(value: str) -> None:
    """Anything but an address or a network stops the start, naming the option."""
    with pytest.raises(ConfigError, match=r"^--trusted-proxies: "):
        parse_trusted_proxies(value)


def test_configured_by_option_and_environment() -> None:
    """--trusted-proxies and OLLAMAPROXY_TRUSTED_PROXIES set the trusted proxies."""
    by_option = Config.from_sources({"trusted-proxies": "10.0.0.5"}, {})
    by_environment = Config.from_sources({}, {"OLLAMAPROXY_TRUSTED_PROXIES": "10.0.0.5"})
    expected = (TRUSTED.networks[0],)
    assert by_option.trusted_proxies == by_environment.trusted_proxies == expected


def access_clients(chain: Chain, forwarded_for: str, key: str | None = None) -> list[str]:
    """
    The client addresses the access log shows for one request with an
    C{X-Forwarded-For} header.
    """
    with capturedLogs() as events:
        kwargs = {} if key is None else {"key": key}
        chain.body(chain.respond("GET", "/api/tags", headers={"X-Forwarded-For": forwarded_for},
                                 **kwargs))
    return [str(event["client"]) for event in events if "client" in event]


def test_the_access_log_names_the_client_behind_a_trusted_proxy() -> None:
    """
    Behind a trusted proxy (the in-memory client connects from 127.0.0.1),
    the access log shows the client it names; without trust, the peer.
    """
    trusting = Chain(trusted_proxies=parse_trusted_proxies("127.0.0.1"))
    assert access_clients(trusting, "6.6.6.6, 192.0.2.7") == ["192.0.2.7"]
    assert access_clients(Chain(), "192.0.2.7") == ["127.0.0.1"]


def test_the_guess_throttle_counts_by_the_client_behind_a_trusted_proxy() -> None:
    """
    Wrong keys from one client behind a trusted proxy throttle that
    client, not everyone who comes through the same proxy.
    """
    chain = Chain(trusted_proxies=parse_trusted_proxies("127.0.0.1"))
    for i in range(10):
        response = chain.respond("GET", "/api/tags", key=f"guess-{i}",
                                 headers={"X-Forwarded-For": "192.0.2.66"})
        assert response.code == 401
        chain.body(response)
    guesser = chain.respond("GET", "/api/tags", key="guess-again",
                            headers={"X-Forwarded-For": "192.0.2.66"})
    assert guesser.code == 429
    chain.body(guesser)
    other = chain.respond("GET", "/api/tags", key="wrong-but-new",
                          headers={"X-Forwarded-For": "192.0.2.7"})
    assert other.code == 401
    chain.body(other)


def test_a_prepended_malformed_item_does_not_escape_the_throttle() -> None:
    """
    A guesser behind a trusted proxy that has used up its wrong keys cannot
    start afresh by prepending a malformed item to C{X-Forwarded-For}: it
    is still counted by its own address (429), not as the proxy in front,
    and another client of the same proxy is not throttled for it.
    """
    chain = Chain(trusted_proxies=parse_trusted_proxies("127.0.0.1"))
    for i in range(10):
        response = chain.respond("GET", "/api/tags", key=f"guess-{i}",
                                 headers={"X-Forwarded-For": "192.0.2.66"})
        assert response.code == 401
        chain.body(response)
    for junk in ("junk", "", "[2001:db8::1", "192.0.2.7:http"):
        guesser = chain.respond("GET", "/api/tags", key="guess-again",
                                headers={"X-Forwarded-For": f"{junk}, 192.0.2.66"})
        assert guesser.code == 429
        chain.body(guesser)
    other = chain.respond("GET", "/api/tags", key="wrong-but-new",
                          headers={"X-Forwarded-For": "192.0.2.7"})
    assert other.code == 401
    chain.body(other)
