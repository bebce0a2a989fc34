# -*- test-case-name: tests.test_routes -*-
"""
The catalogue of Ollama's routes, as a proxy must know them.

For each route: the methods Ollama serves on it, the scope a key needs, where
a request names a model, and whether the answer is a model listing.  The
access check (L{ollamaproxy.admission.auth}), the model policy
(L{ollamaproxy.admission.policy}) and the metrics' route label all read this one
table, so a new Ollama route is one edit here.

The table follows Ollama's C{server/routes.go}.  Paths are compared the way
Ollama's router compares them: percent-decoded (L{decoded_path}), case
sensitive, a parameter (C{{model}}) standing for one non-empty segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote_to_bytes

from ollamaproxy.errors import ProxyError


class Scope(Enum):
    """
    What a key needs to use a route.
    """

    #: Harmless and names no model (C{/}, C{/api/version}): every key, and
    #: the candidates for C{--open-routes}.
    OPEN = "open"
    #: Generation, embeddings, model details and listings: every key.
    INFERENCE = "inference"
    #: Model management, account and experimental routes: admin keys only.
    ADMIN = "admin"


class ModelIn(Enum):
    """
    Where a request on a route names the model(s) it uses.
    """

    NOWHERE = "nowhere"
    #: Top-level fields of a JSON body (L{RouteSpec.model_fields}).
    JSON = "json"
    #: Fields of a C{multipart/form-data} body, and the query string (Go's
    #: C{FormValue} reads both).
    FORM = "form"
    #: The last path segment (C{/v1/models/{model}}).
    PATH = "path"


class Placement(Enum):
    """
    Which backend a request goes to, when the proxy has several.
    """

    #: A healthy backend that has the model the request names (any, if it
    #: names none), in memory first, then the least busy.
    MODEL = "model"
    #: The first healthy backend, in the order configured: model uploads
    #: (C{/api/blobs}) and the C{/api/create} that uses them must meet, and
    #: a pulled model lands in one known place.
    PRIMARY = "primary"
    #: Every healthy backend in turn (L{ollamaproxy.backends.everywhere}): a pull.
    EVERY = "every"
    #: Every healthy backend that has the model, in turn: a delete, a copy.
    EVERY_HAVING = "every having"


class Opening(Enum):
    """
    What of a request says which conversation it continues
    (L{ollamaproxy.admission.conversation}).
    """

    #: Nothing: a request of the route continues no conversation.
    NONE = "none"
    #: Its messages, up to the first user message (a chat).
    MESSAGES = "messages"
    #: The start of its prompt (a completion).
    PROMPT = "prompt"


@dataclass(frozen=True)
class RouteSpec:
    """
    One of Ollama's routes.

    @ivar pattern: The path, with C{{name}} for a one-segment parameter at
        its end; also the route's label in metrics.
    @ivar methods: The methods Ollama serves on it.
    @ivar scope: What a key needs to use it.
    @ivar model_in: Where a request names its model(s).
    @ivar model_fields: The JSON or form fields that name a model, compared
        without regard to case for JSON, as Go's decoder does.
    @ivar listing: For a model listing, the field holding the list.
    @ivar runs: Whether a request runs its model (generation, embeddings,
        transcription): it takes one of a backend's C{--parallel} slots
        for that model, and waits in the fair queue when there is none.
    @ivar placement: Which backend a request goes to, with several.
    @ivar changes_models: Whether a request changes a backend's models, so
        that the proxy asks it again for them once the request has ended.
    @ivar generates: Whether a request generates text: a backend that does
        not answer one in time is checked with a one-token generation of
        its model (L{ollamaproxy.backends.pool.BackendPool.hung}), which
        an embedding or image model cannot take.
    @ivar embeds: Whether its answer is vectors: it reads a prompt and
        generates no tokens (L{ollamaproxy.admission.estimate}).
    @ivar opening: What of a request names the conversation it continues.
    """

    pattern: str
    methods: frozenset[bytes]
    scope: Scope
    model_in: ModelIn = ModelIn.NOWHERE
    model_fields: tuple[str, ...] = ("model", "name")
    listing: str | None = None
    runs: bool = False
    placement: Placement = Placement.MODEL
    changes_models: bool = False
    generates: bool = False
    embeds: bool = False
    opening: Opening = Opening.NONE

    @property
    def prefix(self) -> bytes | None:
        """
        For a route ending in a parameter, the path up to it.
        """
        if not self.pattern.endswith("}"):
            return None
        return self.pattern[: self.pattern.rindex("/") + 1].encode("ascii")


def _route(pattern: str, methods: str, scope: Scope, model_in: ModelIn = ModelIn.NOWHERE,
           *, fields: tuple[str, ...] = ("model", "name"), listing: str | None = None,
           runs: bool = False, placement: Placement = Placement.MODEL,
           changes_models: bool = False, generates: bool = False, embeds: bool = False,
           opening: Opening = Opening.NONE) -> RouteSpec:
    return RouteSpec(pattern, frozenset(m.encode("ascii") for m in methods.split()), scope,
                     model_in, fields, listing, runs, placement, changes_models, generates,
                     embeds, opening)


OPEN, INFERENCE, ADMIN = Scope.OPEN, Scope.INFERENCE, Scope.ADMIN
JSON, FORM, PATH = ModelIn.JSON, ModelIn.FORM, ModelIn.PATH
PRIMARY, EVERY, EVERY_HAVING = Placement.PRIMARY, Placement.EVERY, Placement.EVERY_HAVING
MESSAGES, PROMPT = Opening.MESSAGES, Opening.PROMPT

#: Ollama's routes (server/routes.go), and the few the issue tracker and
#: Ollama's clients know of that a release may serve.
OLLAMA_ROUTES = (
    _route("/", "GET HEAD", OPEN),
    _route("/api/version", "GET HEAD", OPEN),
    _route("/api/status", "GET", INFERENCE),
    _route("/api/tags", "GET HEAD", INFERENCE, listing="models"),
    _route("/api/ps", "GET", INFERENCE, listing="models"),
    _route("/api/show", "POST", INFERENCE, JSON),
    _route("/api/generate", "POST", INFERENCE, JSON, runs=True, generates=True, opening=PROMPT),
    _route("/api/chat", "POST", INFERENCE, JSON, runs=True, generates=True, opening=MESSAGES),
    _route("/api/embed", "POST", INFERENCE, JSON, runs=True, embeds=True),
    _route("/api/embeddings", "POST", INFERENCE, JSON, runs=True, embeds=True),
    _route("/api/pull", "POST", ADMIN, JSON, placement=EVERY, changes_models=True),
    _route("/api/push", "POST", ADMIN, JSON),
    _route("/api/delete", "DELETE", ADMIN, JSON, placement=EVERY_HAVING, changes_models=True),
    _route("/api/create", "POST", ADMIN, JSON, fields=("model", "name", "from"),
           placement=PRIMARY, changes_models=True),
    _route("/api/copy", "POST", ADMIN, JSON, fields=("source", "destination"),
           placement=EVERY_HAVING, changes_models=True),
    _route("/api/blobs/{digest}", "POST HEAD", ADMIN, placement=PRIMARY),
    _route("/api/me", "POST", ADMIN),
    _route("/api/signout", "POST", ADMIN),
    _route("/api/user/keys/{encodedKey}", "DELETE", ADMIN),
    _route("/api/experimental/web_search", "POST", ADMIN),
    _route("/api/experimental/web_fetch", "POST", ADMIN),
    _route("/api/experimental/model-recommendations", "GET", ADMIN),
    _route("/v1/chat/completions", "POST", INFERENCE, JSON, runs=True, generates=True,
           opening=MESSAGES),
    _route("/v1/completions", "POST", INFERENCE, JSON, runs=True, generates=True,
           opening=PROMPT),
    _route("/v1/embeddings", "POST", INFERENCE, JSON, runs=True, embeds=True),
    _route("/v1/responses", "POST", INFERENCE, JSON, runs=True, generates=True),
    _route("/v1/messages", "POST", INFERENCE, JSON, runs=True, generates=True,
           opening=MESSAGES),
    _route("/v1/messages/count_tokens", "POST", INFERENCE, JSON),
    _route("/v1/images/generations", "POST", INFERENCE, JSON, runs=True),
    _route("/v1/images/edits", "POST", INFERENCE, FORM, fields=("model",), runs=True),
    _route("/v1/audio/transcriptions", "POST", INFERENCE, FORM, fields=("model",),
           runs=True),
    _route("/v1/models", "GET", INFERENCE, listing="data"),
    _route("/v1/models/{model}", "GET", INFERENCE, PATH),
)


#: The proxy's own routes beside Ollama's, for the key check: metrics and
#: the console's data, admin keys only.
METRICS_ROUTE = RouteSpec("/metrics", frozenset({b"GET"}), Scope.ADMIN)
CONSOLE_ROUTE = RouteSpec("/-/console", frozenset({b"GET"}), Scope.ADMIN)


class Catalogue:
    """
    Finds the route a path is on.
    """

    def __init__(self, routes: Iterable[RouteSpec] = OLLAMA_ROUTES) -> None:
        self._exact: dict[bytes, RouteSpec] = {}
        self._parameters: list[tuple[bytes, RouteSpec]] = []
        for route in routes:
            prefix = route.prefix
            if prefix is None:
                self._exact[route.pattern.encode("ascii")] = route
            else:
                self._parameters.append((prefix, route))
        #: The paths of the routes without a parameter.
        self.fixed: frozenset[bytes] = frozenset(self._exact)

    def find(self, path: bytes) -> RouteSpec | None:
        """
        The route a percent-decoded path is on, whatever the method, or
        L{None} if Ollama has no such route.
        """
        route = self._exact.get(path)
        if route is not None:
            return route
        for prefix, route in self._parameters:
            if path.startswith(prefix) and len(path) > len(prefix):
                if b"/" not in path[len(prefix):]:
                    return route
        return None


_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def decoded_path(path: bytes) -> bytes:
    """
    A request path as Ollama's router sees it: percent-escapes decoded, once.

    @raise ProxyError: 400 for a malformed escape, as Go's URL parser refuses
        it.
    """
    if b"%" not in path:
        return path
    if _ESCAPE.search(path):
        raise ProxyError(400, "malformed percent-escape in the request path")
    return unquote_to_bytes(path)
