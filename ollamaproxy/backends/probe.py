# -*- test-case-name: tests.backends.test_probe -*-
"""
At start, one line per upstream saying where requests go and whether
Ollama answered there.

The proxy asks each upstream for C{GET /api/version} as it starts, with a
short timeout, and logs what came of it: the version it answered with, or
a warning with the reason it did not.  An Ollama that is down is not a
reason to refuse to start (it may come up later, and requests get a 502
naming the address until it does), so the start never waits for it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from ollamaproxy.backends.pool import own_request_headers
from ollamaproxy.backends.relay import whole_body
from ollamaproxy.backends.upstream import Upstream

log = Logger()

# Seconds to wait for an answer: enough for a busy Ollama on a slow link,
# short enough that the line comes while the operator is still looking.
PROBE_TIMEOUT = 5.0
VERSION_PATH = b"/api/version"
# Ollama's answer is a few dozen bytes.
MAX_ANSWER = 64 * 1024


class UpstreamProbe(Service):
    """
    When started, asks each upstream for its version and logs one line for
    each; stopping cancels what has not answered yet.

    @param upstreams: The upstreams requests are relayed to.
    @param timeout: Seconds to wait for each answer.
    """

    def __init__(self, upstreams: Sequence[Upstream], timeout: float = PROBE_TIMEOUT) -> None:
        self._upstreams = upstreams
        self._timeout = timeout
        self._pending: list[Deferred[None]] = []

    def startService(self) -> None:
        super().startService()
        for upstream in self._upstreams:
            probe = self._probe(upstream)
            self._pending.append(probe)
            probe.addBoth(self._done, probe)

    def stopService(self) -> None:
        super().stopService()
        for probe in list(self._pending):
            probe.cancel()

    def _done(self, result: object, probe: Deferred[None]) -> None:
        self._pending.remove(probe)

    def _probe(self, upstream: Upstream) -> Deferred[None]:
        where = upstream.base.decode("ascii", "replace")
        # Marked as the proxy marks what it forwards: an upstream that is
        # this proxy itself answers 508 at once instead of calling itself.
        headers = own_request_headers(upstream)
        d = upstream.request(b"GET", VERSION_PATH, headers, None)
        d.addCallback(_version)
        d.addTimeout(self._timeout, upstream.clock)
        return d.addCallbacks(
            lambda version: log.info(
                "Relaying requests to Ollama at {upstream}: it answered, version {version}",
                upstream=where,
                version=version,
            ),
            lambda failure: _not_answered(failure, where, self._timeout),
        )


def _version(response: IResponse) -> Deferred[str]:
    """
    The version an answer to C{GET /api/version} names.

    @raise ValueError: If it is not Ollama's answer.
    """
    if response.code == 508:
        raise _ItIsThisProxy()
    if response.code != 200:
        raise ValueError(f"it answered GET /api/version with {response.code}")

    def parse(body: bytes) -> str:
        try:
            version = json.loads(body)["version"]
        except (ValueError, TypeError, KeyError):
            raise ValueError("its answer to GET /api/version is not Ollama's") from None
        return str(version)

    def too_large(failure: Failure) -> str:
        failure.trap(ValueError)
        raise ValueError("its answer to GET /api/version is not Ollama's")

    return whole_body(response, MAX_ANSWER).addCallbacks(parse, too_large)


class _ItIsThisProxy(Exception):
    """
    The upstream answered 508: it is this very proxy.
    """


def _not_answered(failure: Failure, where: str, timeout: float) -> None:
    """
    Warn that an upstream did not answer, saying why in a few words.
    """
    if failure.check(CancelledError):
        return  # stopped before it answered: nothing to say
    if failure.check(_ItIsThisProxy):
        log.warn(
            "Relaying requests to {upstream}, which is this proxy itself: every request "
            "would come back to it (clients get 508).  Point --upstream at Ollama.",
            upstream=where,
        )
        return
    if failure.check(TimeoutError):
        reason = f"no answer within {timeout:g} seconds"
    elif failure.check(ValueError):
        reason = str(failure.value)
    else:
        reasons = getattr(failure.value, "reasons", None) or []
        reason = "; ".join(r.getErrorMessage() for r in reasons) or failure.getErrorMessage()
    log.warn(
        "Relaying requests to Ollama at {upstream}, which did not answer ({reason}); "
        "clients get 502 until it does",
        upstream=where,
        reason=reason,
    )
