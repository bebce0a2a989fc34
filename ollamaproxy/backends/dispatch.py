# -*- test-case-name: tests.web.test_app,tests.backends.test_through_proxy -*-
"""
Sending an admitted request to Ollama and answering the client: the one
step of the pipeline that talks to the backends.

A request goes to the backend the router gives it; if that backend cannot
even be connected to (nothing was sent), to another that has its model.  A
backend that took the request but sent no response head (timed out, or
broke off) is marked unhealthy too (for the model, if it hung on a
generation), and the request mostly goes nowhere else: it may have been
sent, and the client gets the 504 or 502.

But a request that runs a model and got no response head within the header
timeout (a hung generation, Ollama #17408) is sent once more, to another
backend that serves the model (L{Dispatcher._again}): nothing was written
to its client, the hung backend answered nothing, and its body, read whole
by its plan, can be sent again.  A request whose body streamed past the
proxy unread, one that takes no slot, or one with no other backend for its
model gets the 504 as before; a client that leaves cancels the retry as it
cancels any request.  So a client waits at most two header timeouts for a
response head, with the second's wait for a slot in between (at most
C{--queue-timeout}).

With several backends, a model listing is every healthy backend's, merged,
and a model's pull, delete or copy goes to every backend
(L{ollamaproxy.backends.everywhere}).

What the trip found (the backend, the wait, the status, what the answer
amounted to) is written in a L{Trip} that the caller hands in and reads
when the request has ended, however it ended: a request cancelled
mid-stream or refused by a backend still has its backend and status to
log, which a return value would lose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

from ollamaproxy.after_send import AfterSend
from ollamaproxy.backends.downstream import Downstream
from ollamaproxy.backends.everywhere import on_every_backend
from ollamaproxy.backends.headers import upstream_request_headers
from ollamaproxy.backends.listings import merge_listings
from ollamaproxy.backends.pool import Backend
from ollamaproxy.backends.queue import busy
from ollamaproxy.backends.relay import (
    NOTHING_ANSWERED,
    Answered,
    NoResponseHead,
    Target,
    Unreachable,
    answer,
    send,
    whole_body,
)
from ollamaproxy.backends.router import Lease, Router
from ollamaproxy.backends.upstream import BytesProducer
from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import Meter
from ollamaproxy.model_names import ModelName
from ollamaproxy.routes import Placement, RouteSpec

_EVERY = (Placement.EVERY, Placement.EVERY_HAVING)


@dataclass(frozen=True)
class Job:
    """
    An admitted request, as the backends' side needs it.

    @ivar target: Where it goes.
    @ivar route: Its route in the catalogue, if it is one of Ollama's.
    @ivar key: The name of the key it came with (its turn in the fair
        queue), C{-} for none.
    @ivar weight: The key's share of turns in the fair queue.
    @ivar user: Who it is for behind its key, whose share of the key's
        it has in the fair queue; L{None} for a key that names no users.
    @ivar model: The model it runs or names, for the router.
    @ivar rewrite: How to rewrite a successful answer, if it needs it.
    @ivar body: Its body, if it was read whole (as sent on).
    @ivar expected_output: The tokens it may generate, as its plan
        estimates them: with its meter's prompt estimate, what the fair
        queue charges it until the meter says (L{Router}).
    @ivar conversation: The digest of the conversation it continues, if
        any: the router sends it home if it may.
    @ivar context: The C{num_ctx} its body is sent with, if the plan knows
        it: the backend it goes to is known to hold its model with that
        context from the moment it is sent (L{ollamaproxy.backends.pool.BackendPool.sending}).
    """

    target: Target
    route: RouteSpec | None = None
    key: str = "-"
    weight: int = 1
    model: ModelName | None = None
    rewrite: Callable[[bytes], bytes] | None = None
    body: bytes | None = None
    expected_output: int = 0
    user: str | None = None
    conversation: bytes | None = None
    context: int | None = None


@dataclass
class Trip:
    """
    What a request's trip to the backends found, written as it goes.

    @ivar backend: The backend (or, comma-separated, backends) it went to.
    @ivar queued: Seconds it waited in the fair queue for a slot.
    @ivar status: The status Ollama's answer came with.
    @ivar responded: When that answer's head came.
    @ivar answered: What the answer amounted to.
    @ivar meter: The tokens the answer used, counted as it streams (so
        that a request cancelled mid-stream still has them).
    @ivar placement: For a request that carried a conversation, how its
        backend compared with its conversation's last (C{home}, C{moved},
        C{new}); empty for others.
    @ivar retried: For a request sent again after a backend hung on it,
        which backend and why (for the access line's notes); empty for
        others.  C{backend} is then the one it was sent to again, and
        C{queued} both its waits for a slot.
    """

    backend: str = ""
    queued: float = 0.0
    status: int | None = None
    responded: float | None = None
    answered: Answered = NOTHING_ANSWERED
    meter: Meter = field(default_factory=Meter)
    placement: str = ""
    retried: str = ""


class Dispatcher:
    """
    Sends admitted requests to the backends the router gives them, and
    answers their clients.

    @param after_send: Makes the calls that wait until an answer has been
        sent: a request's end of trip (its slot freed, its tokens settled)
        never delays its answer.
    @param sample_bytes: How much of each response body to keep for the
        log; 0 for none.
    """

    def __init__(self, router: Router, after_send: AfterSend, sample_bytes: int = 0) -> None:
        self._router = router
        self._after_send = after_send
        self._pool = router.pool
        self._sample_bytes = sample_bytes
        # Every backend's client carries the process's clock.
        self._clock = router.backends[0].upstream.clock
        #: Whether the router chooses among backends.
        self.several = router.several
        #: Whether it sends a conversation's turns home.
        self.conversations = router.affinity is not None
        #: This process's mark, which every backend's client carries.
        self.via = router.backends[0].upstream.via
        #: The backends, as an operator names them.
        self.upstreams = ", ".join(b.name for b in router.backends)

    async def dispatch(self, request: Downstream, job: Job, trip: Trip) -> None:
        """
        Send C{request} on and answer it with what comes back.

        @param trip: Written as the request goes (see the module's
            docstring).
        @raise ProxyError: If the request could not be sent, or no answer
            came (nothing was written to the client then); an answer cut
            short is not an error, but C{trip.answered.cut}.
        """
        route = job.route
        if route is not None and self.several:
            if route.listing is not None:
                await self._merged_listing(request, job, route.listing, trip)
                return
            if route.placement in _EVERY:
                await self._on_every_backend(request, job, route, trip)
                return
        await self._on_one_backend(request, job, trip)

    async def _on_one_backend(self, request: Downstream, job: Job, trip: Trip) -> None:
        """
        Send a request to the backend the router gives it, or, if that one
        cannot be connected to, to the next; or, once, if it hung on the
        request, to another (L{_again}).
        """
        route = job.route
        # A HEAD whose answer is rewritten goes as GET, so that its length
        # is the rewritten body's.
        method = b"GET" if job.rewrite is not None and request.method == b"HEAD" else None
        tried: list[Backend] = []
        # Why it left the last backend it tried: its answer if no other comes.
        moved_on: ProxyError | None = None
        again: IBodyProducer | None = None  # its body held whole, once it hung
        while True:
            try:
                acquiring = self._router.acquire(
                    job.key,
                    job.model,
                    runs=route is not None and route.runs,
                    primary=route is not None and route.placement is Placement.PRIMARY,
                    exclude=tried,
                    weight=job.weight,
                    meter=trip.meter,
                    expected_output=job.expected_output,
                    user=job.user,
                    conversation=job.conversation,
                )
                if acquiring.called:
                    # Most requests get their lease at once, for no call more.
                    lease = await acquiring
                else:
                    if request.body is not None:
                        # Queued: read on, so that a client that leaves is seen to.
                        request.body.wait()
                    lease = await self._waited(acquiring, trip)
            except ProxyError:
                if moved_on is not None:
                    trip.retried = ""
                    raise moved_on from None
                raise
            backend = lease.backend
            trip.backend, trip.queued = backend.name, trip.queued + lease.queued
            if lease.placement is not None:
                trip.placement = lease.placement
            # Per request, and only for a body that names a context: a
            # look-up and a count, then another at its end.
            sent = (self._pool.sending(backend, lease.model, job.context)
                    if job.context is not None and lease.model is not None else None)
            try:
                response = await send(request, backend.upstream, job.target, method, again)
                trip.status, trip.responded = response.code, backend.upstream.clock.seconds()
                if lease.model is not None:
                    lease.answering(response)
                trip.answered = await answer(request, response, backend.upstream, job.target,
                                             self._after_send, job.rewrite, self._sample_bytes,
                                             trip.meter)
            except Unreachable as e:
                self._pool.failed(backend, e.message)
                tried.append(backend)
                if len(tried) == len(self._router.backends):
                    raise
                moved_on = e
                continue
            except NoResponseHead as e:
                self._no_head(backend, job, e)
                if trip.retried or not self._again(request, job, e):
                    raise
                trip.retried = f"retried after {backend.name}: {e.message}"
                tried.append(backend)
                moved_on, again = e, None if job.body is None else BytesProducer(job.body)
                continue
            finally:
                lease.release()
                if sent is not None:
                    self._pool.ended(backend, sent)
            if route is not None and route.changes_models and self.several:
                self._pool.refresh(backend)
            return

    def _no_head(self, backend: Backend, job: Job, error: NoResponseHead) -> None:
        """
        C{backend} took C{job}'s request but sent no response head: out of
        rotation, for the model only if a generation of it timed out (its
        listings may answer while this model's runs hang, so only a run of
        the model brings it back).
        """
        route = job.route
        if error.code == 504 and job.model is not None and route is not None \
                and route.generates:
            self._pool.hung(backend, job.model, error.message)
        else:
            self._pool.failed(backend, error.message)

    def _again(self, request: Downstream, job: Job, error: NoResponseHead) -> bool:
        """
        Whether a request that a backend sent no response head for may be
        sent once more, to another backend (the caller sees to once): it
        runs a model (it takes a slot: what hangs), it timed out (a 504; a
        connection that broke may have been the request's own doing, and
        would break the next backend's too), there are other backends, and
        its body, if it has one, was read whole by its plan (one streamed
        past the proxy cannot be sent again).  Nothing was written to its
        client yet.  Whether another backend serves its model is the
        router's to say, when the request asks it for one.
        """
        route = job.route
        return (error.code == 504 and route is not None and route.runs and self.several
                and (request.body is None or job.body is not None))

    async def _waited(self, acquiring: Deferred[Lease], trip: Trip) -> Lease:
        """
        The lease C{acquiring}, a wait in the fair queue, fires with.  A
        request that leaves the queue without one (its client left, or it
        waited too long) waited all the same, but the lease that says how
        long never comes: its wait is measured here, for the log (added to
        any wait before a backend it left).
        """
        since = self._clock.seconds()
        try:
            return await acquiring
        except BaseException:
            trip.queued += self._clock.seconds() - since
            raise

    async def _on_every_backend(
        self, request: Downstream, job: Job, route: RouteSpec, trip: Trip
    ) -> None:
        """
        Send a model's pull to every healthy backend in turn, or its delete
        or copy to every one that has it (L{ollamaproxy.backends.everywhere});
        then ask each for its models again.
        """
        model = job.model
        if job.body is None and request.body is not None:
            raise ProxyError(400, "with several backends, the proxy reads this request's "
                             "body to send it to each: send it uncompressed, with a "
                             "Content-Length")
        backends = [
            b for b in self._router.backends
            if b.healthy and (route.placement is Placement.EVERY or model is None
                              or b.has(model))
        ]
        if not backends:
            if route.placement is Placement.EVERY or model is None:
                raise busy("no backend is healthy", 1)
            raise ProxyError(404, f"model '{model.canonical}' not found on any "
                             "healthy backend")
        try:
            every = await on_every_backend(request, job.target, backends, job.body or b"",
                                           self._sample_bytes)
        finally:
            for backend in backends:
                self._pool.refresh(backend)
        trip.backend = ",".join(b.name for b in every.reached)
        trip.status, trip.responded, trip.answered = every.status, every.responded, every.answered

    async def _merged_listing(
        self, request: Downstream, job: Job, field: str, trip: Trip
    ) -> None:
        """
        Answer a model listing with the union of every healthy backend's,
        asked all at once.
        """
        backends = [b for b in self._router.backends if b.healthy]
        # Every backend's client carries this process's mark, and its clock.
        upstream = self._router.backends[0].upstream
        headers = upstream_request_headers(request.requestHeaders, upstream.via)
        answers = await gatherResults(
            [Deferred.fromCoroutine(self._listing_of(b, job.target, headers)) for b in backends],
            consumeErrors=True,
        )
        bodies = [body for body in answers if body is not None]
        if not bodies:
            raise ProxyError(502, "no backend answered for the model listing")
        try:
            merged = merge_listings(bodies, field)
        except ValueError:
            raise ProxyError(502, "a backend's model listing could not be read") from None
        if job.rewrite is not None:
            merged = job.rewrite(merged)
        trip.backend = ",".join(
            b.name for b, body in zip(backends, answers, strict=True) if body is not None
        )
        trip.status, trip.responded = 200, upstream.clock.seconds()
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
            response = await backend.upstream.request(b"GET", target.uri, headers, None)
            body = await whole_body(response)
        except CancelledError:
            raise
        except Exception as e:
            self._pool.failed(backend, f"{type(e).__name__}: {e}")
            return None
        return body if response.code == 200 else None
