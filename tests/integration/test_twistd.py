"""
The proxy as its users run it: a real C{twistd} process on 127.0.0.1, in
front of a fake Ollama on a real port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import error
from twisted.internet.defer import maybeDeferred
from twisted.internet.ssl import Certificate
from twisted.web.client import BrowserLikePolicyForHTTPS

from tests.fakes.client import agent, body, chat_lines, read, request, wait_for
from tests.fakes.tls import make_self_signed
from tests.fakes.twistd import (
    REPO,
    TEST_KEY,
    TwistdLauncher,
    Upstream,
    proxy_args,
)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_a_stream_and_stops_cleanly(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    C{twistd -n ollamaproxy} says at start where usage is kept, relays a
    streamed chat to a real client, logs it without the key, and exits
    with status 0 on SIGTERM, saying what drains and for how long.
    """
    proxy = await twistd.start(proxy_args(upstream.url))
    assert f"Relaying requests to Ollama at {upstream.url}: it answered" in proxy.output
    assert "Usage is kept in the SQLite file " in proxy.output
    lines = await chat_lines(reactor, proxy.url, TEST_KEY)
    assert [line["message"]["content"] for line in lines[:-1]] == [
        f"tok{i} " for i in range(5)
    ]
    assert lines[-1]["done"] is True
    assert await proxy.terminate(reactor), proxy.output
    assert ("Stopping: the ports close; 0 request(s) in flight get up to 30 s to finish "
            "(--grace-period)") in proxy.output
    assert "POST /api/chat 200 completed" in proxy.output
    assert TEST_KEY not in proxy.output
    assert "Traceback" not in proxy.output


@pytest_twisted.ensureDeferred
async def test_tac_file_builds_the_same_service(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    C{twistd -ny ollamaproxy.tac}, configured by environment variables,
    serves the API behind a key.
    """
    proxy = await twistd.start(
        ["-ny", str(REPO / "ollamaproxy.tac"), "--pidfile="],
        env={
            "OLLAMAPROXY_LISTEN": "tcp:0:interface=127.0.0.1",
            "OLLAMA_HOST": upstream.url,
            "OLLAMAPROXY_API_KEY": TEST_KEY,
            "OLLAMAPROXY_KEYS_FILE": "keys.json",
        },
    )
    client = agent(reactor)
    denied = await request(client, b"GET", proxy.url + "/api/tags")
    assert denied.code == 401
    await (await read(denied)).done
    lines = await chat_lines(reactor, proxy.url, TEST_KEY)
    assert lines[-1]["done"] is True
    assert await proxy.terminate(reactor), proxy.output


@pytest_twisted.ensureDeferred
async def test_first_start_makes_a_key_and_shows_it_once(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    With no key anywhere, the proxy does not run open: it makes a key,
    stores only its hash, prints it, and accepts it.
    """
    keys_file = tmp_path / "state" / "keys.json"
    args = ["-n", "--pidfile=", "ollamaproxy", "--listen", "tcp:0:interface=127.0.0.1",
            "--upstream", upstream.url, "--keys-file", str(keys_file)]
    proxy = await twistd.start(args)
    found = re.search(r"olpk_[0-9A-Za-z]{38}", proxy.output)
    assert found is not None, proxy.output
    key = found.group(0)
    assert key not in keys_file.read_text()
    client = agent(reactor)
    anonymous = await request(client, b"GET", proxy.url + "/api/tags")
    assert anonymous.code == 401
    await (await read(anonymous)).done
    lines = await chat_lines(reactor, proxy.url, key)
    assert lines[-1]["done"] is True
    assert await proxy.terminate(reactor), proxy.output
    assert proxy.output.count(key) == 2  # the key itself, and the curl example

    again = await twistd.start(args)
    assert key not in again.output and "olpk_" not in again.output


@pytest_twisted.ensureDeferred
async def test_tls_endpoint(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    An C{ssl:} endpoint serves the API over TLS to a client that trusts the
    certificate.
    """
    key_path, cert_path = make_self_signed(tmp_path)
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    args = proxy_args(upstream.url)
    args[args.index("tcp:0:interface=127.0.0.1")] = listen
    proxy = await twistd.start(args)
    trust = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(cert_path.read_bytes()))
    lines = await chat_lines(reactor, f"https://localhost:{proxy.port}", TEST_KEY, tls=trust)
    assert lines[-1]["done"] is True
    assert await proxy.terminate(reactor), proxy.output


@pytest_twisted.ensureDeferred
async def test_log_files(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    With --log-dir, requests are written to a text log and a JSON-lines
    log, and the key is in neither.
    """
    proxy = await twistd.start(proxy_args(upstream.url, "--log-dir", str(tmp_path / "logs")))
    await chat_lines(reactor, proxy.url, TEST_KEY)
    assert await proxy.terminate(reactor), proxy.output
    text = (tmp_path / "logs" / "ollamaproxy.log").read_text()
    assert "api-key POST /api/chat 200 completed" in text
    events = [
        json.loads(line)
        for line in (tmp_path / "logs" / "ollamaproxy.json").read_text().splitlines()
    ]
    # One object a line in the documented shape, none of Twisted's own keys.
    assert not [k for e in events for k in e if k.startswith("log_")]
    access = [e for e in events if e["event"] == "access"]
    assert [(e["method"], e["path"], e["status"]) for e in access] == [
        ("POST", "/api/chat", 200)
    ]
    assert TEST_KEY not in text
    assert all(TEST_KEY not in json.dumps(e) for e in events)


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_is_502(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    Ollama not listening: the proxy starts anyway, with a warning line that
    names the address and says Ollama did not answer; a request gets 502
    with an Ollama-shaped JSON error naming the address tried.
    """
    closed_port = upstream.url.rsplit(":", 1)[1]
    await maybeDeferred(upstream.port.stopListening)
    proxy = await twistd.start(proxy_args(f"http://127.0.0.1:{closed_port}"))
    assert (
        f"Relaying requests to Ollama at http://127.0.0.1:{closed_port}, which did not answer"
        in proxy.output
    )
    response = await request(
        agent(reactor), b"GET", proxy.url + "/api/tags", {"X-API-Key": TEST_KEY}
    )
    assert response.code == 502
    arrivals = await read(response)
    await arrivals.done
    assert json.loads(arrivals.body)["error"].startswith(
        f"cannot reach Ollama at http://127.0.0.1:{closed_port}: "
    )


@pytest_twisted.ensureDeferred
async def test_keys_from_the_command_reach_a_running_proxy(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    A key added with C{ollamaproxy keys add} works on a running proxy, and
    stops working soon after C{ollamaproxy keys revoke} (at once on SIGHUP).
    """
    keys_file = str(tmp_path / "keys.json")

    def command(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "ollamaproxy.cli", "keys", *args, "--keys-file", keys_file],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return done.stdout

    admin = command("add", "ops", "--admin").splitlines()[-1]
    proxy = await twistd.start(["-n", "--pidfile=", "ollamaproxy", "--listen",
                                "tcp:0:interface=127.0.0.1", "--upstream", upstream.url,
                                "--keys-file", keys_file])
    bob = command("add", "bob").splitlines()[-1]

    async def status(key: str) -> int:
        response = await request(agent(reactor), b"GET", proxy.url + "/api/tags",
                                 {"Authorization": f"Bearer {key}"})
        await (await read(response)).done
        code: int = response.code
        return code

    # Polling for bob before the reload would count as guessing: wait for
    # the reload instead (the file is watched; SIGHUP makes it immediate).
    os.kill(proxy.pid, signal.SIGHUP)
    await wait_for(reactor, lambda: proxy.output.count("Reloaded") >= 2, "the reload")
    assert await status(bob) == 200
    command("revoke", "bob")
    await wait_for(reactor, lambda: proxy.output.count("Reloaded") >= 3, "the next reload")
    assert await status(bob) == 401
    assert await status(admin) == 200
    assert await proxy.terminate(reactor), proxy.output


@pytest_twisted.ensureDeferred
async def test_no_key_reaches_any_log_file(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    After a run with body logging on, right and wrong keys in headers and a
    key pasted into a request body, no log file holds any of them.
    """
    logs = tmp_path / "logs"
    proxy = await twistd.start(
        proxy_args(upstream.url, "--log-dir", str(logs), "--log-bodies", "--log-max-bytes", "2K")
    )
    wrong = "olpk_" + "W" * 38
    client = agent(reactor)
    for headers in ({"Authorization": f"Bearer {TEST_KEY}"}, {"X-API-Key": TEST_KEY},
                    {"Authorization": f"Bearer {wrong}"}, {"X-API-Key": "hunter2-guess"},
                    {"Cookie": "session=cookie-secret"}):
        pasted = json.dumps({"model": "llama3.2", "prompt": f"my key is {TEST_KEY}"})
        response = await request(client, b"POST", proxy.url + "/api/generate", headers,
                                 body(pasted.encode()))
        await (await read(response)).done
    response = await request(client, b"GET", f"{proxy.url}/api/{TEST_KEY}", {"X-API-Key": TEST_KEY})
    await (await read(response)).done
    assert await proxy.terminate(reactor), proxy.output
    files = list(logs.iterdir())
    assert len(files) > 2, "expected rotated files too"
    # Rotation never splits a line: every JSON line parses, every request is there.
    events = [
        json.loads(line)
        for f in files if f.name.startswith("ollamaproxy.json")
        for line in f.read_text().splitlines()
    ]
    assert len([e for e in events if e["event"] == "access"]) == 6
    text = "".join(f.read_text() for f in files)
    assert "ollamaproxy.bodies" in text and "[redacted]" in text
    for secret in (TEST_KEY, wrong, "cookie-secret"):
        assert secret not in text, text[max(0, text.find(secret) - 400):text.find(secret) + 60]


@pytest_twisted.ensureDeferred
async def test_usage_is_kept_across_restarts(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    Requests and tokens per key are written to the usage database by the
    time the proxy has stopped, add up across restarts, and show in
    C{ollamaproxy usage}.
    """
    usage_file = str(tmp_path / "usage.sqlite3")
    for _ in range(2):
        proxy = await twistd.start(proxy_args(upstream.url, "--usage-file", usage_file))
        await chat_lines(reactor, proxy.url, TEST_KEY)
        assert await proxy.terminate(reactor), proxy.output
    table = subprocess.run(
        [sys.executable, "-m", "ollamaproxy.cli", "usage", "--usage-file", usage_file],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()
    assert table[0].split() == ["KEY", "REQUESTS", "REFUSED", "PROMPT", "TOKENS", "COMPLETION",
                                "TOKENS", "TOTAL"]
    name, requests, refused, prompt, completion, total = table[1].split()
    assert (name, requests, refused, completion) == ("api-key", "2", "0", "10")
    assert int(total) == int(prompt) + 10


@pytest_twisted.ensureDeferred
async def test_instances_side_by_side(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    With --pidfile= several proxies run at once from one directory, each
    with its own keys.
    """
    first = await twistd.start(proxy_args(upstream.url))
    second_key = "olpk_secondinstancesecondinstancesecond00"
    args = proxy_args(upstream.url)
    args[args.index(TEST_KEY)] = second_key
    args[args.index("keys.json")] = "second-keys.json"
    second = await twistd.start(args)
    assert first.port != second.port
    for proxy, key in ((first, TEST_KEY), (second, second_key)):
        lines = await chat_lines(reactor, proxy.url, key)
        assert lines[-1]["done"] is True
    wrong = await request(agent(reactor), b"GET", second.url + "/api/tags", {"X-API-Key": TEST_KEY})
    assert wrong.code == 401
    await (await read(wrong)).done
    assert await first.terminate(reactor), first.output
    assert await second.terminate(reactor), second.output


@pytest_twisted.ensureDeferred
async def test_drain_delay_keeps_serving_then_closes_the_port(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    With C{--drain-delay}, SIGTERM turns C{/-/ready} to 503 at once while a
    chat sent after it on a new connection is still served; the port closes
    once the delay is over, not before, and the process exits cleanly.
    """
    delay = 3.0
    proxy = await twistd.start(proxy_args(upstream.url, "--drain-delay", f"{delay:g}"))
    signalled = time.monotonic()
    os.kill(proxy.pid, signal.SIGTERM)
    await wait_for(reactor, lambda: "Stopping with 0 request(s) in flight" in proxy.output,
                   "the stop logged")
    ready = await request(agent(reactor), b"GET", proxy.url + "/-/ready")
    assert ready.code == 503
    arrivals = await read(ready)
    await arrivals.done
    assert json.loads(arrivals.body)["checks"]["accepting"] is False
    lines = await chat_lines(reactor, proxy.url, TEST_KEY)
    assert lines[-1]["done"] is True
    assert time.monotonic() - signalled < delay, "served after the delay: the test proves nothing"
    code = await proxy.protocol.ended.addTimeout(delay + 10, reactor)
    assert time.monotonic() - signalled >= delay
    assert code in (0, -signal.SIGTERM), proxy.output
    assert "Drain delay over: the ports close" in proxy.output
    assert "Server Shut Down." in proxy.output and "Traceback" not in proxy.output
    try:
        refused = await request(agent(reactor), b"GET", proxy.url + "/-/ready")
    except error.ConnectionRefusedError:
        pass
    else:
        raise AssertionError(f"the port still answers: {refused.code}")
