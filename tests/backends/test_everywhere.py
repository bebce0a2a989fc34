"""
Model management with several backends: a pull onto every healthy backend
in turn, a delete or copy on every one that has the model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from twisted.logger import LogEvent

from ollamaproxy.model_names import resolve
from tests.fakes.agents import Refusing
from tests.fakes.backends import two_backends
from tests.fakes.chain import chat


def lines(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines()]


def test_a_pull_goes_onto_every_backend_in_turn(access_events: list[LogEvent]) -> None:
    """
    A streamed pull reaches each backend, one after the other; the client
    gets one stream with a status line before each backend's progress, and
    both backends then have the model, so either may run it.
    """
    chain = two_backends()
    response = chain.respond("POST", "/api/pull", data=json.dumps({"model": "qwen3"}).encode())
    assert response.code == 200
    progress = lines(chain.body(response))
    statuses = [line["status"] for line in progress]
    assert statuses[0] == "backend 1 of 2"
    assert statuses.index("backend 2 of 2") > statuses.index("success")
    assert statuses[-1] == "success"
    assert [len(fake.received) for fake in chain.fakes] == [1, 1]
    chain.flush()
    assert all("qwen3:latest" in fake.models for fake in chain.fakes)
    # Each backend was asked for its models again.
    assert all(b.models is not None and resolve("qwen3") in b.models for b in chain.backends)
    used = chain.respond("POST", "/api/chat", data=chat("qwen3", stream=False))
    assert used.code == 200
    chain.body(used)
    assert access_events[0]["upstream"] == "http://127.0.0.1:11434,http://127.0.0.1:11435"


def test_a_pull_without_streaming_answers_once_at_the_end() -> None:
    """
    With C{"stream": false} the client gets one answer, the last
    backend's, once every backend has the model.
    """
    chain = two_backends()
    response = chain.respond("POST", "/api/pull", data=json.dumps(
        {"model": "qwen3", "stream": False}).encode())
    assert response.code == 200
    assert json.loads(chain.body(response)) == {"status": "success"}
    assert all("qwen3:latest" in fake.models for fake in chain.fakes)


def test_a_pull_cut_by_a_failing_backend_never_looks_finished() -> None:
    """
    A backend that cannot be reached in the middle of a pull ends the
    stream with an error line that names which backend, and the stream
    is cut (no normal end); the backends before it keep the model.
    """
    chain = two_backends()
    chain.backends[1].upstream = replace(chain.backends[1].upstream, agent=Refusing())
    response = chain.respond("POST", "/api/pull", data=json.dumps({"model": "qwen3"}).encode())
    assert response.code == 200
    collector = chain.stream(response)
    failure = chain.failure(collector.done)
    assert failure is not None
    last = lines(collector.body)[-1]
    assert last["error"].startswith("backend 2 of 2: cannot reach Ollama at")
    assert "qwen3:latest" in chain.fakes[0].models


def test_a_delete_reaches_every_backend_that_has_the_model() -> None:
    """
    A model on both backends is deleted from both; one on a single
    backend only from that one; then it is on none, and a chat for it is
    404 without reaching any backend.
    """
    chain = two_backends()
    for model, reached in (("hold", [1, 1]), ("mistral", [1, 2])):
        response = chain.respond("DELETE", "/api/delete",
                                 data=json.dumps({"model": model}).encode())
        assert response.code == 200
        chain.body(response)
        assert [len(fake.received) for fake in chain.fakes] == reached
    chain.flush()
    refused = chain.respond("POST", "/api/chat", data=chat("hold"))
    assert refused.code == 404
    chain.body(refused)
    assert [len(fake.received) for fake in chain.fakes] == [1, 2]


def test_a_failed_delete_answers_with_the_failure() -> None:
    """
    A backend that refuses the delete (its answer not 2xx) gives the
    client its status and error, not the other backends' success.
    """
    chain = two_backends()
    chain.fakes[0].models.remove("hold:latest")  # the proxy does not know yet
    response = chain.respond("DELETE", "/api/delete", data=json.dumps({"model": "hold"}).encode())
    assert response.code == 404
    assert "not found" in json.loads(chain.body(response))["error"]
