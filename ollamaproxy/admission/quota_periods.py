# -*- test-case-name: tests.admission.test_quota_periods -*-
"""
The periods a key's token quota counts over: UTC days and UTC months.

Plain functions of a time (seconds since the epoch), shared by the quota
kept in this process and the one kept in Redis, so that both start, end and
word a period alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

Period = Literal["day", "month"]


@dataclass(frozen=True)
class Window:
    """
    One period: the UTC day or month holding a time.

    @ivar period: C{day} or C{month}.
    @ivar start: When it began (seconds since the epoch).
    @ivar end: When it ends and the next begins.
    @ivar label: Names it, for counters: C{2026-12-01} or C{2026-12}.
    """

    period: Period
    start: float
    end: float
    label: str


def window(period: Period, now: float) -> Window:
    """
    The UTC day or month holding C{now}.
    """
    when = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = when.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
        label = start.strftime("%Y-%m-%d")
    else:
        start = when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
        label = start.strftime("%Y-%m")
    return Window(period, start.timestamp(), end.timestamp(), label)


def over_quota_message(key_name: str, quota: int, span: Window) -> str:
    """
    What a key over its quota is told: which quota, and when it resets.
    """
    when = "today (UTC)" if span.period == "day" else "this month (UTC)"
    resets = datetime.fromtimestamp(span.end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"key {key_name!r} has used its {quota} tokens for {when}; "
        f"the quota resets at {resets}"
    )
