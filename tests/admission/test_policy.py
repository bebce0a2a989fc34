"""
Tests for L{ollamaproxy.admission.policy}: reading the models a request names.
"""

from __future__ import annotations

import pytest

from ollamaproxy.admission.policy import form_models, json_model_fields, json_models
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
        (b'{"model": "a", "messages": [{"content": "' + b"[" * 200_000 + b'"}]}', ["a"]),
        (b'{"model": "a", "x": "' + b"{,\\\"" * 400_000 + b'"}', ["a"]),
        (b'{"model": "a"} {"model": "b"}', ["a"]),
        (b'{"model": "a"}trailing garbage', ["a"]),
        (b' \r\n\t{"model": "a"}\n', ["a"]),
        (b'{"model": "a", "prompt": "\xff\xfe"}', ["a"]),
        (b'{"model": "a\xe2\x82"}', ["a\ufffd\ufffd"]),
        (b'{"model": "a\\ud800"}', ["a\ufffd"]),
        (b'{"model": "a", "n": 1' + b"0" * 5000 + b"}", ["a"]),
    ],
    ids=["brackets-in-a-string", "separators-and-escapes-in-a-string", "two-values",
         "trailing-data", "whitespace-around", "invalid-utf8-elsewhere",
         "invalid-utf8-in-the-model", "lone-surrogate-escape", "long-number"],
)
def test_json_models_as_go_reads_them(body: bytes, names: list[str]) -> None:
    """
    A body is read as Go's decoder reads it: brackets, commas and escaped
    quotes inside strings are not structure (not counted against the
    bounds), only the first value counts, invalid UTF-8 and lone surrogate
    escapes in a string are U+FFFD (one per invalid byte), and a number
    Python would refuse to make an int of is read.
    """
    assert json_models(body, ("model",)) == names


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "x": NaN}',
        b'{"model": "a", "x": -Infinity}',
        b'\xef\xbb\xbf{"model": "a"}',
        b'{"model": "a", "x": "' + b"[" * 100_001,
        b'{"model": "a", "x": [' + b"[]," * 100_001 + b"[]]}",
    ],
    ids=["nan", "infinity", "byte-order-mark", "unterminated-string", "many-arrays"],
)
def test_json_models_refuse_what_go_refuses(body: bytes) -> None:
    """
    What Go's decoder refuses (C{NaN}, C{Infinity}, a byte order mark, an
    unterminated string) is refused with 400, and so is a body over the
    bounds in its structure.
    """
    with pytest.raises(ProxyError) as raised:
        json_models(body, ("model",))
    assert raised.value.code == 400


def test_json_members_from_the_same_parse() -> None:
    """
    Asked for, the body's top-level members come from the model check's
    parse: by case-folded name, the last of repeated ones, objects inside
    as their pairs, numbers as their text's length; a body that is no
    object is refused as without them.
    """
    members: dict[str, object] = {}
    body = b'{"Model": "a", "messages": [{"role": "user", "content": "hi", "n": 1234}], ' \
           b'"stream": false, "STREAM": true}'
    assert json_model_fields(body, ("model",), members) == [("model", "a")]
    assert members == {"model": "a", "stream": True,
                       "messages": [[("role", "user"), ("content", "hi"), ("n", 4)]]}
    for not_an_object in (b'[{"model": "a"}]', b'"a"'):
        with pytest.raises(ProxyError) as raised:
            json_model_fields(not_an_object, ("model",), {})
        assert raised.value.code == 400


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
