# -*- test-case-name: tests.console.test_usage_view -*-
"""
What the console's views show, as plain JSON-ready values: the backends,
the keys, usage over time (and as CSV).

These are pure functions of what the proxy knows; the web part
(L{ollamaproxy.console.web}) serves them.  What they leave out matters as
much: never a key, never a key's hash, never a backend's credentials (an
upstream URL may hold C{user:password@}, and an error message may repeat
it), never more of a URL than its scheme, host, port and path.  A
client's address is shown (in the Now view): the console is for admin keys
only, which see it in the access log too.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ollamaproxy.admission.caps import show_duration
from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.backends.pool import Backend
from ollamaproxy.backends.router import UNREAD_MODEL, Router
from ollamaproxy.model_names import ModelName
from ollamaproxy.record.usage_db import SeriesRow

# "//user:password@" inside any text (an error message quoting a URL).
_USERINFO = re.compile(r"//[^/\s@]*@")


def without_credentials(url: str, redact: Callable[[str], str] = str) -> str:
    """
    A URL as the console may show it: scheme, host, port and path, without
    the user and password, query string or fragment it may hold, and
    redacted (L{ollamaproxy.record.redact}).
    """
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        shown = urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        shown = _USERINFO.sub("//", url.split("?", 1)[0])
    return redact(shown)


def clean_text(text: str, redact: Callable[[str], str] = str) -> str:
    """
    Free text (a backend's error) as the console may show it: any URL's
    credentials blanked, and redacted.
    """
    return redact(_USERINFO.sub("//", text))


def _model_label(model: ModelName | None) -> str:
    if model is None:
        return "(none named)"
    if model == UNREAD_MODEL:
        # A body the proxy did not read, or whose model it could not name.
        return "(model unknown)"
    return model.canonical


def backends_view(router: Router, redact: Callable[[str], str] = str) -> list[dict[str, Any]]:
    """
    Every backend: health, models, models in memory (and, in C{resident},
    what each holds, as its C{/api/ps} said: bytes in all and in VRAM, the
    context its runner was loaded with, when it is unloaded), requests in
    flight per model against its C{parallel}, or its effective parallel for
    the model where that is lowered (C{effective}:
    L{ollamaproxy.backends.effective}), recent errors (each with its count
    and times, in seconds since the epoch).

    An unhealthy backend shows no model in memory: what it said it had
    loaded is as old as its last answer, and it may have restarted since.
    """
    shown = []
    lowered: dict[Backend, dict[str, int]] = {}
    for backend, model, limit in router.effective.lowered():
        lowered.setdefault(backend, {})[model] = limit
    for backend in router.backends:
        running = sorted(
            ({"model": _model_label(model), "count": count}
             for model, count in backend.running.items() if count > 0),
            key=lambda entry: str(entry["model"]),
        )
        shown.append({
            "name": without_credentials(backend.name, redact),
            "healthy": backend.healthy,
            "parallel": backend.parallel,
            "in_flight": backend.in_flight,
            "models": None if backend.models is None
            else sorted(model.canonical for model in backend.models),
            "loaded": sorted(model.canonical for model in backend.loaded)
            if backend.healthy else [],
            "resident": [
                {"model": model.canonical, "size": held.size, "size_vram": held.size_vram,
                 "context_length": held.context_length, "expires_at": held.expires_at}
                for model, held in sorted(backend.resident.items(),
                                          key=lambda item: item[0].canonical)
            ] if backend.healthy else [],
            "running": running,
            "effective": lowered.get(backend, {}),
            "errors": [
                {"error": clean_text(error.reason, redact), "count": error.count,
                 "first": round(error.first, 3), "last": round(error.last, 3)}
                for error in backend.errors
            ],
        })
    return shown


def _time(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def keys_view(
    keys: Iterable[ApiKey],
    now: float,
    last_used: Mapping[str, float],
    used_today: Mapping[str, int],
    used_this_month: Mapping[str, int],
) -> list[dict[str, Any]]:
    """
    Every key, by name: scopes, models, limits, quotas and their use,
    created, expires, last used.  Never the key, never its hash.

    @param last_used: When each key (by name) was last used, to the minute.
    @param used_today: Tokens each key used this UTC day.
    @param used_this_month: The same this UTC month.
    """
    when = datetime.fromtimestamp(now, UTC)
    shown = []
    for key in sorted(keys, key=lambda k: k.name):
        shown.append({
            "name": key.name,
            "scopes": sorted(key.scopes),
            "models": list(key.models),
            "rpm": key.rpm,
            "max_streams": key.max_streams,
            "max_keep_alive": None if key.caps.keep_alive is None
            else show_duration(key.caps.keep_alive),
            "max_num_ctx": key.caps.num_ctx,
            "weight": key.weight,
            "user_header": key.user_header,
            "chat_header": key.chat_header,
            "tokens_per_day": key.tokens_per_day,
            "tokens_per_month": key.tokens_per_month,
            "used_today": used_today.get(key.name, 0),
            "used_this_month": used_this_month.get(key.name, 0),
            "created": _time(key.created),
            "expires": _time(key.expires),
            "expired": key.expired(when),
            "last_used": last_used.get(key.name),
        })
    return shown


#: The fields of a usage row, in order: in the Usage view's JSON and the CSV.
USAGE_COLUMNS = ("time", "key", "model", "requests", "prompt_tokens", "completion_tokens")


# A cell starting with one of these is a formula to a spreadsheet.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA) else text


def usage_csv(rows: Sequence[SeriesRow]) -> bytes:
    """
    Usage rows as CSV, with a header: the bucket's start in UTC (ISO 8601),
    key, model, requests, prompt and completion tokens.  A name a
    spreadsheet would take for a formula is quoted with C{'}.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(USAGE_COLUMNS)
    for ts, key, model, r, p, c in rows:
        start = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        writer.writerow([start, _cell(key), _cell(model), r, p, c])
    return out.getvalue().encode("utf-8")
