"""
Token quotas in a real C{twistd} process: kept across a restart through the
usage database.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest_twisted

from ollamaproxy.cli import main
from tests.fakes.client import WAIT_LIMIT, agent, body, read, request, sleep
from tests.fakes.twistd import TwistdLauncher, Upstream, proxy_args


async def answer(reactor: Any, method: bytes, url: str, key: str | None = None,
                 data: bytes | None = None) -> tuple[int, list[bytes] | None, bytes]:
    """
    A whole answer: status, C{Retry-After}, body.
    """
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    response = await request(agent(reactor), method, url, headers,
                             None if data is None else body(data))
    arrivals = await read(response)
    await arrivals.done
    return response.code, response.headers.getRawHeaders(b"retry-after"), arrivals.body


async def ready(reactor: Any, url: str) -> dict[str, Any]:
    """
    Wait (bounded) until the proxy says it is ready; its answer.
    """
    deadline = time.monotonic() + WAIT_LIMIT
    while True:
        code, _, text = await answer(reactor, b"GET", url + "/-/ready")
        if code == 200:
            document: dict[str, Any] = json.loads(text)
            return document
        assert time.monotonic() < deadline, text
        await sleep(reactor, 0.05)


@pytest_twisted.ensureDeferred
async def test_a_quota_survives_a_restart(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    A key that used its monthly quota is refused with 429 after the proxy
    is restarted: the new process reads the month's tokens from the usage
    database before it serves the key.
    """
    keys_file = str(tmp_path / "keys.json")
    usage_file = str(tmp_path / "usage.sqlite3")
    out = io.StringIO()
    assert main(["keys", "add", "bob", "--tokens-per-month", "20", "--keys-file", keys_file],
                stdout=out, stderr=io.StringIO(), environ={}) == 0
    bob = out.getvalue().splitlines()[-1]
    generate = json.dumps(
        {"model": "llama3.2", "prompt": "a b", "options": {"num_predict": 18}}
    ).encode()
    args = proxy_args(upstream.url, "--usage-file", usage_file)
    args[args.index("--keys-file") + 1] = keys_file

    proxy = await twistd.start(args)
    assert (await ready(reactor, proxy.url))["checks"]["quotas"] is True
    code, _, _ = await answer(reactor, b"POST", proxy.url + "/api/generate", bob, generate)
    assert code == 200  # 2 prompt and 18 completion tokens: the quota, reached
    code, _, _ = await answer(reactor, b"POST", proxy.url + "/api/generate", bob, generate)
    assert code == 429
    assert await proxy.terminate(reactor), proxy.output

    proxy = await twistd.start(args)
    await ready(reactor, proxy.url)
    sent = len(upstream.fake.received)
    code, retry_after, text = await answer(reactor, b"POST", proxy.url + "/api/generate", bob,
                                           generate)
    assert code == 429, text
    assert "has used its 20 tokens for this month (UTC)" in json.loads(text)["error"]
    assert retry_after is not None and int(retry_after[0]) > 0
    assert len(upstream.fake.received) == sent
    assert "Token quotas loaded: 1 key(s)" in proxy.output
    assert await proxy.terminate(reactor), proxy.output
