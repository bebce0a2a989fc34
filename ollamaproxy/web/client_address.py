# -*- test-case-name: tests.web.test_client_address -*-
"""
Who a request comes from: the peer of its connection, or, when that peer is
a trusted proxy in front (a TLS terminator, a load balancer), the address
that proxy reports in C{X-Forwarded-For} or C{Forwarded} (RFC 7239).

The address is what the access log shows, and what the guess throttle and
anything else per address count by.  The rule is the usual one: walk the
reported chain of addresses from the right (the hop nearest to the proxy)
and take the first that is not itself a trusted proxy.  A client can put
anything at the left of the chain, so what it prepends is never taken, nor
even read: a malformed item left of the client's address is never reached.
A header from a peer that is not trusted is ignored.

An item the walk reaches that names no address (malformed, or RFC 7239's
C{unknown} and obfuscated identifiers) stops it, and the request is counted
by the last address the walk trusted: the trusted proxy that reported the
item (the peer itself when it is the right-most item).  That proxy is the
nearest hop the proxy still knows for sure; the unreadable item is what
that proxy was told, by its own peer, so nothing further left can be
believed.  Walking on past it would let a client who can make a trusted
proxy report garbage choose its own address; giving up on the whole chain
(as this module once did) let a client who prepends garbage be counted as
the load balancer, escaping its own throttle.  A chain of trusted proxies
only is counted by its left-most, the last the walk trusted too.

C{X-Forwarded-For} is read when present, C{Forwarded} otherwise: the proxy
in front must set or extend C{X-Forwarded-For} (nginx, HAProxy, Caddy,
Traefik and cloud load balancers do), or set C{Forwarded} and drop a
C{X-Forwarded-For} the client sent.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.web.http_headers import Headers

from ollamaproxy.config import Network, parse_networks

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_XFF = b"x-forwarded-for"
_FORWARDED = b"forwarded"
# One forwarded-pair of RFC 7239: a token, "=", a token or a quoted string.
_PAIR = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)=("(?:[^"\\]|\\.)*"|[^;,\s"]*)\s*')


class Malformed(ValueError):
    """
    A forwarding header that cannot be read.
    """


@dataclass(frozen=True)
class TrustedProxies:
    """
    The proxies in front whose forwarding headers are believed.

    @ivar networks: Their addresses, as networks (a single address is a
        C{/32} or C{/128}).
    """

    networks: tuple[Network, ...] = ()

    def client_address(self, peer: str, headers: Headers) -> str:
        """
        The address a request comes from.

        @param peer: The address of the connection's other end, as text.
        @param headers: The request's headers.
        @return: C{peer}, or the address a trusted C{peer} reports.
        """
        if not self.networks:
            return peer
        peer_address = _address(peer)
        if peer_address is None or not self._trusts(peer_address):
            return peer
        items, read = _reported(headers)
        trusted = peer
        for item in reversed(items):
            try:
                hop = read(item)
            except Malformed:
                break
            if not self._trusts(hop):
                return str(hop)
            trusted = str(hop)
        return trusted

    def _trusts(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


# The default: no proxy in front, every forwarding header ignored.
NOBODY = TrustedProxies()


def parse_trusted_proxies(value: str) -> TrustedProxies:
    """
    Parse C{--trusted-proxies}: addresses and networks (CIDR), IPv4 or
    IPv6, separated by commas or spaces.  An empty value trusts nobody.

    @raise ConfigError: For an item that is neither.
    """
    return TrustedProxies(parse_networks("trusted-proxies", value))


def _address(text: str) -> Address | None:
    """
    An IP address, with IPv4-mapped IPv6 addresses (a dual-stack socket's
    C{::ffff:10.0.0.1}) read as the IPv4 address they are.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _reported(headers: Headers) -> tuple[list[str], Callable[[str], Address]]:
    """
    The items of the forwarding header present, the client's first, and how
    to read one item's address (raising L{Malformed} for an item that names
    none).  Items are read one by one, from the right, so that a malformed
    item stops the walk only where it is.
    """
    forwarded_for = headers.getRawHeaders(_XFF)
    if forwarded_for is not None:
        # X-Forwarded-For has no quoted strings: every comma separates.
        return [item.strip() for item in _text(forwarded_for).split(",")], _hop
    forwarded = headers.getRawHeaders(_FORWARDED)
    if forwarded is not None:
        return [item.strip() for item in _split_commas(_text(forwarded))], _forwarded_for
    return [], _hop


def _text(values: Sequence[bytes]) -> str:
    """
    Every line of a header, joined with commas.  A byte outside ASCII
    becomes U+FFFD, which no address holds: the item it is in is
    malformed, and only that item.
    """
    return ",".join(value.decode("ascii", "replace") for value in values)


def _split_commas(text: str) -> list[str]:
    """
    Split at commas outside quoted strings.  A quoted string that never
    ends (which a client can start at the left, for the proxies in front to
    append to) ends its item at the next comma: the strict reading would
    swallow every element appended after it, those of the trusted proxies
    too.  The item it leaves is malformed.
    """
    items, start, quoted, escaped = [], 0, False, False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append(text[start:index])
            start = index + 1
    if quoted:
        # From the item the unended quote opens in, every comma separates.
        return items + text[start:].split(",")
    items.append(text[start:])
    return items


def _forwarded_for(element: str) -> Address:
    """
    The address in the C{for} parameter of one C{Forwarded} element.

    @raise Malformed: If there is none.
    """
    return _hop(_for_of(element))


def _for_of(element: str) -> str:
    """
    The C{for} parameter of one C{Forwarded} element, unquoted.

    @raise Malformed: If the element is not a list of pairs or has no
        C{for}.
    """
    found = None
    position = 0
    while position < len(element):
        match = _PAIR.match(element, position)
        if match is None:
            raise Malformed("not a forwarded-pair")
        name, value = match.group(1).lower(), match.group(2)
        if name == "for":
            if found is not None:
                raise Malformed("two for= parameters")
            found = re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith('"') else value
        position = match.end()
        if position < len(element):
            if element[position] != ";":
                raise Malformed("pairs not separated by ;")
            position += 1
    if found is None:
        raise Malformed("no for=")
    return found


def _hop(text: str) -> Address:
    """
    One hop's address: C{192.0.2.1}, C{192.0.2.1:4711}, C{2001:db8::1},
    C{[2001:db8::1]} or C{[2001:db8::1]:4711}.

    @raise Malformed: For anything else, including RFC 7239's C{unknown}
        and obfuscated identifiers: they name no address to count by.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            raise Malformed(text)
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise Malformed(text)
    else:
        host = text
    address = _address(host)
    if address is None:
        raise Malformed(text)
    return address
