"""
Tests for what C{--database} adds to the proxy's service (L{ollamaproxy.tap}
with L{ollamaproxy.postgres.shared}), built on a real PostgreSQL and a
L{MemoryReactorClock}, never started.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from ollamaproxy.admission.key_sources import DatabaseKeysPoller
from ollamaproxy.admission.reload import KeysReloader
from ollamaproxy.cli import main
from ollamaproxy.config import Config
from ollamaproxy.postgres.usage import PostgresUsage
from ollamaproxy.reactors import daemon_reactor
from ollamaproxy.record.usage import UsageStore
from ollamaproxy.tap import ProxyOptions, build_service

LOCAL = "tcp:0:interface=127.0.0.1"


def config(tmp_path: Path, url: str, **changes: object) -> Config:
    return Config(listen=(LOCAL,), database=url, keys_file=str(tmp_path / "keys.json"),
                  usage_file=str(tmp_path / "usage.sqlite3"), **changes)  # type: ignore[arg-type]


def test_database_service_structure(tmp_path: Path, postgres_url: str) -> None:
    """
    With --database, usage goes to PostgreSQL (the usage file is its spill
    file), and a poller after the keys file's reloader keeps the database's
    keys; with a key in the database, no first key is made.
    """
    out = io.StringIO()
    assert main(["keys", "add", "bob", "--database", postgres_url], stdout=out,
                stderr=io.StringIO(), environ={}) == 0
    announced: list[str] = []
    service = build_service(config(tmp_path, postgres_url), daemon_reactor(MemoryReactorClock()),
                            announced.append)
    kinds = [type(child) for child in service]
    assert kinds.index(DatabaseKeysPoller) == kinds.index(KeysReloader) + 1
    [store] = [child for child in service if isinstance(child, UsageStore)]
    assert isinstance(store.database, PostgresUsage)
    [poller] = [child for child in service if isinstance(child, DatabaseKeysPoller)]
    assert poller.ready
    assert announced == [] and not (tmp_path / "keys.json").exists()


def test_an_empty_database_and_no_key_makes_the_first_key(
    tmp_path: Path, postgres_url: str
) -> None:
    """
    With an empty database and no other key, the first start makes a key
    in the keys file, as without --database.
    """
    announced: list[str] = []
    build_service(config(tmp_path, postgres_url), daemon_reactor(MemoryReactorClock()),
                  announced.append)
    assert len(announced) == 1 and (tmp_path / "keys.json").exists()


def test_a_name_in_the_file_and_the_database_stops_the_start(
    tmp_path: Path, postgres_url: str
) -> None:
    """
    A key name in both the keys file and the database stops the start with
    one line naming both.
    """
    for where in (["--keys-file", str(tmp_path / "keys.json")], ["--database", postgres_url]):
        assert main(["keys", "add", "bob", *where], stdout=io.StringIO(),
                    stderr=io.StringIO(), environ={}) == 0
    with pytest.raises(ValueError, match="'bob' is in both the keys file and the database"):
        build_service(config(tmp_path, postgres_url), daemon_reactor(MemoryReactorClock()),
                      lambda text: None)


def test_database_from_the_environment() -> None:
    """
    C{OLLAMAPROXY_DATABASE} gives the URL when the option does not; both
    C{postgresql://} and C{postgres://} are taken; without either, none.
    """
    for url in ("postgresql://proxy@db/usage", "postgres://proxy:pw@db:5433/usage"):
        options = ProxyOptions(environ={"OLLAMAPROXY_DATABASE": url})
        options.parseOptions([])
        assert options.config.database == url
    options = ProxyOptions(environ={"OLLAMAPROXY_DATABASE": "postgres://env/db"})
    options.parseOptions(["--database", "postgresql://option/db"])
    assert options.config.database == "postgresql://option/db"
    options = ProxyOptions(environ={})
    options.parseOptions([])
    assert options.config.database is None
