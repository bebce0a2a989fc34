# -*- test-case-name: tests.admission.test_caps,tests.test_options -*-
"""
Durations as Ollama reads them (C{api.Duration}): a number of seconds, or a
Go duration string (C{"10m"}, C{"1h30m"}); a negative one means for ever.

In the base layer because two rooms read them: the options
(C{--max-keep-alive}, L{ollamaproxy.config}) and the caps applied to
request bodies (L{ollamaproxy.admission.caps}).
"""

from __future__ import annotations

import math
import re

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
