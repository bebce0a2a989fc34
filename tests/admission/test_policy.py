"""
Tests for L{ollamaproxy.admission.policy}: reading the models a request names.
"""

from __future__ import annotations

import pytest

from ollamaproxy.admission.policy import form_models, json_models
from ollamaproxy.errors import ProxyError

CT = b"multipart/form-data; boundary=B"


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"model": "a"}', ["a"]),
        (b'{"MODEL": "a", "Name": "b"}', ["a", "b"]),
        (b'{"mod\\u0065l": "a"}', ["a"]),
        (b'{"model": "a", "model": "b"}', ["a", "b"]),
        (b'{"messages": [{"model": "nested"}], "model": "a"}', ["a"]),
        (b'{"options": {"name": "nested"}}', []),
        (b"{}", []),
    ],
    ids=["plain", "any-case", "escaped-field-name", "repeated", "nested-ignored",
         "nested-only", "none"],
)
def test_json_models(body: bytes, names: list[str]) -> None:
    """
    Every top-level field Go's decoder would read as the model counts,
    whatever its case, escapes or repetitions; nested ones do not.
    """
    assert json_models(body, ("model", "name")) == names


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\na\r\n--B--\r\n', ["a"]),
        (b'--B\nContent-Disposition: form-data; name="model"\n\na\n--B--\n', ["a"]),
        (b'--B\r\ncontent-disposition: form-data; name=model\r\n\r\na\r\n--B--', ["a"]),
        (b'preamble\r\n--B\r\nContent-Disposition: form-data; name="model"\r\n'
         b'Content-Type: text/plain\r\n\r\na\r\n--B--\r\n', ["a"]),
    ],
    ids=["crlf", "lf", "unquoted-lowercase-header", "preamble-and-more-headers"],
)
def test_form_models(body: bytes, names: list[str]) -> None:
    """
    The model field of a multipart form is found in each framing Go's
    reader takes.
    """
    assert form_models(body, CT, b"", "model") == names


def test_form_field_names_are_case_sensitive() -> None:
    """
    Go's FormValue("model") does not read a field named "Model": neither
    does the check, and a form naming only that names no model (400).
    """
    body = b'--B\r\nContent-Disposition: form-data; name="Model"\r\n\r\na\r\n--B--\r\n'
    with pytest.raises(ProxyError) as raised:
        form_models(body, CT, b"", "model")
    assert raised.value.code == 400


def test_query_model_counts_before_the_form() -> None:
    """
    A model in the query string counts too: Go's FormValue prefers it.
    """
    body = b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\na\r\n--B--\r\n'
    assert form_models(body, CT, b"model=q&x=1", "model") == ["q", "a"]
