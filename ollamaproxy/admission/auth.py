# -*- test-case-name: tests.admission.test_auth -*-
"""
Who is asking: finding the key a client presents and checking it.

Clients present a key as C{Authorization: Bearer KEY} (ollama-python, the
OpenAI SDKs, Open WebUI, Continue, LangChain) or as C{X-API-Key: KEY} (the
header of the first version's clients; Page Assist and ollama-js can send
either).  The check happens
before any request reaches Ollama.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from ollamaproxy.admission.keys import ApiKey, KeyStore, digest
from ollamaproxy.config import Route
from ollamaproxy.errors import ProxyError, unauthorized
from ollamaproxy.routes import RouteSpec, Scope


def presented_key(headers: Headers) -> str | None:
    """
    The key in a request's C{Authorization: Bearer} or C{X-API-Key} header,
    or L{None} if there is neither.  When both are present, the bearer token
    wins.  Another C{Authorization} scheme (C{Basic}, from a web server in
    front) is no key.

    @raise ProxyError: 401 for an C{Authorization} header holding a bare
        token: a key sent without C{Bearer}, which is said so.
    """
    bare = False
    for value in headers.getRawHeaders(b"authorization", ()):
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip().decode("utf-8", "replace")
        bare = bare or (scheme.lower() not in (b"", b"bearer") and not token.strip())
    for value in headers.getRawHeaders(b"x-api-key", ()):
        if value.strip():
            return value.strip().decode("utf-8", "replace")
    if bare:
        raise unauthorized(
            "the Authorization header needs the Bearer scheme: send "
            "'Authorization: Bearer <key>'"
        )
    return None


class WrongKey(ProxyError):
    """
    The key presented is none of the keys (401): the guess throttle is told.
    """

    def __init__(self) -> None:
        super().__init__(401, "invalid API key", {b"WWW-Authenticate": b"Bearer"})


@dataclass(frozen=True)
class Authenticator:
    """
    Decides whether a request may go on.

    @ivar keys: The keys accepted.
    @ivar open_routes: Routes served to requests that present no key,
        compared with the percent-decoded path, as Ollama routes it.
    @ivar clock: Tells time, for keys that expire.
    """

    keys: KeyStore
    open_routes: frozenset[Route]
    clock: IReactorTime

    def authenticate(
        self,
        method: bytes,
        path: bytes,
        route: RouteSpec | None,
        headers: Headers,
    ) -> ApiKey | None:
        """
        Check a request's key and whether it may use the route.  A key that
        is presented is always checked, on an open route too; a valid key is
        never refused for what others sent from its address.

        @param path: The request path, percent-decoded, without the query
            string and the C{/proxy} prefix.
        @param route: The route C{path} is on, or L{None} for none of
            Ollama's.
        @return: The key presented, or L{None} on an open route.
        @raise ProxyError: 401 if a key is needed and none, a wrong one
            (L{WrongKey}) or an expired one was presented; 403 if the key
            may not use the route; 404 or 405 for a route Ollama does not have, to a key that may
            not pass such requests on.
        """
        presented = presented_key(headers)
        if presented is None:
            if Route(method, path) in self.open_routes:
                return None
            raise unauthorized(
                "missing API key: send it as 'Authorization: Bearer <key>' "
                "or 'X-API-Key: <key>'"
            )
        key = self.keys.find_digest(digest(presented))
        if key is None:
            raise WrongKey()
        if key.expired(datetime.fromtimestamp(self.clock.seconds(), UTC)):
            raise unauthorized(f"API key {key.name!r} has expired")
        if not key.admin:
            _check_scope(key, method, path, route)
        return key


def _check_scope(key: ApiKey, method: bytes, path: bytes, route: RouteSpec | None) -> None:
    """
    @raise ProxyError: if a key without the admin scope may not use a route.
    """
    shown = f"{method.decode('ascii', 'replace')} {path.decode('utf-8', 'replace')}"
    if route is None:
        raise ProxyError(404, f"{shown} is not one of Ollama's routes")
    if method not in route.methods:
        allowed = ", ".join(sorted(m.decode("ascii") for m in route.methods))
        raise ProxyError(405, f"{shown}: Ollama serves this route only with {allowed}",
                         {b"Allow": allowed.encode("ascii")})
    if route.scope is Scope.ADMIN:
        raise ProxyError(403, f"API key {key.name!r} may not use {shown}: "
                         "it needs the 'admin' scope")
