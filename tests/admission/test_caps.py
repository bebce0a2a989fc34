"""
Tests for L{ollamaproxy.admission.caps}: keep_alive and num_ctx caps.
"""

from __future__ import annotations

import json
import math

import pytest
from twisted.logger import LogEvent

from ollamaproxy.admission.caps import (
    NO_CAPS,
    Caps,
    clamp,
    keep_loaded_context,
    named_context,
    parse_duration,
)
from tests.fakes.chain import Chain, chat


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


def _loaded_chain(context: int, caps: Caps = NO_CAPS, keep: bool = True) -> Chain:
    """
    A chain whose Ollama has llama3.2 loaded with C{context}, as the pool
    has read it, and the context rule on (or, C{keep=False}, off).
    """
    chain: Chain = Chain(caps=Caps(
        caps.keep_alive, caps.num_ctx,
        (lambda model: chain.router.loaded_context(model)) if keep else None,
    ))
    chain.fake.load("llama3.2", context)
    chain.pool.refresh(chain.backends[0])
    chain.flush()
    return chain


def _sent_context(chain: Chain, options: dict[str, object] | None) -> object:
    """
    The C{num_ctx} a chat with C{options} reaches Ollama with (C{None}: none).
    """
    fields = {} if options is None else {"options": options}
    chain.body(chain.respond("POST", "/api/chat", data=chat("llama3.2", stream=False, **fields)))
    return (chain.fake.received[-1].json().get("options") or {}).get("num_ctx")


def test_a_smaller_context_is_raised_to_the_loaded_one(access_events: list[LogEvent]) -> None:
    """
    A request for a loaded model that asks for less context than its runner
    was loaded with is sent with the loaded context, so Ollama does not
    reload it; the access line says so.
    """
    chain = _loaded_chain(8192)
    assert _sent_context(chain, {"num_ctx": 2048, "temperature": 0}) == 8192
    assert access_events[-1]["notes"] == "num_ctx 2048 raised to 8192, as loaded"
    assert chain.fake.loads == [("llama3.2:latest", 8192)]


def test_a_larger_context_is_sent_as_asked() -> None:
    """
    A request that asks for more than the loaded context goes as asked,
    byte for byte.
    """
    chain = _loaded_chain(8192)
    body = chat("llama3.2", stream=False, options={"num_ctx": 16384})
    chain.body(chain.respond("POST", "/api/chat", data=body))
    assert chain.fake.received[-1].body == body


@pytest.mark.parametrize("options", [None, {}, {"temperature": 0}, {"num_ctx": None}])
def test_none_given_gets_the_loaded_context(
    options: dict[str, object] | None, access_events: list[LogEvent]
) -> None:
    """
    A request that names no context (no options, none in them, or null) for
    a runner loaded with one is sent with it: otherwise Ollama's default
    would reload it.
    """
    chain = _loaded_chain(8192)
    assert _sent_context(chain, options) == 8192
    assert access_events[-1]["notes"] == "num_ctx set to 8192, as loaded"
    assert chain.fake.loads == [("llama3.2:latest", 8192)]


def test_the_rule_off_sends_every_request_as_it_came() -> None:
    """
    With C{--keep-loaded-context no}, a smaller context and none at all go
    as they came, and Ollama reloads as it would.
    """
    chain = _loaded_chain(8192, keep=False)
    smaller = chat("llama3.2", stream=False, options={"num_ctx": 2048})
    chain.body(chain.respond("POST", "/api/chat", data=smaller))
    assert chain.fake.received[-1].body == smaller
    assert _sent_context(chain, None) is None
    assert len(chain.fake.loads) == 3


def test_a_cap_still_bounds_the_context() -> None:
    """
    A loaded context over C{--max-num-ctx} is never put into a body: a
    smaller request is only clamped as usual, and a larger one clamped to
    the cap.
    """
    chain = _loaded_chain(32768, Caps(num_ctx=8192))
    assert _sent_context(chain, None) is None
    assert _sent_context(chain, {"num_ctx": 2048}) == 2048
    assert _sent_context(chain, {"num_ctx": 65536}) == 8192
    within = _loaded_chain(4096, Caps(num_ctx=8192))
    assert _sent_context(within, {"num_ctx": 2048}) == 4096


def test_a_context_sent_is_the_loaded_one_at_once() -> None:
    """
    A request that reloads its model with a larger context makes that the
    loaded context as it is sent: the next requests, for less or for none,
    go with it before the pool reads C{/api/ps} again, and Ollama loads the
    runner once, not once a request.
    """
    chain = _loaded_chain(2048)
    assert _sent_context(chain, {"num_ctx": 8192}) == 8192
    assert _sent_context(chain, None) == 8192
    assert _sent_context(chain, {"num_ctx": 4096}) == 8192
    assert chain.fake.loads == [("llama3.2:latest", 2048), ("llama3.2:latest", 8192)]


def test_a_context_clamped_by_a_cap_is_the_one_remembered() -> None:
    """
    What is remembered is the context sent, after the caps: a request for
    more than C{--max-num-ctx} loads the runner with the cap, and the next
    request that names none goes with that, not with what C{/api/ps} said
    before.
    """
    chain = _loaded_chain(2048, Caps(num_ctx=8192))
    assert _sent_context(chain, {"num_ctx": 65536}) == 8192
    assert _sent_context(chain, None) == 8192
    assert chain.fake.loads == [("llama3.2:latest", 2048), ("llama3.2:latest", 8192)]


def test_a_request_that_names_no_context_tells_nothing() -> None:
    """
    A request sent with no C{num_ctx} (nothing loaded, so the rule adds
    none) leaves its backend's context unknown: Ollama's default is its own.
    With the rule off nothing is remembered either, whatever a body names.
    """
    chain = _loaded_chain(8192)
    chain.body(chain.respond("POST", "/api/chat", data=chat("mistral", stream=False)))
    assert chain.fake.received[-1].json().get("options") is None
    assert chain.backends[0].sent == {}
    off = _loaded_chain(2048, keep=False)
    _sent_context(off, {"num_ctx": 8192})
    assert off.backends[0].sent == {}


@pytest.mark.parametrize(
    ("body", "context"),
    [
        (b'{"model":"m"}', None),
        (b'{"model":"m","options":{"num_ctx":8192}}', 8192),
        (b'{"model":"m","options":{"num_ctx":8192.0}}', 8192),
        (b'{"model":"m","opti\\u006fns":{"num_\\u0063tx":2048}}', 2048),
        (b'{"model":"m","OPTIONS":{"num_ctx":2048}}', 2048),
        (b'{"model":"m","options":{"NUM_CTX":2048}}', None),
        (b'{"model":"m","options":{"num_ctx":1024,"num_ctx":2048}}', 2048),
        (b'{"model":"m","options":{"num_ctx":1024},"options":{"top_k":1}}', 1024),
        (b'{"model":"m","options":{"num_ctx":1024},"options":null}', None),
        (b'{"model":"m","options":{"num_ctx":1024},"options":{"num_ctx":null}}', None),
        (b'{"model":"m","options":{"num_ctx":"big"}}', None),
        (b'{"model":"m","options":{"num_ctx":true}}', None),
        (b'{"model":"m","options":{"num_ctx":0}}', None),
        (b'{"model":"m","options":{"num_ctx":1e400}}', None),
        (b'{"model":"m","options":"num_ctx"}', None),
        (b'["num_ctx"]', None),
    ],
)
def test_the_context_named_is_read_as_ollama_reads_it(body: bytes, context: int | None) -> None:
    """
    The context a body loads its runner with is read as Ollama reads it:
    C{options} in any case, merged when repeated and reset by a C{null};
    inside it C{num_ctx} exactly, the last one winning; nothing for a body
    Ollama would refuse or one that leaves the context to its default.
    """
    assert named_context(body) == context


def test_an_unloaded_model_goes_as_asked() -> None:
    """
    Nothing is rewritten for a model no backend has loaded.
    """
    chain = _loaded_chain(8192)
    body = chat("mistral", stream=False, options={"num_ctx": 2048})
    chain.body(chain.respond("POST", "/api/chat", data=body))
    assert chain.fake.received[-1].body == body


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        (b'{"model":"m"}', b'{"options":{"num_ctx":8192},"model":"m"}'),
        (b' { } ', b' {"options":{"num_ctx":8192} } '),
        (b'{"model":"m","opti\\u006fns":{"num_ctx":1}}',
         b'{"model":"m","opti\\u006fns":{"num_ctx":8192}}'),
        ('{"model":"m","option\u017f":{"num_ctx":1}}'.encode(),
         '{"model":"m","option\u017f":{"num_ctx":8192}}'.encode()),
        (b'{"model":"m","options":null}', b'{"model":"m","options":{"num_ctx":8192}}'),
        (b'{"model":"m","options":{}}', b'{"model":"m","options":{"num_ctx":8192}}'),
        (b'{"model":"m","options":{"top_k":1}}',
         b'{"model":"m","options":{"num_ctx":8192,"top_k":1}}'),
        (b'{"model":"m","options":{"num_ctx":1},"options":{"NUM_CTX":2}}',
         b'{"model":"m","options":{"num_ctx":8192},"options":{"NUM_CTX":8192}}'),
    ],
)
def test_the_loaded_context_is_written_where_go_reads_it(body: bytes, sent: bytes) -> None:
    """
    The context is added to the last C{options}, or in one added, and every
    smaller one raised, as Go's decoder will read them; the rest is kept.
    """
    assert keep_loaded_context(body, 8192)[0] == sent


def test_options_ollama_refuses_are_left_alone() -> None:
    """
    A body whose C{options} is no object goes as it came: Ollama refuses
    it, whatever its context.
    """
    body = b'{"model":"m","options":"x"}'
    assert keep_loaded_context(body, 8192) == (body, [])
