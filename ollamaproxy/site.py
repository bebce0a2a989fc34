# -*- test-case-name: tests.test_site -*-
"""
The web server clients connect to: twisted.web's L{Site}, with a deadline
for request heads and without twisted.web's own access log.

A client that sends its request line and headers slowly (a slowloris) would
otherwise hold a connection for as long as it trickles bytes: twisted.web's
idle timeout starts again with every byte.  Here a request's head must be
complete within the client timeout of its first byte; the same timeout is
the idle limit while a client sends a body or between requests.  It never
applies while a response streams.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from twisted.web.resource import IResource
from twisted.web.server import Site

log = Logger()


class _HeadDeadlineChannel(HTTPChannel):
    """
    An L{HTTPChannel} that drops a client whose request head takes longer
    than C{timeOut} seconds.
    """

    _deadline: IDelayedCall | None = None
    _awaiting_head = True

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_head and self._deadline is None and self.timeOut:
            self._deadline = self.callLater(self.timeOut, self._head_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._cancel_deadline()
        super().allHeadersReceived()

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)
        self._awaiting_head = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "Dropped {peer}: request head not complete within {timeout:g} seconds",
            peer=str(getattr(peer, "host", peer)),
            timeout=self.timeOut,
        )
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()


class ProxySite(Site):
    """
    The proxy's L{Site}: HTTP/1.1 with a request-head deadline, and no access
    log of its own (the proxy logs each request itself, with the key's name
    and the outcome).
    """

    noisy = False
    protocol = _HeadDeadlineChannel  # type: ignore[assignment]

    def __init__(self, resource: IResource, client_timeout: float, reactor: Any) -> None:
        super().__init__(resource, timeout=client_timeout, reactor=reactor)

    def log(self, request: Request) -> None:
        pass
