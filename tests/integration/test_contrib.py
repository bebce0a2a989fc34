"""
The deployment files of C{contrib/}, checked by the programs that read
them: the systemd units by C{systemd-analyze verify}, the nginx and Caddy
configurations by running Debian's nginx and Caddy with them in front of a
real proxy and streaming a chat through each, line by line, over TLS.

The tools come from C{.ci/system-packages}; a missing one fails the test
saying what to install.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.fakes.client import (
    HELD_CHAT,
    WAIT_LIMIT,
    agent,
    body,
    read,
    request,
    wait_for,
    write_line_by_line,
)
from tests.fakes.engines import free_port
from tests.fakes.fronts import (
    CLIENT_ADDRESS,
    ServerLauncher,
    agent_from_client_address,
    caddy_globals,
    nginx_main,
    render,
    tool,
)
from tests.fakes.tls import make_self_signed
from tests.fakes.twistd import REPO, TEST_KEY, TwistdLauncher, Upstream, proxy_args

CONTRIB = REPO / "contrib"
UNITS = ["ollamaproxy.service", "ollamaproxy@.service"]
#: Where the units' install steps put the project's pages.
DOCS_INSTALLED = "file:/usr/share/doc/ollamaproxy/"
SYSTEMD_UNITS = Path("/usr/lib/systemd/system")
VERIFY_TIMEOUT = 60
#: The site-specific values of the front ends' files, as shipped.
NAME = "ollama.example.com"
CERTIFICATE = "/etc/ssl/certs/ollama.example.com.pem"
PRIVATE_KEY = "/etc/ssl/private/ollama.example.com.key"
PROXY_ADDRESS = "127.0.0.1:5000"
# Enough connections that the kernel, spreading them by address and port,
# gives each of two instances some (all to one: 1 in 2**23).
CONNECTIONS = 24


def unit_settings(unit: str, name: str) -> list[str]:
    """
    The values of every C{name=} line of a unit file, continued lines
    joined.
    """
    text = (CONTRIB / unit).read_text().replace("\\\n", " ")
    return re.findall(rf"^{name}=(.*)$", text, re.M)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    """
    C{systemd-analyze verify} finds nothing to say about the unit (an
    instance of it, for the template): no unknown or misspelt setting, no
    bad value, its program there.  It runs on a temporary root that holds
    the system's own units, the unit, and an executable at the unit's
    C{ExecStart} path, so it needs no running systemd and nothing
    installed.
    """
    analyze = tool("systemd-analyze")
    root = tmp_path / "root"
    shutil.copytree(SYSTEMD_UNITS, root / SYSTEMD_UNITS.relative_to("/"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(CONTRIB / unit, root / "etc/systemd/system" / unit)
    [exec_start] = unit_settings(unit, "ExecStart")
    program = root / exec_start.split()[0].lstrip("/")
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)

    name = unit.replace("@.", "@01.")
    verified = subprocess.run(
        [analyze, f"--root={root}", "verify", f"/etc/systemd/system/{name}"],
        capture_output=True, text=True, timeout=VERIFY_TIMEOUT, check=False,
    )
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_documentation_is_installed_with_it(unit: str) -> None:
    """
    Each C{Documentation=} of the unit is one of the project's pages,
    where the unit's install steps copy them, and the page exists: the
    project has no web page to link to.
    """
    documentation = unit_settings(unit, "Documentation")
    assert documentation
    for uri in documentation:
        assert uri.startswith(DOCS_INSTALLED), uri
        assert (REPO / uri.removeprefix(DOCS_INSTALLED)).is_file(), uri
    assert "cp -r README.md docs /usr/share/doc/ollamaproxy/" in (
        (CONTRIB / "ollamaproxy.service").read_text()
    )


def test_template_unit_instances_differ() -> None:
    """
    The template's instances share one C{reuseport:} port and the state
    directory, and each has its own log directory and metrics port, made
    from the instance's name.
    """
    [exec_start] = unit_settings("ollamaproxy@.service", "ExecStart")
    arguments = exec_start.split()
    assert arguments[arguments.index("--listen") + 1].startswith("reuseport:5000:")
    assert arguments[arguments.index("--log-dir") + 1] == "/var/log/ollamaproxy/%i"
    assert arguments[arguments.index("--metrics-listen") + 1] == "tcp:91%i:interface=127.0.0.1"
    assert unit_settings("ollamaproxy@.service", "LogsDirectory") == ["ollamaproxy/%i"]


def _logged(log: Path, line: str) -> bool:
    return line in log.read_text()


def instance_arguments(instance: str, directory: Path, port: int, metrics: int) -> list[str]:
    """
    The template unit's C{ExecStart} for C{instance}, as systemd would run
    it (C{%i} expanded), but with its directories in C{directory}, its
    port C{port} and its metrics port C{metrics}, and without the program
    (the launcher runs twistd).
    """
    [exec_start] = unit_settings("ollamaproxy@.service", "ExecStart")
    expanded = render(exec_start, {
        "/var/lib/ollamaproxy/": f"{directory}/state/",
        "/var/log/ollamaproxy/": f"{directory}/log/",
        "reuseport:5000:": f"reuseport:{port}:",
        "tcp:91%i:": f"tcp:{metrics}:",
    }).replace("%i", instance)
    program, *arguments = shlex.split(expanded)
    assert program == "/opt/ollamaproxy/bin/twistd"
    return arguments


@pytest_twisted.ensureDeferred
async def test_template_unit_instances_share_a_port(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    Two instances run with the template's command line, as systemd runs
    instances C{01} and C{02} (with the settings of the environment file:
    Ollama's address and a key), share one port, each serving some of
    the requests sent to it and logging them in its own directory, and
    each serves its own metrics.
    """
    port = free_port()
    metrics = {"01": free_port(), "02": free_port()}
    (tmp_path / "state").mkdir()
    environment = {"OLLAMA_HOST": upstream.url, "OLLAMAPROXY_API_KEY": TEST_KEY}
    for instance, metrics_port in metrics.items():
        (tmp_path / "log" / instance).mkdir(parents=True)
        await twistd.start(instance_arguments(instance, tmp_path, port, metrics_port),
                           env=environment)
    for _ in range(CONNECTIONS):
        response = await request(agent(reactor), b"GET", f"http://127.0.0.1:{port}/api/version",
                                 {"Authorization": f"Bearer {TEST_KEY}"})
        await (await read(response)).done
        assert response.code == 200
    for instance, metrics_port in metrics.items():
        log = tmp_path / "log" / instance / "ollamaproxy.log"
        await wait_for(reactor, partial(_logged, log, "GET /api/version 200"),
                       f"instance {instance}'s access lines")
        response = await request(agent(reactor), b"GET",
                                 f"http://127.0.0.1:{metrics_port}/metrics")
        scraped = await read(response)
        await scraped.done
        assert response.code == 200 and b"ollamaproxy_requests_total" in scraped.body


@pytest_twisted.async_yield_fixture
async def fronts(reactor: Any, tmp_path: Path) -> AsyncIterator[ServerLauncher]:
    """
    Start nginx or Caddy; they are all stopped when the test ends.
    """
    launcher = ServerLauncher(reactor, tmp_path)
    yield launcher
    await launcher.stop_all()


async def start_nginx(fronts: ServerLauncher, proxy_port: int, directory: Path) -> int:
    """
    Debian's nginx with C{contrib/nginx.conf} as its site, in front of the
    proxy on C{proxy_port}; its TLS port.
    """
    nginx = tool("nginx")
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    port = free_port()
    site = directory / "site.conf"
    site.write_text(render((CONTRIB / "nginx.conf").read_text(), {
        "listen 443 ssl": f"listen 127.0.0.1:{port} ssl",
        f"server_name {NAME};": "server_name localhost;",
        CERTIFICATE: str(cert_path),
        PRIVATE_KEY: str(key_path),
        f"server {PROXY_ADDRESS};": f"server 127.0.0.1:{proxy_port};",
    }))
    main = directory / "nginx.conf"
    main.write_text(nginx_main(directory, site))
    await fronts.start([nginx, "-p", f"{directory}/", "-c", str(main), "-e", "stderr"], port)
    return port


async def start_caddy(fronts: ServerLauncher, proxy_port: int, directory: Path) -> int:
    """
    Debian's Caddy with C{contrib/Caddyfile}, in front of the proxy on
    C{proxy_port}; its TLS port.
    """
    caddy = tool("caddy")
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    port = free_port()
    caddyfile = directory / "Caddyfile"
    caddyfile.write_text(caddy_globals(directory) + render((CONTRIB / "Caddyfile").read_text(), {
        f"{NAME} {{": f"localhost:{port} {{",
        CERTIFICATE: str(cert_path),
        PRIVATE_KEY: str(key_path),
        f"reverse_proxy {PROXY_ADDRESS} ": f"reverse_proxy 127.0.0.1:{proxy_port} ",
    }))
    await fronts.start([caddy, "run", "--adapter", "caddyfile", "--config", str(caddyfile)],
                       port)
    return port


Starter = Callable[[ServerLauncher, int, Path], Awaitable[int]]


@pytest.mark.parametrize("start", [start_nginx, start_caddy], ids=["nginx", "caddy"])
@pytest_twisted.ensureDeferred
async def test_chat_streams_through_the_front_end(
    reactor: Any,
    upstream: Upstream,
    twistd: TwistdLauncher,
    fronts: ServerLauncher,
    tmp_path: Path,
    start: Starter,
) -> None:
    """
    Through the front end's TLS port, a chat with a key streams line by
    line: each line Ollama writes reaches the client before Ollama writes
    the next (nothing on the way buffers the stream).  The proxy, started
    with C{--trusted-proxies 127.0.0.1} as the files say, logs the client's
    own address (C{127.0.0.2}), passed on by the front end, not the front
    end's.
    """
    make_self_signed(tmp_path)
    proxy = await twistd.start(proxy_args(upstream.url, "--trusted-proxies", "127.0.0.1"))
    port = await start(fronts, proxy.port, tmp_path)

    sent = Deferred.fromCoroutine(request(
        agent_from_client_address(reactor, tmp_path / "cert.pem"), b"POST",
        f"https://localhost:{port}/api/chat",
        {"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"},
        body(HELD_CHAT),
    ))
    await wait_for(reactor, lambda: bool(upstream.fake.held), "the request to reach Ollama")
    held = upstream.fake.held[-1]
    # The answer's head may wait for its first line (a buffering front end
    # holds both), so the first line goes out before the head is awaited.
    held.write_line({"n": 0, "done": False})
    response = await sent.addTimeout(WAIT_LIMIT, reactor)
    assert response.code == 200
    client = await read(response)
    await write_line_by_line(reactor, held, client, 3, written=1)
    assert [json.loads(line)["n"] for line in client.body.splitlines()] == [0, 1, 2, 3]

    await wait_for(reactor, lambda: "POST /api/chat 200" in proxy.output, "the access line")
    [access] = [line for line in proxy.output.splitlines() if "POST /api/chat 200" in line]
    assert re.search(rf"(^|\s){re.escape(CLIENT_ADDRESS)} \S+ POST /api/chat 200 ", access), access
