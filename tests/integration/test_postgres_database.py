"""
Tests against a real PostgreSQL (L{tests.fakes.engines}): the schema and its
migrations, usage and keys in the database, the C{ollamaproxy} command with
C{--database}, and the usage service across a database restart.
"""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from ollamaproxy.admission.keys import digest
from ollamaproxy.cli import main
from ollamaproxy.config import Config
from ollamaproxy.errors import ConfigError
from ollamaproxy.postgres.database import MIGRATIONS, Database, DatabaseError, SchemaTooNew
from ollamaproxy.postgres.keys import load_keys
from ollamaproxy.postgres.shared import SharedDatabase
from ollamaproxy.postgres.usage import PostgresUsage
from ollamaproxy.reactors import daemon_reactor
from ollamaproxy.record.usage import UsageStore
from ollamaproxy.record.usage_db import Row, SqliteUsage, summarise
from tests.fakes.engines import PostgresServer, free_port
from tests.fakes.worker import ManualWorker

T0 = 1795762800.0
NOW = datetime(2026, 11, 27, 7, 0, tzinfo=UTC)


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as connection:
        return connection.execute(sql).fetchall()


def cli(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err, environ=environ or {"HOME": "/nonexistent"},
                now=lambda: NOW)
    return code, out.getvalue(), err.getvalue()


def test_an_empty_database_is_migrated_once(postgres_url: str) -> None:
    """
    The first connection to an empty database creates the schema and
    records its version; later ones change nothing.
    """
    for _ in range(2):
        database = Database(postgres_url)
        database.run(lambda connection: None)
        database.close()
    assert query(postgres_url, "SELECT version FROM schema_version ORDER BY version") == [
        (version,) for version in range(1, len(MIGRATIONS) + 1)]
    tables = {name for (name,) in query(
        postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables == {"schema_version", "usage", "api_keys", "keys_version"}


def test_racing_migrations_all_succeed(postgres_url: str) -> None:
    """
    Several proxies and commands coming at once to an empty database all
    start: one migrates, the others wait for it and find it done.
    """
    count = 6
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def connect() -> None:
        database = Database(postgres_url)
        try:
            barrier.wait(timeout=30)
            database.run(lambda connection: None)
        except BaseException as e:
            errors.append(e)
        finally:
            database.close()

    threads = [threading.Thread(target=connect) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert query(postgres_url, "SELECT version FROM schema_version ORDER BY version") == [
        (version,) for version in range(1, len(MIGRATIONS) + 1)]


def test_a_newer_schema_is_refused(postgres_url: str, tmp_path: Path) -> None:
    """
    A database migrated by a newer ollamaproxy is refused with one line:
    by the code, by the command (exit 1), and by a starting proxy.
    """
    Database(postgres_url).run(lambda connection: None)
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(SchemaTooNew, match="version 99, newer than this ollamaproxy knows"):
        Database(postgres_url).run(lambda connection: None)
    code, out, err = cli("usage", "--database", postgres_url)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "upgrade ollamaproxy" in err
    config = Config(database=postgres_url, api_key="x" * 20,
                    keys_file=str(tmp_path / "keys.json"))
    with pytest.raises(ConfigError, match=r"^--database: .*upgrade ollamaproxy$"):
        SharedDatabase.at_start(config, daemon_reactor(Clock()), NOW, lambda text: None)


def test_usage_is_summed_per_minute_key_and_model(postgres_url: str) -> None:
    """
    Writes add to a minute's row; summing works per key, per model, since
    a time; C{tokens_by_key} counts prompt and completion tokens.
    """
    usage = PostgresUsage(Database(postgres_url))
    usage.write([(T0 + 1, "bob", "llama3", 1, 10, 5, 0), (T0 + 2, "bob", "llama3", 1, 10, 5, 0)])
    usage.write([(T0 + 3, "bob", "llama3", 1, 1, 1, 0), (T0 + 61, "alice", "qwen", 1, 100, 1, 0)])
    assert query(postgres_url, "SELECT count(*) FROM usage") == [(2,)]
    assert usage.summarise(None, "key") == [Row("alice", 1, 100, 1), Row("bob", 3, 21, 11)]
    assert usage.summarise(None, "model") == [Row("qwen", 1, 100, 1), Row("llama3", 3, 21, 11)]
    assert usage.summarise(T0 + 60, "key") == [Row("alice", 1, 100, 1)]
    assert usage.tokens_by_key(T0) == {"alice": 101, "bob": 32}
    usage.close()


def test_refused_requests_are_counted_apart(postgres_url: str) -> None:
    """
    Refused requests add to their own column, not to the requests; summing
    can stop before a time.
    """
    usage = PostgresUsage(Database(postgres_url))
    usage.write([(T0, "bob", "", 0, 0, 0, 1), (T0 + 1, "bob", "", 1, 0, 0, 0),
                 (T0 + 2, "bob", "", 0, 0, 0, 1), (T0 + 60, "bob", "", 0, 0, 0, 1)])
    assert usage.summarise(None, "key") == [Row("bob", 1, 0, 0, refused=3)]
    assert usage.summarise(None, "model", until=T0 + 60) == [Row("", 1, 0, 0, refused=2)]
    usage.close()


def test_usage_is_summed_per_user(postgres_url: str) -> None:
    """
    Each user behind a key has its own minute rows, summed per user
    behind each key, a row written without a user the anonymous one's.
    """
    usage = PostgresUsage(Database(postgres_url))
    usage.write([(T0, "webui", "llama3", 1, 10, 5, 0, "alice"),
                 (T0 + 1, "webui", "llama3", 1, 10, 5, 0, "alice"),
                 (T0 + 2, "webui", "llama3", 1, 1, 1, 0, "bob"),
                 (T0 + 3, "webui", "llama3", 1, 1, 0, 0)])
    assert query(postgres_url, "SELECT count(*) FROM usage") == [(3,)]
    assert usage.summarise(None, "user") == [
        Row("webui", 2, 20, 10, 0, "alice"), Row("webui", 1, 1, 1, 0, "bob"),
        Row("webui", 1, 1, 0, 0, "")]
    assert usage.summarise(None, "key") == [Row("webui", 4, 22, 11)]
    usage.close()


def test_usage_from_before_users_is_kept_as_the_anonymous_users(postgres_url: str) -> None:
    """
    A database at schema 2 (before users) is migrated with its rows kept,
    each the anonymous user's of its key; its minute rows are then one per
    user.
    """
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY,"
            " applied timestamptz NOT NULL DEFAULT now())")
        for version in (1, 2):
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        connection.execute("INSERT INTO usage (minute, key, model, requests, prompt_tokens, "
                           "completion_tokens) VALUES (to_timestamp(%s), 'bob', 'llama3', 1, "
                           "2, 3)", (T0,))
    usage = PostgresUsage(Database(postgres_url))
    usage.write([(T0, "bob", "llama3", 1, 10, 10, 0, "alice"), (T0, "bob", "llama3", 1, 1, 1, 0)])
    assert usage.summarise(None, "user") == [Row("bob", 1, 10, 10, 0, "alice"),
                                             Row("bob", 2, 3, 4, 0, "")]
    usage.close()


def test_keys_show_and_list_read_the_use_in_the_database(
    postgres_url: str, tmp_path: Path
) -> None:
    """
    With C{--database}, C{keys show} and C{keys list} read the keys' use
    this day and month from the usage of every proxy in the database,
    never from a usage file; and C{usage --until} and C{--json} read it
    there too.
    """
    code, _, err = cli("keys", "add", "bob", "--tokens-per-day", "100", "--database",
                       postgres_url)
    assert (code, err) == (0, "")
    usage = PostgresUsage(Database(postgres_url))
    usage.write([(T0 - 60, "bob", "llama3", 1, 10, 5, 0), (T0 - 86400, "bob", "llama3", 1, 1, 1, 0),
                 (T0 - 30, "bob", "", 0, 0, 0, 1)])
    usage.close()
    decoy = tmp_path / "usage.sqlite3"
    SqliteUsage(str(decoy)).write([(T0 - 60, "bob", "llama3", 1, 1000, 1000, 0)])
    code, out, err = cli("keys", "show", "bob", "--json", "--database", postgres_url,
                         "--usage-file", str(decoy))
    assert (code, err) == (0, "")
    shown = json.loads(out)
    assert (shown["used_today"], shown["used_this_month"]) == (15, 17)
    code, out, _ = cli("keys", "list", "--database", postgres_url)
    assert out.splitlines()[1].split()[8:10] == ["15/100", "17"]
    code, out, _ = cli("usage", "--json", "--until", "2026-11-27", "--database", postgres_url)
    assert json.loads(out)["rows"] == [
        {"key": "bob", "requests": 1, "refused": 0, "prompt_tokens": 1,
         "completion_tokens": 1, "total_tokens": 2}]


def test_the_command_sums_usage_in_the_database(postgres_url: str) -> None:
    """
    C{ollamaproxy usage --database} (or C{$OLLAMAPROXY_DATABASE}) shows the
    database's sums, the file's never.
    """
    usage = PostgresUsage(Database(postgres_url))
    usage.write([(T0, "bob", "llama3", 2, 10, 5, 0)])
    usage.close()
    code, out, _ = cli("usage", "--database", postgres_url)
    assert code == 0
    assert out.splitlines()[1].split() == ["bob", "2", "0", "10", "5", "15"]
    code, out, _ = cli("usage", "--by", "model",
                       environ={"OLLAMAPROXY_DATABASE": postgres_url, "HOME": "/nonexistent"})
    assert code == 0 and out.splitlines()[1].split()[0] == "llama3"
    code, out, _ = cli("usage", "--database", postgres_url, "--since", "2030-01-01")
    assert code == 0 and out.startswith("No usage recorded in database postgresql://")


def test_keys_commands_work_on_the_database(postgres_url: str, tmp_path: Path) -> None:
    """
    C{keys add|list|update|rotate|revoke --database} keep each key's entry (its
    hash, never the key) in the database, bump the change marker at every
    change, and never touch the keys file.
    """
    keys_file = tmp_path / "keys.json"
    code, out, err = cli("keys", "add", "bob", "--rpm", "5", "--database", postgres_url,
                         "--keys-file", str(keys_file))
    assert code == 0, err
    secret = out.splitlines()[-1]
    assert "Added key 'bob' to database postgresql://" in out
    assert "within 5 seconds" in out
    assert not keys_file.exists()
    [(entry,)] = query(postgres_url, "SELECT entry FROM api_keys")
    assert entry["name"] == "bob" and entry["rpm"] == 5
    assert entry["hash"] == "sha256:" + digest(secret).hex()
    assert secret not in repr(query(postgres_url, "SELECT * FROM api_keys"))
    code, out, err = cli("keys", "add", "bob", "--database", postgres_url)
    assert code == 1 and "already exists in database" in err
    code, out, _ = cli("keys", "list", "--database", postgres_url)
    assert code == 0 and out.splitlines()[1].split()[:4] == ["bob", "inference", "all", "5"]
    code, out, err = cli("keys", "update", "bob", "--tokens-per-day", "1000",
                         "--database", postgres_url)
    assert code == 0 and "Updated key 'bob' in database postgresql://" in out, err
    [(entry,)] = query(postgres_url, "SELECT entry FROM api_keys")
    assert entry["tokens_per_day"] == 1000 and entry["hash"] == "sha256:" + digest(secret).hex()
    code, out, _ = cli("keys", "rotate", "bob", "--database", postgres_url)
    rotated = out.splitlines()[-1]
    database = Database(postgres_url)
    read = database.run(load_keys)
    assert read is not None
    [key] = read[1]
    assert key.digest == digest(rotated) and key.rpm == 5
    version = read[0]
    code, out, _ = cli("keys", "revoke", "bob",
                       environ={"OLLAMAPROXY_DATABASE": postgres_url, "HOME": "/nonexistent"})
    assert code == 0 and "Revoked key 'bob' in database" in out
    assert database.run(lambda connection: load_keys(connection, version)) == (version + 1, [])
    database.close()
    code, _, err = cli("keys", "revoke", "bob", "--database", postgres_url)
    assert code == 1 and "no key named 'bob' in database" in err


def test_a_bad_database_url_is_one_line_without_its_password() -> None:
    """
    A URL that is not PostgreSQL's is a usage error (exit 2) in one line,
    its password hidden.
    """
    code, out, err = cli("keys", "list", "--database", "mysql://me:hunter2@db/proxy")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "not a PostgreSQL URL" in err and "hunter2" not in err


def test_an_unreachable_database_is_one_line() -> None:
    """
    The command says in one line (exit 1) that the database cannot be
    reached, never the password.
    """
    url = f"postgresql://me:hunter2@127.0.0.1:{free_port()}/proxy"
    code, out, err = cli("keys", "list", "--database", url)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "hunter2" not in err
    assert err.startswith("ollamaproxy: database postgresql://me:***@127.0.0.1")


def test_start_without_the_database_needs_other_keys(tmp_path: Path) -> None:
    """
    A proxy starting while the database is down starts with the other keys
    (--api-key or the keys file); with none, it stops with one line.
    """
    url = f"postgresql://me:hunter2@127.0.0.1:{free_port()}/proxy"
    config = Config(database=url, keys_file=str(tmp_path / "keys.json"))
    with pytest.raises(ConfigError, match="no key to start with") as raised:
        SharedDatabase.at_start(config, daemon_reactor(Clock()), NOW, lambda text: None)
    assert "hunter2" not in str(raised.value) and "\n" not in str(raised.value)
    config = Config(database=url, api_key="olpk_operator-operator-operator",
                    keys_file=str(tmp_path / "keys.json"))
    with capturedLogs() as events:
        shared = SharedDatabase.at_start(config, daemon_reactor(Clock()), NOW, lambda text: None)
    assert shared.store.find("olpk_operator-operator-operator") is not None
    lines = [formatEvent(e) for e in events]
    assert [line for line in lines if "hunter2" in line] == []
    assert any(line.startswith("Cannot read keys from postgresql://me:***@127.0.0.1")
               for line in lines), lines


def test_start_says_the_database_answered(postgres_url: str, tmp_path: Path) -> None:
    """
    At start, a line names the database in use, without its password, and
    says that it answered, with how many keys it holds.
    """
    database_url = postgres_url.replace("postgres@", "postgres:hunter2@")
    assert "hunter2" in database_url  # the server trusts loopback: any password passes
    config = Config(database=database_url, api_key="olpk_operator-operator-operator",
                    keys_file=str(tmp_path / "keys.json"))
    with capturedLogs() as events:
        SharedDatabase.at_start(config, daemon_reactor(Clock()), NOW, lambda text: None)
    lines = [formatEvent(e) for e in events]
    assert [line for line in lines if "hunter2" in line] == []
    name = postgres_url.replace("postgres@", "postgres:***@")
    assert f"Keys and usage are kept in PostgreSQL at {name}: it answered, with 0 key(s)" in lines




def test_usage_survives_a_database_restart(own_postgres: PostgresServer, tmp_path: Path) -> None:
    """
    With PostgreSQL stopped, usage stays in memory; once it is back, the
    next flush reconnects and writes it.  Stopped again at shutdown, the
    pending usage goes to the spill file and the next start writes it.
    """
    url = own_postgres.create_database("proxy")
    clock = Clock()
    clock.advance(T0)
    spill = SqliteUsage(str(tmp_path / "usage.sqlite3"))
    store = UsageStore(PostgresUsage(Database(url)), clock, 5.0, worker=ManualWorker(), spill=spill)
    store.startService()
    assert store.ready
    own_postgres.stop()
    store.record("bob", "llama3", 1, 1)
    clock.advance(5)
    assert not store.ready and store.pending == 1
    own_postgres.start()
    clock.advance(5)
    assert store.ready and store.pending == 0
    assert query(url, "SELECT key, requests FROM usage") == [("bob", 1)]
    own_postgres.stop()
    store.record("bob", "llama3", 1, 1)
    store.record("alice", "llama3", 1, 1)
    assert store.stopService().called
    assert {row.name for row in summarise(spill.path, None, "key")} == {"alice", "bob"}
    own_postgres.start()
    again = UsageStore(PostgresUsage(Database(url)), clock, 5.0, worker=ManualWorker(), spill=spill)
    again.startService()
    assert sorted(query(url, "SELECT key, requests FROM usage")) == [("alice", 1), ("bob", 2)]
    assert summarise(spill.path, None, "key") == []
    again.stopService()


def test_errors_never_show_the_password(own_postgres: PostgresServer) -> None:
    """
    A failure's message names the database without its password.
    """
    url = own_postgres.url("proxy").replace("postgres@", "postgres:hunter2@")
    own_postgres.stop()
    database = Database(url)
    with pytest.raises(DatabaseError) as raised:
        database.run(lambda connection: None)
    assert "hunter2" not in str(raised.value) and "\n" not in str(raised.value)
    assert database.name == url.replace("hunter2", "***")
