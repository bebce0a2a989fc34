"""
Tests for L{ollamaproxy.routes}: the catalogue of Ollama's routes and the
path its checks see.
"""

from __future__ import annotations

import pytest

from ollamaproxy.errors import ProxyError
from ollamaproxy.routes import OLLAMA_ROUTES, Catalogue, ModelIn, Scope, decoded_path


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        (b"/", "/"),
        (b"/api/version", "/api/version"),
        (b"/api/tags", "/api/tags"),
        (b"/api/chat", "/api/chat"),
        (b"/api/blobs/sha256:" + b"0" * 64, "/api/blobs/{digest}"),
        (b"/api/blobs/", None),
        (b"/api/blobs", None),
        (b"/api/blobs/a/b", None),
        (b"/api/user/keys/abc", "/api/user/keys/{encodedKey}"),
        (b"/api/experimental/web_search", "/api/experimental/web_search"),
        (b"/v1/messages", "/v1/messages"),
        (b"/v1/messages/count_tokens", "/v1/messages/count_tokens"),
        (b"/v1/images/edits", "/v1/images/edits"),
        (b"/v1/audio/transcriptions", "/v1/audio/transcriptions"),
        (b"/v1/models", "/v1/models"),
        (b"/v1/models/llama3.2", "/v1/models/{model}"),
        (b"/v1/models/hf.co/user/repo:Q4_K_M", None),
        (b"/v1/models/", None),
        (b"/api/chat/", None),
        (b"/API/CHAT", None),
        (b"//api/chat", None),
        (b"/api/./chat", None),
        (b"/favicon.ico", None),
        (b"", None),
        (b"/\xff", None),
        (b"/proxy/api/chat", None),
    ],
)
def test_find(path: bytes, pattern: str | None) -> None:
    """
    A decoded path is on one of Ollama's routes, compared as Ollama's
    router compares it (exactly, a parameter being one non-empty segment),
    or on none.
    """
    route = Catalogue().find(path)
    assert (None if route is None else route.pattern) == pattern


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        (b"/api/chat", b"/api/chat"),
        (b"/api/%63hat", b"/api/chat"),
        (b"/api/%63%68at", b"/api/chat"),
        (b"/v1/models/hf.co%2Fuser", b"/v1/models/hf.co/user"),
        (b"/api/%2563hat", b"/api/%63hat"),
        (b"/%E2%82%AC", "/€".encode()),
    ],
)
def test_decoded_path(raw: bytes, decoded: bytes) -> None:
    """
    Percent-escapes are decoded once, as Go's URL parser does before
    Ollama's router sees the path.
    """
    assert decoded_path(raw) == decoded


@pytest.mark.parametrize("raw", [b"/api/%6", b"/api/%zzchat", b"/api/chat%"])
def test_malformed_escape_is_400(raw: bytes) -> None:
    """
    A malformed escape is refused with 400, as Ollama refuses it.
    """
    with pytest.raises(ProxyError) as raised:
        decoded_path(raw)
    assert raised.value.code == 400


def test_catalogue_is_consistent() -> None:
    """
    Every route is listed once; listings and open routes name no model; a
    route whose model is in its path has a parameter; form routes name the
    one field Go reads.
    """
    patterns = [route.pattern for route in OLLAMA_ROUTES]
    assert len(patterns) == len(set(patterns))
    for route in OLLAMA_ROUTES:
        if route.listing is not None or route.scope is Scope.OPEN:
            assert route.model_in is ModelIn.NOWHERE
        if route.model_in is ModelIn.PATH:
            assert route.prefix is not None
        if route.model_in is ModelIn.FORM:
            assert route.model_fields == ("model",)


@pytest.mark.parametrize(
    "pattern",
    [
        "/v1/messages", "/v1/messages/count_tokens", "/v1/responses",
        "/v1/images/generations", "/v1/images/edits", "/v1/audio/transcriptions",
        "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show",
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models/{model}",
    ],
)
def test_every_inference_route_names_its_model(pattern: str) -> None:
    """
    The inference routes that run or describe a model say where the model
    is named, so a key's model list holds on each of them.
    """
    [route] = [r for r in OLLAMA_ROUTES if r.pattern == pattern]
    assert route.scope is Scope.INFERENCE
    assert route.model_in is not ModelIn.NOWHERE
