# -*- test-case-name: tests.test_auth -*-
"""
Who is asking: finding the key a client presents and checking it.

Clients present a key as C{Authorization: Bearer KEY} (ollama-python, the
OpenAI SDKs, Open WebUI, Continue, LangChain) or as C{X-API-Key: KEY} (the
seed's header; Page Assist and ollama-js can send either).  The check happens
before any request reaches Ollama.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from ollamaproxy.config import Route
from ollamaproxy.errors import ProxyError, unauthorized
from ollamaproxy.keys import ApiKey, KeyStore, digest
from ollamaproxy.limits import GuessThrottle


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


# What every key may do: inference and read-only routes.  Anything else
# (pull, push, create, copy, delete, blobs, account and experimental routes,
# and any path spelled otherwise) needs the admin scope.
_INFERENCE_ROUTES = frozenset(
    Route(method, path)
    for methods, path in [
        ((b"GET", b"HEAD"), b"/"),
        ((b"GET", b"HEAD"), b"/api/version"),
        ((b"GET", b"HEAD"), b"/api/tags"),
        ((b"GET",), b"/api/ps"),
        ((b"POST",), b"/api/show"),
        ((b"POST",), b"/api/chat"),
        ((b"POST",), b"/api/generate"),
        ((b"POST",), b"/api/embed"),
        ((b"POST",), b"/api/embeddings"),
    ]
    for method in methods
)
# Plain segments only: no empty, "." or ".." segments, no percent-escapes.
_PLAIN_PATH = re.compile(rb"^(/[A-Za-z0-9_:-][A-Za-z0-9_.:-]*)+$")


def needs_admin(method: bytes, path: bytes) -> bool:
    """
    Whether a route is beyond the inference scope.  The check is on the
    exact path as sent, and only plain spellings of inference routes pass,
    so no other spelling of an admin route gets through.
    """
    if Route(method, path) in _INFERENCE_ROUTES:
        return False
    openai = path.startswith(b"/v1/") and method in (b"GET", b"HEAD", b"POST")
    return not (openai and _PLAIN_PATH.match(path))


@dataclass(frozen=True)
class Authenticator:
    """
    Decides whether a request may go on.

    @ivar keys: The keys accepted.
    @ivar open_routes: Routes served without a key.  They are compared with
        the exact path as sent, so no spelling of another path can pass for
        an open one.
    @ivar clock: Tells time, for keys that expire.
    @ivar throttle: Refuses addresses that guess keys, or L{None}.
    """

    keys: KeyStore
    open_routes: frozenset[Route]
    clock: IReactorTime
    throttle: GuessThrottle | None = None

    def authenticate(
        self, method: bytes, path: bytes, headers: Headers, address: str = ""
    ) -> ApiKey | None:
        """
        Check a request's key and whether it may use the route.

        @param path: The request path without the query string and without
            the C{/proxy} prefix.
        @param address: The client's address, for the guess throttle.
        @return: The key presented, or L{None} on an open route.
        @raise ProxyError: 401 if a key is needed and none, a wrong one or an
            expired one was presented; 429 if the address is throttled for
            guessing; 403 if the key may not use the route.
        """
        if Route(method, path) in self.open_routes:
            return None
        presented = presented_key(headers)
        if presented is None:
            raise unauthorized(
                "missing API key: send it as 'Authorization: Bearer <key>' "
                "or 'X-API-Key: <key>'"
            )
        presented_digest = digest(presented)
        if self.throttle is not None:
            self.throttle.check(address, presented_digest)
        key = self.keys.find_digest(presented_digest)
        if key is None:
            if self.throttle is not None:
                self.throttle.failed(address)
            raise unauthorized("invalid API key")
        if self.throttle is not None:
            self.throttle.worked(address, presented_digest)
        if key.expired(datetime.fromtimestamp(self.clock.seconds(), UTC)):
            raise unauthorized(f"API key {key.name!r} has expired")
        if not key.admin and needs_admin(method, path):
            raise ProxyError(
                403, f"API key {key.name!r} may not use {method.decode('ascii', 'replace')} "
                f"{path.decode('ascii', 'replace')}"
            )
        return key


# Routes whose JSON body names a model, and model listings.
MODEL_IN_BODY = frozenset(
    Route(b"POST", path)
    for path in [
        b"/api/chat", b"/api/generate", b"/api/embed", b"/api/embeddings", b"/api/show",
        b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings", b"/v1/responses",
    ]
)
LISTINGS = {
    Route(b"GET", b"/api/tags"): "models",
    Route(b"GET", b"/api/ps"): "models",
    Route(b"GET", b"/v1/models"): "data",
}
OPENAI_MODEL_PREFIX = b"/v1/models/"


def models_named(body: bytes) -> list[str]:
    """
    Every model a JSON request body names: the values of its top-level
    C{model} and legacy C{name} fields.  Ollama's JSON decoder matches field
    names without regard to case and takes the last of repeated ones, so
    every spelling and every repetition counts here.

    @raise ProxyError: 400 if the body is not a JSON object, or names a
        model with something other than a string.
    """
    pairs: list[tuple[str, object]] = []

    def keep_pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        pairs[:] = items  # objects are decoded inside out: the last is the body
        return dict(items)

    try:
        document = json.loads(body, object_pairs_hook=keep_pairs)
    except ValueError:
        raise ProxyError(400, "request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise ProxyError(400, "request body must be a JSON object")
    names = []
    for field, value in pairs:
        if field.casefold() in ("model", "name"):
            if not isinstance(value, str):
                raise ProxyError(400, f"{field} must be a string")
            names.append(value)
    return names


def check_models(key: ApiKey, names: list[str]) -> None:
    """
    @raise ProxyError: 403 if the key may not use one of the models.
    """
    for name in names:
        if not key.allows_model(name):
            raise ProxyError(403, f"API key {key.name!r} may not use model {name!r}")


def filter_listing(key: ApiKey, field: str, body: bytes) -> bytes:
    """
    A model listing (C{/api/tags}, C{/api/ps}, C{/v1/models}) showing only
    the models the key may use.
    """
    document = json.loads(body)
    identity = "id" if field == "data" else "name"
    document[field] = [
        entry for entry in document.get(field) or []
        if key.allows_model(str(entry.get(identity) or entry.get("model") or ""))
    ]
    return json.dumps(document, separators=(",", ":")).encode("utf-8")
