"""
The C{reuseport:} endpoint string: what it reads and what it refuses.
(Sharing a port is shown with real sockets in
C{tests/integration/test_reuseport.py}.)
"""

from __future__ import annotations

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from ollamaproxy.reuseport import DEFAULT_BACKLOG, ReusePortEndpoint


def test_endpoint_string_is_known_through_the_plugin() -> None:
    """
    Any endpoint string, C{--listen}'s included, may use C{reuseport:}: the
    plugin module registers its parser.
    """
    reactor = MemoryReactor()
    endpoint = serverFromString(reactor, "reuseport:5000:interface=127.0.0.1:backlog=128")
    assert endpoint == ReusePortEndpoint(reactor, 5000, "127.0.0.1", 128)


def test_defaults_are_those_of_tcp() -> None:
    """
    Like C{tcp:}, the endpoint listens on every IPv4 address with a backlog
    of 50 unless told otherwise.
    """
    reactor = MemoryReactor()
    assert serverFromString(reactor, "reuseport:5000") == ReusePortEndpoint(
        reactor, 5000, "", DEFAULT_BACKLOG
    )
    assert DEFAULT_BACKLOG == 50


def test_ipv6_interface() -> None:
    """
    An IPv6 address is written with its colons escaped, as for C{tcp6:}.
    """
    reactor = MemoryReactor()
    endpoint = serverFromString(reactor, r"reuseport:5000:interface=\:\:1")
    assert endpoint == ReusePortEndpoint(reactor, 5000, "::1")


@pytest.mark.parametrize(
    ("description", "complaint"),
    [
        ("reuseport:", "give one port"),
        ("reuseport:5000:6000", "give one port"),
        ("reuseport:http", "numbers"),
        ("reuseport:5000:backlog=many", "numbers"),
        ("reuseport:70000", "0 to 65535"),
        ("reuseport:5000:backlog=0", "at least 1"),
        ("reuseport:5000:iface=127.0.0.1", "unknown option iface"),
    ],
)
def test_bad_strings_say_what_is_wrong(description: str, complaint: str) -> None:
    """
    A mistaken endpoint string is a L{ValueError} naming the mistake, which
    twistd shows without a traceback.
    """
    with pytest.raises(ValueError, match=complaint):
        serverFromString(MemoryReactor(), description)
