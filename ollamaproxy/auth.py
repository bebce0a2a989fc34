# -*- test-case-name: tests.test_auth -*-
"""
Who is asking: finding the key a client presents and checking it.

Clients present a key as C{Authorization: Bearer KEY} (ollama-python, the
OpenAI SDKs, Open WebUI, Continue, LangChain) or as C{X-API-Key: KEY} (the
seed's header; Page Assist and ollama-js can send either).  The check happens
before any request reaches Ollama.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.web.http_headers import Headers

from ollamaproxy.config import Route
from ollamaproxy.errors import ProxyError, unauthorized
from ollamaproxy.keys import ApiKey, KeyStore


def presented_key(headers: Headers) -> str | None:
    """
    The key in a request's C{Authorization: Bearer} or C{X-API-Key} header,
    or L{None} if there is neither.  When both are present, the bearer token
    wins.
    """
    for value in headers.getRawHeaders(b"authorization", ()):
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip().decode("utf-8", "replace")
    for value in headers.getRawHeaders(b"x-api-key", ()):
        if value.strip():
            return value.strip().decode("utf-8", "replace")
    return None


@dataclass(frozen=True)
class Authenticator:
    """
    Decides whether a request may go on.

    @ivar keys: The keys accepted.
    @ivar open_routes: Routes served without a key.  They are compared with
        the exact path as sent, so no spelling of another path can pass for
        an open one.
    """

    keys: KeyStore
    open_routes: frozenset[Route]

    def authenticate(self, method: bytes, path: bytes, headers: Headers) -> ApiKey | None:
        """
        Check a request.

        @param path: The request path without the query string and without
            the C{/proxy} prefix.
        @return: The key presented, or L{None} on an open route.
        @raise ProxyError: 401 if a key is needed and none or a wrong one was
            presented.
        """
        if Route(method, path) in self.open_routes:
            return None
        presented = presented_key(headers)
        if presented is None:
            raise unauthorized(
                "missing API key: send it as 'Authorization: Bearer <key>' "
                "or 'X-API-Key: <key>'"
            )
        key = self.keys.find(presented)
        if key is None:
            raise unauthorized("invalid API key")
        return key


__all__ = ["Authenticator", "ProxyError", "presented_key"]
