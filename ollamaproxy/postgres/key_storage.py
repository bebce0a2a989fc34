# -*- test-case-name: tests.integration.test_postgres_database -*-
"""
The keys in PostgreSQL, as the C{ollamaproxy keys} commands read and change
them (L{ollamaproxy.admission.key_storage.KeyStorage}).

psycopg is imported only when the keys are used, so that the command works
without it for a keys file.
"""

from __future__ import annotations

from collections.abc import Callable

from ollamaproxy.admission.key_storage import KeyStorageError
from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.config import show_database_url


class DatabaseKeys:
    """
    The keys in PostgreSQL (L{ollamaproxy.postgres.keys}); the schema is made or
    migrated first if need be.
    """

    picked_up = "Every proxy using this database picks up the change within 5 seconds."

    def __init__(self, url: str) -> None:
        self._url = url
        self.where = f"database {show_database_url(url)}"

    def _run(self, change: Callable[[list[ApiKey]], list[ApiKey]] | None = None) -> list[ApiKey]:
        """
        Read the keys, or, given C{change}, change them.
        """
        try:
            from ollamaproxy.postgres import keys as keys_pg
            from ollamaproxy.postgres.database import Database, DatabaseError
        except ImportError:
            raise KeyStorageError(
                "--database needs psycopg: pip install 'ollamaproxy[postgresql]'"
            ) from None
        database = Database(self._url)
        try:
            if change is None:
                loaded = database.run(keys_pg.load_keys)
                assert loaded is not None
                return loaded[1]
            return database.run(lambda connection: keys_pg.update_keys(connection, change))
        except DatabaseError as e:
            raise KeyStorageError(f"{self.where}: {e}") from None
        except ValueError as e:
            raise KeyStorageError(f"{self.where}: {e}") from None
        finally:
            database.close()

    def load(self) -> list[ApiKey]:
        return self._run()

    def update(self, change: Callable[[list[ApiKey]], list[ApiKey]]) -> list[ApiKey]:
        return self._run(change=change)
