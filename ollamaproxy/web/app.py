# -*- test-case-name: tests.web.test_app -*-
"""
The Klein application: the route tree every request enters by.

One catch-all route takes the whole Ollama API, and the same tree is mounted
again under C{/proxy/}, where the seed served it.  Each request is
authenticated, relayed, and logged; every error the proxy answers itself
leaves through one handler, in Ollama's JSON shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from ollamaproxy.admission.auth import Authenticator, WrongKey
from ollamaproxy.admission.caps import Caps
from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.admission.limits import Limits, Throttle
from ollamaproxy.admission.request_plan import Plan, plan_request
from ollamaproxy.backends.everywhere import on_every_backend
from ollamaproxy.backends.listings import merge_listings
from ollamaproxy.backends.pool import Backend
from ollamaproxy.backends.queue import busy
from ollamaproxy.backends.relay import (
    NoResponseHead,
    Relayed,
    Target,
    Unreachable,
    end_cut,
    relay,
    whole_body,
)
from ollamaproxy.backends.router import Router
from ollamaproxy.console import CONSOLE_PATH, CONSOLE_ROUTE, Console, Live
from ollamaproxy.errors import ProxyError, error_body, is_openai_path, reason_phrase
from ollamaproxy.exchange import Exchange
from ollamaproxy.readiness import READY_PATH, Readiness
from ollamaproxy.record.logs import log_exchange
from ollamaproxy.record.metrics import Metrics
from ollamaproxy.record.redact import Redactor, redacted_failure
from ollamaproxy.record.usage import UsageStore
from ollamaproxy.routes import Catalogue, Placement, RouteSpec, Scope, decoded_path
from ollamaproxy.web.client_address import NOBODY, TrustedProxies
from ollamaproxy.web.cors import Cors
from ollamaproxy.web.headers import came_back, upstream_request_headers
from ollamaproxy.web.site import ProxyRequest

log = Logger()

PREFIX = b"/proxy"
# The proxy's own route, beside Ollama's.
METRICS_ROUTE = RouteSpec("/metrics", frozenset({b"GET"}), Scope.ADMIN)


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

    @param router: Gives each request a backend (an Ollama server).
    @param auth: Decides who may ask.
    @param limits: Keeps each key within its limits.
    @param clock: Tells time for the access log.
    @param metrics: Counts what happens, for Prometheus.
    @param usage: Keeps requests and tokens per key, or L{None}.
    @param body_sample_bytes: How much of each response body to log; 0 for
        none.
    @param catalogue: Ollama's routes.
    @param redact: Blanks credentials and keys in what the proxy logs or
        answers with; by default, a L{Redactor} that knows the keys of
        C{auth} by digest.
    @param trusted_proxies: The proxies in front whose forwarding headers
        name the client.
    @param caps: The proxy's caps on C{keep_alive} and C{num_ctx}.
    @param throttle: Slows down addresses that guess keys, or L{None}.
    @param readiness: Answers C{GET /-/ready}; the proxy adds its own
        checks to it (a healthy backend, not shutting down).
    """

    app = Klein()

    def __init__(
        self,
        router: Router,
        auth: Authenticator,
        limits: Limits,
        cors: Cors,
        clock: IReactorTime,
        metrics: Metrics,
        usage: UsageStore | None = None,
        body_sample_bytes: int = 0,
        catalogue: Catalogue | None = None,
        redact: Callable[[str], str] | None = None,
        trusted_proxies: TrustedProxies = NOBODY,
        caps: Caps | None = None,
        throttle: Throttle | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self._router = router
        self._caps = caps or Caps()
        # Every backend's client carries this process's mark.
        self._via = router.backends[0].upstream.via
        self._trusted_proxies = trusted_proxies
        self._catalogue = catalogue or Catalogue()
        self._redact = redact or Redactor(auth.keys.is_key)
        self._auth = auth
        self._limits = limits
        self._throttle = throttle
        self._cors = cors
        self._metrics = metrics
        self._usage = usage
        self._body_sample_bytes = body_sample_bytes
        self._clock = clock
        self._in_flight: dict[Any, Exchange] = {}
        self._draining = False
        self._drained: list[Deferred[None]] = []
        self._readiness = readiness or Readiness()
        self._readiness.add("backends", lambda: any(b.healthy for b in router.backends))
        # Not ready first when stopping, so that load balancers look away.
        self._readiness.add("accepting", lambda: not self._draining)
        #: The operator console at /-/console/; its sampler is a service
        #: the daemon runs.
        self.console = Console(
            Live(self._in_flight, router, clock, self._redact),
            auth.keys,
            usage,
            clock,
            lambda request: self._authenticate(request, CONSOLE_PATH, CONSOLE_ROUTE,
                                               self._client_address(request)),
        )

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
            if self._via and came_back(request.requestHeaders, self._via):
                raise self._loop()
            # Every check sees the path Ollama's router will see.
            path = decoded_path(target.path)
            route = self._catalogue.find(path)
            if route is not None:
                exchange.route = route.pattern
            key = await self._authenticate(request, path, route, exchange.client)
            await self._serve(request, target, exchange, key, path, route)
        except ProxyError as e:
            exchange.status = e.code
            exchange.failed(e.outcome, e.message)
            raise
        except CancelledError:
            # Klein cancels the handler when the client goes away, or when
            # the connection refused the rest of the request (site.py).
            if request.refused is not None:
                exchange.status, detail, outcome = request.refused
                exchange.failed(outcome, detail)
            elif exchange.outcome == "completed":
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

    async def _authenticate(
        self, request: Any, path: bytes, route: RouteSpec | None, client: str
    ) -> ApiKey | None:
        """
        The key a request presents (L{Authenticator.authenticate}); a wrong
        one is counted against the client's address, and answered with 429
        instead of 401 for an address that guesses.
        """
        try:
            return self._auth.authenticate(request.method, path, route, request.requestHeaders)
        except WrongKey:
            if self._throttle is not None:
                await self._throttle.failed(client)
            raise

    async def _serve(
        self,
        request: ProxyRequest,
        target: Target,
        exchange: Exchange,
        key: ApiKey | None,
        path: bytes,
        route: RouteSpec | None,
    ) -> None:
        """
        Relay an authenticated request within its key's limits.
        """
        if key is None:
            _refuse_body_without_key(request)
            await self._relay(request, target, exchange, None, route, Plan())
            return
        exchange.key = key.name
        release = await self._limits.admit(key)
        try:
            plan = await plan_request(key, request, target, path, route, self._caps,
                                      self._router.several)
            exchange.notes = "; ".join(plan.notes)
            exchange.model = plan.model
            await self._relay(request, target, exchange, key, route, plan)
        finally:
            summary = exchange.summary
            release(0 if summary is None else summary.prompt_tokens + summary.completion_tokens)

    async def _relay(
        self,
        request: ProxyRequest,
        target: Target,
        exchange: Exchange,
        key: ApiKey | None,
        route: RouteSpec | None,
        plan: Plan,
    ) -> None:
        """
        Relay a request to the backend the router gives it; if that backend
        cannot even be connected to (nothing was sent), to another that has
        its model.  A backend that took the request but sent no response
        head (timed out, or broke off) is marked unhealthy too, but the
        request goes nowhere else: it may have been sent, and the client
        gets the 504 or 502.  A listing, with several backends, is every
        healthy backend's, merged.

        @param key: The key presented, or L{None} on an open route.
        """
        if route is not None and route.listing is not None and self._router.several:
            await self._merged_listing(request, target, exchange, route.listing, plan)
            return
        if route is not None and route.placement in _EVERY and self._router.several:
            await self._on_every_backend(request, target, exchange, route, plan)
            return
        tried: list[Backend] = []
        unreachable: Unreachable | None = None
        while True:
            try:
                lease = await self._router.acquire(
                    exchange.key,
                    plan.model,
                    runs=route is not None and route.runs,
                    primary=route is not None and route.placement is Placement.PRIMARY,
                    exclude=tried,
                    weight=1 if key is None else key.weight,
                )
            except ProxyError:
                if unreachable is not None:
                    raise unreachable from None
                raise
            exchange.backend = lease.backend.name
            exchange.queued = lease.queued
            try:
                relayed = await relay(
                    request, lease.backend.upstream, target,
                    lambda code: exchange.responded(self._clock.seconds(), code),
                    plan.rewrite, self._body_sample_bytes,
                )
            except Unreachable as e:
                self._router.pool.failed(lease.backend, e.message)
                tried.append(lease.backend)
                if len(tried) == len(self._router.backends):
                    raise
                unreachable = e
                continue
            except NoResponseHead as e:
                self._router.pool.failed(lease.backend, e.message)
                raise
            finally:
                lease.release()
            if route is not None and route.changes_models and self._router.several:
                self._router.pool.refresh(lease.backend)
            await self._relayed(request, exchange, relayed)
            return

    async def _on_every_backend(
        self, request: ProxyRequest, target: Target, exchange: Exchange, route: RouteSpec,
        plan: Plan,
    ) -> None:
        """
        Send a model's pull to every healthy backend in turn, or its delete
        or copy to every one that has it (L{ollamaproxy.backends.everywhere}); then
        ask each for its models again.
        """
        body = plan.body
        if body is None and request.body is not None:
            raise ProxyError(400, "with several backends, the proxy reads this request's "
                             "body to send it to each: send it uncompressed, with a "
                             "Content-Length")
        backends = [
            b for b in self._router.backends
            if b.healthy and (route.placement is Placement.EVERY or plan.model is None
                              or b.has(plan.model))
        ]
        if not backends:
            if route.placement is Placement.EVERY or plan.model is None:
                raise busy("no backend is healthy", 1)
            raise ProxyError(404, f"model '{plan.model.canonical}' not found on any "
                             "healthy backend")
        try:
            relayed, reached = await on_every_backend(
                request, target, backends, body or b"",
                lambda code: exchange.responded(self._clock.seconds(), code),
                self._body_sample_bytes,
            )
        finally:
            for backend in backends:
                self._router.pool.refresh(backend)
        exchange.backend = ",".join(b.name for b in reached)
        await self._relayed(request, exchange, relayed)

    async def _relayed(self, request: ProxyRequest, exchange: Exchange, relayed: Relayed) -> None:
        """
        Note what a response amounted to; end one that was cut short.
        """
        exchange.summary = relayed.summary
        exchange.response_sample = relayed.sample
        if relayed.cut is not None:
            exchange.failed("upstream_error", relayed.cut)
            await end_cut(request)

    async def _merged_listing(
        self, request: ProxyRequest, target: Target, exchange: Exchange, field: str, plan: Plan
    ) -> None:
        """
        Answer a model listing with the union of every healthy backend's,
        asked all at once.
        """
        backends = [b for b in self._router.backends if b.healthy]
        headers = upstream_request_headers(request.requestHeaders, self._via)
        answers = await gatherResults(
            [Deferred.fromCoroutine(self._listing_of(b, target, headers)) for b in backends],
            consumeErrors=True,
        )
        bodies = [body for body in answers if body is not None]
        if not bodies:
            raise ProxyError(502, "no backend answered for the model listing")
        try:
            merged = merge_listings(bodies, field)
        except ValueError:
            raise ProxyError(502, "a backend's model listing could not be read") from None
        if plan.rewrite is not None:
            merged = plan.rewrite(merged)
        exchange.responded(self._clock.seconds(), 200)
        exchange.backend = ",".join(
            b.name for b, body in zip(backends, answers, strict=True) if body is not None
        )
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(merged))
        request.write(merged)

    async def _listing_of(self, backend: Backend, target: Target, headers: Headers) -> bytes | None:
        """
        One backend's listing, or L{None} if it did not give one (a backend
        that could not be asked is marked unhealthy).
        """
        try:
            response = await backend.upstream.request(b"GET", target.target, headers, None)
            body = await whole_body(response)
        except CancelledError:
            raise
        except Exception as e:
            self._router.pool.failed(backend, f"{type(e).__name__}: {e}")
            return None
        return body if response.code == 200 else None

    def _loop(self) -> ProxyError:
        """
        A request this proxy forwarded came back to it: the upstream is the
        proxy itself.  Say so once for each such request (the 508 ends the
        circle at its second turn) and refuse it before the key check, since
        a looped request carries no key.
        """
        upstream = ", ".join(b.name for b in self._router.backends)
        log.warn(
            "A request came back to this proxy: the upstream {upstream} points at "
            "the proxy itself.  Set --upstream to Ollama's address.",
            upstream=upstream,
        )
        return ProxyError(
            508,
            f"the proxy's upstream ({upstream}) points at the proxy itself, "
            "not at Ollama",
            outcome="rejected",
        )

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
        log_exchange(exchange, sent_bytes, now, self._redact)
        self._metrics.observe(exchange, now)
        if self._usage is not None and exchange.key != "-":
            self._usage.record_summary(exchange.key, exchange.summary, now)

    def record_refused(self, exchange: Exchange, sent_bytes: int, now: float) -> None:
        """
        Write down a request the web server refused before it reached
        L{proxy} (a malformed request line or header): log and metrics.
        """
        # Any token passes for a method here, a key too.
        exchange.method = self._redact(exchange.method)
        log_exchange(exchange, sent_bytes, now, self._redact)
        self._metrics.observe(exchange, now)

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
    async def metrics(self, request: Any) -> bytes:
        """
        Prometheus metrics, for admin keys (or, without a key, on the
        separate C{--metrics-listen} endpoint).
        """
        await self._authenticate(request, b"/metrics", METRICS_ROUTE,
                                 self._client_address(request))
        content_type, body = self._metrics.render(request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type)
        return body

    @app.route(CONSOLE_PATH.decode("ascii") + "/", branch=True)
    def console_page(self, request: Any) -> IResource:
        """
        The operator console (L{ollamaproxy.console}): admin keys only, but
        for the page's own files.
        """
        return self.console.serve(request)

    @app.route(CONSOLE_PATH.decode("ascii"))
    def console_redirect(self, request: Any) -> bytes:
        """
        The console's address without its slash: to the page.
        """
        return self.console.redirect(request)

    @app.route(READY_PATH.decode("ascii"), methods=["GET", "HEAD"])
    def ready(self, request: Any) -> bytes:
        """
        Whether this proxy can serve (L{Readiness}), without a key.
        """
        code, body = self._readiness.answer()
        request.setResponseCode(code, reason_phrase(code))
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return body

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
        # A message may repeat the path or a model name the client sent.
        return _error_response(request, error.code, self._redact(error.message), error.headers)

    @app.handle_errors(Exception)
    def unexpected_error(self, request: IRequest, failure: Failure) -> bytes:
        """
        A bug: log it with its traceback, and answer with a 500 that shows
        none.  The URI (its query string may hold a key) and the exception's
        message are redacted in the event itself, for every log observer.
        """
        uri = self._redact((request.uri or b"").decode("utf-8", "replace"))
        log.failure("Unexpected error handling {uri}", redacted_failure(failure, self._redact),
                    uri=uri)
        return _error_response(request, 500, "internal error in ollamaproxy", {})


_EVERY = (Placement.EVERY, Placement.EVERY_HAVING)


def _refuse_body_without_key(request: ProxyRequest) -> None:
    """
    A request without a key (on an open route) may not send a body: it
    would hold a connection to Ollama for as long as the body takes.

    @raise ProxyError: 413 if it has one.
    """
    if request.body is not None:
        raise ProxyError(413, "a request without a key cannot have a body")


def _error_response(
    request: IRequest, code: int, message: str, headers: dict[bytes, bytes]
) -> bytes:
    request.setResponseCode(code, reason_phrase(code))
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    for name, value in headers.items():
        request.setHeader(name, value)
    openai = is_openai_path(target_of(request.uri).path)
    return error_body(message, code, openai)

