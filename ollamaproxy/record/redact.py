# -*- test-case-name: tests.record.test_redact -*-
"""
Blanking credentials in text the proxy writes down or answers with.

Two kinds of credential can turn up in a path, a query string, a model name,
a body sample or an error message:

  - anything shaped like one: the proxy's generated keys (C{olpk_...}),
    bearer tokens, the values of credential headers or JSON fields
    (C{Authorization}, C{X-API-Key}, C{Cookie}, C{api_key}), and the values
    of credential-like query parameters (C{key}, C{token}, C{api_key},
    C{access_token}, C{auth}, C{password}, C{secret}, ...);
  - the proxy's own keys, whatever their shape: an C{--api-key} is known in
    clear and blanked wherever it appears, whatever its length and
    punctuation (as sent, percent-encoded or JSON-escaped); keys of the keys
    file are known by digest only, so each word of the text is checked
    against them.

L{Redactor} does both, where the proxy makes its log events and error
bodies, so every log observer (twistd's console, the files) sees the same
clean text.  L{blank_credentials} does the first alone, cheaply: the log
files apply it (with the clear keys) once more to everything they write,
down to the text of tracebacks the proxy did not make.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable
from urllib.parse import quote, quote_plus, unquote

from twisted.python.failure import Failure
from twisted.python.reflect import safe_str

REDACTED = "[redacted]"
#: What the proxy's generated keys begin with
#: (L{ollamaproxy.admission.keys.generate_key}); here, since redacting needs it
#: and sits below the keys.
KEY_PREFIX = "olpk_"

# Anything that looks like a credential: our keys, bearer tokens, and the
# values of credential headers or fields in any text.  A placeholder
# (C{Bearer <key>}, as in the proxy's own help) is not one.
_SECRETS = re.compile(
    rf"(?P<key>{KEY_PREFIX}[0-9A-Za-z]{{38}})"
    r"|(?P<name>(?i:bearer\s+|(?:x-api-key|authorization|cookie|api_key|api-key|apikey)"
    r"[\"']?\s*[:=]\s*[\"']?))"
    r"(?>(?i:(?:bearer|basic|token)\s+)?)[^\s\"',;&<][^\s\"',;&]*"
)
# The words one of those starts with (and, lower-cased, what text is
# searched for first: a plain search is much cheaper than running the
# expression at every position, so it runs only where they are).
_SECRET_WORDS = re.compile(KEY_PREFIX + r"|bearer|x-api-key|api[-_]?key|authorization|cookie", re.I)

# A query parameter whose name says it holds a credential (key, token,
# api_key, X-Api-Key, access_token, auth, password, client_secret, ...): its
# value goes.
_QUERY_SECRET = re.compile(
    r"(?<=[?&;])(?P<name>[^=&#\s\"'?;]*?"
    r"(?:key|token|auth|passw|passphrase|pwd|secret|credential|signature|session)"
    r"[^=&#\s\"'?;]*=)(?P<value>[^&#\s\"';]+)",
    re.IGNORECASE,
)

# Words that may be a key of the keys file: runs of anything between the
# separators of query strings, JSON and prose, so that a key with
# punctuation of its own is one word; a word holding C{/} or C{=} (a path, a
# query parameter) is also checked part by part.
_WORDS = re.compile(r"[^ \t\r\n\"'?&,()\[\]{}<>]{8,}")
_PARTS = re.compile(r"([/=])")
# Punctuation of the surrounding text a word may begin or end with.
_EDGES = ".,:;!?*`|"


def blank_credentials(text: str) -> str:
    """
    C{text} with anything shaped like a credential replaced.
    """
    lowered = text.lower()
    if (
        KEY_PREFIX in lowered or "bearer" in lowered or "api_key" in lowered
        or "api-key" in lowered or "apikey" in lowered or "authorization" in lowered
        or "cookie" in lowered
    ):
        text = _blank_shaped(text)
    if "=" in text:
        text = _QUERY_SECRET.sub(_blank_value, text)
    return text


def _blank_shaped(text: str) -> str:
    pieces = []
    done = 0
    for word in _SECRET_WORDS.finditer(text):
        start = word.start()
        if start < done:
            continue
        found = _SECRETS.match(text, start)
        if found is not None:
            pieces += [text[done:start], found["name"] or "", REDACTED]
            done = found.end()
    return "".join(pieces) + text[done:] if pieces else text


def _blank_value(found: re.Match[str]) -> str:
    return found["name"] + REDACTED


def spellings(secret: str) -> list[str]:
    """
    The ways a key known in clear can be written in a request or a log
    line: as it is, percent-encoded (as in a path or a form), and escaped as
    in a JSON string; longest first, so that no spelling is left half
    replaced by a shorter one.
    """
    if not secret:
        return []
    found = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret),
             json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    return sorted(found, key=len, reverse=True)


class Redactor:
    """
    Blanks credentials and the proxy's own keys in text: call it with the
    text.

    @param is_key: Whether a word is one of the proxy's keys (the key
        store's, which knows digests only, so it is asked about each word
        long enough to be a key); L{None} to check shapes only.
    @param secrets: Keys known in clear (C{--api-key}), blanked wherever
        they appear.
    """

    def __init__(
        self, is_key: Callable[[str], bool] | None = None, secrets: Iterable[str] = ()
    ) -> None:
        self._is_key = is_key
        self._spellings = sorted(
            {s for secret in secrets for s in spellings(secret)}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        for spelling in self._spellings:
            if spelling in text:
                text = text.replace(spelling, REDACTED)
        text = blank_credentials(text)
        if self._is_key is not None:
            text = _blank_keys(text, self._is_key)
        return text


def _blank_keys(text: str, is_key: Callable[[str], bool]) -> str:
    """
    C{text} with every word that is one of the keys C{is_key} knows
    replaced, percent-encoded ones included.
    """

    def known(word: str) -> bool:
        if is_key(word) or ("%" in word and is_key(unquote(word))):
            return True
        # A key at the end of a sentence or before a colon.
        trimmed = word.strip(_EDGES)
        return trimmed != word and len(trimmed) >= 8 and is_key(trimmed)

    def blank(found: re.Match[str]) -> str:
        word = found[0]
        if known(word):
            return REDACTED
        if "/" not in word and "=" not in word:
            return word
        return "".join(
            REDACTED if len(part) >= 8 and known(part) else part
            for part in _PARTS.split(word)
        )

    return _WORDS.sub(blank, text)


class _RedactedMessage(Exception):
    """
    Stands in for an exception whose message held a credential: its text,
    blanked.
    """

    def __str__(self) -> str:
        return str(self.args[0])


def redacted_failure(failure: Failure, redact: Callable[[str], str]) -> Failure:
    """
    C{failure}, or, if its exception's message holds a credential, a copy
    whose message is blanked (the type and the frames stay), for logging.
    """
    message = safe_str(failure.value)
    clean = redact(message)
    if clean == message:
        return failure
    copied = copy.copy(failure)
    copied.value = _RedactedMessage(clean)
    return copied
