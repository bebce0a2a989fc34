# -*- test-case-name: tests.record.test_usage -*-
"""
The usage database: requests and tokens per minute, key and model, in
SQLite.  Plain functions, no Twisted: the proxy's L{ollamaproxy.record.usage}
service writes with them (through L{SqliteUsage}) on a thread of its own,
and C{ollamaproxy usage} reads with L{summarise} at any time (the database
is in WAL mode, so a reader neither blocks the proxy nor is blocked by it).

With C{--database}, usage goes to PostgreSQL (L{ollamaproxy.postgres.usage})
instead, and this file is only where usage waits when PostgreSQL cannot take
it (L{SqliteUsage.drain} hands it over when it can).

Rows are summed per minute, key, model and user, so the table grows with
time and the number of keys, models and users, not with traffic.  Keys
never appear in the database: rows name a key by its name.  The user is
who a request was for behind a key that names its users
(L{ollamaproxy.admission.users}), in column C{end_user} (C{user} is a
word of SQL's): C{""} for the key's anonymous user and for every key that
names none.  It is personal data (an Open WebUI user's id, or an e-mail
address if the key's header is one): it stays in the database as long as
the rows do.  Files written before users were counted get the column (at
C{""}) when next opened, and their rows keep what they counted.

A request is I{served} when it reached Ollama, whatever Ollama answered,
and I{refused} when the proxy turned it away itself (a model the key may
not use, its rate or quota, a full queue): column C{requests} counts the
first, C{refused} the second, so that usage is what Ollama served and the
refusals are still seen per key.  Files written before C{refused} existed
get the column (at 0) when next opened; their refusals stay counted as
requests with no model, as they were written.
"""

from __future__ import annotations

import math
import os
import sqlite3
import stat
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote

# How long a write waits for another writer (a second proxy on the same
# file) before giving up until the next flush.
_BUSY_TIMEOUT: Final = 10.0
_MINUTE: Final = 60

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS usage (ts REAL, key TEXT, model TEXT, requests INTEGER, "
    "prompt_tokens INTEGER, completion_tokens INTEGER, refused INTEGER NOT NULL DEFAULT 0, "
    "end_user TEXT NOT NULL DEFAULT '')",
)
# The columns a file made before them lacks, and how each is added: before
# users, a minute's row was one per key and model, and so was its index.
_ADD_COLUMNS: Final = {
    "refused": ("ALTER TABLE usage ADD COLUMN refused INTEGER NOT NULL DEFAULT 0",),
    "end_user": ("ALTER TABLE usage ADD COLUMN end_user TEXT NOT NULL DEFAULT ''",
                 "DROP INDEX IF EXISTS usage_minute"),
}
# Leads with ts, so it is also the index that --since uses; unique, so that
# every flush adds to a minute's row instead of adding a row.
_INDEX: Final = (
    "CREATE UNIQUE INDEX IF NOT EXISTS usage_minute_user ON usage (ts, key, model, end_user)"
)
_ADD = (
    "INSERT INTO usage (ts, key, model, requests, prompt_tokens, completion_tokens, refused, "
    "end_user) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (ts, key, model, end_user) DO UPDATE SET "
    "requests = requests + excluded.requests, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens, "
    "refused = refused + excluded.refused"
)

UserRow = tuple[float, str, str, int, int, int, int, str]
"""
C{(ts, key, model, requests, prompt_tokens, completion_tokens, refused,
user)}: one request as recorded (C{ts} its time, C{requests} 1 if it was
served, C{refused} 1 if it was refused, C{user} who it was for behind its
key, C{""} for none), or a minute's sum.
"""

UsageRow = UserRow | tuple[float, str, str, int, int, int, int]
"""
A L{UserRow}, or one without its user, of no user: what is written.
"""


class DatabaseDown(Exception):
    """
    The usage database cannot be reached now (PostgreSQL is down, say): the
    message, one line, says which and why.
    """


class UsageFileError(ValueError):
    """
    The usage database cannot be read: the message says which and why.
    """


def minute(when: float) -> float:
    """
    The start of the minute holding C{when} (seconds since the epoch).
    """
    return float(math.floor(when / _MINUTE) * _MINUTE)


def aggregate(rows: Iterable[UsageRow]) -> list[UserRow]:
    """
    Sum rows per minute, key, model and user.

    @return: One row per minute, key, model and user, its C{ts} the start
        of the minute, in the order each first appears.
    """
    sums: dict[tuple[float, str, str, str], tuple[int, int, int, int]] = {}
    for row in rows:
        ts, key, model, requests, prompt_tokens, completion_tokens, refused = row[:7]
        where = (minute(ts), key, model, row[7] if len(row) > 7 else "")
        r, p, c, f = sums.get(where, (0, 0, 0, 0))
        sums[where] = (r + requests, p + prompt_tokens, c + completion_tokens, f + refused)
    return [
        (ts, key, model, r, p, c, f, user)
        for (ts, key, model, user), (r, p, c, f) in sums.items()
    ]


def open_database(path: str) -> sqlite3.Connection:
    """
    Open the usage database for writing, creating it (readable by its owner
    only, in a directory created readable by its owner only) and its table
    if missing.  Blocking: call it away from the reactor thread.

    @return: A connection in autocommit mode (transactions are explicit).
    @raise OSError: If the file or its directory cannot be made.
    @raise sqlite3.Error: If the file is not a usable database.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # SQLite would create the file world-readable; its -wal and -shm files
    # take the database file's permissions.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        # In WAL mode, a power cut may lose the last flushes, never the file.
        connection.execute("PRAGMA synchronous = NORMAL")
        for statement in _SCHEMA:
            connection.execute(statement)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
        for column, statements in _ADD_COLUMNS.items():
            if column not in columns:
                for statement in statements:
                    connection.execute(statement)
        connection.execute(_INDEX)
    except BaseException:
        connection.close()
        raise
    return connection


def write_rows(path: str, rows: Sequence[UsageRow]) -> None:
    """
    Add C{rows} to the database at C{path} in one transaction, summed per
    minute, key and model, creating the database if missing.  Blocking: call
    it away from the reactor thread.

    @raise OSError: If the file or its directory cannot be made.
    @raise sqlite3.Error: If the database cannot be written; nothing is.
    """
    with closing(open_database(path)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(_ADD, aggregate(rows))
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")


@dataclass(frozen=True)
class Row:
    """
    What one key, one model, or one user behind a key used.

    @ivar name: The key's name, or the model (C{""} for requests that named
        no model or ended before saying what they used).
    @ivar requests: The requests served (that reached Ollama).
    @ivar refused: The requests the proxy refused itself.
    @ivar user: Summed by user, the user behind the key C{name} (C{""} for
        its anonymous user, and for a key that names none); else L{None}.
    """

    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    refused: int = 0
    user: str | None = None

    @property
    def total_tokens(self) -> int:
        """
        Prompt and completion tokens together.
        """
        return self.prompt_tokens + self.completion_tokens


By = Literal["key", "model", "user"]
"""
What usage is summed by: a key, a model, or a user behind a key.
"""

# What the rows are grouped by for each L{By}.
_GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "key": ("key",), "model": ("model",), "user": ("key", "end_user"),
}


def summarise(
    path: str, since: float | None, by: By, until: float | None = None
) -> list[Row]:
    """
    Sum the usage in the database at C{path}, without changing it.

    @param since: Count only minutes from the one holding this time (seconds
        since the epoch), or everything if L{None}.
    @param by: Sum per C{key}, per C{model}, or per C{user} (behind each
        key).
    @param until: Count only minutes before the one holding this time, or
        to the end if L{None}.
    @return: One row per key, model or user, most total tokens first (then
        most requests, then by name).  An empty database file gives none.
    @raise FileNotFoundError: If there is no file at C{path}.
    @raise UsageFileError: If the file is not a usage database, or cannot be
        read.
    """
    # A file from before refusals were counted apart, or before users
    # were, not written since (only a writer adds the columns): none
    # refused, every user the anonymous one.
    missing: dict[str, str] = {}
    while True:
        query, parameters = summary_query(by, since, until, "ts >= ?", "ts < ?", **missing)
        try:
            sums = _read(path, query, tuple(parameters), missing_ok=False)
            break
        except UsageFileError as e:
            if "no such column: refused" in str(e) and "refused" not in missing:
                missing["refused"] = "SUM(0)"
            elif "no such column: end_user" in str(e) and "user" not in missing:
                missing["user"] = "''"
            else:
                raise
    return rows_of(sums, by)


def rows_of(sums: list[tuple[Any, ...]], by: By) -> list[Row]:
    """
    The L{Row}s of what L{summary_query} selected, for either engine.
    """
    # A hand-made row may hold NULLs (SUM skips them; all NULL gives NULL).
    if by == "user":
        return [
            Row(str(key or ""), int(r or 0), int(p or 0), int(c or 0), int(f or 0),
                str(user or ""))
            for key, user, r, p, c, f in sums
        ]
    return [
        Row("" if name is None else str(name), int(r or 0), int(p or 0), int(c or 0),
            int(f or 0))
        for name, r, p, c, f in sums
    ]


def summary_query(
    by: By, since: float | None, until: float | None,
    from_minute: str, before_minute: str, refused: str = "SUM(refused)",
    user: str = "end_user",
) -> tuple[str, list[float]]:
    """
    The query that sums usage per key, model or user between two times,
    for either engine (L{summarise}, and L{ollamaproxy.postgres.usage}).

    @param from_minute: The engine's condition "from the minute of C{%s}"
        (its placeholder standing for a minute's start).
    @param before_minute: Its condition "before the minute of C{%s}".
    @param refused: What sums the refused requests.
    @param user: What names the user.
    @return: The query and its parameters.
    """
    if by not in _GROUPS:
        raise ValueError(f"cannot sum usage by {by!r}")
    group = ", ".join(user if column == "end_user" else column for column in _GROUPS[by])
    conditions, parameters = [], []
    for condition, when in ((from_minute, since), (before_minute, until)):
        if when is not None:
            conditions.append(condition)
            parameters.append(minute(when))
    where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
    return (
        f"SELECT {group}, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), "
        f"{refused} FROM usage {where}GROUP BY {group} "
        "ORDER BY SUM(prompt_tokens) + SUM(completion_tokens) DESC, SUM(requests) DESC, "
        f"{refused} DESC, {group}",
        parameters,
    )


def tokens_by_key(path: str, since: float) -> dict[str, int]:
    """
    The tokens (prompt and completion) each key used since a time, for the
    token quotas: the daemon reads its day's and month's at start.
    Blocking: call it away from the reactor thread.

    @param since: Count the minutes from the one holding this time
        (seconds since the epoch).
    @return: Tokens per key name; keys that used none are left out.  No
        file, or an empty one, gives none.
    @raise UsageFileError: If the file is not a usage database, or cannot be
        read.
    """
    try:
        rows = summarise(path, since, "key")
    except FileNotFoundError:
        return {}
    return {row.name: row.total_tokens for row in rows if row.total_tokens > 0}


Bucket = Literal["hour", "day"]
BUCKET_SECONDS: Final = {"hour": 3600, "day": 86400}

SeriesRow = tuple[float, str, str, int, int, int]
"""
C{(bucket start, key, model, requests, prompt_tokens, completion_tokens)}:
what one key used of one model in one hour or UTC day.
"""


def series(path: str, since: float, until: float, bucket: Bucket) -> list[SeriesRow]:
    """
    Requests and tokens per key and model, per hour or per UTC day, from
    C{since} up to (not including) C{until}, for the console's Usage view.
    Blocking: call it away from the reactor thread.

    @return: C{(bucket start, key, model, requests, prompt_tokens,
        completion_tokens)} rows, by time, then key, then model.  No file,
        or an empty one, gives none.
    @raise UsageFileError: If the file is not a usage database.
    """
    width = BUCKET_SECONDS[bucket]
    query = (
        "SELECT CAST(ts / ? AS INTEGER) * ? AS bucket, key, model, SUM(requests), "
        "SUM(prompt_tokens), SUM(completion_tokens) FROM usage "
        "WHERE ts >= ? AND ts < ? GROUP BY bucket, key, model ORDER BY bucket, key, model"
    )
    found = _read(path, query, (width, width, minute(since), until))
    return [
        (float(ts), str(key or ""), str(model or ""), int(r or 0), int(p or 0), int(c or 0))
        for ts, key, model, r, p, c in found
    ]


def last_used(path: str) -> dict[str, float]:
    """
    When each key (by name) was last used: the start of the last minute
    the database holds for it.  Blocking: call it away from the reactor
    thread.

    @raise UsageFileError: If the file is not a usage database.
    """
    found = _read(path, "SELECT key, MAX(ts) FROM usage GROUP BY key", ())
    return {str(key): float(ts) for key, ts in found if key is not None and ts is not None}


def _read(
    path: str, query: str, parameters: tuple[object, ...], missing_ok: bool = True
) -> list[tuple[Any, ...]]:
    """
    The rows a read-only query gives; none if there is no database yet (a
    file of a proxy that has not yet had the chance to add the table).

    @param missing_ok: Whether no file at all is no rows, rather than
        L{FileNotFoundError}.
    """
    try:
        found = os.stat(path)
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    if stat.S_ISDIR(found.st_mode):
        raise UsageFileError(f"cannot read usage file {path}: it is a directory")
    if found.st_size == 0:
        return []
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT)) as connection:
            return connection.execute(query, parameters).fetchall()
    except sqlite3.Error as e:
        raise UsageFileError(f"cannot read usage file {path}: {e}") from None


def drain(path: str, into: Callable[[list[UsageRow]], None]) -> int:
    """
    Hand every row of the database at C{path} to C{into}, and delete them
    once it returns; if it raises, nothing is deleted.  Blocking.

    The file stays locked for writing while C{into} runs, so rows another
    writer adds meanwhile are neither lost nor handed over twice.  A crash
    between C{into} returning and the deletion hands the same rows over again
    at the next drain: C{into} should be quick to commit.

    @return: How many rows were handed over (0 if there is no file).
    """
    if not os.path.exists(path):
        return 0
    with closing(open_database(path)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        try:
            rows: list[UsageRow] = [
                (float(ts), str(key), str(model), int(r or 0), int(p or 0), int(c or 0),
                 int(f or 0), str(user or ""))
                for ts, key, model, r, p, c, f, user in connection.execute(
                    "SELECT ts, key, model, requests, prompt_tokens, completion_tokens, "
                    "refused, end_user FROM usage"
                )
            ]
            if rows:
                into(rows)
                connection.execute("DELETE FROM usage")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    return len(rows)


class SqliteUsage:
    """
    The usage database in an SQLite file, as the usage service
    (L{ollamaproxy.record.usage.UsageDatabase}) sees it.  Blocking: call its methods
    away from the reactor thread.
    """

    def __init__(self, path: str) -> None:
        """
        @param path: The file; it and its directory are made when first
            written.
        """
        self.path = path

    @property
    def name(self) -> str:
        return self.path

    def write(self, rows: Sequence[UsageRow]) -> None:
        write_rows(self.path, rows)

    def summarise(self, since: float | None, by: By, until: float | None = None) -> list[Row]:
        try:
            return summarise(self.path, since, by, until)
        except FileNotFoundError:
            return []

    def tokens_by_key(self, since: float) -> dict[str, int]:
        return tokens_by_key(self.path, since)

    def series(self, since: float, until: float, bucket: Bucket) -> list[SeriesRow]:
        return series(self.path, since, until, bucket)

    def last_used(self) -> dict[str, float]:
        return last_used(self.path)

    def drain(self, into: Callable[[list[UsageRow]], None]) -> int:
        """
        Hand every row to C{into}, then delete them (L{drain}).
        """
        return drain(self.path, into)

    def close(self) -> None:
        """
        Nothing to do: every write opens the file and closes it.
        """

