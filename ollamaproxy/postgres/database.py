# -*- test-case-name: tests.integration.test_postgres_database -*-
"""
PostgreSQL, shared by every proxy given the same C{--database}: connecting,
and the schema, created and migrated by whichever comes first.

Blocking code with psycopg 3, no Twisted: the proxy calls it on threads of
its own (L{ollamaproxy.record.usage}, L{ollamaproxy.admission.key_sources}), the
C{ollamaproxy} command directly.  What is stored in it is in
L{ollamaproxy.postgres.usage} (usage) and L{ollamaproxy.postgres.keys} (keys).

The schema is versioned: table C{schema_version} holds one row per migration
applied, and L{MIGRATIONS} lists them in order, never changed once released
(a change is a new migration at the end).  Every connection first migrates
under a transaction-level advisory lock, so two proxies, or a proxy and the
command, coming at once to an empty database do not both create it: the
second waits, then finds it done.  A database migrated by a newer
ollamaproxy (a version beyond L{MIGRATIONS}) is refused with
L{SchemaTooNew}: this code cannot know what that version changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

import psycopg

from ollamaproxy.config import show_database_url
from ollamaproxy.record.usage_db import DatabaseDown

_T = TypeVar("_T")

Connection = psycopg.Connection[tuple[Any, ...]]

# Seconds to wait for a connection: a database that is down is found out
# quickly, on a thread that has nothing else to do meanwhile.
CONNECT_TIMEOUT: Final = 3

# Any number nobody else uses: the lock that migrations take.
_MIGRATION_LOCK: Final = 0x6F6C6C616D61  # "ollama"

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: usage per minute, key name and model; keys by name; the keys'
    # change marker, bumped by every change so that proxies read the keys
    # only when they changed.
    (
        "CREATE TABLE usage ("
        " minute timestamptz NOT NULL,"
        " key text NOT NULL,"
        " model text NOT NULL,"
        " requests bigint NOT NULL DEFAULT 0,"
        " prompt_tokens bigint NOT NULL DEFAULT 0,"
        " completion_tokens bigint NOT NULL DEFAULT 0,"
        " PRIMARY KEY (minute, key, model))",
        "CREATE TABLE api_keys ("
        " name text PRIMARY KEY,"
        " hash text NOT NULL UNIQUE,"
        " entry jsonb NOT NULL,"
        " updated timestamptz NOT NULL DEFAULT now())",
        "CREATE TABLE keys_version ("
        " only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),"
        " version bigint NOT NULL)",
        "INSERT INTO keys_version (version) VALUES (0)",
    ),
    # 2: requests the proxy refused itself counted apart from those Ollama
    # served (L{ollamaproxy.record.usage_db}); rows written before stay as
    # they were.
    (
        "ALTER TABLE usage ADD COLUMN refused bigint NOT NULL DEFAULT 0",
    ),
    # 3: usage per user behind a key too (L{ollamaproxy.record.usage_db});
    # rows written before are the keys' anonymous users', as they were.
    (
        "ALTER TABLE usage ADD COLUMN end_user text NOT NULL DEFAULT ''",
        "ALTER TABLE usage DROP CONSTRAINT usage_pkey",
        "ALTER TABLE usage ADD PRIMARY KEY (minute, key, model, end_user)",
    ),
)


class DatabaseError(DatabaseDown):
    """
    The database cannot be used: the message (one line, never a password)
    says why; the caller says which database.
    """


class SchemaTooNew(DatabaseError):
    """
    The database's schema was made by a newer ollamaproxy.
    """


def migrate(connection: Connection) -> int:
    """
    Bring the schema up to date, in one transaction, under the migration
    lock.

    @return: The schema version, now L{len}C{(MIGRATIONS)}.
    @raise SchemaTooNew: If the database's version is beyond L{MIGRATIONS}.
    """
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY,"
            " applied timestamptz NOT NULL DEFAULT now())"
        )
        row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
        current = int(row[0] or 0) if row is not None else 0
        if current > len(MIGRATIONS):
            raise SchemaTooNew(
                f"the database's schema is version {current}, newer than this "
                f"ollamaproxy knows ({len(MIGRATIONS)}): upgrade ollamaproxy"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return len(MIGRATIONS)


class Database:
    """
    One connection to PostgreSQL, made when first needed, with the schema
    migrated, and made again after it is lost.  Use it from one thread at a
    time.
    """

    def __init__(self, url: str, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        """
        @param url: A C{postgresql://} URL.
        @param connect_timeout: Seconds a connection may take.
        """
        self._url = url
        self._connect_timeout = connect_timeout
        self._connection: Connection | None = None

    @property
    def name(self) -> str:
        """
        The URL without its password, for logs and messages.
        """
        return show_database_url(self._url)

    def _connect(self) -> Connection:
        connection = psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=max(1, round(self._connect_timeout)),
            application_name="ollamaproxy",
            # A peer that vanishes without a word is noticed in seconds, not
            # hours.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        try:
            migrate(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def run(self, work: Callable[[Connection], _T]) -> _T:
        """
        Call C{work} with the connection (made if need be), and return what
        it returns.  If the connection fails meanwhile it is closed, and
        the next call makes a new one.

        @raise DatabaseError: If the database cannot be reached or used.
        @raise SchemaTooNew: If its schema is newer than this code.
        """
        try:
            if self._connection is None or self._connection.closed:
                self._connection = self._connect()
            return work(self._connection)
        except psycopg.Error as e:
            if self._connection is not None and (
                self._connection.closed or self._connection.broken
                or isinstance(e, psycopg.OperationalError)
            ):
                self.close()
            raise DatabaseError(" ".join(str(e).split()) or type(e).__name__) from None

    def close(self) -> None:
        """
        Close the connection, if any.
        """
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
