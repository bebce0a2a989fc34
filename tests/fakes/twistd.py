# -*- test-case-name: tests.integration.test_twistd -*-
"""
Real sockets and real processes for the integration tests, all on
127.0.0.1: a fake Ollama on a real port, and the proxy as a real C{twistd}
process (the fixtures that hand them out are in
C{tests/integration/conftest.py}).

Every wait is bounded, and every port and process a test opens is closed or
killed when it ends.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.server import Site

from tests.fakes.client import HELD_CHAT, Arrivals, agent, body, read, request, wait_for
from tests.fakes.ollama import FakeOllama, HeldStream

REPO = Path(__file__).resolve().parents[2]
TEST_KEY = "olpk_integrationtestkeyintegrationtestkey"
START_TIMEOUT = 30.0
TWISTD = str(Path(sys.executable).parent / "twistd")


@dataclass
class Upstream:
    """
    A fake Ollama listening on a real port.
    """

    fake: FakeOllama
    port: IListeningPort
    connections: WrappingFactory | None = None
    """
    The server's open connections, kept by L{serve} so that L{stop} can cut
    them; L{None} once stopped, or if nobody keeps them.
    """

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"  # type: ignore[attr-defined]


class _TwistdProtocol(ProcessProtocol):
    """
    Collects a twistd process's output and tells when it listens and ends.
    """

    def __init__(self) -> None:
        self.output = bytearray()
        self.listening: Deferred[int] = Deferred()
        self.probed: Deferred[None] = Deferred()
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._received(data)

    def errReceived(self, data: bytes) -> None:
        self._received(data)

    def _received(self, data: bytes) -> None:
        self.output += data
        if not self.listening.called:
            found = re.search(rb"starting on (\d+)", self.output)
            if found:
                self.listening.callback(int(found.group(1)))
        if not self.probed.called and b"Relaying requests to Ollama at " in self.output:
            # The start-up request for Ollama's version has had its answer,
            # so it cannot be taken for a request a test made.
            self.probed.callback(None)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        assert isinstance(value, (ProcessDone, ProcessTerminated))
        if not self.listening.called:
            self.listening.errback(
                RuntimeError("twistd ended before listening:\n" + self.output.decode())
            )
        if not self.probed.called:
            self.probed.callback(None)
        self.ended.callback(value.exitCode if value.signal is None else -value.signal)


@dataclass
class Twistd:
    """
    A running C{twistd} process.
    """

    protocol: _TwistdProtocol
    pid: int
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return self.protocol.output.decode("utf-8", "replace")

    def rss_kb(self) -> int:
        """
        The process's resident memory now, in kB.
        """
        status = Path(f"/proc/{self.pid}/status").read_text()
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert found is not None
        return int(found.group(1))

    async def terminate(self, reactor: Any) -> bool:
        """
        Send SIGTERM, wait (bounded) for the process to exit, and tell
        whether it shut down cleanly: twistd logs its shutdown and then ends
        by the same signal, as daemons do (systemd counts that as success).
        """
        if not self.protocol.ended.called:
            os.kill(self.pid, signal.SIGTERM)
        code = await self.protocol.ended.addTimeout(START_TIMEOUT, reactor)
        return (
            code in (0, -signal.SIGTERM)
            and "Server Shut Down." in self.output
            and "Traceback" not in self.output
        )


# Runs a command with the limit on open files given as its first argument.
_WITH_OPEN_FILES = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])"
)


@dataclass
class TwistdLauncher:
    """
    Starts twistd processes and kills whatever is left of them at the end.
    """

    reactor: Any
    directory: Path
    started: list[Twistd] = field(default_factory=list)

    async def start(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        open_files: int | None = None,
    ) -> Twistd:
        """
        Run C{twistd ARGS} (the script installed beside this Python) in the
        test's directory and wait until it listens and has logged whether
        Ollama answered.  Listen on C{tcp:0:interface=127.0.0.1} and the port is
        read from the log.

        @param open_files: If given, the process's soft and hard limits on
            open files.
        """
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO),
            "HOME": str(self.directory),
        }
        environ.update(env or {})
        protocol = _TwistdProtocol()
        command = [TWISTD, *args]
        if open_files is not None:
            command = [sys.executable, "-c", _WITH_OPEN_FILES, str(open_files), *command]
        process = self.reactor.spawnProcess(
            protocol,
            command[0],
            command,
            env=environ,
            path=str(self.directory),
        )
        port = await protocol.listening.addTimeout(START_TIMEOUT, self.reactor)
        await protocol.probed.addTimeout(START_TIMEOUT, self.reactor)
        twistd = Twistd(protocol, process.pid, port)
        self.started.append(twistd)
        return twistd

    async def stop_all(self) -> None:
        for twistd in self.started:
            if not twistd.protocol.ended.called:
                try:
                    await twistd.terminate(self.reactor)
                except Exception:
                    os.kill(twistd.pid, signal.SIGKILL)
                    await twistd.protocol.ended


def proxy_args(upstream_url: str, *extra: str) -> list[str]:
    """
    twistd arguments for the proxy on a free loopback port, with the test key.
    """
    return [
        "-n",
        "--pidfile=",
        "ollamaproxy",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--upstream",
        upstream_url,
        "--api-key",
        TEST_KEY,
        "--keys-file",
        "keys.json",
        *extra,
    ]


def serve(reactor: Any, fake: FakeOllama, port: int = 0) -> Upstream:
    """
    Serve C{fake} on 127.0.0.1 (on C{port}, or one of the system's
    choosing), keeping its connections so that L{stop} can cut them.
    """
    site = Site(fake)
    site.noisy = False
    connections = WrappingFactory(site)
    listening = reactor.listenTCP(port, connections, interface="127.0.0.1")
    return Upstream(fake, listening, connections)


async def stop(upstream: Upstream) -> None:
    """
    Stop a fake Ollama as a stopped server stops: no new connections, and
    the open ones (the proxy's pooled ones) cut.
    """
    connections, upstream.connections = upstream.connections, None
    assert connections is not None, "not served by serve(), or stopped already"
    await maybeDeferred(upstream.port.stopListening)
    for protocol in list(connections.protocols):
        protocol.transport.abortConnection()


async def held_stream(
    reactor: Any, upstream: Upstream, proxy: Twistd
) -> tuple[HeldStream, Arrivals]:
    """
    A chat whose answer the test writes by hand, read by a real client
    through the proxy.
    """
    sent = Deferred.fromCoroutine(
        request(agent(reactor), b"POST", proxy.url + "/api/chat", {"X-API-Key": TEST_KEY},
                body(HELD_CHAT))
    )
    await wait_for(reactor, lambda: bool(upstream.fake.held), "the request to reach Ollama")
    response = await sent
    return upstream.fake.held[-1], await read(response)
