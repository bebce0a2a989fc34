# -*- test-case-name: tests.admission.test_conversation -*-
"""
Which conversation a request continues: a digest the router sends home
(L{ollamaproxy.backends.affinity}), made of what clients actually send.

A chat client sends the whole conversation every turn: turn I{n} sends
messages C{m1..mk}, turn I{n+1} sends C{m1..mk}, the answer, C{m(k+1)}.
The digest must be the same for both, and the proxy must not keep the
answer (it streams through) nor the messages.  So a conversation is known
by how it I{began}, which no later turn changes:

  - C{/api/chat}, C{/v1/chat/completions}, C{/v1/messages}: the model and
    the messages up to and including the first user message (the system
    prompt and the first question), with C{/v1/messages}'s top-level
    C{system};
  - C{/api/generate}, C{/v1/completions}: the model, C{system} and the first
    L{PROMPT_PREFIX} characters of the prompt (a client that renders the
    history into the prompt keeps its start; a first prompt shorter than
    that keys its first turn apart from the next ones);
  - any route that runs a model, when the request's key names a chat id
    header (C{keys add NAME --chat-header X-OpenWebUI-Chat-Id}) and the
    request carries it: the model and that header's value, which the
    client keeps for the conversation's life.  A value that is a credential
    is refused (L{chat_id_of}), as a user header's is.

Two conversations that began alike (the same system prompt and first
question) share a digest, and so a backend: harmless, since Ollama's cache
serves the prefix they share too; the slack still spreads them when their
home is busy.  A client that renders every prompt from one long template
makes all its conversations one: give its key a chat id header.

Only the digest (16 bytes of BLAKE2b) is kept; it is computed from the
members the model check already parsed (L{ollamaproxy.admission.policy.
json_model_fields}), with no second parse, and only while turns go home
(several backends, C{--affinity-slack} not C{off}).  Nothing that is sent
changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from hashlib import blake2b
from typing import Final

from twisted.web.http_headers import Headers

from ollamaproxy.admission.keys import refuse_credential
from ollamaproxy.model_names import ModelName
from ollamaproxy.routes import Opening

#: How much of a prompt (characters) says which conversation it continues.
PROMPT_PREFIX: Final = 256


def chat_id_of(header: bytes, headers: Headers, redact: Callable[[str], str]) -> bytes | None:
    """
    The chat id a request names in its key's chat id header C{header} (the
    last, if sent more than once), or L{None}.

    @param redact: Blanks credentials in a text: a value it changes is a
        credential, not a chat id.
    @raise ProxyError: 400 for a credential, in any of the values: each
        goes on to Ollama, not only the one read.
    """
    values = headers.getRawHeaders(header)
    if values is None:
        return None
    for value in values:
        refuse_credential(header, value.decode("latin-1"), "a conversation", redact)
    return values[-1]


def conversation(
    opening: Opening, model: ModelName, members: Mapping[str, object],
    chat_id: bytes | None = None,
) -> bytes | None:
    """
    The digest of the conversation a request continues, or L{None} if its
    route has none (see the module's docstring for the rule).

    @param opening: What of a request of its route names its conversation
        (the catalogue's C{RouteSpec.opening}).
    @param members: The body's top-level members, by case-folded name, each
        object inside as its list of C{(name, value)} pairs.
    @param chat_id: The value of the chat id header the key names, if the
        request carries it: it wins, unless empty (no chat named).
    """
    if chat_id:
        return _digest(model, ("chat-id", chat_id))
    if opening is Opening.MESSAGES:
        messages = members.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        return _digest(model, (members.get("system"), _leading(messages)))
    if opening is Opening.PROMPT:
        prompt = members.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return None
        return _digest(model, (members.get("system"), prompt[:PROMPT_PREFIX]))
    return None


def _leading(messages: list[object]) -> list[object]:
    """
    The messages up to and including the first user message (all of them
    if none is a user's).
    """
    for at, message in enumerate(messages):
        if isinstance(message, list) and ("role", "user") in message:
            return messages[:at + 1]
    return messages


def _digest(model: ModelName, what: object) -> bytes:
    """
    16 bytes that stand for C{what} of a conversation with C{model}.

    The text is Python's C{repr} of strings, lists and numbers' lengths,
    which is the same for the same values; a lone surrogate (invalid
    UTF-8, as the model check decodes it) is kept as it came.
    """
    text = repr((model.canonical, what))
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
