"""
The floor under any Twisted proxy: a relay that copies bytes both ways
between each client connection and its own connection to the upstream, with
no HTTP parsing, no key, no logging.

It is not a proxy anyone should run (it checks nothing); it is what the
reactor itself costs per relayed chunk on this machine, so the benchmark can
tell how much of ollamaproxy's cost is its own and how much comes with
CPython and Twisted.  Run by C{bench/run} as the target C{twisted-floor}:

    python3 bench/twisted_floor.py LISTEN_PORT http://127.0.0.1:UPSTREAM_PORT
"""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


class _Upstream(Protocol):
    def __init__(self, client: _Client) -> None:
        self._client = client

    def dataReceived(self, data: bytes) -> None:
        self._client.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._client.transport.loseConnection()  # type: ignore[union-attr]


class _Client(Protocol):
    def __init__(self, reactor: IReactorTCP, upstream_port: int) -> None:
        self._reactor = reactor
        self._upstream_port = upstream_port
        self._upstream: _Upstream | None = None
        self._early: list[bytes] = []

    def connectionMade(self) -> None:
        endpoint = TCP4ClientEndpoint(self._reactor, "127.0.0.1", self._upstream_port)
        connecting = endpoint.connect(Factory.forProtocol(lambda: _Upstream(self)))
        connecting.addCallbacks(self._upstream_made, lambda _: self.transport.loseConnection())  # type: ignore[union-attr]

    def _upstream_made(self, upstream: _Upstream) -> None:
        self._upstream = upstream
        for data in self._early:
            upstream.transport.write(data)  # type: ignore[union-attr]
        self._early = []

    def dataReceived(self, data: bytes) -> None:
        if self._upstream is None:
            self._early.append(data)
        else:
            self._upstream.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._upstream is not None:
            self._upstream.transport.loseConnection()  # type: ignore[union-attr]


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    listen_port = int(argv[1])
    upstream_port = urlsplit(argv[2]).port or 80
    factory = Factory.forProtocol(lambda: _Client(reactor, upstream_port))
    TCP4ServerEndpoint(reactor, listen_port, interface="127.0.0.1").listen(factory)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
