"""
Several real C{twistd} proxies sharing one real PostgreSQL (C{--database}):
usage summed across them, a key revoked in the database refused by all,
and PostgreSQL stopped and restarted under a running proxy.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from ollamaproxy.cli import main
from tests.fakes.client import agent, chat_lines, read, request, sleep
from tests.fakes.engines import PostgresServer
from tests.fakes.twistd import TEST_KEY, Twistd, TwistdLauncher, Upstream, proxy_args

# A revoke must be refused everywhere within this many seconds.
REVOKE_LIMIT = 5.0
# Bounds every other wait.
WAIT_LIMIT = 30.0


def cli(*argv: str) -> str:
    """
    Run the C{ollamaproxy} command in this process; its standard output.
    """
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err, environ={"HOME": "/nonexistent"})
    assert code == 0, err.getvalue()
    return out.getvalue()


def usage_rows(url: str) -> dict[str, int]:
    """
    Requests per key in the database.
    """
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT key, sum(requests) FROM usage GROUP BY key")
        return {key: int(requests) for key, requests in rows}


async def status(reactor: Any, proxy: Twistd, key: str) -> int:
    response = await request(agent(reactor), b"GET", proxy.url + "/api/tags",
                             {"Authorization": f"Bearer {key}"})
    await (await read(response)).done
    code: int = response.code
    return code


async def readiness(reactor: Any, proxy: Twistd) -> tuple[int, Any]:
    """
    The proxy's answer to C{GET /-/ready} (no key needed).
    """
    response = await request(agent(reactor), b"GET", proxy.url + "/-/ready")
    arrivals = await read(response)
    await arrivals.done
    return response.code, json.loads(arrivals.body)


async def metrics(reactor: Any, proxy: Twistd) -> str:
    """
    The proxy's Prometheus metrics (the C{--api-key} is an admin key).
    """
    response = await request(agent(reactor), b"GET", proxy.url + "/metrics",
                             {"Authorization": f"Bearer {TEST_KEY}"})
    arrivals = await read(response)
    await arrivals.done
    assert response.code == 200
    return arrivals.body.decode()


async def wait_for_output(reactor: Any, proxy: Twistd, text: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while text not in proxy.output:
        assert time.monotonic() < deadline, f"no {text!r} in:\n{proxy.output}"
        await sleep(reactor, 0.1)


def database_args(upstream: Upstream, url: str, usage_file: Path) -> Sequence[str]:
    return proxy_args(upstream.url, "--database", url, "--usage-file", str(usage_file))


@pytest_twisted.ensureDeferred
async def test_two_proxies_share_usage_and_keys(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path,
    postgres_url: str,
) -> None:
    """
    Two proxies starting at once on one empty database (both migrate it,
    neither fails): a key added with C{keys add --database} while they run
    works on both within 5 seconds, their usage is summed by C{usage
    --database}, and a C{keys revoke --database} is refused by both within
    5 seconds.  Neither log shows the key.
    """
    proxies: list[Twistd] = await gatherResults([
        Deferred.fromCoroutine(twistd.start(
            database_args(upstream, postgres_url, tmp_path / f"usage{n}.sqlite3")))
        for n in range(2)
    ])
    secret = cli("keys", "add", "bob", "--database", postgres_url).splitlines()[-1]
    added = time.monotonic()
    for proxy in proxies:
        while await status(reactor, proxy, secret) != 200:
            assert time.monotonic() - added < REVOKE_LIMIT, "the new key is not accepted"
            # Seldom: ten refusals a minute from one address are throttled.
            await sleep(reactor, 0.5)
    for proxy in proxies:
        lines = await chat_lines(reactor, proxy.url, secret)
        assert lines[-1]["done"] is True
    await chat_lines(reactor, proxies[0].url, secret)

    cli("keys", "revoke", "bob", "--database", postgres_url)
    revoked = time.monotonic()
    refused: set[int] = set()
    accepted = 0  # requests that came before a proxy saw the revoke count too
    while len(refused) < 2:
        elapsed = time.monotonic() - revoked
        assert elapsed < REVOKE_LIMIT, f"still accepted by {2 - len(refused)} after {elapsed}s"
        for n, proxy in enumerate(proxies):
            if n not in refused:
                code = await status(reactor, proxy, secret)
                if code == 401:
                    refused.add(n)
                else:
                    assert code == 200
                    accepted += 1
        await sleep(reactor, 0.1)
    for proxy in proxies:
        assert await status(reactor, proxy, TEST_KEY) == 200
        assert await proxy.terminate(reactor), proxy.output
        assert secret not in proxy.output
    table = cli("usage", "--database", postgres_url).splitlines()
    bob = next(line.split() for line in table if line.startswith("bob"))
    assert bob[1] == str(3 + 2 + accepted)
    assert int(bob[4]) == 3 * 5  # completion tokens: five per chat


@pytest_twisted.ensureDeferred
async def test_postgres_stopped_and_restarted_under_a_running_proxy(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path,
    own_postgres: PostgresServer,
) -> None:
    """
    With PostgreSQL stopped, the proxy still answers and stays ready (keys
    read from the database stay in force), logs that it cannot write usage,
    shows C{ollamaproxy_database_up 0}, and writes the usage kept meanwhile
    once PostgreSQL is back, logging that too.
    Stopped again when the proxy stops, the pending usage goes to the usage
    file and the next start writes it to PostgreSQL.
    """
    url = own_postgres.create_database("proxy")
    secret = cli("keys", "add", "bob", "--database", url).splitlines()[-1]
    usage_file = tmp_path / "usage.sqlite3"
    proxy = await twistd.start(database_args(upstream, url, usage_file))
    await chat_lines(reactor, proxy.url, secret)

    own_postgres.stop()
    for _ in range(3):
        await chat_lines(reactor, proxy.url, secret)
    await wait_for_output(reactor, proxy, "Cannot write usage to postgresql://")
    await wait_for_output(reactor, proxy, "Cannot read keys from postgresql://")
    assert await status(reactor, proxy, secret) == 200
    code, document = await readiness(reactor, proxy)
    assert (code, document["degraded"]) == (200, ["database"])
    assert "ollamaproxy_database_up 0.0" in await metrics(reactor, proxy)

    own_postgres.start()
    await wait_for_output(reactor, proxy, "Writing usage to postgresql://")
    await wait_for_output(reactor, proxy, "Reading keys from postgresql://")
    assert "ollamaproxy_database_up 1.0" in await metrics(reactor, proxy)
    assert usage_rows(url)["bob"] == 5  # four chats and one /api/tags

    await chat_lines(reactor, proxy.url, secret)
    own_postgres.stop()
    assert await proxy.terminate(reactor), proxy.output
    assert f"in {usage_file}" in proxy.output

    own_postgres.start()
    again = await twistd.start(database_args(upstream, url, usage_file))
    await wait_for_output(reactor, again, f"kept in {usage_file}")
    assert usage_rows(url)["bob"] == 6
    assert await again.terminate(reactor), again.output
