# -*- test-case-name: tests.test_app -*-
"""
The Klein application: the route tree every request enters by.

One catch-all route takes the whole Ollama API, and the same tree is mounted
again under C{/proxy/}, where the seed served it.  Each request is
authenticated, relayed, and logged; every error the proxy answers itself
leaves through one handler, in Ollama's JSON shape.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import unquote

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from ollamaproxy.auth import (
    LISTINGS,
    MODEL_IN_BODY,
    OPENAI_MODEL_PREFIX,
    Authenticator,
    check_models,
    filter_listing,
    models_named,
)
from ollamaproxy.client_address import NOBODY, TrustedProxies
from ollamaproxy.config import Route
from ollamaproxy.cors import Cors
from ollamaproxy.errors import ProxyError, error_body, is_openai_path, reason_phrase
from ollamaproxy.keys import ApiKey
from ollamaproxy.limits import KeyLimits
from ollamaproxy.logs import Exchange, log_exchange
from ollamaproxy.metrics import Metrics
from ollamaproxy.relay import Target, relay
from ollamaproxy.request_body import BodyTooLarge
from ollamaproxy.site import ProxyRequest
from ollamaproxy.upstream import Upstream
from ollamaproxy.usage import UsageStore

log = Logger()

PREFIX = b"/proxy"
# A body read whole to see which model it names (chat with images can be
# several MB).
MAX_CHECKED_BODY = 64 * 1024 * 1024


def target_of(uri: bytes) -> Target:
    """
    Where a request URI goes: the seed's C{/proxy} prefix comes off, the
    rest (path and query string, exactly as sent) goes to Ollama.
    """
    if uri == PREFIX or uri.startswith(PREFIX + b"/") or uri.startswith(PREFIX + b"?"):
        uri = uri[len(PREFIX):]
    if not uri.startswith(b"/"):
        uri = b"/" + uri
    path = uri.split(b"?", 1)[0]
    return Target(path=path, target=uri, openai=is_openai_path(path))


class OllamaProxy:
    """
    An Ollama server that needs a key.

    @param upstream: Ollama, and how to reach it.
    @param auth: Decides who may ask.
    @param clock: Tells time for the access log.
    @param metrics: Counts what happens, for Prometheus.
    @param usage: Keeps requests and tokens per key, or L{None}.
    @param body_sample_bytes: How much of each response body to log; 0 for
        none.
    @param trusted_proxies: The proxies in front whose forwarding headers
        name the client.
    """

    app = Klein()

    def __init__(
        self,
        upstream: Upstream,
        auth: Authenticator,
        limits: KeyLimits,
        cors: Cors,
        clock: IReactorTime,
        metrics: Metrics,
        usage: UsageStore | None = None,
        body_sample_bytes: int = 0,
        trusted_proxies: TrustedProxies = NOBODY,
    ) -> None:
        self._upstream = upstream
        self._trusted_proxies = trusted_proxies
        self._auth = auth
        self._limits = limits
        self._cors = cors
        self._metrics = metrics
        self._usage = usage
        self._body_sample_bytes = body_sample_bytes
        self._clock = clock
        self._in_flight: dict[Any, Exchange] = {}
        self._draining = False
        self._drained: list[Deferred[None]] = []

    def resource(self) -> IResource:
        """
        The resource to serve, for a L{twisted.web.server.Site}.
        """
        return self.app.resource()

    @app.route("/", branch=True)
    async def proxy(self, request: Any) -> None:
        """
        Authenticate a request, relay it to Ollama, and log what happened.
        """
        target = target_of(request.uri)
        exchange = Exchange(
            method=request.method.decode("ascii", "replace"),
            path=target.path.decode("ascii", "replace"),
            client=self._client_address(request),
            started=self._clock.seconds(),
        )
        # Ollama does not announce a server name, so neither does the proxy.
        request.responseHeaders.removeHeader(b"server")
        if self._cors.is_preflight(request.method, request.requestHeaders):
            self._preflight(request, exchange)
            return
        for name, value in self._cors.response_headers(request.requestHeaders):
            request.responseHeaders.addRawHeader(name, value)
        self._in_flight[request] = exchange
        self._metrics.stream_started()
        try:
            if self._draining:
                raise ProxyError(503, "ollamaproxy is shutting down", outcome="shutdown")
            key = self._auth.authenticate(
                request.method, target.path, request.requestHeaders, exchange.client
            )
            await self._serve(request, target, exchange, key)
        except ProxyError as e:
            exchange.status = e.code
            exchange.failed(e.outcome, e.message)
            raise
        except CancelledError:
            # Klein cancels the handler when the client goes away.
            if exchange.outcome == "completed":
                exchange.failed("client_disconnected", "")
            raise
        except Exception as e:
            exchange.status = 500
            exchange.failed("internal_error", type(e).__name__)
            raise
        finally:
            self._metrics.stream_ended()
            if request.body is not None:
                exchange.request_sample = request.body.sample
            self._record(exchange, request.sentLength)
            # Last: a drain waiting for this request goes on to close the
            # log files and the usage store.
            del self._in_flight[request]
            if self._draining and not self._in_flight:
                drained, self._drained = self._drained, []
                for d in drained:
                    d.callback(None)

    async def _serve(
        self, request: ProxyRequest, target: Target, exchange: Exchange, key: ApiKey | None
    ) -> None:
        """
        Relay an authenticated request within its key's limits.
        """
        if key is None:
            await relay(request, self._upstream, target, exchange,
                        sample_bytes=self._body_sample_bytes)
            return
        exchange.key = key.name
        release = self._limits.admit(key)
        try:
            rewrite = await self._models_for(key, request, target)
            await relay(request, self._upstream, target, exchange, rewrite,
                        self._body_sample_bytes)
        finally:
            release()

    def _client_address(self, request: Any) -> str:
        """
        Who a request comes from: its peer, or the client a trusted proxy
        in front names.
        """
        peer = request.getClientAddress()
        return self._trusted_proxies.client_address(
            str(getattr(peer, "host", peer)), request.requestHeaders
        )

    def _record(self, exchange: Exchange, sent_bytes: int) -> None:
        """
        Write down what happened to a request: log, metrics, usage.
        """
        now = self._clock.seconds()
        log_exchange(exchange, sent_bytes, now, self._upstream.base.decode("ascii"),
                     self._auth.keys.is_key)
        self._metrics.observe(exchange, now)
        if self._usage is not None and exchange.key != "-":
            self._usage.record_summary(exchange.key, exchange.summary, now)

    def _preflight(self, request: Any, exchange: Exchange) -> None:
        """
        Answer a browser's CORS preflight, without a key (browsers send none
        on a preflight): 204 with what the origin may do, or 403 with an
        empty body, as Ollama answers an origin it does not allow.
        """
        headers = self._cors.preflight(request.requestHeaders)
        request.setResponseCode(403 if headers is None else 204)
        for name, value in headers or []:
            request.responseHeaders.addRawHeader(name, value)
        exchange.status = request.code
        if headers is None:
            exchange.failed("rejected", "origin not allowed")
        self._record(exchange, 0)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Any) -> bytes:
        """
        Prometheus metrics, for admin keys (or, without a key, on the
        separate C{--metrics-listen} endpoint).
        """
        self._auth.authenticate(
            b"GET", b"/metrics", request.requestHeaders, self._client_address(request)
        )
        content_type, body = self._metrics.render(request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type)
        return body

    async def _models_for(
        self, key: ApiKey, request: ProxyRequest, target: Target
    ) -> Callable[[bytes], bytes] | None:
        """
        For a key limited to some models: refuse a request for another
        model, and say how to narrow a model listing.

        @return: How to rewrite the response body, if it needs it.
        @raise ProxyError: 403 for a model the key may not use.
        """
        if not key.models:
            return None
        route = Route(request.method, target.path)
        if route in MODEL_IN_BODY and request.body is not None:
            try:
                body = await request.body.collect(MAX_CHECKED_BODY)
            except BodyTooLarge:
                raise ProxyError(413, "request body too large to check its model") from None
            check_models(key, models_named(body))
        elif target.path.startswith(OPENAI_MODEL_PREFIX):
            name = unquote(target.path[len(OPENAI_MODEL_PREFIX):].decode("utf-8", "replace"))
            check_models(key, [name])
        elif route in LISTINGS:
            return partial(filter_listing, key, LISTINGS[route])
        return None

    def drain(self, grace_period: float) -> Deferred[None]:
        """
        Shut down gently: answer new requests with 503, give those in flight
        C{grace_period} seconds to finish, then drop their connections.

        @return: Fires when no request is left.
        """
        self._draining = True
        if not self._in_flight:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        cut = self._clock.callLater(grace_period, self._cut_in_flight)

        def stop_timer(result: None) -> None:
            if cut.active():
                cut.cancel()

        return drained.addCallback(stop_timer)

    def _cut_in_flight(self) -> None:
        log.info(
            "Grace period over: closing {count} request(s) still running",
            count=len(self._in_flight),
        )
        for request, exchange in list(self._in_flight.items()):
            exchange.failed("shutdown", "still running at the end of the grace period")
            transport = request.channel and request.channel.transport
            if transport is not None:
                transport.abortConnection()

    @app.handle_errors(ProxyError)
    def proxy_error(self, request: IRequest, failure: Failure) -> bytes:
        """
        Answer with the error's status and an Ollama-shaped JSON body.
        """
        error = failure.value
        assert isinstance(error, ProxyError)
        return _error_response(request, error.code, error.message, error.headers)

    @app.handle_errors(Exception)
    def unexpected_error(self, request: IRequest, failure: Failure) -> bytes:
        """
        A bug: log it with its traceback, and answer with a 500 that shows
        none.
        """
        log.failure("Unexpected error handling {uri}", failure, uri=request.uri)
        return _error_response(request, 500, "internal error in ollamaproxy", {})


def _error_response(
    request: IRequest, code: int, message: str, headers: dict[bytes, bytes]
) -> bytes:
    request.setResponseCode(code, reason_phrase(code))
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    for name, value in headers.items():
        request.setHeader(name, value)
    openai = is_openai_path(target_of(request.uri).path)
    return error_body(message, code, openai)


