# -*- test-case-name: tests.test_tap -*-
"""
Putting the request pipeline together from its rooms: the gate, the
dispatcher, the recorder, the registry of requests in flight and the
console, around the conductor of each request (L{OllamaProxy}).

The daemon (L{ollamaproxy.tap}) and the tests' in-memory chain build the
proxy here, the same way; nothing below this module builds a part of
another room.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from ollamaproxy.admission.auth import Authenticator
from ollamaproxy.admission.caps import Caps
from ollamaproxy.admission.limits import Limits, Throttle
from ollamaproxy.after_send import AfterSend
from ollamaproxy.backends.dispatch import Dispatcher
from ollamaproxy.backends.gauges import RouterGauges
from ollamaproxy.backends.router import Router
from ollamaproxy.console import Console, Sampler
from ollamaproxy.readiness import Readiness
from ollamaproxy.record.metrics import Metrics
from ollamaproxy.record.recorder import Recorder
from ollamaproxy.record.redact import Redactor
from ollamaproxy.record.usage import UsageStore
from ollamaproxy.web.app import OllamaProxy
from ollamaproxy.web.client_address import NOBODY, TrustedProxies
from ollamaproxy.web.cors import Cors
from ollamaproxy.web.gate import Gate
from ollamaproxy.web.in_flight import InFlight


@dataclass(frozen=True)
class Assembled:
    """
    The proxy, and the parts the daemon runs or stops beside it.

    @ivar proxy: The conductor of each request; its C{resource()} is what
        the web server serves.
    @ivar in_flight: The requests in flight; drained on shutdown.
    @ivar recorder: Writes down every request; the web server records
        those it refuses itself through it too.
    @ivar console: The operator console; its sampler is a service.
    """

    proxy: OllamaProxy
    in_flight: InFlight
    recorder: Recorder
    console: Console


def assemble(
    router: Router,
    auth: Authenticator,
    limits: Limits,
    clock: IReactorTime,
    metrics: Metrics,
    readiness: Readiness,
    *,
    cors: Cors | None = None,
    usage: UsageStore | None = None,
    body_sample_bytes: int = 0,
    redact: Callable[[str], str] | None = None,
    trusted_proxies: TrustedProxies = NOBODY,
    caps: Caps | None = None,
    throttle: Throttle | None = None,
) -> Assembled:
    """
    Build the proxy around C{router}.

    @param auth: Decides who may ask.
    @param limits: Keeps each key within its limits.
    @param readiness: Answers C{GET /-/ready}; the proxy's own checks are
        added to it (a healthy backend, not shutting down).
    @param usage: Keeps requests and tokens per key, or L{None}.
    @param body_sample_bytes: How much of each response body to log; 0 for
        none.
    @param redact: Blanks credentials and keys in what the proxy logs or
        answers with; by default, a L{Redactor} that knows the keys of
        C{auth} by digest.
    @param trusted_proxies: The proxies in front whose forwarding headers
        name the client.
    @param caps: The proxy's caps on C{keep_alive} and C{num_ctx}.
    @param throttle: Slows down addresses that guess keys, or L{None}.
    """
    redact = redact or Redactor(auth.keys.is_key)
    router.redact_with(redact)
    in_flight = InFlight(clock)
    # One for the process: the calls of a turn share its timers.
    after_send = AfterSend(clock)
    recorder = Recorder(clock, metrics, usage, redact, after_send)
    gate = Gate(auth, recorder, clock, trusted_proxies, throttle)
    metrics.registry.register(RouterGauges(router))
    readiness.add("backends", lambda: any(b.healthy for b in router.backends))
    # Not ready first when stopping (before the ports close, with
    # --drain-delay), so that load balancers look away.
    readiness.add("accepting", lambda: not in_flight.withdrawn)
    console = Console(Sampler(in_flight, router, clock, redact), auth.keys, usage, clock, gate)
    proxy = OllamaProxy(
        gate,
        limits,
        Dispatcher(router, after_send, body_sample_bytes),
        recorder,
        in_flight,
        clock,
        cors or Cors(),
        metrics,
        readiness,
        caps=caps,
        console=console,
    )
    return Assembled(proxy, in_flight, recorder, console)
