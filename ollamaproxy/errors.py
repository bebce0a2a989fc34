# -*- test-case-name: tests.web.test_app -*-
"""
The errors the proxy itself answers with, and how they look on the wire.

Ollama answers errors with C{{"error": "message"}}; its OpenAI-compatible
routes under C{/v1} answer with OpenAI's shape,
C{{"error": {"message": ..., "type": ..., "param": null, "code": null}}}.
The proxy's own errors follow the same rule, so every client's existing error
handling shows them properly.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING

from twisted.web.http import RESPONSES

if TYPE_CHECKING:
    # For annotations only: the options read ConfigError from here without
    # importing the exchange's rooms.
    from ollamaproxy.exchange import Outcome

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ConfigError(ValueError):
    """
    A setting has a value the proxy cannot work with.  The message names the
    setting and says what is wrong, in words fit for the user.
    """


class ProxyError(Exception):
    """
    A request the proxy answers itself, with an HTTP status and a message.

    @ivar code: The HTTP status.
    @ivar message: What went wrong, in words for the client.
    @ivar headers: Extra response headers, such as C{WWW-Authenticate}.
    @ivar outcome: How the access log names what happened: by default
        C{rejected} for 4xx, C{timeout} for 504, C{upstream_error} for other
        5xx.
    """

    def __init__(
        self,
        code: int,
        message: str,
        headers: dict[bytes, bytes] | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.outcome: Outcome = outcome or (
            "rejected" if code < 500 else "timeout" if code == 504 else "upstream_error"
        )


def reason_phrase(code: int) -> bytes:
    """
    The reason phrase for a status the proxy answers with: twisted.web's,
    else the standard one (twisted.web knows no 429, 431 or 508 and would
    send C{429 Unknown Status}).
    """
    known = RESPONSES.get(code)
    if known is not None:
        return known
    try:
        return HTTPStatus(code).phrase.encode("ascii")
    except ValueError:
        return b"Unknown Status"


def unauthorized(message: str) -> ProxyError:
    """
    A 401 that tells the client how to authenticate.
    """
    return ProxyError(HTTPStatus.UNAUTHORIZED, message, {b"WWW-Authenticate": b"Bearer"})


def error_body(message: str, code: int, openai: bool) -> bytes:
    """
    The JSON body of an error, in Ollama's shape or, for C{/v1} routes, in
    OpenAI's.
    """
    if openai:
        detail = {
            "message": message,
            "type": _OPENAI_TYPES.get(code, "api_error"),
            "param": None,
            "code": None,
        }
        return json.dumps({"error": detail}).encode("utf-8")
    return json.dumps({"error": message}).encode("utf-8")


def is_openai_path(path: bytes) -> bool:
    """
    Whether a path (without the C{/proxy} prefix) is one of Ollama's
    OpenAI-compatible routes.
    """
    return path == b"/v1" or path.startswith(b"/v1/")
