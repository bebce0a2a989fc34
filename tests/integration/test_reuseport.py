"""
Several listeners on one port through C{reuseport:}, on real sockets: what
only the kernel can show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from ollamaproxy.reuseport import ReusePortEndpoint
from tests.fakes.client import agent, read, request, wait_for
from tests.fakes.twistd import (
    START_TIMEOUT,
    TEST_KEY,
    TwistdLauncher,
    Upstream,
    proxy_args,
)

# Enough connections that the kernel, spreading them by address and port,
# gives each of two listeners some (all to one: 1 in 2**23).
CONNECTIONS = 24


class _Counted(Protocol):
    """
    Counts itself for the listener that accepted it, and hangs up.
    """

    def __init__(self, accepted: list[int]) -> None:
        self._accepted = accepted

    def connectionMade(self) -> None:
        self._accepted.append(1)
        assert self.transport is not None
        self.transport.loseConnection()


class _Hangup(Protocol):
    """
    The client side: done when the listener hangs up.
    """

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(None)


def _port(listening: IListeningPort) -> int:
    port: int = listening.getHost().port  # type: ignore[attr-defined]
    return port


@pytest_twisted.ensureDeferred
async def test_listeners_share_a_port_and_each_accepts(reactor: Any) -> None:
    """
    Two listeners on one port both get connections, and a plain listener
    cannot take the port from them.
    """
    accepted: tuple[list[int], list[int]] = ([], [])
    first = await ReusePortEndpoint(reactor, 0, "127.0.0.1").listen(
        Factory.forProtocol(lambda: _Counted(accepted[0]))
    )
    port = _port(first)
    second = await ReusePortEndpoint(reactor, port, "127.0.0.1").listen(
        Factory.forProtocol(lambda: _Counted(accepted[1]))
    )
    try:
        client = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        for _ in range(CONNECTIONS):
            hangup = cast(_Hangup, await client.connect(Factory.forProtocol(_Hangup)))
            await hangup.closed.addTimeout(START_TIMEOUT, reactor)
        assert len(accepted[0]) + len(accepted[1]) == CONNECTIONS
        assert accepted[0] and accepted[1]
        with pytest.raises(CannotListenError):
            reactor.listenTCP(port, Factory(), interface="127.0.0.1")
    finally:
        await maybeDeferred(first.stopListening)
        await maybeDeferred(second.stopListening)


@pytest_twisted.ensureDeferred
async def test_a_port_held_by_a_plain_listener_is_refused(reactor: Any) -> None:
    """
    Sharing takes every listener's consent: a port held without
    C{SO_REUSEPORT} cannot be joined.
    """
    plain = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    try:
        with pytest.raises(CannotListenError):
            await ReusePortEndpoint(reactor, _port(plain), "127.0.0.1").listen(Factory())
    finally:
        await maybeDeferred(plain.stopListening)


def _listening_on(args: Sequence[str], endpoint: str) -> list[str]:
    return [endpoint if arg == "tcp:0:interface=127.0.0.1" else arg for arg in args]


async def _version_ok(reactor: Any, url: str) -> None:
    response = await request(
        agent(reactor), b"GET", url + "/api/version", {"Authorization": f"Bearer {TEST_KEY}"}
    )
    await (await read(response)).done
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_two_proxies_serve_one_port(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    Two proxies started with the same C{reuseport:} endpoint both answer
    requests on it, and when one stops the other goes on answering.
    """
    args = proxy_args(upstream.url)
    first = await twistd.start(_listening_on(args, "reuseport:0:interface=127.0.0.1"))
    second = await twistd.start(
        _listening_on(args, f"reuseport:{first.port}:interface=127.0.0.1")
    )
    assert second.port == first.port
    for _ in range(CONNECTIONS):
        await _version_ok(reactor, first.url)
    # Each access line is written once its answer has gone: waited for.
    for proxy in (first, second):
        await wait_for(reactor, lambda: "GET /api/version 200" in proxy.output,  # noqa: B023
                       f"an access line from {proxy.pid}")

    assert await first.terminate(reactor), first.output
    served_before = second.output.count("GET /api/version 200")
    for _ in range(4):
        await _version_ok(reactor, second.url)
    await wait_for(
        reactor, lambda: second.output.count("GET /api/version 200") == served_before + 4,
        "the four access lines")
