# -*- test-case-name: tests.integration.test_postgres_database -*-
"""
Usage in PostgreSQL: the same rows as the SQLite file (L{ollamaproxy.record.usage_db}),
requests served, requests refused and tokens per minute, key name, model
and user behind the key,
added to by every proxy that uses the database, so that C{ollamaproxy usage
--database URL} sums them all.  Keys never appear in it: rows name a key by
its name.

Blocking: the usage service calls it on its own thread.
"""

from __future__ import annotations

from collections.abc import Sequence

from ollamaproxy.postgres.database import Connection, Database
from ollamaproxy.record.usage_db import (
    BUCKET_SECONDS,
    Bucket,
    By,
    Row,
    SeriesRow,
    UsageRow,
    aggregate,
    minute,
    rows_of,
    summary_query,
)

_ADD = (
    "INSERT INTO usage AS u "
    "(minute, key, model, requests, prompt_tokens, completion_tokens, refused, end_user) "
    "VALUES (to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (minute, key, model, end_user) DO UPDATE SET "
    "requests = u.requests + excluded.requests, "
    "prompt_tokens = u.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = u.completion_tokens + excluded.completion_tokens, "
    "refused = u.refused + excluded.refused"
)


def write_rows(connection: Connection,
               rows: Sequence[UsageRow]) -> None:
    """
    Add C{rows}, summed per minute, key, model and user, in one transaction.
    """
    summed = aggregate(rows)
    if not summed:
        return
    with connection.transaction(), connection.cursor() as cursor:
        cursor.executemany(_ADD, summed)


def summarise(
    connection: Connection,
    since: float | None,
    by: By,
    until: float | None = None,
) -> list[Row]:
    """
    Sum the usage per key, model or user, as
    L{ollamaproxy.record.usage_db.summarise} does for the file.
    """
    query, parameters = summary_query(
        by, since, until, "minute >= to_timestamp(%s)", "minute < to_timestamp(%s)"
    )
    return rows_of(connection.execute(query, parameters).fetchall(), by)


def series(
    connection: Connection, since: float, until: float, bucket: Bucket
) -> list[SeriesRow]:
    """
    Requests and tokens per key and model, per hour or UTC day, as
    L{ollamaproxy.record.usage_db.series} does for the file.
    """
    width = BUCKET_SECONDS[bucket]
    found = connection.execute(
        "SELECT floor(extract(epoch FROM minute) / %s) * %s AS bucket, key, model, "
        "SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) FROM usage "
        "WHERE minute >= to_timestamp(%s) AND minute < to_timestamp(%s) "
        "GROUP BY bucket, key, model ORDER BY bucket, key, model",
        (width, width, minute(since), until),
    ).fetchall()
    return [
        (float(ts), str(key), str(model), int(r or 0), int(p or 0), int(c or 0))
        for ts, key, model, r, p, c in found
    ]


def last_used(connection: Connection) -> dict[str, float]:
    """
    When each key was last used, as L{ollamaproxy.record.usage_db.last_used} says
    for the file.
    """
    found = connection.execute(
        "SELECT key, extract(epoch FROM MAX(minute)) FROM usage GROUP BY key"
    ).fetchall()
    return {str(key): float(ts) for key, ts in found if ts is not None}


class PostgresUsage:
    """
    Usage in PostgreSQL, as the usage service
    (L{ollamaproxy.record.usage.UsageDatabase}) sees it: one connection, kept open
    and made again when lost.
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    @property
    def name(self) -> str:
        return self._database.name

    def write(self, rows: Sequence[UsageRow]) -> None:
        """
        Add C{rows}; with none, only connect (and migrate), so that a
        database that cannot be used is known at once.

        @raise ollamaproxy.postgres.database.DatabaseError: If it cannot; nothing is
            written.
        """
        self._database.run(lambda connection: write_rows(connection, rows))

    def summarise(self, since: float | None, by: By, until: float | None = None) -> list[Row]:
        return self._database.run(lambda connection: summarise(connection, since, by, until))

    def tokens_by_key(self, since: float) -> dict[str, int]:
        """
        The prompt and completion tokens each key used, every proxy
        together, from the minute holding C{since} on.
        """
        rows = self.summarise(since, "key")
        return {row.name: row.total_tokens for row in rows if row.total_tokens > 0}

    def series(self, since: float, until: float, bucket: Bucket) -> list[SeriesRow]:
        return self._database.run(lambda connection: series(connection, since, until, bucket))

    def last_used(self) -> dict[str, float]:
        return self._database.run(last_used)

    def close(self) -> None:
        self._database.close()
