# -*- test-case-name: tests.integration.test_contrib -*-
"""
The TLS front ends of C{contrib/} (nginx, Caddy) as real processes on
127.0.0.1, and a client that reaches them from another loopback address.

The configurations are run as shipped, with only their site-specific
values (name, certificate, ports) replaced: L{render} fails if one of them
is no longer in the file, so a test cannot go on running a configuration
that has drifted from the one it was written for.  What a real server's
main configuration would add (its pid file, logs, temporary directories)
is given by L{nginx_main} and L{caddy_globals}, around the shipped file.

The client connects from C{127.0.0.2} (any 127/8 address is the loopback
on Linux), so that the client's address differs from the front end's
(C{127.0.0.1}) and the proxy's access log shows which one it took.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tests.fakes.client import sleep

#: The client's own loopback address, not the front end's.
CLIENT_ADDRESS = "127.0.0.2"
START_LIMIT = 20.0
STOP_LIMIT = 10.0
#: The commands, where Debian puts them (nginx in /usr/sbin, which an
#: ordinary user's PATH may lack), and what to run to have them.
INSTALL = "run .ci/system-packages (apt-get install nginx-light caddy systemd)"


def tool(name: str) -> str:
    """
    The path of a command the tests need.

    @raise AssertionError: When it is missing, saying what to install: a
        missing tool fails the test, it never skips it.
    """
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert path is not None, f"{name} is not installed: {INSTALL}"
    return path


def render(template: str, replacements: Mapping[str, str]) -> str:
    """
    C{template} with each key of C{replacements} replaced by its value.

    @raise AssertionError: If a key is not in C{template}.
    """
    for old, new in replacements.items():
        assert old in template, f"{old!r} is no longer in the configuration"
        template = template.replace(old, new)
    return template


def nginx_main(directory: Path, site: Path) -> str:
    """
    A main C{nginx.conf} that includes C{site} (a file such as
    C{contrib/nginx.conf}) and keeps everything else nginx writes in
    C{directory}: in the foreground, one worker, the access log in
    C{directory/access.log}.  As root, the worker runs as root too, since
    it must write to the test's private directory.
    """
    user = f"user {pwd.getpwuid(os.getuid()).pw_name};\n" if os.getuid() == 0 else ""
    temporary = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {directory / 'nginx.pid'};\n"
        "error_log stderr;\nevents { worker_connections 64; }\n"
        f"http {{\n    access_log {directory / 'access.log'};\n{temporary}\n"
        f"    include {site};\n}}\n"
    )


def caddy_globals(directory: Path) -> str:
    """
    Caddy's global options for a test: no admin endpoint, no redirecting
    listener on port 80, storage in C{directory}, every listener on
    127.0.0.1.  Put before a Caddyfile that has no global block.
    """
    return (
        "{\n\tadmin off\n\tauto_https disable_redirects\n\tdefault_bind 127.0.0.1\n"
        f"\tstorage file_system {directory / 'storage'}\n}}\n\n"
    )


class _ServerProtocol(ProcessProtocol):
    """
    Collects a server's output and tells when it ends.
    """

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        assert isinstance(reason.value, (ProcessDone, ProcessTerminated))
        self.ended.callback(None)


@dataclass
class Server:
    """
    A running front end.
    """

    protocol: _ServerProtocol
    process: Any
    port: int

    @property
    def output(self) -> str:
        return self.protocol.output.decode("utf-8", "replace")


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class ServerLauncher:
    """
    Starts front ends and kills whatever is left of them at the end.
    """

    reactor: Any
    directory: Path
    started: list[Server] = field(default_factory=list)

    async def start(self, command: list[str], port: int) -> Server:
        """
        Run C{command} in the test's directory, with C{HOME} and Caddy's
        XDG directories there too, and wait (bounded) until it accepts
        connections on C{port} of 127.0.0.1.
        """
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.directory),
            "XDG_DATA_HOME": str(self.directory / "data"),
            "XDG_CONFIG_HOME": str(self.directory / "config"),
        }
        protocol = _ServerProtocol()
        process = self.reactor.spawnProcess(
            protocol, command[0], command, env=environ, path=str(self.directory)
        )
        server = Server(protocol, process, port)
        self.started.append(server)
        deadline = time.monotonic() + START_LIMIT
        while not _accepts(port):
            if protocol.ended.called or time.monotonic() > deadline:
                raise AssertionError(f"{command[0]} did not listen on {port}:\n{server.output}")
            await sleep(self.reactor, 0.05)
        return server

    async def stop_all(self) -> None:
        for server in self.started:
            if not server.protocol.ended.called:
                server.process.signalProcess("TERM")
                try:
                    await server.protocol.ended.addTimeout(STOP_LIMIT, self.reactor)
                except Exception:
                    server.process.signalProcess("KILL")
                    await server.protocol.ended


@implementer(IAgentEndpointFactory)
@dataclass(frozen=True)
class _FromClientAddress:
    """
    TLS connections to 127.0.0.1 from L{CLIENT_ADDRESS}, trusting one
    certificate, checked against the URL's host name.
    """

    reactor: Any
    certificate: Certificate

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        tcp = TCP4ClientEndpoint(
            self.reactor, "127.0.0.1", uri.port, timeout=10, bindAddress=(CLIENT_ADDRESS, 0)
        )
        tls = optionsForClientTLS(uri.host.decode("ascii"), trustRoot=self.certificate)
        return wrapClientTLS(tls, tcp)


def agent_from_client_address(reactor: Any, cert_path: Path) -> Agent:
    """
    An agent that reaches C{https://localhost:PORT} on 127.0.0.1 from
    L{CLIENT_ADDRESS}, trusting only the certificate at C{cert_path}, and
    keeps no connection after its response.
    """
    certificate = Certificate.loadPEM(cert_path.read_bytes())
    agent: Agent = Agent.usingEndpointFactory(
        reactor,
        _FromClientAddress(reactor, certificate),
        pool=HTTPConnectionPool(reactor, persistent=False),
    )
    return agent
