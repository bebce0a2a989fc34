# -*- test-case-name: tests.admission.test_access -*-
"""
What the proxy must know of a request before it sends it on: the model it
names (for the key's model list and the cloud scope, and for the router),
the body to send (a C{keep_alive} over its cap is clamped; a loaded model's
context kept, L{ollamaproxy.admission.caps.keep_loaded_context}), and how its
answer is rewritten (a model listing narrowed to the key's models).

A body is read only when something needs it: a key limited to models or
without the C{cloud} scope, a cap, a request that runs a model (the router
gives it a slot for that model), or several backends to choose from.  Model
uploads and every other body stream through unread; so does a body that
runs a model but cannot be read whole (sent in chunks, compressed, or
declared larger than the proxy reads): it runs as the router's
L{UNREAD_MODEL}, which takes a whole backend, as does one whose model the
check could not read (the router gives a request that runs a model it
cannot name no smaller slot).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ollamaproxy.admission.caps import (
    CAPPED_ROUTES,
    NO_CAPS,
    Caps,
    clamp,
    keep_loaded_context,
    named_context,
)
from ollamaproxy.admission.conversation import conversation
from ollamaproxy.admission.estimate import NOTHING, Estimate, estimate
from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.admission.policy import (
    MAX_CHECKED_BODY,
    check_models,
    filter_listing,
    models_named,
    needs_body_check,
    path_model,
)
from ollamaproxy.backends.downstream import Downstream
from ollamaproxy.backends.relay import Target
from ollamaproxy.backends.request_body import BodyTooLarge
from ollamaproxy.backends.router import UNREAD_MODEL
from ollamaproxy.errors import ProxyError
from ollamaproxy.model_names import ModelName, resolve
from ollamaproxy.routes import ModelIn, RouteSpec


@dataclass
class Plan:
    """
    @ivar model: The model the request runs or names, for the router.
    @ivar rewrite: How to rewrite a successful answer, if it needs it.
    @ivar notes: What the proxy changed in the request, for the access line.
    @ivar body: The request's body, if it was read whole (as sent on).
    @ivar estimate: What the request is expected to cost in tokens, which
        its key's quotas reserve (L{ollamaproxy.admission.estimate}).
    @ivar conversation: The digest of the conversation it continues, if
        the router sends turns home and it has one
        (L{ollamaproxy.admission.conversation}).
    @ivar context: The C{num_ctx} its body is sent with, after the context
        rule and the caps, when the rule is on and the body names one: the
        context the runner that serves it is loaded with, which the proxy
        remembers for its backend (L{ollamaproxy.backends.pool.BackendPool.sending}).
    """

    model: ModelName | None = None
    rewrite: Callable[[bytes], bytes] | None = None
    notes: list[str] = field(default_factory=list)
    body: bytes | None = None
    estimate: Estimate = NOTHING
    conversation: bytes | None = None
    context: int | None = None


async def plan_request(
    key: ApiKey | None,
    request: Downstream,
    target: Target,
    path: bytes,
    route: RouteSpec | None,
    caps: Caps,
    several_backends: bool,
    conversations: bool = False,
    chat_id: bytes | None = None,
) -> Plan:
    """
    Read what must be read of a request, refuse what its key may not do, and
    clamp what goes over a cap.

    @param key: The key presented, or L{None} on an open route.
    @param caps: The proxy's caps (a key's own make them tighter).
    @param several_backends: Whether the router chooses among backends.
    @param conversations: Whether the router sends a conversation's turns
        home, so that the plan says which conversation a request continues.
    @param chat_id: The chat id the request names in its key's chat id
        header (L{ollamaproxy.admission.conversation.chat_id_of}), if any.
    @raise ProxyError: 403 for a model the key may not use, or for a route
        the proxy does not know when the key is limited to some models; 400
        or 413 for a body it cannot read.
    """
    if route is None:
        if key is not None and key.models:
            raise ProxyError(
                403, f"API key {key.name!r} is limited to some models and may not use "
                f"{request.method.decode('ascii', 'replace')} "
                f"{path.decode('utf-8', 'replace')}, which is none of Ollama's routes"
            )
        return Plan()
    if route.listing is not None:
        if key is not None and key.models:
            return Plan(rewrite=partial(filter_listing, key, route.listing))
        return Plan()
    if route.model_in is ModelIn.NOWHERE:
        return Plan()
    check = key is not None and needs_body_check(key)
    if route.pattern not in CAPPED_ROUTES:
        caps = NO_CAPS
    elif key is not None and key.caps != NO_CAPS:
        caps = caps.tighter(key.caps)
    must = check or caps != NO_CAPS
    if not (must or route.runs or several_backends):
        return Plan()
    members: dict[str, object] | None = {} if conversations and route.runs else None
    if route.model_in is ModelIn.PATH:
        named = [(route.model_fields[0], path_model(path, route))]
        body = b""
    else:
        if request.body is None and route.model_in is ModelIn.JSON:
            return Plan()  # Ollama answers that the model is missing
        if not must and not _readable(request):
            # Read only to route it: a body that cannot be read whole
            # goes on unread, and Ollama answers for it as it would; if it
            # runs a model, after its turn in the queue.
            return Plan(model=UNREAD_MODEL if route.runs else None,
                        estimate=estimate(route, None))
        body = await _read(request)
        query = target.uri.partition(b"?")[2]
        try:
            named = models_named(route, body, request.getHeader(b"content-type"), query,
                                 members)
        except ProxyError:
            if must:
                raise
            named = []
    if check:
        assert key is not None
        check_models(key, [name for _, name in named])
    plan = Plan(model=_routed(named, route), body=body if request.body is not None else None,
                estimate=estimate(route, body))
    if members is not None and plan.model is not None:
        plan.conversation = conversation(route.opening, plan.model, members, chat_id)
    if request.body is not None and (caps.loaded_context is not None or caps != NO_CAPS):
        _rewrite(plan, request, body, caps)
    return plan


def _rewrite(plan: Plan, request: Downstream, body: bytes, caps: Caps) -> None:
    """
    Rewrite the body of a request that has one as the context rule and the
    caps say, the caps last, so that they bound what the rule wrote; note
    each change in C{plan}.

    @raise ProxyError: 400 for a value the caps cannot read.
    """
    assert request.body is not None
    sent = body
    if caps.loaded_context is not None and plan.model is not None:
        sent, plan.notes, plan.context = _keep_context(body, plan.model, caps)
    if caps != NO_CAPS:
        try:
            sent, clamped = clamp(sent, caps)
        except ValueError as e:
            raise ProxyError(400, str(e)) from None
        plan.notes += clamped
    if sent is not body:
        request.body.replace(sent)
        plan.body = sent


def _keep_context(body: bytes, model: ModelName, caps: Caps
                  ) -> tuple[bytes, list[str], int | None]:
    """
    The body with the context C{model} is loaded with, by the context rule
    (L{keep_loaded_context}), unless no context is known or the caps
    forbid it (a loaded context over C{--max-num-ctx} would be clamped
    back, reloading all the same); and the context it will be sent with
    once the caps have clamped it (L{Plan.context}).

    That context is reckoned from what the client named and what the rule
    and the caps do to it, rather than read again from the rewritten body:
    a body that names none, most of them, is then never parsed.
    """
    assert caps.loaded_context is not None
    named = named_context(body)
    loaded = caps.loaded_context(model)
    notes: list[str] = []
    sent = body
    if loaded is not None and (caps.num_ctx is None or loaded <= caps.num_ctx):
        try:
            sent, notes = keep_loaded_context(body, loaded)
        except ValueError:
            # Ollama answers for a body it cannot take; without a cap, as
            # it came (with one, the caps refuse it next).
            return body, [], None
        named = loaded if named is None or named < loaded else named
    if named is not None and caps.num_ctx is not None and named > caps.num_ctx:
        named = caps.num_ctx
    return sent, notes, named


def _readable(request: Downstream) -> bool:
    """
    Whether a body can be read whole without refusing it: declared small
    enough, and not compressed.
    """
    body = request.body
    if body is None:
        return True
    return (
        isinstance(body.length, int) and body.length <= MAX_CHECKED_BODY
        and request.getHeader(b"content-encoding") is None
    )


async def _read(request: Downstream) -> bytes:
    """
    A request's whole body, within the proxy's bound for a checked body.
    """
    if request.body is None:
        return b""
    encoding = request.getHeader(b"content-encoding")
    if encoding is not None and encoding.strip().lower() != b"identity":
        raise ProxyError(400, "the proxy cannot read which model a body with "
                         "Content-Encoding names: send it uncompressed")
    try:
        return await request.body.collect(MAX_CHECKED_BODY)
    except BodyTooLarge:
        raise ProxyError(
            413, f"request body is larger than {MAX_CHECKED_BODY // 2**20} MiB, the "
            "most the proxy reads to check which model it names"
        ) from None


def _routed(named: list[tuple[str, str]], route: RouteSpec) -> ModelName | None:
    """
    The model a request is routed by: its route's first model field
    (C{model}; C{source} for a copy), else any; the first form value (Go's
    C{FormValue} takes the query string's first), the last JSON one (Go's
    decoder keeps the last of repeated fields).
    """
    first = [name for field, name in named if field == route.model_fields[0]]
    names = first or [name for _, name in named]
    if not names:
        return None
    return resolve(names[0] if route.model_in is ModelIn.FORM else names[-1])
