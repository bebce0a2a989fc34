"""
Tests for L{ollamaproxy.record.redact}: credentials and the proxy's own keys are
blanked in any text, whatever their shape.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from twisted.python.failure import Failure

from ollamaproxy.admission.keys import ApiKey, KeyStore, digest
from ollamaproxy.record.redact import Redactor, blank_credentials, redacted_failure

PUNCTUATED = "my:custom;secret!key"


@pytest.mark.parametrize("name", [
    "key", "KEY", "token", "api_key", "apikey", "api-key", "X-Api-Key", "x_api_key",
    "access_token", "auth", "password", "passwd", "pwd", "secret", "client_secret",
    "refresh_token", "Authorization", "sessionid", "X-Amz-Signature",
])
def test_query_values_of_credential_parameters_are_blanked(name: str) -> None:
    """
    The value of a query parameter whose name says it holds a credential is
    blanked, whatever the case of its name and wherever it is in the query;
    the other parameters stay as they were.
    """
    for uri in (f"/api/tags?{name}=s3cr3t-value&x=1", f"/api/tags?x=1&{name}=s3cr3t-value"):
        blanked = blank_credentials(uri)
        assert "s3cr3t-value" not in blanked
        assert f"{name}=[redacted]" in blanked
        assert "x=1" in blanked


def test_placeholders_stay() -> None:
    """
    The proxy's own help text (C{'Authorization: Bearer <key>'}) names a
    placeholder, not a key: it stays readable in logs and error bodies.
    """
    text = "missing API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    assert blank_credentials(text) == text
    assert blank_credentials("Authorization: Bearer abc.def") == "Authorization: [redacted]"


def test_other_query_parameters_stay() -> None:
    """
    Query parameters that are not credentials are left alone.
    """
    uri = "/api/tags?model=llama3.2&limit=10"
    assert blank_credentials(uri) == uri


@pytest.mark.parametrize("secret", [PUNCTUATED, "short", "a b/c?d=e&f\"g'h"])
@pytest.mark.parametrize("spell", [
    lambda s: s, lambda s: quote(s, safe=""), lambda s: quote(s),
    lambda s: s.replace("\"", "\\\""),
], ids=["plain", "percent", "path-percent", "json"])
def test_keys_known_in_clear_are_blanked_in_any_spelling(secret: str, spell: object) -> None:
    """
    A key known in clear (C{--api-key}) is blanked wherever it appears,
    whatever its length and punctuation: as sent, percent-encoded, or
    escaped in a JSON string.
    """
    spelled = spell(secret)  # type: ignore[operator]
    redact = Redactor(secrets=[secret])
    for text in (f"/api/pull/{spelled}", f"/api/tags?q={spelled}&x=1",
                 f"API key 'bob' may not use model '{spelled}'",
                 f'{{"model": "{spelled}"}}'):
        assert spelled not in redact(text), text
        assert "[redacted]" in redact(text)


@pytest.mark.parametrize("text", [
    f"/api/pull/{PUNCTUATED}",
    f"/api/pull/{quote(PUNCTUATED, safe='')}",
    f"/api/pull/{quote(PUNCTUATED, safe='').lower()}",
    f"API key 'bob' may not use model '{PUNCTUATED}'",
    f'{{"model":"{PUNCTUATED}","stream":false}}',
    f"/api/tags?q={PUNCTUATED}&x=1",
    f"my key is {PUNCTUATED}.",
    f"key: {PUNCTUATED}; and more",
])
def test_keys_known_by_digest_are_blanked_with_their_punctuation(text: str) -> None:
    """
    A key the proxy knows only by digest (the keys file) is found in a
    path, a quoted model name, a JSON body or a query value, punctuation and
    percent-encoding included.
    """
    store = KeyStore([ApiKey(name="op", digest=digest(PUNCTUATED))])
    redacted = Redactor(store.is_key)(text)
    assert PUNCTUATED not in redacted
    assert quote(PUNCTUATED, safe="") not in redacted
    assert quote(PUNCTUATED, safe="").lower() not in redacted
    assert "[redacted]" in redacted


def test_json_log_fields_named_key_stay() -> None:
    """
    The JSON log's own C{"key": "<name>"} field is a key's name, not a
    key: the last guard on the files leaves it alone.
    """
    line = '{"key": "alice", "path": "/api/chat", "log_namespace": "ollamaproxy.access"}'
    assert Redactor(secrets=["elsewhere-secret"])(line) == line


def test_redacted_failure_blanks_the_message_and_keeps_the_type() -> None:
    """
    A failure whose message holds a key is logged with the message blanked,
    its exception type and frames kept; one without is logged as it is.
    """
    try:
        raise KeyError(f"no such model {PUNCTUATED}")
    except KeyError:
        failure = Failure()
    redact = Redactor(secrets=[PUNCTUATED])
    clean = redacted_failure(failure, redact)
    text = clean.getTraceback()
    assert PUNCTUATED not in text
    assert "KeyError" in text and "[redacted]" in text
    assert "test_redacted_failure_blanks_the_message" in text  # the frames stay
    assert PUNCTUATED in failure.getTraceback()  # the original is untouched
    plain = Failure(ValueError("nothing secret"))
    assert redacted_failure(plain, redact) is plain
