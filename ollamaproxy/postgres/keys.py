# -*- test-case-name: tests.integration.test_postgres_database -*-
"""
Keys in PostgreSQL, shared by every proxy given the same C{--database}.

Each row of C{api_keys} holds one key's entry exactly as the keys file
writes it (L{ollamaproxy.admission.keys.key_to_json}: its name, its hash, never the
key), so one format describes a key wherever it lives.  Every change bumps
the single row of C{keys_version}, so a proxy polling for changes reads one
number every couple of seconds, and the keys only when they changed.

Blocking, no Twisted: the command calls it directly, the daemon on a thread
of its own (L{ollamaproxy.admission.key_sources}).
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg.types.json import Jsonb

from ollamaproxy.admission.keys import ApiKey, KeyStore, key_from_json, key_to_json
from ollamaproxy.postgres.database import Connection


def _version(connection: Connection, lock: bool = False) -> int:
    row = connection.execute(
        "SELECT version FROM keys_version" + (" FOR UPDATE" if lock else "")
    ).fetchone()
    return 0 if row is None else int(row[0])


def _keys(connection: Connection) -> list[ApiKey]:
    """
    @raise ValueError: If a row is not a valid key, saying which.
    """
    keys = []
    for name, entry in connection.execute("SELECT name, entry FROM api_keys ORDER BY name"):
        try:
            keys.append(key_from_json(entry))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the key {name!r} in the database is not valid: {e}") from None
    return keys


def load_keys(connection: Connection, known: int | None = None) -> tuple[int, list[ApiKey]] | None:
    """
    The keys in the database and the version they are at, or L{None} if
    the version is still C{known}.

    @raise ValueError: If a key in the database is not valid.
    """
    with connection.transaction():
        # Repeatable read: the version and the keys come from one snapshot.
        connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        version = _version(connection)
        if version == known:
            return None
        return version, _keys(connection)


def update_keys(
    connection: Connection, change: Callable[[list[ApiKey]], list[ApiKey]]
) -> list[ApiKey]:
    """
    Change the keys in one transaction: C{change} is given the keys and
    returns the keys to keep.  Writers wait for each other (the version's
    row is locked), so two commands at once cannot lose each other's change.

    @return: The keys written.
    @raise ValueError: If C{change} returns two keys of one name, or a key
        in the database is not valid.  Any exception C{change} raises leaves
        the database as it was and is passed on.
    """
    with connection.transaction():
        _version(connection, lock=True)
        current = _keys(connection)
        old = {key.name: key_to_json(key) for key in current}
        keys = change(list(current))
        KeyStore(keys)
        new = {key.name: key_to_json(key) for key in keys}
        connection.execute("DELETE FROM api_keys WHERE NOT (name = ANY(%s))", (list(new),))
        for name, entry in new.items():
            if old.get(name) != entry:
                connection.execute(
                    "INSERT INTO api_keys (name, hash, entry) VALUES (%s, %s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET hash = excluded.hash, "
                    "entry = excluded.entry, updated = now()",
                    (name, entry["hash"], Jsonb(entry)),
                )
        if old != new:
            connection.execute("UPDATE keys_version SET version = version + 1")
    return keys
