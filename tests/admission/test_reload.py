"""
Tests for L{ollamaproxy.admission.reload}: the keys file is reloaded when it changes
and on C{SIGHUP}, and a broken file changes nothing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from ollamaproxy.admission.key_sources import DATABASE, FILE, KeySources
from ollamaproxy.admission.keys import ApiKey, KeyStore, digest, generate_key, write_keys_file
from ollamaproxy.admission.reload import DEFAULT_INTERVAL, KeysReloader, sighup_installer


def named_key(name: str) -> tuple[str, ApiKey]:
    """
    A fresh secret and the ApiKey that stands for it.
    """
    secret = generate_key()
    return secret, ApiKey(name=name, digest=digest(secret))


@implementer(ILogObserver)
class ReloadEvents:
    """
    Keeps the events that L{ollamaproxy.admission.reload} logs.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "ollamaproxy.admission.reload":
            self.events.append(event)

    @property
    def reloads(self) -> int:
        """
        How many times the keys were replaced from the file.
        """
        return sum(1 for e in self.events if e["log_format"].startswith("Reloaded "))

    @property
    def warnings(self) -> list[LogEvent]:
        return [e for e in self.events if e["log_level"] == LogLevel.warn]


@pytest.fixture
def events() -> Iterator[ReloadEvents]:
    """
    What the reloader logs while the test runs.
    """
    observer = ReloadEvents()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


@dataclass
class FakeSighup:
    """
    An installer for L{KeysReloader} that remembers the handler instead of
    touching signals; L{send} plays the signal arriving.
    """

    handlers: list[Callable[[], None]] = field(default_factory=list)
    uninstalled: int = 0

    def install(self, on_sighup: Callable[[], None]) -> Callable[[], None]:
        self.handlers.append(on_sighup)

        def uninstall() -> None:
            self.handlers.remove(on_sighup)
            self.uninstalled += 1

        return uninstall

    def send(self) -> None:
        for handler in list(self.handlers):
            handler()


@dataclass
class Keys:
    """
    A keys file with two keys, the C{--api-key} key, and a running
    L{KeysReloader} keeping a store in step with them.
    """

    path: str
    store: KeyStore
    clock: Clock
    sighup: FakeSighup
    reloader: KeysReloader
    secrets: dict[str, str]
    keys: dict[str, ApiKey]

    def add(self, name: str) -> str:
        """
        Make a key called C{name}, for L{write}; return its secret.
        """
        self.secrets[name], self.keys[name] = named_key(name)
        return self.secrets[name]

    def write(self, *names: str) -> None:
        """
        Replace the keys file with one holding the named keys.
        """
        write_keys_file(self.path, [self.keys[name] for name in names])

    def accepted(self) -> set[str]:
        """
        The names of the keys the store accepts now.
        """
        return {name for name, secret in self.secrets.items() if self.store.find(secret)}


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[Keys]:
    """
    A started reloader over a file holding C{alice} and C{bob}, with the
    extra key C{api-key}; stopped again after the test.
    """
    extra, operator = named_key("api-key")
    path = str(tmp_path / "keys.json")
    sighup = FakeSighup()
    clock = Clock()
    store = KeyStore()
    fixture = Keys(
        path=path,
        store=store,
        clock=clock,
        sighup=sighup,
        reloader=KeysReloader(store, path, [operator], clock, install_sighup=sighup.install),
        secrets={"api-key": extra},
        keys={"api-key": operator},
    )
    fixture.add("alice")
    fixture.add("bob")
    fixture.write("alice", "bob")
    store.replace([operator, fixture.keys["alice"], fixture.keys["bob"]])
    fixture.reloader.startService()
    try:
        yield fixture
    finally:
        if fixture.reloader.running:
            fixture.reloader.stopService()


def test_start_loads_the_file(tmp_path: Path, events: ReloadEvents) -> None:
    """
    Starting reloads the file once, so a change made after the store was
    built is not missed.
    """
    extra, operator = named_key("api-key")
    secret, alice = named_key("alice")
    path = str(tmp_path / "keys.json")
    write_keys_file(path, [alice])
    store = KeyStore([operator])
    reloader = KeysReloader(store, path, [operator], Clock(), install_sighup=FakeSighup().install)
    reloader.startService()
    try:
        assert store.find(secret) == alice
        assert store.find(extra) == operator
        assert events.reloads == 1
        [event] = events.events
        assert formatEvent(event) == f"Reloaded 1 keys from {path}"
        assert event["total"] == 2
    finally:
        reloader.stopService()


def test_change_picked_up_after_one_interval(keys: Keys) -> None:
    """
    A new keys file is in force one interval after it is written: a revoked
    key is no longer found and a new key is.
    """
    keys.add("carol")
    keys.write("bob", "carol")
    keys.clock.advance(DEFAULT_INTERVAL - 0.1)
    assert keys.accepted() == {"api-key", "alice", "bob"}
    keys.clock.advance(0.1)
    assert keys.accepted() == {"api-key", "bob", "carol"}


def test_interval_is_configurable(tmp_path: Path) -> None:
    """
    The file is looked at every C{interval} seconds, not every two.
    """
    _, operator = named_key("api-key")
    secret, alice = named_key("alice")
    path = str(tmp_path / "keys.json")
    clock = Clock()
    store = KeyStore()
    reloader = KeysReloader(
        store, path, [operator], clock, interval=10.0, install_sighup=FakeSighup().install
    )
    reloader.startService()
    try:
        write_keys_file(path, [alice])
        clock.advance(9.9)
        assert store.find(secret) is None
        clock.advance(0.1)
        assert store.find(secret) == alice
    finally:
        reloader.stopService()


def test_no_change_no_reload(keys: Keys, events: ReloadEvents) -> None:
    """
    An unchanged file is not read again however many intervals pass.
    """
    keys.clock.pump([DEFAULT_INTERVAL] * 20)
    assert events.reloads == 0
    assert keys.accepted() == {"api-key", "alice", "bob"}


def test_same_content_rewritten_reloads(keys: Keys, events: ReloadEvents) -> None:
    """
    Rewriting the file, even with the same keys, is a change (a new inode).
    """
    keys.write("alice", "bob")
    keys.clock.advance(DEFAULT_INTERVAL)
    assert events.reloads == 1


def test_invalid_json_keeps_old_keys(keys: Keys, events: ReloadEvents) -> None:
    """
    A file that is not JSON changes nothing and is warned about once, naming
    the file; fixing it takes effect at the next poll.
    """
    Path(keys.path).write_text('{"keys": [')
    keys.clock.pump([DEFAULT_INTERVAL] * 5)
    assert keys.accepted() == {"api-key", "alice", "bob"}
    [warning] = events.warnings
    assert warning["keys_file"] == keys.path
    assert keys.path in formatEvent(warning)
    assert "log_failure" not in warning
    assert events.reloads == 0

    keys.write("bob")
    keys.clock.advance(DEFAULT_INTERVAL)
    assert keys.accepted() == {"api-key", "bob"}
    assert events.reloads == 1


def test_invalid_entry_keeps_old_keys(keys: Keys, events: ReloadEvents) -> None:
    """
    A file with a malformed key entry changes nothing and is warned about.
    """
    Path(keys.path).write_text('{"keys": [{"name": "mallory", "hash": "md5:00"}]}')
    keys.clock.advance(DEFAULT_INTERVAL)
    assert keys.accepted() == {"api-key", "alice", "bob"}
    [warning] = events.warnings
    assert keys.path in formatEvent(warning)


def test_duplicate_names_keep_old_keys(keys: Keys, events: ReloadEvents) -> None:
    """
    Two keys with one name in the file change nothing and are warned about.
    """
    keys.add("carol")
    write_keys_file(keys.path, [keys.keys["carol"], named_key("carol")[1]])
    keys.clock.advance(DEFAULT_INTERVAL)
    assert keys.accepted() == {"api-key", "alice", "bob"}
    [warning] = events.warnings
    assert warning["keys_file"] == keys.path
    assert "'carol'" in formatEvent(warning)


def test_file_key_named_like_extra_keeps_old_keys(keys: Keys, events: ReloadEvents) -> None:
    """
    A file key with the name of an extra key changes nothing: the extra key
    is not shadowed or dropped.
    """
    keys.add("impostor")
    write_keys_file(keys.path, [ApiKey(name="api-key", digest=keys.keys["impostor"].digest)])
    keys.clock.advance(DEFAULT_INTERVAL)
    assert keys.accepted() == {"api-key", "alice", "bob"}
    assert len(events.warnings) == 1


def test_clash_cleared_in_the_database_lets_the_file_keys_in(
    tmp_path: Path, events: ReloadEvents
) -> None:
    """
    A keys file whose key is named like one of the database's is read again
    at every poll, with one warning in all; once the database's key is gone,
    the next poll takes the file's keys without waiting for the file to
    change.
    """
    carol, in_file = named_key("carol")
    _, in_database = named_key("carol")
    dave, other = named_key("dave")
    path = str(tmp_path / "keys.json")
    write_keys_file(path, [in_file, other])
    clock = Clock()
    store = KeyStore()
    sources = KeySources(store, {FILE: [], DATABASE: [in_database]})
    reloader = KeysReloader(sources.part(FILE), path, [], clock,
                            install_sighup=FakeSighup().install)
    reloader.startService()
    try:
        clock.pump([DEFAULT_INTERVAL] * 5)
        assert store.find(carol) is None and store.find(dave) is None
        [warning] = events.warnings
        assert "'carol' is in both" in formatEvent(warning)
        sources.part(DATABASE).replace([])
        clock.advance(DEFAULT_INTERVAL)
        assert store.find(carol) == in_file and store.find(dave) == other
        assert events.reloads == 1
    finally:
        reloader.stopService()


def test_missing_file_leaves_only_extra(keys: Keys, events: ReloadEvents) -> None:
    """
    Removing the keys file revokes its keys, with a warning; the extra key
    stays.
    """
    os.unlink(keys.path)
    keys.clock.advance(DEFAULT_INTERVAL)
    assert keys.accepted() == {"api-key"}
    [warning] = events.warnings
    assert "removed" in formatEvent(warning)
    assert keys.path in formatEvent(warning)


def test_no_file_at_start_is_not_a_warning(tmp_path: Path, events: ReloadEvents) -> None:
    """
    Running with only the extra key and no keys file at all is normal: no
    warning, and nothing read again.
    """
    extra, operator = named_key("api-key")
    clock = Clock()
    store = KeyStore([operator])
    reloader = KeysReloader(
        store,
        str(tmp_path / "keys.json"),
        [operator],
        clock,
        install_sighup=FakeSighup().install,
    )
    reloader.startService()
    try:
        clock.pump([DEFAULT_INTERVAL] * 5)
        assert store.find(extra) == operator
        assert len(store) == 1
        assert events.warnings == []
        assert events.reloads == 1
    finally:
        reloader.stopService()


def test_unreachable_path_warns_once(tmp_path: Path, events: ReloadEvents) -> None:
    """
    A path that cannot even be looked at (its directory is a file) keeps the
    keys and is warned about once, not at every poll.
    """
    _, operator = named_key("api-key")
    secret, alice = named_key("alice")
    (tmp_path / "file").write_text("")
    clock = Clock()
    store = KeyStore([operator, alice])
    path = str(tmp_path / "file" / "keys.json")
    reloader = KeysReloader(store, path, [operator], clock, install_sighup=FakeSighup().install)
    reloader.startService()
    try:
        clock.pump([DEFAULT_INTERVAL] * 5)
        assert store.find(secret) == alice
        [warning] = events.warnings
        assert warning["keys_file"] == path
    finally:
        reloader.stopService()


def test_extra_survives_every_reload(keys: Keys) -> None:
    """
    The extra key is accepted after a good reload, a broken file, a
    duplicate, a missing file and a SIGHUP.
    """
    keys.write("alice")
    keys.clock.advance(DEFAULT_INTERVAL)
    assert "api-key" in keys.accepted()
    Path(keys.path).write_text("not json")
    keys.clock.advance(DEFAULT_INTERVAL)
    assert "api-key" in keys.accepted()
    write_keys_file(keys.path, [keys.keys["bob"], keys.keys["bob"]])
    keys.clock.advance(DEFAULT_INTERVAL)
    assert "api-key" in keys.accepted()
    os.unlink(keys.path)
    keys.clock.advance(DEFAULT_INTERVAL)
    assert keys.accepted() == {"api-key"}
    keys.write("bob")
    keys.sighup.send()
    assert keys.accepted() == {"api-key", "bob"}


def test_sighup_reloads_at_once(keys: Keys, events: ReloadEvents) -> None:
    """
    SIGHUP reloads without waiting for the next poll.
    """
    assert len(keys.sighup.handlers) == 1
    keys.add("carol")
    keys.write("carol")
    keys.sighup.send()
    assert keys.accepted() == {"api-key", "carol"}
    assert events.reloads == 1
    keys.clock.advance(DEFAULT_INTERVAL)
    assert events.reloads == 1


def test_sighup_reloads_unchanged_file(keys: Keys, events: ReloadEvents) -> None:
    """
    SIGHUP reloads even when the file looks unchanged.
    """
    keys.sighup.send()
    assert events.reloads == 1


def test_sighup_after_stop_does_nothing(keys: Keys, events: ReloadEvents) -> None:
    """
    A SIGHUP handed to the reactor just before the service stopped does not
    reload once it has stopped.
    """
    [handler] = keys.sighup.handlers
    keys.reloader.stopService()
    keys.write("bob")
    handler()
    assert keys.accepted() == {"api-key", "alice", "bob"}
    assert events.events == []


def test_stop_leaves_nothing_behind(keys: Keys, events: ReloadEvents) -> None:
    """
    Stopping cancels the polling (no delayed calls left) and removes the
    SIGHUP handler; later changes are not picked up.
    """
    assert keys.clock.getDelayedCalls() != []
    keys.reloader.stopService()
    assert keys.clock.getDelayedCalls() == []
    assert keys.sighup.uninstalled == 1
    assert keys.sighup.handlers == []
    keys.write("bob")
    keys.clock.pump([DEFAULT_INTERVAL] * 3)
    assert keys.accepted() == {"api-key", "alice", "bob"}
    assert events.reloads == 0


def test_restart(keys: Keys, events: ReloadEvents) -> None:
    """
    A stopped reloader can be started again, and picks up what changed
    meanwhile.
    """
    keys.reloader.stopService()
    keys.write("bob")
    keys.reloader.startService()
    assert keys.accepted() == {"api-key", "bob"}
    assert len(keys.sighup.handlers) == 1
    keys.reloader.stopService()
    assert keys.clock.getDelayedCalls() == []
    assert keys.sighup.uninstalled == 2


def test_logs_never_show_keys(keys: Keys, events: ReloadEvents) -> None:
    """
    No reload event, good or bad, carries a key or a digest.
    """
    keys.add("carol")
    keys.write("carol")
    keys.sighup.send()
    write_keys_file(keys.path, [keys.keys["carol"], keys.keys["carol"]])
    keys.sighup.send()
    Path(keys.path).write_text("{" + keys.keys["carol"].digest.hex())
    keys.sighup.send()
    os.unlink(keys.path)
    keys.sighup.send()
    assert len(events.events) >= 8
    text = "\n".join(formatEvent(e) + repr(e) for e in events.events)
    for name, secret in keys.secrets.items():
        assert secret not in text, name
        assert keys.keys[name].digest.hex() not in text, name


def test_real_sighup_installer(tmp_path: Path, events: ReloadEvents) -> None:
    """
    The default installer reloads on a real SIGHUP through C{callFromThread}
    and puts the previous handler back when the service stops.
    """
    original = signal.getsignal(signal.SIGHUP)
    hups: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        hups.append(signum)

    handed: list[Callable[[], None]] = []

    def call_from_thread(f: Callable[[], None]) -> None:
        handed.append(f)
        f()

    _, operator = named_key("api-key")
    secret, alice = named_key("alice")
    path = str(tmp_path / "keys.json")
    store = KeyStore()
    reloader = KeysReloader(
        store, path, [operator], Clock(), install_sighup=sighup_installer(call_from_thread)
    )
    signal.signal(signal.SIGHUP, previous)
    try:
        reloader.startService()
        assert signal.getsignal(signal.SIGHUP) is not previous
        write_keys_file(path, [alice])
        os.kill(os.getpid(), signal.SIGHUP)
        assert len(handed) == 1
        assert store.find(secret) == alice
        assert events.reloads == 2
        reloader.stopService()
        assert signal.getsignal(signal.SIGHUP) is previous
        os.kill(os.getpid(), signal.SIGHUP)
        assert hups == [signal.SIGHUP]
        assert len(handed) == 1
    finally:
        if reloader.running:
            reloader.stopService()
        signal.signal(signal.SIGHUP, original)


def test_real_sighup_installer_leaves_later_handler(tmp_path: Path) -> None:
    """
    Removing the default handler does not undo a handler installed after
    it.
    """
    original = signal.getsignal(signal.SIGHUP)

    def later(signum: int, frame: FrameType | None) -> None:
        pass

    try:
        uninstall = sighup_installer(lambda f: f())(lambda: None)
        signal.signal(signal.SIGHUP, later)
        uninstall()
        assert signal.getsignal(signal.SIGHUP) is later
    finally:
        signal.signal(signal.SIGHUP, original)
