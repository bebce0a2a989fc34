# -*- test-case-name: tests.record.test_recorder -*-
"""
Writing down what happened to a request, once, however it ended: its access
and stream events, its metrics and its usage.

The app records every request that reached it; the web server records the
ones it refused before they did (a malformed request line, a head too
large), through the same L{Recorder.record}.

A record is written once the answer it records has gone to the client,
not before (L{ollamaproxy.after_send}): logging, metrics and usage then
never delay an answer; requests recorded in one turn are written together,
each with the time it ended.  Stopping writes what is left
(L{Recorder.stopService}), before the usage store stops.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Final

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ollamaproxy.after_send import AfterSend
from ollamaproxy.exchange import HTTP_METHODS, Exchange
from ollamaproxy.record.logs import log_exchange
from ollamaproxy.record.metrics import Metrics
from ollamaproxy.record.redact import blank_credentials
from ollamaproxy.record.usage import UsageStore

#: How a request ends when the proxy turned it away itself, before Ollama
#: served it: its usage counts it as refused, not as a request.
REFUSED_OUTCOMES: Final = frozenset({"rejected", "queue_full", "queue_timeout", "bad_request"})

log = Logger()


class Recorder(Service):
    """
    Writes down requests that have ended, once their answers have gone.

    @param clock: Tells when a request ended.
    @param metrics: Counts them, or L{None} (a web server on its own).
    @param usage: Keeps each key's requests and tokens, or L{None}.
    @param after_send: Makes the calls that wait for answers to be sent;
        by default, one of the recorder's own.
    @ivar redact: Blanks credentials and keys in what the proxy logs or
        answers with (L{ollamaproxy.record.redact.Redactor}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        usage: UsageStore | None = None,
        redact: Callable[[str], str] = blank_credentials,
        after_send: AfterSend | None = None,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._usage = usage
        self.redact = redact
        self._after_send = AfterSend(clock) if after_send is None else after_send

    def record(
        self, exchange: Exchange, sent_bytes: int, several_backends: bool = False
    ) -> None:
        """
        Write down a request that has ended: log, metrics, usage, once its
        answer has gone (see the module's docstring).

        @param sent_bytes: How many bytes of response body the client was
            sent.
        @param several_backends: Whether the proxy had several backends to
            send it to (its access line then names the one it went to).
        """
        self._after_send.call(
            partial(self._write, exchange, sent_bytes, several_backends, self._clock.seconds())
        )

    def stopService(self) -> None:
        """
        Write what is recorded and not yet written (making every call that
        waits for a send: the requests' own ends, which record them).
        """
        Service.stopService(self)
        self._after_send.flush()

    def _write(
        self, exchange: Exchange, sent_bytes: int, several_backends: bool, now: float
    ) -> None:
        """
        Write a request down; one that fails (a bug) is logged and keeps no
        other from being written.
        """
        try:
            if exchange.method not in HTTP_METHODS:
                # A token of the client's choosing (a key, even): redacted.
                exchange.method = self.redact(exchange.method)
            log_exchange(exchange, sent_bytes, now, self.redact, several_backends)
            if self._metrics is not None:
                self._metrics.observe(exchange, now)
            if self._usage is not None and exchange.key != "-":
                self._usage.record_summary(exchange.key, exchange.summary, now,
                                           refused=exchange.outcome in REFUSED_OUTCOMES,
                                           user=exchange.user or "")
        except Exception:
            log.failure("Writing down a request to {route} failed", route=exchange.route)
