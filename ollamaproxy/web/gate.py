# -*- test-case-name: tests.web.test_gate -*-
"""
The gate every request that needs a key passes: who the client is, and the
key it presents, checked for the route it asks for.

The Ollama API's catch-all route asks the gate as a step of its pipeline
(L{ollamaproxy.web.app}); every other route that needs a key (metrics, the
console's data) is declared with L{keyed}, which asks the gate before the
handler runs, so that a new route cannot forget the check.  A wrong key is
counted against the client's address, and an address that guesses gets 429
instead of 401.

What the routes declared with L{keyed} refuse is written down by the one
recorder (L{Recorder.record}), with the outcome C{rejected} and the
refusal's status, as the app writes down the refusals of Ollama's routes:
so a wrong, missing or insufficient key sent to C{/metrics} or the console
has its access line and its count in C{ollamaproxy_auth_failures_total},
and someone guessing keys there is seen like anywhere else.  What those
routes serve is not written down: they are the proxy's own, not Ollama's,
and the console polls several times a second, which would bury the
access log under lines that say nothing.  (The app's Ollama routes are
recorded by the app, so L{Gate.key} itself records nothing.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, Protocol, TypeVar, cast

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from ollamaproxy.admission.auth import Authenticator, WrongKey
from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.admission.limits import Throttle
from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import Exchange
from ollamaproxy.record.recorder import Recorder
from ollamaproxy.routes import RouteSpec
from ollamaproxy.web.client_address import NOBODY, TrustedProxies


class Gate:
    """
    Checks the key a request presents.

    @param auth: Decides who may ask.
    @param recorder: Writes down the refusals of the routes declared with
        L{keyed}.
    @param clock: Tells when those requests started.
    @param trusted_proxies: The proxies in front whose forwarding headers
        name the client.
    @param throttle: Slows down addresses that guess keys, or L{None}.
    """

    def __init__(
        self,
        auth: Authenticator,
        recorder: Recorder,
        clock: IReactorTime,
        trusted_proxies: TrustedProxies = NOBODY,
        throttle: Throttle | None = None,
    ) -> None:
        self.auth = auth
        self._recorder = recorder
        self._clock = clock
        self._trusted_proxies = trusted_proxies
        self._throttle = throttle

    def client_address(self, request: IRequest) -> str:
        """
        Who a request comes from: its peer, or the client a trusted proxy
        in front names.
        """
        peer = request.getClientAddress()
        return self._trusted_proxies.client_address(
            str(getattr(peer, "host", peer)), request.requestHeaders
        )

    async def key(
        self, request: IRequest, path: bytes, route: RouteSpec | None, client: str
    ) -> ApiKey | None:
        """
        The key a request presents (L{Authenticator.authenticate}).

        @param client: The client's address (L{client_address}).
        @return: The key, or L{None} on an open route.
        @raise ProxyError: 401 for a missing, wrong or expired key (429 for
            an address that guesses), 403, 404 or 405 for a route the key
            may not use.
        """
        method = request.method
        assert method is not None
        try:
            return self.auth.authenticate(method, path, route, request.requestHeaders)
        except WrongKey:
            if self._throttle is not None:
                await self._throttle.failed(client)
            raise

    async def check(self, request: IRequest, route: RouteSpec, may_open: bool) -> None:
        """
        Check the key of a request to a route declared with L{keyed}, and
        write the request down if it is refused.

        @param may_open: Whether the route may be opened to requests
            without a key.
        @raise ProxyError: As L{key} does, or 403 for a request without a
            key to a route that may not be opened.
        """
        started = self._clock.seconds()
        client = self.client_address(request)
        path = route.pattern.encode("ascii")
        try:
            key = await self.key(request, path, route, client)
            if key is None and not may_open:
                raise ProxyError(403, f"{route.pattern} needs a key")
        except ProxyError as e:
            method = request.method or b"-"
            exchange = Exchange(
                method=method.decode("ascii", "replace"),
                path=(request.path or path).decode("ascii", "replace"),
                client=client,
                started=started,
                route=route.pattern,
                status=e.code,
            )
            exchange.failed(e.outcome, e.message)
            # Recorded before the error's body is written, as the app records
            # its own refusals: no body bytes sent yet.
            self._recorder.record(exchange, 0)
            raise

    def holds(self, request: IRequest, route: RouteSpec, *, may_open: bool) -> bool:
        """
        Whether the key a request to a route declared with L{keyed}
        presented still passes, for an answer that lasts (the console's
        feed): a key revoked, expired or narrowed since it was checked does
        not.  Nothing is counted against the address (the key passed once:
        it is no guess), and nothing is recorded.
        """
        method = request.method
        assert method is not None
        path = route.pattern.encode("ascii")
        try:
            key = self.auth.authenticate(method, path, route, request.requestHeaders)
        except ProxyError:
            return False
        return key is not None or may_open


class Gated(Protocol):
    """
    What has routes declared with L{keyed}: its gate.
    """

    @property
    def gate(self) -> Gate:
        """The gate the routes' requests pass."""


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def keyed(route: RouteSpec, *, may_open: bool = True) -> Callable[[_Handler], _Handler]:
    """
    Declare a Klein handler of C{route}: the gate checks the request's key
    first, and the handler runs only if it may use the route.

    Apply it below C{@app.route(...)}.

    @param may_open: Whether the operator may open the route to requests
        without a key (C{--open-routes}); if not, such a request gets 403.
    """

    def declare(handler: _Handler) -> _Handler:
        @wraps(handler)
        async def checked(self: Gated, request: IRequest, *args: Any, **kwargs: Any) -> Any:
            await self.gate.check(request, route, may_open)
            return await handler(self, request, *args, **kwargs)

        return cast(_Handler, checked)

    return declare
