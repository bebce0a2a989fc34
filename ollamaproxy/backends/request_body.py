# -*- test-case-name: tests.backends.test_request_body -*-
"""
A client's request body, passed on to Ollama while it arrives.

twisted.web would receive a whole body (into a temporary file, past 100 kB)
before the proxy sees the request; a 20 GB model upload would wait for its
last byte before its first went on.  L{StreamedBody} is instead filled by the
request as bytes arrive (L{ollamaproxy.web.site.ProxyRequest}) and drained by
the agent sending the request to Ollama.  Between the two it holds at most
about L{HIGH_WATER} bytes: past that it stops reading from the client until
Ollama has taken what is waiting.

Except while its request waits for a slot (L{StreamedBody.wait}): a client
whose socket is not read is a client whose hang-up is not seen (its FIN
comes after the bytes it sent, which wait unread in the kernel's buffers),
and a request whose client has left must never reach Ollama.  So a waiting
request's body is read on, and held, up to L{WAITING_HOLD}: as much as a
body whose model the proxy reads whole, which may wait in the queue
holding as much; the kernel's buffers on both sides of a loopback or LAN
connection hold a few MiB at most, so reading that far drains them and the
hang-up arrives.  A body larger still is paused again, and a hang-up behind
it is seen only once its turn has come and it is read: Ollama then gets a
body cut short, and the connection to it is closed.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

HIGH_WATER = 256 * 1024
#: The most a body holds while its request waits for a slot (the same as
#: L{ollamaproxy.admission.policy.MAX_CHECKED_BODY}, a room above).
WAITING_HOLD = 16 * 1024 * 1024


class BodyTooLarge(Exception):
    """
    The client sent more than the configured maximum body size.
    """


@implementer(IBodyProducer)
class StreamedBody:
    """
    An L{IBodyProducer} fed, as they arrive, with the bytes of a client's body.

    @ivar length: The size the client declared, or C{UNKNOWN_LENGTH} for a
        chunked body.
    @ivar received: How many bytes have arrived so far.
    @ivar complete: Whether the whole body has arrived.
    @ivar held: Set when the proxy stops reading the client because Ollama
        is slower; whoever watches the client's rate clears it.
    @ivar on_demand: Called once, when the body is first read (sent on or
        collected), or L{None}.
    @ivar max_size: The largest body accepted, in bytes; 0 for no limit.
    @param sample_bytes: How much of the start of the body to keep in
        C{sample}, for the log; 0 for none.
    """

    def __init__(
        self,
        length: int | None,
        max_size: int,
        pause_client: Callable[[], None],
        resume_client: Callable[[], None],
        sample_bytes: int = 0,
    ) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._declared = length or 0
        self.received = 0
        self.complete = False
        self.held = False
        self.on_demand: Callable[[], None] | None = None
        self.sample = b""
        self._sample_left = sample_bytes
        self.max_size = max_size
        self._pause_client = pause_client
        self._resume_client = resume_client
        self._waiting: list[bytes] = []
        self._waiting_size = 0
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] = Deferred()
        self._upstream_paused = False
        self._client_paused = False
        self._failure: Failure | None = None
        self._high_water = HIGH_WATER
        self._collected: Deferred[bytes] | None = None

    @property
    def too_large(self) -> bool:
        """
        Whether the declared or received size is over the maximum.
        """
        return self.max_size > 0 and max(self._declared, self.received) > self.max_size

    # Fed by the client's request.

    def write(self, data: bytes) -> None:
        """
        Bytes of the body arrived from the client.
        """
        if self._done.called or self._failure is not None:
            return
        self.received += len(data)
        if self._sample_left:
            self.sample += data[: self._sample_left]
            self._sample_left = max(0, self._sample_left - len(data))
        if self.too_large:
            self.fail(Failure(BodyTooLarge(self.max_size)))
            return
        if self._consumer is not None and not self._upstream_paused and not self._waiting:
            self._consumer.write(data)
            return
        self._waiting.append(data)
        self._waiting_size += len(data)
        if self._collected is not None and self._waiting_size > self._high_water:
            self.fail(Failure(BodyTooLarge(self._high_water)))
        elif self._waiting_size > self._high_water:
            # Again on every write: twisted.web may have resumed reading.
            self._client_paused = True
            self.held = True
            self._pause_client()

    def finish(self) -> None:
        """
        The whole body has arrived.
        """
        self.complete = True
        if self._collected is not None and not self._collected.called:
            self._collected.callback(b"".join(self._waiting))
        self._drain()

    def fail(self, reason: Failure) -> None:
        """
        The body will not arrive whole (the client left, or it is too
        large): the request to Ollama fails and is dropped.
        """
        self._waiting = []
        self._waiting_size = 0
        self._failure = reason
        if self._collected is not None and not self._collected.called:
            self._collected.errback(reason)
        if self._consumer is not None and not self._done.called:
            self._done.errback(reason)

    def collect(self, limit: int) -> Deferred[bytes]:
        """
        Wait for the whole body, for a check that must read it before it
        goes on (which model a request names); it is then sent on as usual.

        @param limit: The most bytes to hold; past that, the body fails with
            L{BodyTooLarge}.
        @return: Fires with the body once it has all arrived.
        """
        assert self._consumer is None and self._collected is None
        self._demanded()
        self._collected = Deferred()
        self._high_water = limit
        if self._client_paused:
            self._client_paused = False
            self._resume_client()
        if self._failure is not None:
            self._collected.errback(self._failure)
        elif self.complete:
            self._collected.callback(b"".join(self._waiting))
        return self._collected

    def wait(self) -> None:
        """
        The request waits (for a slot) before its body goes on: read on from
        the client, holding up to L{WAITING_HOLD}, so that a client that
        hangs up meanwhile is seen to (see the module's docstring).  Sending
        the body on (L{startProducing}) brings the bound back to
        L{HIGH_WATER}.
        """
        if self._consumer is not None or self._collected is not None:
            return
        self._high_water = WAITING_HOLD
        if self._client_paused:
            self._client_paused = False
            self._resume_client()

    def replace(self, data: bytes) -> None:
        """
        Send C{data} instead of the collected body (a body the proxy
        rewrote: a C{keep_alive} over its cap).
        """
        assert self.complete and self._consumer is None and self._collected is not None
        self._waiting, self._waiting_size = [data], len(data)
        self.length = len(data)

    # Drained by the agent.

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._demanded()
        self._consumer = consumer
        self._high_water = HIGH_WATER
        if self._failure is not None:
            self._done.errback(self._failure)
        else:
            self._drain()
        return self._done

    def _demanded(self) -> None:
        on_demand, self.on_demand = self.on_demand, None
        if on_demand is not None:
            on_demand()

    def _drain(self) -> None:
        if self._consumer is None or self._upstream_paused or self._done.called:
            return
        if self._waiting:
            waiting, self._waiting, self._waiting_size = self._waiting, [], 0
            self._consumer.write(b"".join(waiting))
        if self._client_paused and not self._upstream_paused:
            self._client_paused = False
            self._resume_client()
        if self.complete and not self._waiting:
            self._done.callback(None)

    def pauseProducing(self) -> None:
        self._upstream_paused = True

    def resumeProducing(self) -> None:
        self._upstream_paused = False
        self._drain()

    def stopProducing(self) -> None:
        # Ollama's connection is gone; whatever still arrives is dropped.
        self._upstream_paused = True
        self._waiting = []
        self._waiting_size = 0
