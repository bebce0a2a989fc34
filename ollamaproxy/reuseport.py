# -*- test-case-name: tests.test_reuseport,tests.integration.test_reuseport -*-
"""
Several proxy processes on one port, to use more than one core.

One proxy process is one core's worth of streams and requests.  The endpoint
C{reuseport:PORT[:interface=ADDRESS][:backlog=N]} listens like C{tcp:}, with
C{SO_REUSEPORT} set on the socket, so that several proxies started with the
same endpoint all listen on the port together.  On Linux the kernel gives
each of them its own queue of new connections and spreads connections
across them; each process is a whole proxy, and one that stops leaves the
others serving.  (BSD and macOS accept the option without spreading the
connections, so there it only helps to replace one process with the next.)

Only sockets that all set the option may share a port: a C{tcp:} listener on
it still fails, and so does this one on a port held by a plain listener.

The twistd plugin module registers L{ReusePortParser}, which makes the
C{reuseport:} prefix known to every endpoint string, C{--listen} included.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, execute
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorSocket,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import ServerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

DEFAULT_BACKLOG = 50
_SO_REUSEPORT: int = getattr(socket, "SO_REUSEPORT", 0)


@implementer(IStreamServerEndpoint)
@dataclass(frozen=True)
class ReusePortEndpoint:
    """
    A TCP server endpoint whose listening socket other processes may share.

    @ivar reactor: Adopts the listening socket.
    @ivar port: The port to listen on; 0 for one of the system's choosing.
    @ivar interface: The address to listen on; all IPv4 addresses if empty.
    @ivar backlog: How many connections may wait to be accepted.
    """

    reactor: IReactorSocket
    port: int
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        family = socket.AF_INET6 if isIPv6Address(self.interface) else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as listening:
            try:
                # As Twisted's tcp: does, so a restart need not wait for the
                # old connections' TIME_WAIT.
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listening.setsockopt(socket.SOL_SOCKET, _SO_REUSEPORT, 1)
                listening.bind((self.interface, self.port))
                listening.listen(self.backlog)
                listening.setblocking(False)
            except OSError as e:
                raise CannotListenError(self.interface, self.port, e) from None
            # The reactor listens on a duplicate of the descriptor; this one
            # is closed on leaving the block.
            return self.reactor.adoptStreamPort(
                listening.fileno(), family, cast("ServerFactory[Any]", factory)
            )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    """
    Reads C{reuseport:PORT[:interface=ADDRESS][:backlog=N]}.
    """

    prefix = "reuseport"

    def parseStreamServer(
        self, reactor: IReactorCore, *args: object, **kwargs: object
    ) -> ReusePortEndpoint:
        if not _SO_REUSEPORT:
            raise ValueError("reuseport: endpoints need SO_REUSEPORT, which this system lacks")
        if len(args) != 1 or args[0] == "":
            raise ValueError("reuseport: give one port, e.g. reuseport:5000")
        unknown = set(kwargs) - {"interface", "backlog"}
        if unknown:
            raise ValueError(f"reuseport: unknown option {', '.join(sorted(unknown))}")
        try:
            port = int(str(args[0]))
            backlog = int(str(kwargs.get("backlog", DEFAULT_BACKLOG)))
        except ValueError:
            raise ValueError("reuseport: the port and backlog are numbers") from None
        if not 0 <= port <= 65535 or backlog < 1:
            raise ValueError("reuseport: the port is 0 to 65535, the backlog at least 1")
        interface = str(kwargs.get("interface", ""))
        return ReusePortEndpoint(IReactorSocket(reactor), port, interface, backlog)
