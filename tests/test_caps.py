"""
Tests for L{ollamaproxy.admission.caps}: keep_alive and num_ctx caps.
"""

from __future__ import annotations

import json
import math

import pytest

from ollamaproxy.admission.caps import Caps, clamp, parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0), (0, 0.0), (-1, math.inf), (1.5, 1.5),
        ("10m", 600.0), ("1h30m", 5400.0), ("300ms", 0.3), ("0", 0.0),
        ("-1m", math.inf), ("-1s", math.inf), ("1.5h", 5400.0), ("2h0m0s", 7200.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    """
    keep_alive reads as Ollama reads it: seconds, or a Go duration;
    negative is for ever.
    """
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["10", "-1", "forever", "", "1x", None, True, [1]])
def test_durations_ollama_refuses(value: object) -> None:
    """
    What Ollama refuses is refused here too.
    """
    with pytest.raises(ValueError):
        parse_duration(value)


def test_no_caps_leave_the_body_alone() -> None:
    """
    Without caps the body passes byte for byte.
    """
    body = b'{"model": "m", "keep_alive": -1, "options": {"num_ctx": 131072}}'
    assert clamp(body, Caps()) == (body, [])


def test_under_the_caps_the_body_is_unchanged() -> None:
    """
    A request within the caps passes byte for byte.
    """
    body = b'{"model": "m", "keep_alive": "5m", "options": {"num_ctx": 4096}}'
    assert clamp(body, Caps(600, 8192)) == (body, [])


def test_over_the_caps_is_clamped_and_said() -> None:
    """
    keep_alive -1 and a huge num_ctx are clamped to the caps; every spelling
    of keep_alive Go's decoder would read is clamped; the changes are named.
    """
    body = b'{"model": "m", "Keep_Alive": -1, "options": {"num_ctx": 131072}}'
    clamped, changes = clamp(body, Caps(600, 8192))
    document = json.loads(clamped)
    assert document["Keep_Alive"] == "10m"
    assert document["options"]["num_ctx"] == 8192
    assert changes == ["keep_alive forever clamped to 10m", "num_ctx 131072 clamped to 8192"]


def test_tighter_caps_win() -> None:
    """
    The proxy's and a key's caps combine to the smaller of each.
    """
    assert Caps(600, None).tighter(Caps(3600, 4096)) == Caps(600, 4096)
    assert Caps().tighter(Caps()) == Caps()
