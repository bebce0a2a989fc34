# -*- test-case-name: tests.backends.test_relay -*-
"""
The way to Ollama: one HTTP client with a connection pool, built once and
handed to whoever needs it.

The client is Twisted's own L{Agent}, the layer treq is built on.  treq's
C{request()} always wraps its agent with a cookie jar shared by every request
(cookies set for one client would be sent for the next), with a gzip decoder
that rewrites C{Accept-Encoding} and the body, and with URL handling that
rejects IPv6 literals; a proxy must be transparent, so it talks to the agent
directly.  Tests inject treq's in-memory L{RequestTraversalAgent} instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IConsumer, IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from ollamaproxy.twisted_internals import HTTP11ClientFactory, RequestNotSent, use_client_factory


@dataclass(frozen=True)
class Upstream:
    """
    Ollama, as the relay sees it.

    @ivar agent: The HTTP client.
    @ivar base: Ollama's base URL (C{http://host:port}, maybe with a path
        prefix), as bytes, without a trailing slash.
    @ivar clock: Tells time for the timeouts.
    @ivar header_timeout: Seconds to wait for Ollama's response head.
    @ivar idle_timeout: Seconds Ollama may stay silent within a body.
    @ivar via: This proxy's C{Via} entry (L{ollamaproxy.backends.headers.via_mark}),
        added to every request sent to Ollama and looked for in every
        request received; empty for none.
    """

    agent: IAgent
    base: bytes
    clock: IReactorTime
    header_timeout: float
    idle_timeout: float
    via: bytes = b""

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        """
        Send a request to Ollama.

        @param target: Path and query string, starting with C{/}.
        @return: A L{Deferred} that fires with the response once its head has
            arrived, fails with the agent's error if Ollama cannot be
            reached, or with L{twisted.internet.defer.TimeoutError} if the
            head takes longer than the header timeout.  Cancelling it drops
            the connection and fails it with L{CancelledError}.
        """
        d = self.agent.request(method, self.base + target, headers, body)
        d.addErrback(_plain_cancellation)
        return d.addTimeout(self.header_timeout, self.clock, onTimeoutCancel=_timed_out)


@implementer(IBodyProducer)
class BytesProducer:
    """
    A small body held whole, written at once: the same request to several
    backends, the pool's generation checks (and, in the tests, a fake
    client's bodies: treq's default producer needs a running reactor).
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _plain_cancellation(failure: Failure) -> Failure:
    """
    The agent reports a request cancelled before its response as
    C{ResponseNeverReceived([CancelledError])}, or before its connection
    as C{ConnectingCancelledError}; make it a plain
    L{CancelledError}, so a cancelled request looks cancelled to everyone.
    """
    if failure.check(ConnectingCancelledError):
        # Cancelled before the connection was made: the endpoint's own word.
        return Failure(CancelledError())
    reasons = getattr(failure.value, "reasons", ())
    if failure.check(ResponseNeverReceived, RequestNotSent, ResponseFailed) and any(
        reason.check(CancelledError) for reason in reasons
    ):
        return Failure(CancelledError())
    return failure


def _timed_out(result: object, timeout: float | None) -> NoReturn:
    """
    Whatever the cancelled request failed with, the reason was the timeout.
    """
    raise TimeoutError(timeout, "no response head from Ollama in time")


def connection_pool(reactor: IReactorTime) -> HTTPConnectionPool:
    """
    A pool of persistent connections to Ollama.  Only idle connections are
    kept; every concurrent stream has its own connection.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    use_client_factory(pool, _QuietClientFactory)
    return pool


class _QuietClientFactory(HTTP11ClientFactory):
    """
    The pool's factory for connections to Ollama, without the two log lines
    ("Starting factory", "Stopping factory") Twisted writes for each new
    connection: each stream opens one, and the access log already says all
    there is to say about it.
    """

    noisy = False


def agent_for(reactor: IReactorTCP, pool: HTTPConnectionPool, connect_timeout: float) -> IAgent:
    """
    The production HTTP client for talking to Ollama.
    """
    agent: IAgent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, connect_timeout), pool)
    return agent


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Endpoints for Ollama, made once per address.

    Twisted's default makes a new endpoint for every request, IDNA-encoding
    the host name each time, even when a pooled connection will carry the
    request; the proxy only ever talks to one address.  And an address given
    as an IP literal (the usual C{127.0.0.1:11434}) is connected to directly:
    L{HostnameEndpoint} would resolve it in a thread and race connection
    attempts for it, for each new connection (the larger part of the cost of
    starting a stream).
    """

    def __init__(self, reactor: IReactorTCP, connect_timeout: float) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._made: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        address = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(address)
        if endpoint is None:
            endpoint = self._tcp(uri.host.decode("ascii"), uri.port)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            self._made[address] = endpoint
        return endpoint

    def _tcp(self, host: str, port: int) -> IStreamClientEndpoint:
        timeout = self._connect_timeout
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, timeout=timeout)
        return HostnameEndpoint(self._reactor, host, port, timeout=timeout)


class PoolService(Service):
    """
    Closes the pool's idle connections when the proxy stops.
    """

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed
