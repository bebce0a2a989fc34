# -*- test-case-name: tests.web.test_app -*-
"""
Where a request goes, and how the proxy answers the errors it finds itself.

A request's URI loses the C{/proxy} prefix (the whole API is served under it
too, as the project's first version served it) and the rest goes to Ollama
as it was sent (L{target_of}).  An error the proxy answers itself is
answered one way (L{ErrorAnswers}): its status and a JSON body in the shape
the client expects, Ollama's, or OpenAI's on the C{/v1} routes, with
anything the client sent that could be a key redacted.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from ollamaproxy.backends.relay import Target
from ollamaproxy.errors import ProxyError, error_body, is_openai_path, reason_phrase
from ollamaproxy.record.redact import redacted_failure

log = Logger()

#: The prefix the whole API is served under too.
PREFIX = b"/proxy"


def target_of(uri: bytes) -> Target:
    """
    Where a request URI goes: the C{/proxy} prefix comes off, the rest
    (path and query string, exactly as sent) goes to Ollama.
    """
    if uri == PREFIX or uri.startswith(PREFIX + b"/") or uri.startswith(PREFIX + b"?"):
        uri = uri[len(PREFIX):]
    if not uri.startswith(b"/"):
        uri = b"/" + uri
    path = uri.split(b"?", 1)[0]
    return Target(path=path, uri=uri, openai=is_openai_path(path))


class ErrorAnswers:
    """
    Answers the errors the proxy finds itself.

    @param redact: Blanks credentials and keys: a message may repeat the
        path or a model name the client sent.
    """

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact

    def error(self, request: IRequest, error: ProxyError) -> bytes:
        """
        Answer with the error's status and headers, and its message as the
        JSON body.
        """
        return _answer(request, error.code, self._redact(error.message), error.headers)

    def bug(self, request: IRequest, failure: Failure) -> bytes:
        """
        A bug: log it with its traceback, and answer with a 500 that shows
        none.  The URI (its query string may hold a key) and the exception's
        message are redacted in the event itself, for every log observer.
        """
        uri = self._redact((request.uri or b"").decode("utf-8", "replace"))
        log.failure("Unexpected error handling {uri}", redacted_failure(failure, self._redact),
                    uri=uri)
        return _answer(request, 500, "internal error in ollamaproxy", {})


def _answer(request: IRequest, code: int, message: str, headers: dict[bytes, bytes]) -> bytes:
    request.setResponseCode(code, reason_phrase(code))
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    for name, value in headers.items():
        request.setHeader(name, value)
    return error_body(message, code, target_of(request.uri or b"/").openai)
