# -*- test-case-name: tests.admission.test_key_sources -*-
"""
Keys from every source, added up, and the keys in PostgreSQL kept in step
while the proxy runs.

The proxy accepts the key from C{--api-key}, the keys file's and, with
C{--database}, the database's.  L{KeySources} keeps each source's keys apart
and puts them all in the one L{KeyStore} the proxy looks keys up in; the
keys file's reloader (L{ollamaproxy.admission.reload.KeysReloader}) and
L{DatabaseKeysPoller} each replace only their own source's part.  A name
found in two sources is refused with a one-line reason, and the keys in
force stay.

L{DatabaseKeysPoller} looks at the database's change marker every
L{DEFAULT_INTERVAL} seconds, on a thread of its own, and reads the keys only
when it changed: a key revoked in the database is refused by every proxy
within about that interval (plus a query).  Keys that cannot be taken (a
name also in another source) are read again at every look, with one
warning, until the clash is cleared in either source.  While the database cannot be
reached, the keys last read from it stay in force (it says so in the log,
once), and requests never wait for it.

Keys and digests never appear in log events: only a count and where.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ollamaproxy.admission.keys import ApiKey, KeyStore
from ollamaproxy.record.usage import Worker

log = Logger()

DEFAULT_INTERVAL: Final = 2.0

OPERATOR: Final = "--api-key"
FILE: Final = "the keys file"
DATABASE: Final = "the database"


class KeySources:
    """
    The keys of several sources, added up into one L{KeyStore}.
    """

    def __init__(self, store: KeyStore, parts: Mapping[str, Sequence[ApiKey]]) -> None:
        """
        @param store: Given the keys of all sources at every change.
        @param parts: Each source's keys to start with, by the source's name
            in words (L{OPERATOR}, L{FILE}, L{DATABASE}).
        @raise ValueError: If two sources have a key of the same name.
        """
        self._store = store
        self._parts = {source: list(keys) for source, keys in parts.items()}
        self._replace()

    def _replace(self) -> None:
        where: dict[str, str] = {}
        for source, keys in self._parts.items():
            for key in keys:
                other = where.setdefault(key.name, source)
                if other != source:
                    raise ValueError(
                        f"a key named {key.name!r} is in both {other} and {source}: "
                        "rename or revoke one"
                    )
        self._store.replace([key for keys in self._parts.values() for key in keys])

    def part(self, source: str) -> SourceKeys:
        """
        The keys of C{source}, to be replaced by whoever reads it.
        """
        return SourceKeys(self, source)

    def replace(self, source: str, keys: Sequence[ApiKey]) -> None:
        """
        Accept C{keys} as C{source}'s from now on, with every other source's.

        @raise ValueError: If a name is twice in C{keys}, or also in another
            source; then nothing changes.
        """
        old = self._parts[source]
        self._parts[source] = list(keys)
        try:
            self._replace()
        except ValueError:
            self._parts[source] = old
            raise

    def count(self, source: str) -> int:
        """
        How many keys C{source} has now.
        """
        return len(self._parts[source])

    def __len__(self) -> int:
        return len(self._store)


class SourceKeys:
    """
    One source's part of L{KeySources}, with the interface of a L{KeyStore}
    that L{ollamaproxy.admission.reload.KeysReloader} needs.
    """

    def __init__(self, sources: KeySources, source: str) -> None:
        self._sources = sources
        self._source = source

    def replace(self, keys: Sequence[ApiKey]) -> None:
        self._sources.replace(self._source, keys)

    @property
    def own(self) -> int:
        """
        How many of the keys are this source's.
        """
        return self._sources.count(self._source)

    def __len__(self) -> int:
        """
        How many keys are accepted in all.
        """
        return len(self._sources)


ReadKeys = Callable[[int | None], "tuple[int, list[ApiKey]] | None"]
"""
Reads the keys if their version is not the given one: blocking, returns the
new version and the keys, or L{None} if the version is the same.
"""


class DatabaseKeysPoller(Service):
    """
    Keeps the database's part of the keys in step with the database while
    the service runs.

    @ivar ready: Whether the last look at the database succeeded (for
        readiness checks).
    """

    def __init__(
        self,
        keys: SourceKeys,
        read: ReadKeys,
        name: str,
        clock: IReactorTime,
        *,
        worker: Worker,
        version: int | None = None,
        interval: float = DEFAULT_INTERVAL,
        close: Callable[[], None] = lambda: None,
    ) -> None:
        """
        @param keys: The database's part of the keys the proxy accepts.
        @param read: Reads the keys when they changed (L{ReadKeys}); called
            on C{worker}.
        @param name: The database, in logs (never with its password).
        @param clock: Times the polling.
        @param worker: Runs C{read}; started and stopped with the service.
        @param version: The version of the keys in force now, if they were
            read from the database at start.
        @param interval: Seconds between looks.
        @param close: Lets go of the connection once the worker stopped.
        """
        self._keys = keys
        self._read = read
        self._name = name
        self._clock = clock
        self._worker = worker
        self._version = version
        self._interval = interval
        self._close = close
        self._loop: LoopingCall | None = None
        self._reading: Deferred[None] | None = None
        self._said_down = False
        # The reason last warned of for keys that could not be taken.
        self._said_unusable: str | None = None
        self.ready = version is not None

    def startService(self) -> None:
        super().startService()
        self._worker.start()
        loop = LoopingCall(self.poll)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

        def stop(_: object = None) -> None:
            self._worker.stop()
            self._close()

        reading = self._reading
        if reading is None:
            stop()
            return None
        # Wait for the read in flight; then stop.
        done: Deferred[None] = Deferred()
        reading.addBoth(lambda _: done.callback(None))
        return done.addCallback(stop)

    def poll(self) -> None:
        """
        Look at the database, unless the last look is still going.
        """
        if self._reading is not None:
            return
        known = self._version
        reading: Deferred[tuple[int, list[ApiKey]] | None] = self._worker.run(
            lambda: self._read(known)
        )
        self._reading = reading.addCallbacks(self._read_keys, self._failed)
        self._reading.addBoth(self._done)

    def _done(self, _: None) -> None:
        self._reading = None

    def _read_keys(self, result: tuple[int, list[ApiKey]] | None) -> None:
        self.ready = True
        if self._said_down:
            self._said_down = False
            log.info("Reading keys from {database} again", database=self._name)
        if result is None:
            return
        version, keys = result
        try:
            self._keys.replace(keys)
        except ValueError as e:
            # The version stays unknown: the keys are read again at every
            # poll, and taken once the clash is cleared in either source.
            reason = str(e)
            if reason != self._said_unusable:
                self._said_unusable = reason
                log.warn(
                    "Keys in {database} are not usable, keeping the keys accepted now: "
                    "{reason}",
                    database=self._name,
                    reason=reason,
                )
            return
        self._version = version
        self._said_unusable = None
        log.info("Read {count} keys from {database}", count=len(keys), database=self._name,
                 total=len(self._keys))

    def _failed(self, reason: Failure) -> None:
        self.ready = False
        if not self._said_down:
            self._said_down = True
            log.warn(
                "Cannot read keys from {database}: {reason}; the {count} keys last read "
                "from it stay in force until it answers again",
                database=self._name,
                reason=reason.getErrorMessage(),
                count=self._keys.own,
            )
