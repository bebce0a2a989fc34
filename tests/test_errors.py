"""
Tests for L{ollamaproxy.errors}: how the proxy's own answers look on the
wire.
"""

from __future__ import annotations

import pytest

from ollamaproxy.errors import reason_phrase


@pytest.mark.parametrize(
    ("code", "phrase"),
    [
        (429, b"Too Many Requests"),
        (431, b"Request Header Fields Too Large"),
        (508, b"Loop Detected"),
        (413, b"Request Entity Too Large"),
        (502, b"Bad Gateway"),
        (599, b"Unknown Status"),
    ],
)
def test_reason_phrase(code: int, phrase: bytes) -> None:
    """
    Every status the proxy answers with has its standard reason phrase,
    including those twisted.web does not know (it would say C{Unknown
    Status}).
    """
    assert reason_phrase(code) == phrase
