"""
The console's page, files and data endpoints, in memory: who may see what,
the security headers on every answer, and no key, hash or backend
credential in any payload.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import StringTransport

from ollamaproxy.admission.keys import digest
from ollamaproxy.backends.effective import EVIDENCE
from ollamaproxy.backends.pool import Backend
from ollamaproxy.backends.router import Lease
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.console.sampler import TICK
from ollamaproxy.console.web import CSP
from ollamaproxy.model_names import resolve
from ollamaproxy.record.usage import UsageStore
from ollamaproxy.record.usage_db import write_rows
from tests.fakes.chain import KEY, Chain, chat
from tests.fakes.console import INFERENCE_KEY, add_inference_key
from tests.fakes.routers import first_byte
from tests.fakes.worker import ManualWorker

PAGES = ["/-/console/", "/-/console/static/console.js", "/-/console/static/console.css"]
DATA = ["/-/console/api/now", "/-/console/api/keys", "/-/console/api/usage",
        "/-/console/api/usage.csv", "/-/console/api/feed"]
WRONG_KEY = "olpk_notakeynotakeynotakeynotakeynotake"


def header(response: Any, name: str) -> list[bytes]:
    return list(response.headers.getRawHeaders(name.encode()) or [])


def assert_secure(response: Any) -> None:
    assert header(response, "content-security-policy") == [CSP]
    assert b"unsafe-inline" not in CSP and b"script-src 'self'" in CSP
    assert header(response, "x-frame-options") == [b"DENY"]
    assert header(response, "referrer-policy") == [b"no-referrer"]
    assert header(response, "x-content-type-options") == [b"nosniff"]
    assert header(response, "cache-control") == [b"no-store"]
    assert header(response, "set-cookie") == []


@pytest.mark.parametrize("path", PAGES)
def test_the_page_and_its_files_load_without_a_key(path: str) -> None:
    """
    The page and its static files hold no data: they load without a key,
    with the security headers and their own content type.
    """
    chain = Chain()
    response = chain.respond("GET", path, key=None)
    assert response.code == 200
    assert_secure(response)
    kind = header(response, "content-type")[0]
    assert kind.split(b";")[0] in (b"text/html", b"text/javascript", b"text/css")
    assert chain.body(response)


def test_the_page_has_no_inline_script_or_style() -> None:
    """
    The page's script and style are files of their own, as the CSP
    demands: no inline C{<script>} body, C{<style>} or C{style=}.
    """
    chain = Chain()
    page = chain.body(chain.respond("GET", "/-/console/", key=None)).decode()
    assert "<style" not in page and "style=" not in page
    assert page.count("<script") == page.count('<script src="static/') == 1


def test_the_page_names_its_icon_which_loads_without_a_key() -> None:
    """
    The page links an icon of its own, which loads without a key, so a
    browser does not ask the proxy's C{/favicon.ico} (a 401 in the access
    log each time the console opens).
    """
    chain = Chain()
    page = chain.body(chain.respond("GET", "/-/console/", key=None)).decode()
    assert '<link rel="icon" href="static/favicon.svg" type="image/svg+xml">' in page
    response = chain.respond("GET", "/-/console/static/favicon.svg", key=None)
    assert response.code == 200
    assert_secure(response)
    assert header(response, "content-type") == [b"image/svg+xml"]
    assert chain.body(response).startswith(b'<svg xmlns="http://www.w3.org/2000/svg"')


def test_console_without_its_slash_redirects_to_the_page() -> None:
    """
    C{/-/console} sends the browser to C{/-/console/}, whose relative links
    work; it is never passed on to Ollama.
    """
    chain = Chain()
    response = chain.result(chain.client.request(  # type: ignore[attr-defined]
        "GET", "http://proxy.example:5000/-/console", allow_redirects=False))
    assert response.code == 301
    assert header(response, "location") == [b"/-/console/"]
    assert_secure(response)
    assert chain.fake.received == []


@pytest.mark.parametrize("path", DATA)
@pytest.mark.parametrize(
    ("key", "code"), [(None, 401), (WRONG_KEY, 401), (INFERENCE_KEY, 403)],
    ids=["no key", "wrong key", "inference key"],
)
def test_data_needs_an_admin_key(path: str, key: str | None, code: int) -> None:
    """
    Every data endpoint and the feed refuse a request without a key (401),
    with a wrong key (401) and with an inference key (403), in
    C{{"error": ...}} shape, with the security headers.
    """
    chain = Chain()
    add_inference_key(chain)
    response = chain.respond("GET", path, key=key)
    assert response.code == code
    assert_secure(response)
    assert set(json.loads(chain.body(response))) == {"error"}


def test_wrong_keys_on_the_console_count_as_guesses() -> None:
    """
    Wrong keys sent to the console count towards the guess throttle, as on
    every other route: the eleventh in a minute gets 429.
    """
    chain = Chain()
    codes = [chain.respond("GET", "/-/console/api/now", key=WRONG_KEY).code for _ in range(11)]
    assert codes[:10] == [401] * 10 and codes[10] == 429


def test_unknown_console_paths_and_methods_are_json_errors() -> None:
    """
    A path the console does not have is a 404, a method it does not answer
    a 405, both in C{{"error": ...}} shape with the security headers, and
    neither reaches Ollama.
    """
    chain = Chain()
    for method, path, code in (("GET", "/-/console/api/nothing", 404),
                               ("GET", "/-/console/static/../app.py", 404),
                               ("POST", "/-/console/api/now", 405)):
        response = chain.respond(method, path)
        assert response.code == code
        assert_secure(response)
        assert "error" in json.loads(chain.body(response))
    assert chain.fake.received == []


def test_console_requests_are_not_in_the_access_log(access_events: list[Any]) -> None:
    """
    The console's requests are the proxy's own, not Ollama's: they leave no
    access event (as C{/metrics} does not).
    """
    chain = Chain()
    chain.body(chain.respond("GET", "/-/console/api/now"))
    chain.body(chain.respond("GET", "/-/console/"))
    assert access_events == []


def test_keys_view_lists_keys_without_keys_or_hashes() -> None:
    """
    The Keys view shows each key's name, scopes, models, limits, quotas,
    created and expires, never the key or its hash.
    """
    chain = Chain()
    add_inference_key(chain, models=("llama3*",), rpm=60, max_streams=2,
                      tokens_per_day=1000, expires=datetime(2027, 1, 1, tzinfo=UTC))
    view = json.loads(chain.body(chain.respond("GET", "/-/console/api/keys")))
    bob = next(k for k in view["keys"] if k["name"] == "bob")
    assert bob["scopes"] == ["inference"]
    assert bob["models"] == ["llama3*"]
    limits = (bob["rpm"], bob["max_streams"], bob["tokens_per_day"], bob["weight"])
    assert limits == (60, 2, 1000, 1)
    assert bob["expires"] == "2027-01-01T00:00:00Z"
    assert bob["expired"] is False
    assert bob["last_used"] is None
    assert "digest" not in bob and "hash" not in bob


SECRET_UPSTREAM = b"http://ops:hunter2secret@127.0.0.1:11434"


def secrets_of(*keys: str) -> list[bytes]:
    """
    Every form a test key could leak in: itself, its SHA-256 in hex (as
    the keys file stores it) and the backend's password.
    """
    found = [b"hunter2secret"]
    for key in keys:
        found += [key.encode(), hashlib.sha256(key.encode()).hexdigest().encode(),
                  digest(key).hex().encode()]
    return found


def test_no_payload_holds_a_key_a_hash_or_a_backend_password(tmp_path: Path) -> None:
    """
    Scan every payload of the console, with a stream running, a backend
    whose URL and errors hold a password, keys with every field, and usage
    recorded: no test key, no key's SHA-256 hex and no password anywhere.
    """
    store = UsageStore(str(tmp_path / "usage.sqlite3"), clock=Chain().clock,
                       worker=ManualWorker())
    chain = Chain(usage=store, backends=[["hold"], ["other"]])
    add_inference_key(chain, tokens_per_month=5000)
    # A second backend whose URL holds a password, and an error that
    # repeats it.
    backend = Backend(Upstream(agent=chain.backends[1].upstream.agent, base=SECRET_UPSTREAM,
                               clock=chain.clock, header_timeout=60, idle_timeout=60))
    chain.pool.backends[1] = backend
    backend.healthy = False
    backend.note_error(
        "cannot reach Ollama at http://ops:hunter2secret@127.0.0.1:11434: refused", 0.0)
    write_rows(store.path, [(chain.clock.seconds(), "alice", "llama3.2:latest", 1, 5, 7, 0)])
    chain.console.sampler.startService()
    chain.request("POST", "/api/chat", data=chat("hold"))
    chain.clock.advance(TICK)
    payloads = []
    for path in [*DATA[:-1], "/-/console/api/usage?bucket=hour&from=1970-01-01&to=1970-01-02"]:
        response = chain.respond("GET", path)
        assert response.code == 200, path
        payloads.append(chain.body(response))
    feed = chain.stream(chain.respond("GET", "/-/console/api/feed"))
    chain.clock.advance(TICK)
    chain.flush()
    payloads.append(feed.body)
    everything = b"\n".join(payloads)
    assert b"hold:latest" in everything and b"alice" in everything and b"bob" in everything
    assert b"http://127.0.0.1:11434" in everything
    for secret in secrets_of(KEY, INFERENCE_KEY):
        assert secret not in everything
    chain.console.sampler.stopService()
    chain.fake.held[-1].finish()
    chain.flush()


def backends_of(chain: Chain) -> list[dict[str, Any]]:
    """
    The Backends view, as the console's C{api/now} sends it.
    """
    response = chain.respond("GET", "/-/console/api/now")
    assert response.code == 200
    shown: list[dict[str, Any]] = json.loads(chain.body(response))["backends"]
    return shown


def test_recent_errors_have_their_time_and_repeats_are_counted() -> None:
    """
    A backend that fails the same way three times shows one error with a
    count of 3, when it first and last happened, after the other error it
    had: repeats fold into one entry rather than pushing the rest out.
    """
    chain = Chain(backends=[["hold"], ["other"]])
    backend = chain.pool.backends[1]
    chain.clock.advance(1000)
    chain.pool.failed(backend, "cannot reach Ollama: timed out")
    for _ in range(3):
        chain.clock.advance(2.5)
        chain.pool.failed(backend, "cannot reach Ollama: refused")
    errors = backends_of(chain)[1]["errors"]
    assert errors == [
        {"error": "cannot reach Ollama: timed out", "count": 1, "first": 1000.0, "last": 1000.0},
        {"error": "cannot reach Ollama: refused", "count": 3, "first": 1002.5, "last": 1007.5},
    ]


def test_an_unhealthy_backend_shows_no_model_in_memory() -> None:
    """
    The models a backend said it had loaded are not shown once it is
    unhealthy: that list is stale, and the backend may have restarted.
    """
    chain = Chain(backends=[["hold"], ["other"]])
    backend = chain.pool.backends[1]
    backend.loaded = frozenset([resolve("other")])
    assert backends_of(chain)[1]["loaded"] == ["other:latest"]
    chain.pool.failed(backend, "cannot reach Ollama: refused")
    assert backends_of(chain)[1]["loaded"] == []


def test_each_loaded_model_shows_its_vram_and_context() -> None:
    """
    The backends' view gives each loaded model's memory, VRAM, context and
    expiry, as the backend's C{/api/ps} said them, and the page shows the
    VRAM and the context; none for an unhealthy backend (stale).
    """
    chain = Chain()
    chain.fake.load("llama3.2", 8192)
    chain.pool.refresh(chain.backends[0])
    chain.flush()
    [resident] = backends_of(chain)[0]["resident"]
    assert resident["model"] == "llama3.2:latest"
    assert resident["context_length"] == 8192
    assert resident["size_vram"] > 0 and resident["size"] >= resident["size_vram"]
    assert resident["expires_at"]
    script = chain.body(chain.respond("GET", "/-/console/static/console.js", key=None))
    assert b"GiB VRAM" in script and b"ctx ${r.context_length}" in script
    chain.pool.failed(chain.backends[0], "cannot reach Ollama: refused")
    assert backends_of(chain)[0]["resident"] == []


def test_a_lowered_effective_parallel_is_shown() -> None:
    """
    The backends' view gives each model whose effective parallel is
    lowered on a backend, with it, and the page shows it.
    """
    chain = Chain()
    assert backends_of(chain)[0]["effective"] == {}
    leases: list[Lease] = []
    for _ in range(2 * EVIDENCE):
        chain.router.acquire("k", resolve("llama3.2"), runs=True).addCallback(leases.append)
    while leases:
        # Ollama answers the oldest only; the others sent have no first byte.
        first_byte(leases.pop(0)).release()
    assert backends_of(chain)[0]["effective"] == {"llama3.2:latest": 1}
    script = chain.body(chain.respond("GET", "/-/console/static/console.js", key=None))
    assert b"effective parallel ${limit} of ${b.parallel}" in script


def test_feed_request_and_transport_are_not_kept_after_a_disconnect() -> None:
    """
    A feed whose client vanished without a clean close (the transport's
    producer stopped) is forgotten as well.
    """
    chain = Chain()
    sampler = chain.console.sampler
    sampler.startService()
    transport = StringTransport()
    subscriber = sampler.subscribe(transport.write)
    assert sampler.subscribers == 1
    subscriber.stopProducing()
    assert sampler.subscribers == 0
    sampler.stopService()
