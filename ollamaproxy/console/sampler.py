# -*- test-case-name: tests.console.test_feed -*-
"""
What the proxy is doing now, sampled on a timer and pushed to the consoles
that watch.

Nothing here runs per chunk or per request.  L{Sampler} looks, every C{tick}
seconds (a few times a second), at the requests the app has in flight (its
registry of L{Exchange}s), the fair queue and the backends.  A request's
tokens so far are the pieces its response body arrived in
(L{ollamaproxy.backends.relay.pieces_answered}: one NDJSON line or SSE event is about
one token), a counter the relay keeps anyway; its tokens a second are the
difference between samples.  So a thousand streams cost a loop over a
thousand requests a few times a second, and nothing on the relay's path.

Each tick appends one point (streams running, requests queued, tokens a
second) to a history bounded to the last L{HISTORY_SECONDS}, and, while a
console watches, builds the state the Now and Backends views show (with no
console open, a tick is a loop over the requests in flight and nothing
more).  A subscriber (a console's feed) gets a message only when something
changed since the last one it got
(coalescing: at most one message a tick, none at all while nothing moves),
plus a ping every L{HEARTBEAT} seconds so that it can tell a quiet proxy
from a lost connection.  A subscriber whose connection is not reading
(paused by twisted.web's backpressure) is skipped, and gets the whole
current state when it reads again: no per-subscriber queue, so memory stays
the same for a console open a day, however slow.

The timer runs while the service runs (from start to stop of the proxy),
so that the totals chart has the last minutes when a console opens.

A feed lasts as long as its key does: at each tick the sampler asks each
subscriber whether the key it was opened with still passes (revoked,
expired or no longer admin since: the keys reload on their own), and ends
the feed of one that does not, so a revoked key stops seeing the proxy
within a tick (L{TICK}), well within the 5 seconds promised.  The check is
a digest and a lookup per open console a tick, only while consoles are
open; the page, reconnecting, is refused and asks for a key.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ollamaproxy.backends.relay import pieces_answered
from ollamaproxy.backends.router import Router
from ollamaproxy.console.views import backends_view, without_credentials
from ollamaproxy.web.in_flight import Flight

log = Logger()

#: Seconds between samples: at most this many updates a second go to a
#: console (2).
TICK: Final = 0.5
#: Seconds of totals history kept, and sent to a console that opens.
HISTORY_SECONDS: Final = 600.0
#: Seconds after which a quiet feed gets a ping.
HEARTBEAT: Final = 15.0
#: Requests listed one by one in the Now view; more are counted.
MAX_ROWS: Final = 500
#: Samples a request's tokens a second are measured over (2 seconds).
_RATE_SAMPLES: Final = 5

Point = tuple[float, int, int, float]
"""
C{(time, streams running, requests queued, tokens a second)}: one sample
of the totals.
"""


@dataclass
class _Track:
    """
    What the sampler remembers of one request in flight: its last few
    samples of pieces relayed, for its rate.
    """

    samples: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=_RATE_SAMPLES)
    )

    def rate(self) -> float:
        """
        Pieces a second over the samples kept.
        """
        if len(self.samples) < 2:
            return 0.0
        (t0, r0), (t1, r1) = self.samples[0], self.samples[-1]
        return (r1 - r0) / (t1 - t0) if t1 > t0 else 0.0


@implementer(IPushProducer)
class Subscriber:
    """
    One console's feed: where its messages go, and whether it reads.

    Registered as the push producer of the feed's response, so that
    twisted.web's backpressure tells it when the client stops reading.

    @ivar ended: Fires when the proxy stops or the feed's key no longer
        passes (the feed then ends); never fires otherwise.  Cancelling it
        (the client went away) unsubscribes.
    @ivar allowed: Whether the feed's key still passes, asked at each tick.
    """

    def __init__(
        self, sampler: Sampler, write: Callable[[bytes], None], allowed: Callable[[], bool]
    ) -> None:
        self._sampler = sampler
        self._write = write
        self.allowed = allowed
        self.paused = False
        # The state and the last point this subscriber has had.
        self.state = b""
        self.point_seq = -1
        self.last_sent = 0.0
        self.ended: Deferred[None] = Deferred(lambda _: sampler.unsubscribe(self))

    def send(self, message: dict[str, Any], now: float) -> None:
        self.last_sent = now
        self._write(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")

    # IPushProducer, driven by the feed's connection.

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self._sampler.unsubscribe(self)


class Sampler(Service):
    """
    Samples the requests in flight, the queue and the backends every
    C{tick} seconds, keeps the totals' recent history, and feeds the
    consoles that subscribe.
    """

    def __init__(
        self,
        requests: Mapping[Any, Flight],
        router: Router,
        clock: IReactorTime,
        redact: Callable[[str], str],
        tick: float = TICK,
        history_seconds: float = HISTORY_SECONDS,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        """
        @param requests: The registry of requests in flight (the web
            request to its record and trip), read at each tick, never
            written.
        @param router: The backends and the fair queue.
        @param redact: Blanks credentials in text shown (backend errors).
        """
        self._requests = requests
        self._router = router
        self._clock = clock
        self._redact = redact
        self._tick = tick
        self._heartbeat = heartbeat
        self._tracks: dict[Any, _Track] = {}
        self._history: deque[tuple[int, Point]] = deque(
            maxlen=max(1, int(history_seconds / tick))
        )
        self._seq = 0
        self._state: dict[str, Any] = {}
        self._encoded = b""
        self._subscribers: set[Subscriber] = set()
        self._loop: LoopingCall | None = None

    # The service: the timer runs while the proxy does.

    def startService(self) -> None:
        super().startService()
        loop = LoopingCall(self.sample)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self._tick, now=True).addErrback(
            lambda reason: log.failure("The console's sampling failed", reason)
        )

    def stopService(self) -> None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        for subscriber in list(self._subscribers):
            self._end(subscriber)

    # Subscribers.

    @property
    def subscribers(self) -> int:
        """
        How many feeds are open.
        """
        return len(self._subscribers)

    def subscribe(
        self, write: Callable[[bytes], None], allowed: Callable[[], bool] = lambda: True
    ) -> Subscriber:
        """
        Start a feed: it gets the whole state and history at once, then
        what changes.

        @param allowed: Whether the feed's key still passes; the feed ends
            at the first tick it does not.
        """
        self._refresh_state()
        subscriber = Subscriber(self, write, allowed)
        self._subscribers.add(subscriber)
        self._send(subscriber, self._clock.seconds())
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """
        Forget a feed (its client went away, or the proxy stops).
        """
        self._subscribers.discard(subscriber)

    def _end(self, subscriber: Subscriber) -> None:
        """
        End a feed from the proxy's side: its response finishes.
        """
        self.unsubscribe(subscriber)
        subscriber.ended.callback(None)

    # Sampling.

    def snapshot(self) -> dict[str, Any]:
        """
        The Now and Backends views as of now (tokens and rates as of the
        last sample), with the totals' history.
        """
        self._refresh_state()
        return {**self._state, "history": [list(point) for _, point in self._history]}

    def sample(self) -> None:
        """
        Look at every request in flight once (its pieces relayed so far),
        append the totals to the history, and, if any console watches,
        send it what changed.  With no console open, no view is built.
        """
        now = self._clock.seconds()
        running, queued, rate = self._sample_requests(now)
        self._seq += 1
        self._history.append((self._seq, (round(now, 3), running, queued, round(rate, 1))))
        if self._subscribers:
            self._refresh_state()
            for subscriber in list(self._subscribers):
                if subscriber.allowed():
                    self._send(subscriber, now)
                else:
                    self._end(subscriber)

    def _sample_requests(self, now: float) -> tuple[int, int, float]:
        """
        Sample every request in flight.

        @return: Requests running, requests queued, tokens a second in all.
        """
        tracks: dict[Any, _Track] = {}
        running = queued = 0
        total_rate = 0.0
        for request, flight in list(self._requests.items()):
            track = self._tracks.get(request) or _Track()
            tracks[request] = track
            pieces = pieces_answered(request)
            if pieces is not None:
                track.samples.append((now, pieces))
            total_rate += track.rate()
            if flight.trip.backend:
                running += 1
            else:
                queued += 1
        # Only requests still in flight are remembered.
        self._tracks = tracks
        return running, queued, total_rate

    def _refresh_state(self) -> None:
        """
        Build the Now and Backends views from the requests in flight and the
        last samples.
        """
        rows: list[dict[str, Any]] = []
        for request, flight in list(self._requests.items()):
            exchange, backend = flight.exchange, flight.trip.backend
            track = self._tracks.get(request)
            samples = track.samples if track is not None else ()
            rows.append({
                "key": exchange.key,
                "user": exchange.user,
                "model": exchange.model.canonical if exchange.model is not None else "",
                "backend": _shown(backend, self._redact),
                "route": exchange.route,
                "client": exchange.client,
                "started": round(exchange.started, 3),
                "tokens": samples[-1][1] if samples else 0,
                "tokens_per_second": round(track.rate(), 1) if track is not None else 0.0,
                "state": "running" if backend else "queued",
            })
        rows.sort(key=lambda row: row["started"])
        self._state = {
            "requests": rows[:MAX_ROWS],
            "more": max(0, len(rows) - MAX_ROWS),
            "waiting": self._router.waiting(),
            "backends": backends_view(self._router, self._redact),
        }
        self._encoded = json.dumps(self._state, sort_keys=True).encode("utf-8")

    def _send(self, subscriber: Subscriber, now: float) -> None:
        """
        Send a subscriber what it has not had, if anything changed for it
        (or a ping when it has had nothing for a while).
        """
        if subscriber.paused:
            return
        message: dict[str, Any] = {"type": "update", "now": round(now, 3)}
        if subscriber.state != self._encoded:
            message.update(self._state)
            subscriber.state = self._encoded
        points = list(self._unsent(subscriber))
        if points and (len(message) > 2 or self._moved(points)):
            message["points"] = [list(point) for _, point in points]
            if subscriber.point_seq < 0 or points[0][0] > subscriber.point_seq + 1:
                # The first message, or one after the history moved on.
                message["reset"] = True
            subscriber.point_seq = points[-1][0]
        if len(message) > 2:
            subscriber.send(message, now)
        elif now - subscriber.last_sent >= self._heartbeat:
            subscriber.send({"type": "ping", "now": round(now, 3)}, now)

    def _unsent(self, subscriber: Subscriber) -> Iterable[tuple[int, Point]]:
        return (item for item in self._history if item[0] > subscriber.point_seq)

    def _moved(self, points: list[tuple[int, Point]]) -> bool:
        """
        Whether the totals changed over C{points} and the point before
        them: unchanged points (an idle proxy) are sent later, with the next
        change, or drawn by the console as the last value carried on.
        """
        first = points[0][0]
        before = [point for seq, point in self._history if seq == first - 1]
        values = {point[1:] for point in before} | {point[1:] for _, point in points}
        return len(values) > 1


def _shown(backend: str, redact: Callable[[str], str]) -> str:
    """
    A request's backend (or backends, comma-separated) as the console shows
    it: without credentials.
    """
    if not backend:
        return ""
    return ",".join(without_credentials(name, redact) for name in backend.split(","))
