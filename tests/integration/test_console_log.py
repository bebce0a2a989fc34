"""
The console of a real C{twistd -n} (the journal, under systemd) shows no
key: not one sent in a path, a query string, a model name or a body.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest_twisted

from ollamaproxy.admission.keys import ApiKey, digest, write_keys_file
from tests.fakes.client import agent, body, read, request
from tests.fakes.twistd import TEST_KEY, TwistdLauncher, Upstream

# The operator's own key, chosen with punctuation, given as --api-key.
CHOSEN = "my:custom;secret!key-0042"
# A key of the keys file, limited to one model and to inference.
LIMITED = "olpk_consolelogtestkeyconsolelogtestkeyab"


@pytest_twisted.ensureDeferred
async def test_console_shows_no_key(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, tmp_path: Path
) -> None:
    """
    Keys sent where they do not belong (in paths, query strings, model names
    and bodies, with body logging on) never reach twistd's console output,
    though the requests are logged there.
    """
    keys_file = tmp_path / "keys.json"
    write_keys_file(str(keys_file), [
        ApiKey(name="ci", digest=digest(TEST_KEY)),
        ApiKey(name="limited", digest=digest(LIMITED), models=("llama3.2",)),
    ])
    proxy = await twistd.start(
        ["-n", "--pidfile=", "ollamaproxy", "--listen", "tcp:0:interface=127.0.0.1",
         "--upstream", upstream.url, "--keys-file", str(keys_file), "--log-bodies"],
        env={"OLLAMAPROXY_API_KEY": CHOSEN},
    )
    client = agent(reactor)
    secrets = [CHOSEN, quote(CHOSEN, safe=""), TEST_KEY, LIMITED]
    sent = []
    for secret in secrets:
        for key in (LIMITED, CHOSEN):
            auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            chat = json.dumps({"model": secret, "messages": []}).encode()
            for method, path, data in [
                (b"POST", f"/api/pull/{secret}", b"{}"),
                (b"GET", f"/api/{secret}/tags", None),
                (b"GET", f"/api/tags?api_key={secret}&token={secret}&key={secret}", None),
                (b"POST", "/api/chat", chat),
                (b"POST", f"/v1/models/{secret}", None),
            ]:
                response = await request(client, method, proxy.url + path, auth,
                                         body(data) if data is not None else None)
                sent.append(response.code)
                await (await read(response)).done
    assert 403 in sent and 200 in sent
    assert await proxy.terminate(reactor), proxy.output
    console = proxy.output
    assert console.count("ollamaproxy.access") >= len(sent)
    assert "ollamaproxy.bodies" in console and "[redacted]" in console
    for secret in secrets:
        assert secret not in console, console[max(0, console.find(secret) - 400):][:500]
