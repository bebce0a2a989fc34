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
    keep_alive -1 and a huge num_ctx are clamped to the caps, keep_alive
    in another case too; the changes are named.  (Every other spelling Go's
    decoder reads: L{test_every_spelling_go_reads_is_clamped}.)
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


_KEEP = ["keep_alive forever clamped to 10m"]
_CTX = ["num_ctx 1e+06 clamped to 8192"]


@pytest.mark.parametrize(
    ("body", "expected", "changes"),
    [
        (b'{"model":"m","keep\\u005falive":-1}', {"model": "m", "keep_alive": "10m"}, _KEEP),
        (b'{"model":"m","\\u212aeep_alive":-1}', {"model": "m", "\u212aeep_alive": "10m"}, _KEEP),
        ('{"model":"m","\u212aeep_alive":-1}'.encode(),
         {"model": "m", "\u212aeep_alive": "10m"}, _KEEP),
        (b'{"model":"m","Options":{"num_ctx":1000000}}',
         {"model": "m", "Options": {"num_ctx": 8192}}, _CTX),
        ('{"model":"m","option\u017f":{"num_ctx":1000000}}'.encode(),
         {"model": "m", "option\u017f": {"num_ctx": 8192}}, _CTX),
        (b'{"model":"m","options":{"num\\u005fctx":1000000}}',
         {"model": "m", "options": {"num_ctx": 8192}}, _CTX),
    ],
)
def test_every_spelling_go_reads_is_clamped(
    body: bytes, expected: dict[str, object], changes: list[str]
) -> None:
    """
    Ollama's decoder decodes escapes in names and matches them to fields
    with Unicode case folding (the Kelvin sign is a k, the long s an s):
    however a body spells keep_alive, options or num_ctx, it does not get
    past the caps.
    """
    clamped, said = clamp(body, Caps(600, 8192))
    assert json.loads(clamped) == expected
    assert said == changes


def test_every_repetition_is_clamped() -> None:
    """
    Go's decoder takes the last keep_alive it matches and merges repeated
    options: every one is clamped, so whichever Ollama reads is within the
    caps; the rest of the body is left as it was.
    """
    body = (b'{"model": "m", "keep_alive": -1, "keep\\u005falive": "-1m", '
            b'"options": {"num_ctx": 1000000}, "options": {"temperature": 0.5}}')
    clamped, changes = clamp(body, Caps(600, 8192))
    assert clamped == (b'{"model": "m", "keep_alive": "10m", "keep\\u005falive": "10m", '
                       b'"options": {"num_ctx": 8192}, "options": {"temperature": 0.5}}')
    assert changes == [*_KEEP, *_KEEP, *_CTX]


@pytest.mark.parametrize(
    "body",
    [b'{"model": "m", "keep_alive": null}',
     b'{"model": "m", "keep_alive": null, "options": {"num_ctx": null}}',
     b'{"model": "m", "KEEP_ALIVE": null, "options": null}'],
)
def test_null_passes_as_ollama_reads_it(body: bytes) -> None:
    """
    Ollama reads C{"keep_alive": null} (a nil C{*Duration}) and
    C{"options": {"num_ctx": null}} (skipped by C{Options.FromMap}) as not
    given, so the server's default applies: with caps on they pass
    unchanged, as an absent field does, instead of a 400.
    """
    assert clamp(body, Caps(600, 8192)) == (body, [])


def test_a_null_does_not_hide_a_repeated_keep_alive() -> None:
    """
    Go takes the last C{keep_alive}: a null beside one over the cap leaves
    that one clamped.
    """
    body = b'{"model": "m", "keep_alive": null, "keep_alive": -1}'
    clamped, changes = clamp(body, Caps(600))
    assert clamped == b'{"model": "m", "keep_alive": null, "keep_alive": "10m"}'
    assert changes == ["keep_alive forever clamped to 10m"]
