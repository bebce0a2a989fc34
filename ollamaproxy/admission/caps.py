# -*- test-case-name: tests.test_caps -*-
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
ever.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TypeVar

_N = TypeVar("_N", int, float)

#: Routes whose body Ollama reads C{keep_alive} and C{options} from.
CAPPED_ROUTES = frozenset(["/api/chat", "/api/generate", "/api/embed", "/api/embeddings"])

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
          "m": 60.0, "h": 3600.0}
_SECONDS = re.compile(r"^\s*\d+(\.\d*)?\s*$")
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: object) -> float:
    """
    Seconds, as Ollama reads a C{keep_alive}: C{math.inf} for a negative
    value (for ever).

    @raise ValueError: For something Ollama would refuse too.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        return math.inf if value < 0 else float(value)
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    if not body or _PART.sub("", body):
        raise ValueError(f"not a duration: {value!r}")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(body))
    return math.inf if sign < 0 and seconds > 0 else seconds


def keep_alive_cap(value: object) -> float:
    """
    A cap on C{keep_alive}, in seconds: a number of seconds (also as digits
    in text, as on a command line), or a duration such as C{10m}; never
    negative (for ever).

    @raise ValueError: For anything else, saying what is wrong.
    """
    if isinstance(value, str) and _SECONDS.match(value):
        value = float(value)
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a duration such as 10m or 1h") from None
    if math.isinf(seconds):
        raise ValueError(f"{value!r}: a cap cannot be 'for ever'")
    return seconds


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
    """

    keep_alive: float | None = None
    num_ctx: int | None = None

    def __bool__(self) -> bool:
        return self.keep_alive is not None or self.num_ctx is not None

    def tighter(self, other: Caps) -> Caps:
        """
        Each cap the smaller of the two.
        """
        return Caps(_least(self.keep_alive, other.keep_alive), _least(self.num_ctx, other.num_ctx))


#: No caps: bodies pass as they are.
NO_CAPS = Caps()


def _least(a: _N | None, b: _N | None) -> _N | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def clamp(body: bytes, caps: Caps) -> tuple[bytes, list[str]]:
    """
    A request body with C{keep_alive} and C{options.num_ctx} no higher than
    C{caps}, and what was changed; the body itself when nothing was.

    @param body: A JSON object (already checked, so bounded).
    @raise ValueError: If a value is not one Ollama would take.
    """
    lowered = body.lower()
    if not caps or (b"keep_alive" not in lowered and b"num_ctx" not in lowered):
        return body, []
    document = json.loads(body)
    changes: list[str] = []
    if caps.keep_alive is not None:
        for field in [f for f in document if f.casefold() == "keep_alive"]:
            asked = parse_duration(document[field])
            if asked > caps.keep_alive:
                document[field] = show_duration(caps.keep_alive)
                changes.append(f"keep_alive {show_duration(asked)} clamped to "
                               f"{document[field]}")
    options = document.get("options")
    if caps.num_ctx is not None and isinstance(options, dict) and "num_ctx" in options:
        asked_ctx = options["num_ctx"]
        if not isinstance(asked_ctx, (int, float)) or isinstance(asked_ctx, bool):
            raise ValueError(f"options.num_ctx is not a number: {asked_ctx!r}")
        if asked_ctx > caps.num_ctx:
            options["num_ctx"] = caps.num_ctx
            changes.append(f"num_ctx {asked_ctx:g} clamped to {caps.num_ctx}")
    if not changes:
        return body, []
    return json.dumps(document, separators=(",", ":")).encode("utf-8"), changes
