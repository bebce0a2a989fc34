# -*- test-case-name: tests.web.test_app -*-
"""
The resource the web server serves, in front of the Klein application.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from ollamaproxy.errors import ProxyError
from ollamaproxy.routes import Catalogue
from ollamaproxy.web.answers import PREFIX, ErrorAnswers
from ollamaproxy.web.site import ProxyRequest

log = Logger()

#: A fixed route's path under the prefix the API is served under too.
_PREFIXED = PREFIX + b"/"
_AFTER = len(PREFIX)


class Front(Resource):
    """
    A request for one of Ollama's fixed routes (C{/api/tags}, C{/api/chat},
    ...: most requests), with or without the C{/proxy} prefix, goes straight
    to the proxy's pipeline; any other path goes to Klein, which finds its
    route.

    Klein's routing (the URL's parts, a werkzeug map bound for each
    request, its match, an adapter on the request) costs about as much as
    the whole key check, for a path that can only reach the catch-all
    route: none of the proxy's own routes is one of Ollama's.  What Klein
    does around a handler, the pipeline needs here too: it is cancelled
    when the request ends first (a client that left), the request is
    finished after it (unless the relay did), and a failure that escaped
    it is answered as the app's error handlers answer one.

    @param catalogue: Ollama's routes.
    @param serve: The pipeline (L{ollamaproxy.web.app.OllamaProxy.proxy}).
    @param answers: Answers a failure that escaped it.
    @param routed: The Klein application's resource, for any other path.
    """

    isLeaf = True

    def __init__(
        self,
        catalogue: Catalogue,
        serve: Callable[[ProxyRequest], Coroutine[Any, Any, None]],
        answers: ErrorAnswers,
        routed: IResource,
    ) -> None:
        super().__init__()
        self._catalogue = catalogue
        self._serve = serve
        self._answers = answers
        self._routed = routed

    def render(self, request: ProxyRequest) -> object:
        path, fixed = request.path, self._catalogue.fixed
        if path not in fixed and not (path.startswith(_PREFIXED) and path[_AFTER:] in fixed):
            return self._routed.render(request)
        ended = False

        def end(result: object) -> None:
            nonlocal ended
            ended = True
            if isinstance(result, Failure):
                serving.cancel()

        def served(result: object) -> None:
            # The relay ends a response with the last byte of its answer.
            if not (ended or request.finished):
                request.finish()

        def failed(failure: Failure) -> None:
            if not ended:
                error = failure.value
                request.write(
                    self._answers.error(request, error) if isinstance(error, ProxyError)
                    else self._answers.bug(request, failure)
                )
                request.finish()
            elif not failure.check(CancelledError):
                log.failure("Unhandled error serving a request", failure)

        serving = ensureDeferred(self._serve(request))
        request.notifyFinish().addBoth(end)
        serving.addCallbacks(served, failed)
        return NOT_DONE_YET
