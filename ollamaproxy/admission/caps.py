# -*- test-case-name: tests.admission.test_caps -*-
"""
No key holds a GPU hostage: caps on how long a model stays in memory
(C{keep_alive}) and how large a context it is loaded with
(C{options.num_ctx}).

Any client can send C{"keep_alive": -1}, which pins its model in VRAM for
ever, or a huge C{num_ctx}, so that nobody else's model fits.  With a cap
(the proxy's C{--max-keep-alive} / C{--max-num-ctx}, or a key's own, the
tighter one winning), a request over it is clamped to it: the body is
rewritten with the capped value and the access line says so.  Without caps
bodies pass as they are, byte for byte.

Values are read as Ollama reads them (C{api.Duration}): a number of seconds,
or a Go duration string (C{"10m"}, C{"1h30m"}); a negative one means for
ever.  A C{null} is no value at all, as for Ollama: its C{keep_alive} is a
pointer (C{*Duration}), which Go's decoder sets to nil on C{null} without
calling C{Duration.UnmarshalJSON}, so the request gets the server's
default, as if the field were absent; and C{Options.FromMap} skips a nil
option, so C{"num_ctx": null} is the default context too.  The proxy
passes both unchanged, as it passes an absent field (no cap adds a field
to a body).

The context rule (L{keep_loaded_context}, C{--keep-loaded-context}, on by
default) rewrites the same field the other way: Ollama reloads a model
whose runner was loaded with another C{num_ctx} than a request names (or
than its default, for one that names none), seconds of work for nothing
when the request asked for less than it already has.  A request for a
loaded model is sent with the loaded context when it asks for less or
names none; one that asks for more goes as asked.  The caps bound it: a
loaded context over C{--max-num-ctx} is never put into a body.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ollamaproxy.durations import keep_alive_cap as keep_alive_cap
from ollamaproxy.durations import parse_duration as parse_duration
from ollamaproxy.model_names import ModelName

_N = TypeVar("_N", int, float)

#: Routes whose body Ollama reads C{keep_alive} and C{options} from.
CAPPED_ROUTES = frozenset(["/api/chat", "/api/generate", "/api/embed", "/api/embeddings"])

def show_duration(seconds: float) -> str:
    """
    A duration as a Go duration string (C{"10m0s"} style kept short).
    """
    if math.isinf(seconds):
        return "forever"
    if seconds % 3600 == 0 and seconds:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0 and seconds:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Caps:
    """
    @ivar keep_alive: The most seconds a model may stay loaded after a
        request, or L{None} for no cap.
    @ivar num_ctx: The largest context a request may ask for, or L{None}.
    @ivar loaded_context: The context a model's runners are loaded with,
        if known (L{ollamaproxy.backends.router.Router.loaded_context}), for
        the context rule (L{keep_loaded_context}); L{None} when the rule is
        off (C{--keep-loaded-context no}).  It travels with the caps because
        both rewrite C{options.num_ctx} of the same bodies, the caps last;
        it is no cap, so it neither makes the proxy read a body it would
        not (a body it cannot read whole goes as it came) nor counts in
        comparisons.
    """

    keep_alive: float | None = None
    num_ctx: int | None = None
    loaded_context: Callable[[ModelName], int | None] | None = field(
        default=None, compare=False)

    def __bool__(self) -> bool:
        return self.keep_alive is not None or self.num_ctx is not None

    def tighter(self, other: Caps) -> Caps:
        """
        Each cap the smaller of the two.
        """
        return Caps(_least(self.keep_alive, other.keep_alive), _least(self.num_ctx, other.num_ctx),
                    self.loaded_context)


#: No caps: bodies pass as they are.
NO_CAPS = Caps()


def _least(a: _N | None, b: _N | None) -> _N | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


#: The only characters outside ASCII that Go's case folding (Unicode simple
#: folding) matches to an ASCII letter: the Kelvin sign and the long s.
_FOLDS_TO_ASCII = {"\u212a": "k", "\u017f": "s"}
_GO_FOLD = str.maketrans(_FOLDS_TO_ASCII)
_KELVIN = "\u212a".encode()
_LONG_S = "\u017f".encode()
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def go_field(key: str, name: str) -> bool:
    """
    Whether Go's C{encoding/json}, which Ollama decodes bodies with, reads
    the (decoded) object key C{key} as the struct field C{name}: names match
    under Unicode simple case folding, so C{"KEEP_ALIVE"}, C{"keep_alive"}
    with a Kelvin sign for its k, and C{"options"} with a long s, all count.

    @param name: A field's JSON name, in lower-case ASCII.
    """
    key = key.translate(_GO_FOLD)
    return key.isascii() and key.lower() == name


def clamp(body: bytes, caps: Caps) -> tuple[bytes, list[str]]:
    """
    A request body with C{keep_alive} and C{options.num_ctx} no higher than
    C{caps}, and what was changed; the body itself when nothing was.

    Fields are found as Go's decoder finds them (L{go_field}, escapes
    decoded), and every one is clamped, repeated or not: Go takes the last
    C{keep_alive} and merges repeated C{options}, so none may stay over a
    cap.  (Ollama reads C{options} as a map, with exact names; a C{num_ctx}
    in another case is clamped too, which is harmless.)  Only the values
    clamped change in the body; the rest passes byte for byte.

    @param body: A JSON object (already checked, so bounded).
    @raise ValueError: If a value is not one Ollama would take, or the body
        is not a JSON object.
    """
    if not caps:
        return body, []
    lowered = body.lower()
    if (b"keep_alive" not in lowered and b"num_ctx" not in lowered
            and b"\\u" not in body and _KELVIN not in body):
        # Neither name is in the body in any case, and nothing else can spell
        # one: an escape, or a Kelvin sign for the k (a long s can spell
        # only options, which needs a num_ctx to matter).
        return body, []
    text, members = _object(body)
    edits: list[tuple[int, int, str]] = []
    changes: list[str] = []
    ctx_changes: list[str] = []
    for key, value, start, end in members.pairs:
        if value is None:
            # Ollama's default, as if absent (see the module's docstring).
            continue
        if caps.keep_alive is not None and go_field(key, "keep_alive"):
            asked = parse_duration(value)
            if asked > caps.keep_alive:
                capped = show_duration(caps.keep_alive)
                edits.append((start, end, json.dumps(capped)))
                changes.append(f"keep_alive {show_duration(asked)} clamped to {capped}")
        elif caps.num_ctx is not None and go_field(key, "options") and isinstance(value, dict):
            for name, asked_ctx, ctx_start, ctx_end in _members(text, start).pairs:
                if not go_field(name, "num_ctx") or asked_ctx is None:
                    continue
                if not isinstance(asked_ctx, (int, float)) or isinstance(asked_ctx, bool):
                    raise ValueError(f"options.num_ctx is not a number: {asked_ctx!r}")
                if asked_ctx > caps.num_ctx:
                    edits.append((ctx_start, ctx_end, str(caps.num_ctx)))
                    ctx_changes.append(f"num_ctx {asked_ctx:g} clamped to {caps.num_ctx}")
    if not edits:
        return body, []
    return _edited(text, edits), changes + ctx_changes


def _edited(text: str, edits: list[tuple[int, int, str]]) -> bytes:
    """
    C{text} with each C{(start, end, replacement)} of C{edits} made (none
    overlapping), as UTF-8.
    """
    pieces, done = [], 0
    for start, end, replacement in sorted(edits):
        pieces += [text[done:start], replacement]
        done = end
    pieces.append(text[done:])
    return "".join(pieces).encode("utf-8")


def keep_loaded_context(body: bytes, loaded: int) -> tuple[bytes, list[str]]:
    """
    A request body with C{options.num_ctx} raised to C{loaded}, the context
    its model's runner is loaded with, where it asks for less or names none
    (a C{null} names none, as for Ollama); and what was changed.  A larger
    one is left as asked, and so is a body whose C{options} is not an
    object, which Ollama refuses whatever its context.

    Fields are found as in L{clamp}, and every C{num_ctx} under the loaded
    one is raised.  When none is named, C{num_ctx} is added to the last
    C{options} (a repeated C{options} is merged by Go's decoder, the last
    winning), or an C{options} holding it is added to the body.  The rest
    passes byte for byte.

    @param body: A JSON object (already checked, so bounded).
    @raise ValueError: If the body is not a JSON object, or a C{num_ctx}
        is not a number.
    """
    lowered = body.lower()
    if (b"num_ctx" not in lowered and b"options" not in lowered and b"\\u" not in body
            and _LONG_S not in body):
        # No options in any spelling (an escape, or a long s for the s, could
        # make one): most bodies, added to without a parse.
        at = len(body) - len(body.lstrip(b" \t\n\r"))
        if body[at:at + 1] != b"{":
            raise ValueError("request body must be a JSON object")
        comma = b"" if body[at + 1:].lstrip(b" \t\n\r")[:1] == b"}" else b","
        added = b'"options":{"num_ctx":%d}' % loaded
        return body[:at + 1] + added + comma + body[at + 1:], [_set(loaded)]
    text, members = _object(body)
    edits: list[tuple[int, int, str]] = []
    changes: list[str] = []
    named = False
    last_options: tuple[object, int, int] | None = None
    for key, value, start, end in members.pairs:
        if not go_field(key, "options"):
            continue
        last_options = (value, start, end)
        if not isinstance(value, dict):
            continue
        for name, asked, ctx_start, ctx_end in _members(text, start).pairs:
            if not go_field(name, "num_ctx"):
                continue
            if asked is None:
                # Go's decoder would set the merged map's value to nil, over
                # any num_ctx added before it.
                edits.append((ctx_start, ctx_end, str(loaded)))
                continue
            if not isinstance(asked, (int, float)) or isinstance(asked, bool):
                raise ValueError(f"options.num_ctx is not a number: {asked!r}")
            named = True
            if asked < loaded:
                edits.append((ctx_start, ctx_end, str(loaded)))
                changes.append(f"num_ctx {asked:g} raised to {loaded}, as loaded")
    if not named and not edits:
        # None named, not even a null (each of which now holds it): add it.
        field_text = f'"num_ctx":{loaded}'
        if last_options is None:
            at = _skip(text, 0) + 1
            rest = "," if members.pairs else ""
            edits.append((at, at, '"options":{' + field_text + "}" + rest))
        elif last_options[0] is None:
            edits.append((last_options[1], last_options[2], "{" + field_text + "}"))
        elif isinstance(last_options[0], dict):
            at = last_options[1] + 1
            edits.append((at, at, field_text + ("," if last_options[0] else "")))
        else:
            return body, []
    if not named:
        changes.append(_set(loaded))
    if not edits:
        return body, []
    return _edited(text, edits), changes


def named_context(body: bytes) -> int | None:
    """
    The context Ollama loads a runner with for C{body}, if the body names
    one: what the proxy remembers it sent to a backend
    (L{ollamaproxy.backends.pool.BackendPool.sending}).  L{None} when it
    names none, which leaves the context to Ollama's default and so tells
    nothing of it, and for a body Ollama would refuse (not a JSON object,
    C{options} not an object, a C{num_ctx} that is not a positive number).

    Read as Ollama reads it: C{options} is matched as Go matches a struct's
    fields (L{go_field}), repeated ones merged into one map and a C{null}
    one resetting it; inside, the map's key is exact (C{num_ctx}, not
    C{NUM_CTX}), the last one wins, and a C{null} is the default.  Most
    bodies name no C{num_ctx} at all and are not parsed.
    """
    if b"num_ctx" not in body and b"\\u" not in body:
        return None
    try:
        text, members = _object(body)
    except ValueError:
        return None
    named: object = None
    for key, value, start, _ in members.pairs:
        if not go_field(key, "options"):
            continue
        if value is None:
            named = None
        elif not isinstance(value, dict):
            return None
        else:
            for name, asked, _, _ in _members(text, start).pairs:
                if name == "num_ctx":
                    named = asked
    if (not isinstance(named, (int, float)) or isinstance(named, bool) or named < 1
            or not math.isfinite(named)):
        return None
    return int(named)


def _set(loaded: int) -> str:
    """
    The access line's note for a context added to a body that named none.
    """
    return f"num_ctx set to {loaded}, as loaded"


@dataclass
class _Members:
    """
    A JSON object's members, repeated names and all, in order.

    @ivar pairs: Each member's decoded name and value, and where the value
        starts and ends in the text.
    @ivar end: Where the object ends in the text.
    """

    pairs: list[tuple[str, object, int, int]]
    end: int


def _object(body: bytes) -> tuple[str, _Members]:
    """
    A body that is one JSON object, as text, and its members.

    @raise ValueError: If it is not one JSON object.
    """
    text = body.decode("utf-8")
    members = _members(text, _skip(text, 0))
    if _skip(text, members.end) != len(text):
        raise ValueError("request body is not a single JSON object")
    return text, members


def _members(text: str, at: int) -> _Members:
    """
    The members of the JSON object at C{text[at]}.

    @raise ValueError: If there is no well-formed object there.
    """
    pairs: list[tuple[str, object, int, int]] = []
    if text[at:at + 1] != "{":
        raise ValueError("request body must be a JSON object")
    at = _skip(text, at + 1)
    if text[at:at + 1] == "}":
        return _Members(pairs, at + 1)
    while True:
        if text[at:at + 1] != '"':
            raise ValueError(f"malformed JSON object at character {at}")
        key, at = _DECODER.raw_decode(text, at)
        at = _skip(text, at)
        if text[at:at + 1] != ":":
            raise ValueError(f"malformed JSON object at character {at}")
        start = _skip(text, at + 1)
        value, end = _DECODER.raw_decode(text, start)
        pairs.append((key, value, start, end))
        at = _skip(text, end)
        if text[at:at + 1] == "}":
            return _Members(pairs, at + 1)
        if text[at:at + 1] != ",":
            raise ValueError(f"malformed JSON object at character {at}")
        at = _skip(text, at + 1)


def _skip(text: str, at: int) -> int:
    """
    Where the JSON white space from C{at} ends.
    """
    space = _SPACE.match(text, at)
    assert space is not None  # it matches nothing at worst
    return space.end()
