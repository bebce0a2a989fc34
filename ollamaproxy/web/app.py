# -*- test-case-name: tests.web.test_app -*-
"""
The conductor of each request's pipeline, and the route tree every request
enters by (L{Front}: Ollama's routes here, the proxy's own in
L{ollamaproxy.web.own_routes}).

The whole Ollama API is served, and again under C{/proxy/}, the prefix the
project's first version served it under.  Each request goes through the
same steps, each of which returns what it found or raises a
L{ProxyError}::

    preflight -> gate (the key) -> admit (limits) -> plan (models, caps,
              expected cost) -> reserve (the cost, against the quotas)
              -> dispatch (the backends) -> record

The app fills the request's L{Exchange} from what the steps return and
hands it to the recorder once, however the request ended.  Every error the
proxy answers itself is answered one way (L{ErrorAnswers}), in Ollama's
JSON shape, before the request is recorded, so that its body is counted.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from ollamaproxy.admission.caps import Caps
from ollamaproxy.admission.conversation import chat_id_of
from ollamaproxy.admission.limits import Limits
from ollamaproxy.admission.request_plan import plan_request
from ollamaproxy.admission.users import user_of
from ollamaproxy.backends.dispatch import Dispatcher, Job
from ollamaproxy.backends.headers import came_back
from ollamaproxy.backends.relay import Target
from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import Exchange
from ollamaproxy.readiness import Readiness
from ollamaproxy.record.metrics import Metrics
from ollamaproxy.record.recorder import Recorder
from ollamaproxy.routes import Catalogue, decoded_path
from ollamaproxy.web.answers import ErrorAnswers, target_of
from ollamaproxy.web.cors import Cors
from ollamaproxy.web.front import Front
from ollamaproxy.web.gate import Gate
from ollamaproxy.web.in_flight import Flight, InFlight
from ollamaproxy.web.own_routes import Mountable, OwnRoutes
from ollamaproxy.web.site import ProxyRequest

log = Logger()


class OllamaProxy:
    """
    An Ollama server that needs a key.

    @param gate: Checks the key of every request that needs one.
    @param limits: Keeps each key within its limits.
    @param dispatcher: Sends admitted requests to the backends.
    @param recorder: Writes down what happened to each request.
    @param in_flight: The registry of requests in flight, and the drain.
    @param clock: Tells when a request started.
    @param cors: Which browser origins may call the proxy.
    @param metrics: Counts the requests in flight, and is served at
        C{/metrics}.
    @param readiness: Answers C{GET /-/ready}.
    @param caps: The proxy's caps on C{keep_alive} and C{num_ctx}.
    @param console: The operator console, served at C{/-/console/}, or
        L{None}.
    @param catalogue: Ollama's routes.
    """

    def __init__(
        self,
        gate: Gate,
        limits: Limits,
        dispatcher: Dispatcher,
        recorder: Recorder,
        in_flight: InFlight,
        clock: IReactorTime,
        cors: Cors,
        metrics: Metrics,
        readiness: Readiness,
        *,
        caps: Caps | None = None,
        console: Mountable | None = None,
        catalogue: Catalogue | None = None,
    ) -> None:
        self._gate = gate
        self._limits = limits
        self._dispatcher = dispatcher
        self._recorder = recorder
        self._answers = ErrorAnswers(recorder.redact)
        self._in_flight = in_flight
        self._clock = clock
        self._cors = cors
        self._metrics = metrics
        self._readiness = readiness
        self._caps = Caps() if caps is None else caps
        self._console = console
        self._catalogue = catalogue or Catalogue()

    def resource(self) -> IResource:
        """
        The resource to serve, for a L{twisted.web.server.Site}: Ollama's
        fixed routes straight to L{proxy}, any other path through Klein's
        routes, the proxy's own and a catch-all to L{proxy} (L{Front}).
        """
        own = OwnRoutes(self._gate, self.proxy, self._answers, self._metrics, self._readiness,
                        self._console)
        return Front(self._catalogue, self.proxy, self._answers, own.app.resource())

    async def proxy(self, request: ProxyRequest) -> None:
        """
        Take a request through the pipeline, and record how it ended.
        """
        target = target_of(request.uri)
        exchange = Exchange(
            method=request.method.decode("ascii", "replace"),
            path=target.path.decode("ascii", "replace"),
            client=self._gate.client_address(request),
            started=self._clock.seconds(),
        )
        # Ollama does not announce a server name, so neither does the proxy.
        request.responseHeaders.removeHeader(b"server")
        if self._cors.is_preflight(request.method, request.requestHeaders):
            self._preflight(request, exchange)
            return
        for name, value in self._cors.response_headers(request.requestHeaders):
            request.responseHeaders.addRawHeader(name, value)
        flight = Flight(exchange)
        self._in_flight.add(request, flight)
        self._metrics.stream_started()
        # An error is answered here rather than by Klein's error handlers,
        # which run after this method has returned: its body is then
        # counted in the bytes the access line says were sent.
        try:
            await self._serve(request, target, flight)
        except ProxyError as e:
            exchange.failed(e.outcome, e.message)
            self._answer(request, exchange, e.code, self._answers.error(request, e))
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
            exchange.failed("internal_error", type(e).__name__)
            self._answer(request, exchange, 500, self._answers.bug(request, Failure()))
        finally:
            self._metrics.stream_ended()
            self._record(request, flight)
            # Last: a drain waiting for this request goes on to close the
            # log files and the usage store.
            self._in_flight.remove(request)

    @staticmethod
    def _answer(request: ProxyRequest, exchange: Exchange, code: int, error: bytes) -> None:
        """
        Answer with an error, unless the response has already ended: the
        relay ends it with the last byte of Ollama's answer, before the
        request is done with.
        """
        if not request.finished:
            exchange.status = code
            request.write(error)

    async def _serve(self, request: ProxyRequest, target: Target, flight: Flight) -> None:
        """
        The pipeline's steps after the preflight: gate, admit, plan,
        reserve, dispatch.  The limits come before the plan, which reads the
        body (up to 16 MiB): a key over its rate or its streams is refused
        before a byte of it is read.  The cost the plan expects is then
        reserved against the key's quotas, checked again; the release
        settles what the trip's meter counted, however the request ended.
        """
        exchange = flight.exchange
        self._check_accepting(request)
        # Every check sees the path Ollama's router will see.
        path = decoded_path(target.path)
        route = self._catalogue.find(path)
        if route is not None:
            exchange.route = route.pattern
        key = await self._gate.key(request, path, route, exchange.client)
        if key is None:
            if request.body is not None:
                # It would hold a connection to Ollama for as long as the
                # body takes.
                raise ProxyError(413, "a request without a key cannot have a body")
            await self._dispatcher.dispatch(request, Job(target, route), flight.trip)
            return
        exchange.key = key.name
        # Read only for a key that names its users: for any other, the
        # header is not trusted, and a request costs nothing more.
        user = chat_id = None
        # A key sent as a user or a chat id is refused: never logged, made
        # into a digest, nor forwarded.
        if key.user_header is not None:
            user = exchange.user = user_of(key.user_header.encode("ascii"),
                                           request.requestHeaders, self._recorder.redact)
        if key.chat_header is not None:
            chat_id = chat_id_of(key.chat_header.encode("ascii"), request.requestHeaders,
                                 self._recorder.redact)
        admission = await self._limits.admit(key)
        try:
            plan = await plan_request(key, request, target, path, route, self._caps,
                                      self._dispatcher.several, self._dispatcher.conversations,
                                      chat_id)
        except BaseException:
            admission.give_back()
            raise
        exchange.model = plan.model
        if plan.notes:
            exchange.notes = "; ".join(plan.notes)
        meter = flight.trip.meter
        if route is not None and route.runs:
            meter.expect(plan.estimate.prompt, plan.model.canonical if plan.model else "")
        release = await admission.reserve(plan.estimate.tokens)
        try:
            job = Job(target, route, key.name, key.weight, plan.model, plan.rewrite, plan.body,
                      plan.estimate.output, user=user, conversation=plan.conversation,
                      context=plan.context)
            await self._dispatcher.dispatch(request, job, flight.trip)
        finally:
            release(meter.tokens)

    def _check_accepting(self, request: ProxyRequest) -> None:
        """
        @raise ProxyError: 503 while the proxy shuts down; 508 for a request
            this proxy forwarded that came back to it (the upstream is the
            proxy itself), refused before the key check since a looped
            request carries no key.
        """
        if self._in_flight.draining:
            raise ProxyError(503, "ollamaproxy is shutting down", outcome="shutdown")
        via = self._dispatcher.via
        if via and came_back(request.requestHeaders, via):
            upstream = self._dispatcher.upstreams
            log.warn(
                "A request came back to this proxy: the upstream {upstream} points at "
                "the proxy itself.  Set --upstream to Ollama's address.",
                upstream=upstream,
            )
            raise ProxyError(
                508, f"the proxy's upstream ({upstream}) points at the proxy itself, "
                "not at Ollama",
                outcome="rejected",
            )

    def _record(self, request: ProxyRequest, flight: Flight) -> None:
        """
        Complete a request's record from what its trip found, and write it
        down.
        """
        exchange, trip = flight.exchange, flight.trip
        exchange.backend, exchange.queued = trip.backend, trip.queued
        exchange.placement = trip.placement
        if trip.retried:
            # Sent again after a backend hung on it: said beside what the
            # plan changed.
            exchange.notes = "; ".join(n for n in (exchange.notes, trip.retried) if n)
        if exchange.status is None:
            exchange.status = trip.status
        if trip.responded is not None:
            exchange.first_byte = trip.responded - exchange.started
        answered = trip.answered
        exchange.summary, exchange.response_sample = trip.meter.reading(), answered.sample
        if answered.cut is not None and exchange.outcome == "completed":
            exchange.failed("upstream_error", answered.cut)
        if request.body is not None:
            exchange.request_sample = request.body.sample
        self._recorder.record(exchange, request.sentLength, self._dispatcher.several)

    def _preflight(self, request: ProxyRequest, exchange: Exchange) -> None:
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
        self._recorder.record(exchange, 0)
