"""
The floors under any Twisted proxy, to tell how much of ollamaproxy's cost
is its own and how much comes with CPython and Twisted.  Neither is a proxy
anyone should run: they check no key and log nothing.

C{bytes}: copies bytes both ways between each client connection and its own
connection to the upstream, with no HTTP parsing at all: what the reactor
costs per relayed chunk.

C{http}: the smallest twisted.web and L{Agent} proxy (a leaf resource that
sends each request on through a pooled agent and writes the response body
back as it arrives): what Twisted's HTTP server and client cost per request.

Run by C{bench/run} as the targets C{twisted-floor} and C{twisted-web-floor}:

    python3 bench/twisted_floor.py bytes|http LISTEN_PORT http://127.0.0.1:UPSTREAM_PORT [PROCESSES]

With C{PROCESSES} above 1 (C{bench/alternatives}), the first process listens
and starts the others, which serve the same listening socket (Twisted's
C{adoptStreamPort}): the kernel hands each new connection to one of them.
"""

from __future__ import annotations

import socket
import sys
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTCP, ITransport
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http import Request
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ollamaproxy.backends.request_body import StreamedBody


def _transport(protocol: Protocol) -> ITransport:
    assert protocol.transport is not None
    return protocol.transport


class _Upstream(Protocol):
    def __init__(self, client: _Client) -> None:
        self._client = client

    def dataReceived(self, data: bytes) -> None:
        _transport(self._client).write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        _transport(self._client).loseConnection()


class _Client(Protocol):
    def __init__(self, reactor: IReactorTCP, upstream_port: int) -> None:
        self._reactor = reactor
        self._upstream_port = upstream_port
        self._upstream: _Upstream | None = None
        self._early: list[bytes] = []

    def connectionMade(self) -> None:
        endpoint = TCP4ClientEndpoint(self._reactor, "127.0.0.1", self._upstream_port)
        connecting = endpoint.connect(Factory.forProtocol(lambda: _Upstream(self)))
        connecting.addCallbacks(self._upstream_made, lambda _: _transport(self).loseConnection())

    def _upstream_made(self, upstream: _Upstream) -> None:
        self._upstream = upstream
        for data in self._early:
            _transport(upstream).write(data)
        self._early = []

    def dataReceived(self, data: bytes) -> None:
        if self._upstream is None:
            self._early.append(data)
        else:
            _transport(self._upstream).write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._upstream is not None:
            _transport(self._upstream).loseConnection()


class _Body(Protocol):
    def __init__(self, request: Request) -> None:
        self._request = request

    def dataReceived(self, data: bytes) -> None:
        self._request.write(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._request.finish()


class _Relay(Resource):
    isLeaf = True

    def __init__(self, agent: Agent, upstream: bytes) -> None:
        super().__init__()
        self._agent = agent
        self._upstream = upstream

    def render(self, request: Any) -> object:
        content = request.content.read()
        body: IBodyProducer | None = None
        if content:
            streamed = StreamedBody(len(content), 0, lambda: None, lambda: None)
            streamed.write(content)
            streamed.finish()
            body = streamed
        headers = request.requestHeaders.copy()
        for name in (b"host", b"content-length", b"connection", b"transfer-encoding"):
            headers.removeHeader(name)
        sent = self._agent.request(request.method, self._upstream + request.uri, headers, body)
        sent.addCallback(_respond, request)
        return NOT_DONE_YET


def _respond(response: IResponse, request: Any) -> None:
    request.setResponseCode(response.code)
    for name in (b"content-type", b"content-length"):
        values = response.headers.getRawHeaders(name)
        if values:
            request.responseHeaders.setRawHeaders(name, values)
    response.deliverBody(_Body(request))


def main(argv: list[str]) -> None:
    from twisted.internet import reactor as installed

    # Listening, adopting a socket and spawning live on different
    # interfaces of the one reactor.
    reactor: Any = installed

    mode, listen, upstream = argv[1], argv[2], argv[3]
    processes = int(argv[4]) if len(argv) > 4 else 1
    factory: Factory[Any]
    if mode == "bytes":
        port = urlsplit(upstream).port or 80
        factory = Factory.forProtocol(lambda: _Client(reactor, port))
    else:
        pool = HTTPConnectionPool(reactor)
        pool.maxPersistentPerHost = 64
        site = Site(_Relay(Agent(reactor, pool=pool), upstream.encode("ascii")))
        site.log = lambda request: None  # type: ignore[method-assign]
        factory = site
    if listen.startswith("fd:"):
        reactor.adoptStreamPort(int(listen[3:]), socket.AF_INET, factory)
    else:
        fd = reactor.listenTCP(int(listen), factory, interface="127.0.0.1").fileno()
        for _ in range(processes - 1):
            child = reactor.spawnProcess(
                ProcessProtocol(),
                sys.executable,
                [sys.executable, argv[0], mode, f"fd:{fd}", upstream],
                env=None,
                childFDs={0: 0, 1: 1, 2: 2, fd: fd},
            )
            reactor.addSystemEventTrigger("before", "shutdown", child.signalProcess, "TERM")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
