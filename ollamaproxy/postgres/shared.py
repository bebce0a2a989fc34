# -*- test-case-name: tests.admission.test_key_sources -*-
"""
What C{--database} adds to the proxy: usage written to PostgreSQL, keys read
from it, and whether it answers.

At start (before the reactor runs, like reading the keys file) the proxy
connects once, migrates the schema if need be, and reads the keys:

  - a schema newer than this code, or a key in the database that is not
    valid, stops the start with one line;
  - a database that cannot be reached does not stop it if there are other
    keys to start with (C{--api-key} or the keys file): it starts with
    those, logs a warning, and picks up the database's keys (and writes the
    usage kept meanwhile) as soon as it answers;
  - with no other key, it stops with one line: starting would serve no one,
    and making a first key (as a proxy without C{--database} does) would
    make a key that nobody else knows of.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from twisted.logger import Logger

from ollamaproxy.admission.first_key import keys_to_accept, operator_keys
from ollamaproxy.admission.key_sources import (
    DATABASE,
    FILE,
    OPERATOR,
    DatabaseKeysPoller,
    KeySources,
)
from ollamaproxy.admission.keys import ApiKey, KeysFileError, KeyStore, load_keys_file
from ollamaproxy.config import Config, ConfigError
from ollamaproxy.postgres.database import Database, DatabaseError, SchemaTooNew
from ollamaproxy.postgres.keys import load_keys
from ollamaproxy.postgres.usage import PostgresUsage
from ollamaproxy.reactors import IDaemonReactor
from ollamaproxy.record.usage import ThreadWorker, UsageStore
from ollamaproxy.record.usage_db import SqliteUsage

log = Logger()


class SharedDatabase:
    """
    The proxy's side of C{--database}.

    @ivar store: The keys the proxy accepts, from every source.
    @ivar sources: The same keys, per source.
    """

    def __init__(self, config: Config, reactor: IDaemonReactor, store: KeyStore,
                 sources: KeySources, version: int | None) -> None:
        assert config.database is not None
        self._config = config
        self._url = config.database
        self._reactor = reactor
        self.store = store
        self.sources = sources
        self._version = version
        self.usage: UsageStore | None = None
        self.keys: DatabaseKeysPoller | None = None

    @classmethod
    def at_start(cls, config: Config, reactor: IDaemonReactor, now: datetime,
                 announce: Callable[[str], None]) -> SharedDatabase:
        """
        Connect, migrate and read the keys, as the module says.

        @raise ConfigError: If the proxy cannot start, saying why in one line.
        """
        assert config.database is not None
        database = Database(config.database)
        read: tuple[int, list[ApiKey]] | None = None
        try:
            read = database.run(load_keys)
        except SchemaTooNew as e:
            raise ConfigError(f"--database: {e}") from None
        except DatabaseError as e:
            unreachable = str(e)
        except ValueError as e:
            raise ConfigError(f"--database: {database.name}: {e}") from None
        finally:
            database.close()
        operator = operator_keys(config.api_key)
        try:
            in_file = load_keys_file(config.keys_file)
        except KeysFileError as e:
            raise ConfigError(str(e)) from None
        if read is None:
            if not operator and not in_file:
                raise ConfigError(
                    f"--database: cannot read keys from {database.name}: {unreachable}; with "
                    f"no --api-key and no key in {config.keys_file} there is no key to start "
                    "with"
                )
            log.warn(
                "Cannot read keys from {database} at start ({reason}); starting with the "
                "other keys, and reading them as soon as it answers",
                database=database.name,
                reason=unreachable,
            )
        version, in_database = read if read is not None else (None, [])
        if read is not None:
            # Said at start, as the failure above is: otherwise nothing
            # tells the operator the database is in use until its first
            # write.
            log.info(
                "Keys and usage are kept in PostgreSQL at {database}: it answered, with "
                "{count} key(s)",
                database=database.name,
                count=len(in_database),
            )
        store = KeyStore()
        if not (operator or in_file or in_database):
            # No key anywhere: make the first one, as without --database.
            keys_to_accept(config.api_key, config.keys_file, now, announce)
            in_file = load_keys_file(config.keys_file)
        try:
            sources = KeySources(
                store, {OPERATOR: operator, FILE: in_file, DATABASE: in_database}
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return cls(config, reactor, store, sources, version)

    def usage_store(self, worker: ThreadWorker) -> UsageStore:
        """
        The usage service: PostgreSQL, with the usage file as the spill file.

        @param worker: Writes the usage (and reads it for the token quotas).
        """
        self.usage = UsageStore(
            PostgresUsage(Database(self._url)),
            self._reactor,
            worker=worker,
            spill=SqliteUsage(self._config.usage_file),
        )
        return self.usage

    def keys_poller(self) -> DatabaseKeysPoller:
        """
        The service that keeps the database's keys in step.
        """
        database = Database(self._url)
        self.keys = DatabaseKeysPoller(
            self.sources.part(DATABASE),
            lambda known: database.run(lambda connection: load_keys(connection, known)),
            database.name,
            self._reactor,
            worker=ThreadWorker(self._reactor, name="ollamaproxy-keys"),
            version=self._version,
            close=database.close,
        )
        return self.keys

    @property
    def ready(self) -> bool:
        """
        Whether PostgreSQL took the last usage write and answered the last
        look at the keys (for readiness checks and C{ollamaproxy_database_up}).
        """
        return (self.usage is None or self.usage.ready) and (
            self.keys is None or self.keys.ready
        )
