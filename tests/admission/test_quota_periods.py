"""
The UTC days and months a token quota counts over.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ollamaproxy.admission.quota_periods import over_quota_message, window


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
       second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def test_a_day_runs_from_utc_midnight_to_the_next() -> None:
    """A time late in a UTC day is in that day, which ends at the next midnight."""
    day = window("day", at(2026, 12, 31, 23, 59, 59))
    assert (day.start, day.end, day.label) == (at(2026, 12, 31), at(2027, 1, 1), "2026-12-31")


def test_a_month_runs_to_the_first_of_the_next_whatever_its_length() -> None:
    """February (short, leap or not) and December (year's end) end on the next month's first."""
    assert window("month", at(2028, 2, 29, 12)).end == at(2028, 3, 1)
    assert window("month", at(2027, 2, 28)).end == at(2027, 3, 1)
    december = window("month", at(2026, 12, 1))
    assert (december.start, december.end, december.label) == (
        at(2026, 12, 1), at(2027, 1, 1), "2026-12")


def test_the_message_says_which_quota_and_when_it_resets() -> None:
    """A key over its quota is told the quota, the period and the reset time."""
    message = over_quota_message("alice", 1000, window("day", at(2026, 12, 1, 8)))
    assert message == ("key 'alice' has used its 1000 tokens for today (UTC); "
                       "the quota resets at 2026-12-02T00:00:00Z")
