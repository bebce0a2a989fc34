"""
Tests for L{ollamaproxy.backends.listings}: one listing from several.
"""

from __future__ import annotations

import json

import pytest

from ollamaproxy.backends.listings import merge_listings


def test_tags_union_each_model_once() -> None:
    """
    The union of two /api/tags, each model once however it is spelled, the
    first backend's entry kept.
    """
    a = json.dumps({"models": [{"name": "llama3.2:latest", "size": 1},
                               {"name": "mistral:latest", "size": 2}]}).encode()
    b = json.dumps({"models": [{"name": "Mistral", "size": 3},
                               {"name": "qwen3:8b", "size": 4}]}).encode()
    merged = json.loads(merge_listings([a, b], "models"))
    assert merged == {"models": [{"name": "llama3.2:latest", "size": 1},
                                 {"name": "mistral:latest", "size": 2},
                                 {"name": "qwen3:8b", "size": 4}]}


def test_openai_models_keep_their_shape() -> None:
    """
    /v1/models merges by id and keeps the list object's other fields.
    """
    a = b'{"object":"list","data":[{"id":"llama3.2:latest","object":"model"}]}'
    b = b'{"object":"list","data":[{"id":"qwen3:8b","object":"model"}]}'
    merged = json.loads(merge_listings([a, b], "data"))
    assert merged["object"] == "list"
    assert [m["id"] for m in merged["data"]] == ["llama3.2:latest", "qwen3:8b"]


def test_empty_listings() -> None:
    """
    Backends without models give an empty listing, not an error.
    """
    assert json.loads(merge_listings([b'{"models":[]}', b'{"models":null}'], "models")) == {
        "models": []
    }


@pytest.mark.parametrize("body", [b"[]", b'{"models": 3}', b"oops"])
def test_not_a_listing(body: bytes) -> None:
    """
    A body that is no listing is an error, never half a listing.
    """
    with pytest.raises(ValueError):
        merge_listings([body], "models")
