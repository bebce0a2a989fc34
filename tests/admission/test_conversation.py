"""
Tests for L{ollamaproxy.admission.conversation}: which conversation a
request continues, from the members the model check parsed, per route.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.web.http_headers import Headers

from ollamaproxy.admission.conversation import PROMPT_PREFIX, chat_id_of, conversation
from ollamaproxy.admission.policy import json_model_fields
from ollamaproxy.errors import ProxyError
from ollamaproxy.model_names import resolve
from ollamaproxy.record.redact import Redactor
from ollamaproxy.routes import Catalogue

LLAMA = resolve("llama3.2")
SYSTEM = {"role": "system", "content": "You are terse."}


def digest_of(route: str, body: dict[str, Any], chat_id: bytes | None = None) -> bytes | None:
    """
    The conversation of C{body} on C{route}, from the model check's one
    parse of it.
    """
    members: dict[str, object] = {}
    json_model_fields(json.dumps(body).encode(), ("model",), members)
    spec = Catalogue().find(route.encode())
    assert spec is not None
    return conversation(spec.opening, resolve(str(body["model"])), members, chat_id)


def turns(first: str, answers: int) -> list[list[dict[str, Any]]]:
    """
    The messages of a chat's first C{answers + 1} turns, each sending the
    whole history and a new question.
    """
    history: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": first}]
    sent = [list(history)]
    for number in range(answers):
        history += [{"role": "assistant", "content": f"answer {number}"},
                    {"role": "user", "content": f"question {number}"}]
        sent.append(list(history))
    return sent


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
def test_every_turn_of_a_chat_is_one_conversation(route: str) -> None:
    """
    Turn n+1 sends turn n's messages, the answer and a new question: every
    turn has the digest of the first.
    """
    digests = {digest_of(route, {"model": "llama3.2", "messages": m}) for m in turns("hi", 4)}
    assert len(digests) == 1 and None not in digests


@pytest.mark.parametrize("change", [
    {"messages": [SYSTEM, {"role": "user", "content": "hello"}]},
    {"messages": [{"role": "system", "content": "You are verbose."},
                  {"role": "user", "content": "hi"}]},
    {"model": "mistral"},
])
def test_another_beginning_or_model_is_another_conversation(change: dict[str, Any]) -> None:
    """
    Another first question, another system prompt, or another model: another
    conversation.
    """
    base = {"model": "llama3.2", "messages": turns("hi", 0)[0]}
    assert digest_of("/api/chat", base) != digest_of("/api/chat", {**base, **change})


def test_v1_messages_counts_its_top_level_system() -> None:
    """
    On C{/v1/messages} the system prompt is a top-level field: it tells two
    conversations that begin with the same question apart, and every turn
    keeps the first's digest.
    """
    chats = turns("hi", 2)
    firsts = [{"model": "llama3.2", "system": system, "messages": chats[0][1:]}
              for system in ("a", "b")]
    assert digest_of("/v1/messages", firsts[0]) != digest_of("/v1/messages", firsts[1])
    later = {"model": "llama3.2", "system": "a", "messages": chats[2][1:]}
    assert digest_of("/v1/messages", later) == digest_of("/v1/messages", firsts[0])


@pytest.mark.parametrize("route", ["/api/generate", "/v1/completions"])
def test_a_prompt_is_known_by_its_beginning(route: str) -> None:
    """
    A prompt that renders the history keeps its beginning: prompts that share
    the first L{PROMPT_PREFIX} characters are one conversation, a prompt
    that differs within them another; C{system} counts too.
    """
    start = "x" * PROMPT_PREFIX
    one = digest_of(route, {"model": "llama3.2", "prompt": start + " turn one"})
    assert one is not None
    assert digest_of(route, {"model": "llama3.2", "prompt": start + " two, longer"}) == one
    assert digest_of(route, {"model": "llama3.2", "prompt": "y" + start}) != one
    assert digest_of(route, {"model": "llama3.2", "prompt": start, "system": "s"}) != one


def test_a_chat_id_wins() -> None:
    """
    The key's chat id header names the conversation, whatever the messages
    say; another id is another conversation, on any route that runs a model.
    An empty one names none.
    """
    body = {"model": "llama3.2", "messages": turns("hi", 0)[0]}
    other = {"model": "llama3.2", "messages": turns("hello", 3)[3]}
    assert digest_of("/api/chat", body, b"c-1") == digest_of("/api/chat", other, b"c-1")
    assert digest_of("/api/chat", body, b"c-1") != digest_of("/api/chat", body, b"c-2")
    assert digest_of("/api/chat", body, b"c-1") != digest_of("/api/chat", body)
    assert digest_of("/api/embed", {"model": "llama3.2", "input": "x"}, b"c-1") is not None
    assert digest_of("/api/chat", body, b"") == digest_of("/api/chat", body)


CHAT_ID = b"X-OpenWebUI-Chat-Id"
#: A key of the keys file, whatever its shape (checked word by word).
TEAM_KEY = "team-key.2026"
REDACT = Redactor(lambda word: word == TEAM_KEY)


def test_a_chat_id_is_read_as_sent() -> None:
    """
    The chat id is the header's value as sent (the last, if sent twice),
    and none without the header.
    """
    assert chat_id_of(CHAT_ID, Headers({CHAT_ID: [b"c-1", b"c-2"]}), REDACT) == b"c-2"
    assert chat_id_of(CHAT_ID, Headers({b"x-other": [b"c-1"]}), REDACT) is None


@pytest.mark.parametrize("value", [TEAM_KEY, "olpk_" + "chatidtest" * 3 + "chatidte"])
def test_a_credential_is_no_chat_id(value: str) -> None:
    """
    One of the proxy's keys, or a token of its keys' shape, sent as the
    chat id (a front-end set up to send its key there) is a 400 that does
    not repeat it, rather than a digest made of it and the key forwarded.
    """
    with pytest.raises(ProxyError) as e:
        chat_id_of(CHAT_ID, Headers({CHAT_ID: [value.encode()]}), REDACT)
    assert e.value.code == 400
    assert "credential" in e.value.message and value not in e.value.message


@pytest.mark.parametrize("first", [True, False])
def test_a_credential_beside_a_chat_id_is_refused(first: bool) -> None:
    """
    A key sent in one of several chat id headers is refused, whichever is
    read: every one of them would be forwarded to Ollama.
    """
    values = [TEAM_KEY.encode(), b"c-1"] if first else [b"c-1", TEAM_KEY.encode()]
    with pytest.raises(ProxyError) as e:
        chat_id_of(CHAT_ID, Headers({CHAT_ID: values}), REDACT)
    assert e.value.code == 400
    assert TEAM_KEY not in e.value.message


@pytest.mark.parametrize(("route", "body"), [
    ("/api/chat", {"model": "llama3.2", "messages": []}),
    ("/api/chat", {"model": "llama3.2", "messages": "hi"}),
    ("/api/generate", {"model": "llama3.2"}),
    ("/api/generate", {"model": "llama3.2", "prompt": ""}),
    ("/api/embed", {"model": "llama3.2", "input": "hi"}),
])
def test_nothing_to_know_a_conversation_by(route: str, body: dict[str, Any]) -> None:
    """
    No messages, no prompt, or a route without conversations: none.
    """
    assert digest_of(route, body) is None


def test_the_digest_keeps_nothing_of_the_content() -> None:
    """
    The digest is 16 bytes, whatever the conversation's length, and holds
    none of its text.
    """
    secret = "hunter2 is my password "
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": secret * 100}]}
    digest = digest_of("/api/chat", body)
    assert digest is not None and len(digest) == 16
    # Not a piece of the conversation's text, however it is cut or spelled.
    for text in (json.dumps(body), repr(body), secret * 100):
        assert digest not in text.encode()
    assert b"hunter2" not in digest
