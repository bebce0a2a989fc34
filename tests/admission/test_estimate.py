"""
Tests for L{ollamaproxy.admission.estimate}: a request's expected cost, by
the rule the documentation states.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from ollamaproxy.admission.estimate import (
    DEFAULT_OUTPUT_TOKENS,
    NOTHING,
    Estimate,
    estimate,
)
from ollamaproxy.routes import Catalogue, RouteSpec


def route(path: str) -> RouteSpec:
    found = Catalogue().find(path.encode())
    assert found is not None
    return found


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "llama3.2", **fields}).encode()


def test_prompt_is_a_quarter_of_the_body_and_output_the_default() -> None:
    """
    A chat that sets no length: its prompt is its body's bytes over four,
    rounded up; its output the documented default.
    """
    chat = body(messages=[{"role": "user", "content": "hello there"}])
    assert estimate(route("/api/chat"), chat) == Estimate(
        math.ceil(len(chat) / 4), DEFAULT_OUTPUT_TOKENS)


@pytest.mark.parametrize(("path", "fields", "output"), [
    ("/api/generate", {"prompt": "hi", "options": {"num_predict": 40}}, 40),
    ("/v1/chat/completions", {"messages": [], "max_tokens": 30}, 30),
    ("/v1/chat/completions", {"messages": [], "max_completion_tokens": 20}, 20),
    ("/api/generate", {"prompt": "hi", "options": {"num_predict": -1}}, DEFAULT_OUTPUT_TOKENS),
])
def test_output_is_what_the_request_asks_at_most(
    path: str, fields: dict[str, Any], output: int
) -> None:
    """
    C{num_predict}, C{max_tokens} or C{max_completion_tokens} is the
    output expected; an unlimited one (-1) is the default.
    """
    assert estimate(route(path), body(**fields)).output == output


@pytest.mark.parametrize("path", ["/api/embed", "/api/embeddings", "/v1/embeddings"])
def test_embeddings_generate_nothing(path: str) -> None:
    """
    Embeddings read their input and generate no tokens.
    """
    request = body(input="some text to embed")
    assert estimate(route(path), request) == Estimate(math.ceil(len(request) / 4), 0)


def test_images_are_no_prompt_text() -> None:
    """
    A body with images counts only its text, not the base64 of its images
    (nor the model's name).
    """
    request = body(prompt="describe", images=["A" * 100_000])
    assert estimate(route("/api/generate"), request).prompt == math.ceil(len("describe") / 4)


def test_unread_body_and_routes_that_run_no_model() -> None:
    """
    A body the proxy did not read counts no prompt, but the default
    output; a route that runs no model (a listing, a model's details)
    costs nothing.
    """
    assert estimate(route("/api/chat"), None) == Estimate(0, DEFAULT_OUTPUT_TOKENS)
    assert estimate(route("/api/tags"), None) is NOTHING
    assert estimate(route("/api/show"), body()) is NOTHING
    assert estimate(None, b"{}") is NOTHING
