# -*- test-case-name: tests.web.test_shutdown -*-
"""
The requests in flight, and the drain that waits for them on shutdown.

The app adds each request as it starts and removes it when it has been
recorded; the console reads the registry a few times a second; the daemon's
shutdown first withdraws it (L{InFlight.withdrawn}: C{/-/ready} answers 503
while requests are still served, for C{--drain-delay}), then asks it to
drain: new requests are refused (the app asks L{InFlight.draining}), those
in flight get a grace period, then their connections are closed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.logger import Logger

from ollamaproxy.backends.dispatch import Trip
from ollamaproxy.exchange import Exchange
from ollamaproxy.web.site import ProxyRequest

log = Logger()


@dataclass(frozen=True)
class Flight:
    """
    A request in flight: its record, and its trip to the backends.
    """

    exchange: Exchange
    trip: Trip = field(default_factory=Trip)


class InFlight(Mapping[ProxyRequest, Flight]):
    """
    The requests in flight, each web request to its L{Flight}.

    @ivar withdrawn: Whether the proxy is stopping, and load balancers
        should look away (C{/-/ready} answers 503); set before L{draining},
        while new requests are still served.
    @ivar draining: Whether new requests are refused; implies L{withdrawn}.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._flights: dict[ProxyRequest, Flight] = {}
        self._drained: list[Deferred[None]] = []
        self.withdrawn = False
        self.draining = False

    def __getitem__(self, request: ProxyRequest) -> Flight:
        return self._flights[request]

    def __iter__(self) -> Iterator[ProxyRequest]:
        return iter(self._flights)

    def __len__(self) -> int:
        return len(self._flights)

    def add(self, request: ProxyRequest, flight: Flight) -> None:
        """
        A request has started.
        """
        self._flights[request] = flight

    def remove(self, request: ProxyRequest) -> None:
        """
        A request has ended and been recorded; a drain waiting for the last
        one goes on (to close the log files and the usage store).
        """
        del self._flights[request]
        if self.draining and not self._flights:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def withdraw(self) -> None:
        """
        Say the proxy is stopping (L{withdrawn}), while still serving: load
        balancers probing C{/-/ready} stop sending requests here before the
        listening ports close.
        """
        self.withdrawn = True

    def drain(self, grace_period: float) -> Deferred[None]:
        """
        Shut down gently: from now on L{draining} (and L{withdrawn}) is set
        (the app answers new requests with 503); give those in flight
        C{grace_period} seconds to finish, then drop their connections.

        @return: Fires when no request is left.
        """
        self.withdraw()
        self.draining = True
        if not self._flights:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        cut = self._clock.callLater(grace_period, self._cut)

        def stop_timer(result: None) -> None:
            if cut.active():
                cut.cancel()

        return drained.addCallback(stop_timer)

    def _cut(self) -> None:
        log.info(
            "Grace period over: closing {count} request(s) still running",
            count=len(self._flights),
        )
        for request, flight in list(self._flights.items()):
            flight.exchange.failed("shutdown", "still running at the end of the grace period")
            channel = request.channel
            transport = channel.transport if channel is not None else None
            if transport is not None:
                cast(ITCPTransport, transport).abortConnection()
