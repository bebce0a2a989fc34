"""
Tests for L{ollamaproxy.admission.users}: the user a request names behind a
shared key, and the names a key's user header may have.
"""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from ollamaproxy.admission.users import MAX_USER_LENGTH, user_of
from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import ANONYMOUS
from ollamaproxy.record.redact import Redactor

HEADER = b"X-OpenWebUI-User-Id"
#: A key of the keys file, whatever its shape (known by digest: a word
#: checked), and one of the generated shape that the proxy does not hold.
KEY = "team-key.2026"
SHAPED = "olpk_" + "userstest" * 4 + "us"
REDACT = Redactor(lambda word: word == KEY)


@pytest.mark.parametrize(
    "value",
    ["3f2b6c1e-8a4d-4f6e-9b1a-2c3d4e5f6a7b", "alice@example.com", "a", "x" * MAX_USER_LENGTH,
     "team:alice+bot_1.2"],
)
def test_a_user_is_read_as_sent(value: str) -> None:
    """
    A UUID (as Open WebUI sends), an e-mail address, or any value of the
    allowed characters up to the bound is the user, as sent.
    """
    assert user_of(HEADER, Headers({HEADER: [value.encode()]}), REDACT) == value


def test_no_header_is_the_anonymous_user() -> None:
    """A request without the header is the key's anonymous user."""
    assert user_of(HEADER, Headers({b"x-other": [b"bob"]}), REDACT) == ANONYMOUS


def test_the_header_name_is_not_case_sensitive() -> None:
    """The header is found whatever case the client writes its name in."""
    assert user_of(HEADER, Headers({b"x-openwebui-user-id": [b"bob"]}), REDACT) == "bob"


@pytest.mark.parametrize(
    "values",
    [[b""], [b"x" * (MAX_USER_LENGTH + 1)], [b"bob smith"], [b"b\xc3\xb6b"], [b"bob\x00"],
     [b"a/b"], [b"olpk_x y"], [b"alice", b"bob"]],
)
def test_a_value_that_is_no_user_is_refused(values: list[bytes]) -> None:
    """
    An empty value, one over the bound, one with a character outside
    letters, digits and C{-._@+:}, or the header sent twice, is a 400,
    whose message does not repeat the value.
    """
    with pytest.raises(ProxyError) as e:
        user_of(HEADER, Headers({HEADER: values}), REDACT)
    assert e.value.code == 400
    for value in values:
        if value:
            assert value.decode("latin-1") not in e.value.message


@pytest.mark.parametrize("value", [KEY, SHAPED])
def test_a_credential_is_no_user(value: str) -> None:
    """
    One of the proxy's keys, or a token of its keys' shape, sent as the user
    (a front-end set up to send its key there) is a 400 that does not repeat
    it, rather than a user logged, stored and forwarded to Ollama.
    """
    with pytest.raises(ProxyError) as e:
        user_of(HEADER, Headers({HEADER: [value.encode()]}), REDACT)
    assert e.value.code == 400
    assert "credential" in e.value.message
    assert value not in e.value.message
