# -*- test-case-name: tests.web.test_app -*-
"""
The proxy's own routes, beside Ollama's: its metrics, its console and its
readiness, in a Klein application whose catch-all route takes every other
path to the pipeline (L{ollamaproxy.web.app}).  A request for one of
Ollama's fixed routes does not come through here (L{ollamaproxy.web.front}).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from ollamaproxy.errors import ProxyError, reason_phrase
from ollamaproxy.readiness import READY_PATH, Readiness
from ollamaproxy.record.metrics import Metrics
from ollamaproxy.routes import CONSOLE_ROUTE, METRICS_ROUTE
from ollamaproxy.web.answers import ErrorAnswers
from ollamaproxy.web.gate import Gate, keyed
from ollamaproxy.web.site import ProxyRequest


class Mountable(Protocol):
    """
    A part of the proxy served under a path of its own (the console).
    """

    def serve(self, request: IRequest) -> IResource:
        """The resource that answers a request under the path."""

    def redirect(self, request: IRequest) -> bytes:
        """Answer the path without its trailing slash."""


class OwnRoutes:
    """
    The routes that are the proxy's, and every other path to the pipeline.

    @param gate: Checks the key of the routes that need one.
    @param pipeline: Takes a request to Ollama
        (L{ollamaproxy.web.app.OllamaProxy.proxy}).
    @param answers: Answers the errors of these routes.
    @param metrics: Served at C{/metrics}.
    @param readiness: Answers C{GET /-/ready}.
    @param console: The operator console, served at C{/-/console/}, or
        L{None}.
    """

    app = Klein()

    def __init__(
        self,
        gate: Gate,
        pipeline: Callable[[ProxyRequest], Coroutine[Any, Any, None]],
        answers: ErrorAnswers,
        metrics: Metrics,
        readiness: Readiness,
        console: Mountable | None,
    ) -> None:
        self.gate = gate
        self._pipeline = pipeline
        self._answers = answers
        self._metrics = metrics
        self._readiness = readiness
        self._console = console

    @app.route("/", branch=True)
    async def ollama(self, request: ProxyRequest) -> None:
        """
        Any path that is none of the proxy's own: Ollama's, to the pipeline.
        """
        await self._pipeline(request)

    @app.route(METRICS_ROUTE.pattern, methods=["GET"])
    @keyed(METRICS_ROUTE)
    async def metrics(self, request: ProxyRequest) -> bytes:
        """
        Prometheus metrics, for admin keys (or, without a key, on the
        separate C{--metrics-listen} endpoint).
        """
        content_type, body = self._metrics.render(request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type)
        return body

    @app.route(CONSOLE_ROUTE.pattern + "/", branch=True)
    def console_page(self, request: ProxyRequest) -> IResource:
        """
        The operator console (L{ollamaproxy.console}): admin keys only, but
        for the page's own files.
        """
        if self._console is None:
            raise ProxyError(404, "this proxy has no console")
        return self._console.serve(request)

    @app.route(CONSOLE_ROUTE.pattern)
    def console_redirect(self, request: ProxyRequest) -> bytes:
        """
        The console's address without its slash: to the page.
        """
        if self._console is None:
            raise ProxyError(404, "this proxy has no console")
        return self._console.redirect(request)

    @app.route(READY_PATH.decode("ascii"), methods=["GET", "HEAD"])
    def ready(self, request: ProxyRequest) -> bytes:
        """
        Whether this proxy can serve (L{Readiness}), without a key.
        """
        code, body = self._readiness.answer()
        request.setResponseCode(code, reason_phrase(code))
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return body

    @app.handle_errors(ProxyError)
    def proxy_error(self, request: IRequest, failure: Failure) -> bytes:
        """
        Answer an error of one of the proxy's own routes (the console, the
        metrics, the gate of a C{@keyed} one); the pipeline answers its own.
        """
        error = failure.value
        assert isinstance(error, ProxyError)
        return self._answers.error(request, error)

    @app.handle_errors(Exception)
    def unexpected_error(self, request: IRequest, failure: Failure) -> bytes:
        """
        Answer a bug of one of the proxy's own routes; the pipeline answers
        its own.
        """
        return self._answers.bug(request, failure)
