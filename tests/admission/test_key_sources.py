"""
Tests for L{ollamaproxy.admission.key_sources}: keys of several sources added up,
and the database's keys polled while the proxy runs (in memory: a fake read
function, a worker that runs at once, a L{Clock}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from zope.interface import implementer

from ollamaproxy.admission.key_sources import (
    DATABASE,
    FILE,
    OPERATOR,
    DatabaseKeysPoller,
    KeySources,
)
from ollamaproxy.admission.keys import ApiKey, KeyStore, digest, write_keys_file
from ollamaproxy.admission.reload import KeysReloader
from ollamaproxy.postgres.database import DatabaseError

SECRETS = {name: f"olpk_{name}-secret-secret-secret-secret" for name in ("op", "f", "d", "e")}


def key(name: str) -> ApiKey:
    return ApiKey(name=name, digest=digest(SECRETS[name]))


class AtOnce:
    """
    A worker that runs work at once; C{started} and C{stopped} tell.
    """

    def __init__(self) -> None:
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def run(self, work: Callable[[], Any]) -> Deferred[Any]:
        try:
            return succeed(work())
        except Exception:
            return fail()

    def stop(self) -> None:
        self.stopped = True


class FakeDatabase:
    """
    Keys at a version; C{read} as L{DatabaseKeysPoller} calls it.
    """

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys
        self.version = 1
        self.up = True
        self.reads = 0

    def change(self, keys: list[ApiKey]) -> None:
        self.keys = keys
        self.version += 1

    def read(self, known: int | None) -> tuple[int, list[ApiKey]] | None:
        if not self.up:
            raise DatabaseError("database postgresql://db.example/proxy: connection refused")
        if known == self.version:
            return None
        self.reads += 1
        return self.version, list(self.keys)


@implementer(ILogObserver)
class Events:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "ollamaproxy.admission.key_sources":
            self.events.append(event)


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    observer = Events()
    globalLogPublisher.addObserver(observer)
    yield observer.events
    globalLogPublisher.removeObserver(observer)


def test_sources_add_up() -> None:
    """
    The store accepts the keys of every source; replacing one source's keys
    leaves the others'.
    """
    store = KeyStore()
    sources = KeySources(store, {OPERATOR: [key("op")], FILE: [key("f")], DATABASE: [key("d")]})
    assert all(store.find(SECRETS[n]) for n in ("op", "f", "d"))
    sources.part(DATABASE).replace([key("e")])
    assert store.find(SECRETS["d"]) is None
    assert all(store.find(SECRETS[n]) for n in ("op", "f", "e"))
    assert len(sources.part(FILE)) == 3 and sources.part(FILE).own == 1


def test_a_name_in_two_sources_is_refused_and_changes_nothing() -> None:
    """
    A key name found in two sources is one clear error naming both, and the
    keys in force stay.
    """
    store = KeyStore()
    sources = KeySources(store, {FILE: [key("f")], DATABASE: []})
    clash = ApiKey(name="f", digest=digest(SECRETS["d"]))
    with pytest.raises(ValueError, match="'f' is in both the keys file and the database"):
        sources.part(DATABASE).replace([clash])
    assert store.find(SECRETS["f"]) is not None and store.find(SECRETS["d"]) is None
    with pytest.raises(ValueError, match="in both"):
        KeySources(KeyStore(), {FILE: [key("f")], DATABASE: [clash]})


def test_keys_file_reload_keeps_the_database_keys(tmp_path: Path) -> None:
    """
    The keys file's reloader, given the file's part, replaces only the
    file's keys: the database's stay.
    """
    path = str(tmp_path / "keys.json")
    write_keys_file(path, [key("f")])
    store = KeyStore()
    sources = KeySources(store, {FILE: [], DATABASE: [key("d")]})
    reloader = KeysReloader(sources.part(FILE), path, [], Clock(),
                            install_sighup=lambda _: lambda: None)
    reloader.reload()
    assert store.find(SECRETS["f"]) and store.find(SECRETS["d"])


def poller(database: FakeDatabase, clock: Clock, store: KeyStore,
           version: int | None = 1) -> tuple[DatabaseKeysPoller, AtOnce]:
    sources = KeySources(store, {OPERATOR: [key("op")],
                                 DATABASE: database.keys if version else []})
    worker = AtOnce()
    service = DatabaseKeysPoller(sources.part(DATABASE), database.read,
                                 "postgresql://db.example/proxy", clock, worker=worker,
                                 version=version)
    return service, worker


def test_a_revoke_is_picked_up_at_the_next_poll() -> None:
    """
    The poller reads the keys only when their version changed, and a key
    revoked in the database is refused after the next poll (2 seconds).
    """
    clock = Clock()
    store = KeyStore()
    database = FakeDatabase([key("d"), key("e")])
    service, worker = poller(database, clock, store)
    service.startService()
    assert worker.started and database.reads == 0
    clock.advance(2)
    clock.advance(2)
    assert database.reads == 0
    database.change([key("e")])
    clock.advance(2)
    assert store.find(SECRETS["d"]) is None and store.find(SECRETS["e"]) is not None
    assert store.find(SECRETS["op"]) is not None
    service.stopService()
    assert worker.stopped and clock.getDelayedCalls() == []


def test_keys_stay_while_the_database_is_down(events: list[LogEvent]) -> None:
    """
    While the database cannot be read, the keys last read stay in force;
    one warning says so (with the count, never a key), one line says when it
    answers again, and C{ready} follows.
    """
    clock = Clock()
    store = KeyStore()
    database = FakeDatabase([key("d")])
    service, _ = poller(database, clock, store)
    service.startService()
    assert service.ready
    database.up = False
    for _ in range(5):
        clock.advance(2)
    assert not service.ready
    assert store.find(SECRETS["d"]) is not None
    [down] = [e for e in events if e["log_level"] == LogLevel.warn]
    assert down["count"] == 1 and "connection refused" in down["reason"]
    assert all(secret not in repr(e) for e in events for secret in SECRETS.values())
    database.up = True
    database.change([])
    clock.advance(2)
    assert service.ready and store.find(SECRETS["d"]) is None
    assert any("again" in e["log_format"] for e in events)
    service.stopService()


def test_started_without_the_database_reads_it_when_it_answers() -> None:
    """
    A proxy that started while the database was down (no version read)
    is not ready, and takes the database's keys once it answers.
    """
    clock = Clock()
    store = KeyStore()
    database = FakeDatabase([key("d")])
    database.up = False
    service, _ = poller(database, clock, store, version=None)
    service.startService()
    assert not service.ready and store.find(SECRETS["d"]) is None
    database.up = True
    clock.advance(2)
    assert service.ready and store.find(SECRETS["d"]) is not None
    service.stopService()


def test_a_clash_read_from_the_database_keeps_the_keys(events: list[LogEvent]) -> None:
    """
    Keys read from the database that clash with another source's are
    refused with a warning; the keys in force stay.
    """
    clock = Clock()
    store = KeyStore()
    database = FakeDatabase([key("d")])
    service, _ = poller(database, clock, store)
    service.startService()
    database.change([ApiKey(name="op", digest=digest(SECRETS["e"]))])
    clock.advance(2)
    assert store.find(SECRETS["d"]) is not None and store.find(SECRETS["e"]) is None
    assert any("not usable" in e["log_format"] for e in events)
    service.stopService()


def test_a_clash_cleared_in_the_keys_file_lets_the_database_keys_in(
    events: list[LogEvent],
) -> None:
    """
    Keys read from the database that clash with the keys file's are read
    again at every poll, with one warning in all; once the clash is cleared
    in the keys file, the next poll takes the database's keys (the key
    added accepted, the key revoked refused) without waiting for another
    change in the database.
    """
    clock = Clock()
    store = KeyStore()
    database = FakeDatabase([key("d")])
    sources = KeySources(store, {FILE: [key("f")], DATABASE: database.keys})
    service = DatabaseKeysPoller(sources.part(DATABASE), database.read,
                                 "postgresql://db.example/proxy", clock, worker=AtOnce(),
                                 version=database.version)
    service.startService()
    database.change([ApiKey(name="f", digest=digest(SECRETS["e"]))])
    for _ in range(5):
        clock.advance(2)
    assert store.find(SECRETS["d"]) is not None and store.find(SECRETS["e"]) is None
    [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
    assert "'f' is in both" in warning["reason"]
    sources.part(FILE).replace([])
    clock.advance(2)
    assert store.find(SECRETS["d"]) is None and store.find(SECRETS["e"]) is not None
    assert store.find(SECRETS["f"]) is None
    service.stopService()
