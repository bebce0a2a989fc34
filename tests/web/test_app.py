"""
Tests for L{ollamaproxy.web.app}: the whole proxy as a client sees it, in memory
(client -> proxy -> fake Ollama, see L{tests.fakes.chain}), with no reactor and no
sockets.

The transparency table sends each request twice, through the proxy and
straight to a second, identical L{FakeOllama}, and expects the same answer
byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from ollamaproxy.admission.keys import ApiKey, digest
from ollamaproxy.errors import ProxyError
from tests.fakes.agents import FailingAgent
from tests.fakes.chain import KEY, Chain, Collector
from tests.fakes.observers import ErrorCollector
from tests.fakes.ollama import FakeOllama, ReceivedRequest, in_memory_client

T = TypeVar("T")

PROXY = "http://proxy.example:5000"
OLLAMA = "http://127.0.0.1:11434"
MESSAGES = [{"role": "user", "content": "hi"}]
SEED_BODY = (
    b'{"model":"deepseek-r1:70b","options":{},'
    b'"messages":[{"role":"user","content":"hi"}]}'
)
INTERNAL = "internal error in ollamaproxy"


def js(obj: object) -> bytes:
    """
    A JSON request body.
    """
    return json.dumps(obj).encode()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


BLOB = b"a model layer, uploaded"
KNOWN_BLOB = b"a model layer Ollama already has"
UNKNOWN_DIGEST = "sha256:" + "0" * 64


# -- plumbing ---------------------------------------------------------------


def result(d: Deferred[T]) -> T:
    """
    The result a Deferred already has; fails the test if none or a failure.
    """
    box: list[T | Failure] = []
    d.addBoth(box.append)
    assert box, "no result yet"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


@dataclass
class Reply:
    """
    A complete response as a client received it.
    """

    code: int
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> list[bytes] | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else list(values)

    def json(self) -> Any:
        return json.loads(self.body)


def _read(response: IResponse, flush: Callable[[], None]) -> Reply:
    collector = Collector()
    response.deliverBody(collector)
    flush()
    result(collector.done)
    return Reply(response.code, response.headers, collector.body)


def _headers(key: str | None, headers: Mapping[str, str | list[str]] | None) -> dict[str, Any]:
    all_headers: dict[str, Any] = {}
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    all_headers.update(headers or {})
    return all_headers


def call(
    chain: Chain,
    method: str,
    path: str,
    *,
    key: str | None = KEY,
    headers: Mapping[str, str | list[str]] | None = None,
    data: bytes | None = None,
) -> Reply:
    """
    One complete request through the proxy; redirects are not followed.
    """
    d: Deferred[IResponse] = chain.client.request(  # type: ignore[attr-defined]
        method,
        PROXY + path,
        headers=_headers(key, headers),
        data=data,
        allow_redirects=False,
        unbuffered=True,
    )
    chain.flush()
    return _read(chain.result(d), chain.flush)


@dataclass
class Direct:
    """
    A second, identical fake Ollama, with a client talking to it directly.
    """

    clock: Clock = field(default_factory=Clock)
    fake: FakeOllama = field(init=False)
    agent: RequestTraversalAgent = field(init=False)
    client: HTTPClient = field(init=False)

    def __post_init__(self) -> None:
        self.fake = FakeOllama(self.clock)
        self.agent, self.client = in_memory_client(self.fake)

    def flush(self) -> None:
        for _ in range(20):
            self.agent.flush()
            self.clock.advance(0)

    def call(self, method: str, path: str, data: bytes | None) -> Reply:
        d = self.client.request(
            method, OLLAMA + path, data=data, allow_redirects=False, unbuffered=True
        )
        self.flush()
        return _read(result(d), self.flush)


def only(received: list[ReceivedRequest]) -> ReceivedRequest:
    """
    The one request Ollama received.
    """
    assert len(received) == 1, [r.uri for r in received]
    return received[0]


def is_ollama_error(reply: Reply) -> str:
    """
    Check an Ollama-shaped error body, and return its message.
    """
    assert (reply.header(b"content-type") or [b""])[0].startswith(b"application/json")
    body = reply.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str) and body["error"]
    message: str = body["error"]
    return message


def is_openai_error(reply: Reply) -> str:
    """
    Check an OpenAI-shaped error body, and return its message.
    """
    assert (reply.header(b"content-type") or [b""])[0].startswith(b"application/json")
    error = reply.json()["error"]
    assert list(reply.json()) == ["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None and error["code"] is None
    message: str = error["message"]
    return message


# -- 1. transparency --------------------------------------------------------


def case(method: str, path: str, status: int, data: bytes | None = None, label: str = "") -> Any:
    return pytest.param(method, path, data, status, id=label or f"{method} {path}")


def chat(model: str = "llama3.2", **extra: Any) -> bytes:
    return js({"model": model, "messages": MESSAGES, **extra})


def generate(model: str = "llama3.2", **extra: Any) -> bytes:
    return js({"model": model, "prompt": "why is the sky blue?", **extra})


TRANSPARENCY = [
    case("GET", "/", 200),
    case("HEAD", "/", 200),
    case("GET", "/api/version", 200),
    case("HEAD", "/api/version", 200),
    case("GET", "/api/tags", 200),
    case("HEAD", "/api/tags", 200),
    case("GET", "/api/ps", 200),
    case("POST", "/api/show", 200, js({"model": "llama3.2"}), "show model"),
    case("POST", "/api/show", 200, js({"name": "llama3.2"}), "show legacy name"),
    case("POST", "/api/chat", 200, chat(), "chat stream"),
    case("POST", "/api/chat", 200, chat(stream=False), "chat no stream"),
    case("POST", "/api/chat", 200, js({"model": "llama3.2"}), "chat load reply"),
    case("POST", "/api/generate", 200, generate(), "generate stream"),
    case("POST", "/api/generate", 200, generate(stream=False), "generate no stream"),
    case("POST", "/api/embed", 200, js({"model": "llama3.2", "input": ["a", "b"]})),
    case("POST", "/api/embeddings", 200, js({"model": "llama3.2", "prompt": "a"})),
    case("POST", "/api/pull", 200, js({"model": "qwen2"}), "pull stream"),
    case("POST", "/api/pull", 200, js({"model": "qwen2", "stream": False}), "pull no stream"),
    case("POST", "/api/push", 200, js({"model": "me/llama3.2"})),
    case("POST", "/api/create", 200, js({"model": "mine", "from": "llama3.2"})),
    case("POST", "/api/copy", 200, js({"source": "llama3.2", "destination": "copy"})),
    case("DELETE", "/api/delete", 200, js({"model": "llama3.2"}), "delete existing"),
    case("DELETE", "/api/delete", 404, js({"model": "nope"}), "delete unknown"),
    case("HEAD", f"/api/blobs/{sha256(KNOWN_BLOB)}", 200, label="HEAD known blob"),
    case("HEAD", f"/api/blobs/{UNKNOWN_DIGEST}", 404, label="HEAD unknown blob"),
    case("POST", f"/api/blobs/{sha256(BLOB)}", 201, BLOB, "POST blob"),
    case("POST", f"/api/blobs/{UNKNOWN_DIGEST}", 400, BLOB, "POST blob wrong digest"),
    case("GET", "/v1/models", 200),
    case("POST", "/v1/chat/completions", 200, chat(stream=True), "v1 chat stream"),
    case("POST", "/v1/chat/completions", 200, chat(), "v1 chat no stream"),
    case("POST", "/v1/completions", 200, generate(stream=True), "v1 completions stream"),
    case("POST", "/v1/completions", 200, generate(), "v1 completions no stream"),
    case("POST", "/api/chat", 404, chat("nope"), "chat unknown model"),
    case("POST", "/api/generate", 404, generate("nope", stream=False), "generate unknown"),
    case("POST", "/v1/chat/completions", 404, chat("nope"), "v1 chat unknown model"),
    case("POST", "/v1/chat/completions", 400, js({"model": "llama3.2"}), "v1 no messages"),
    case("POST", "/api/chat", 400, b"{not json", "chat bad json"),
    case("GET", "/api/nothing", 404),
    case("GET", "/api/chat", 405),
    case("HEAD", "/api/ps", 405),
    case("GET", "/api/tags/", 301),
    case("POST", "/api/chat/", 307, chat()),
]


@pytest.mark.parametrize(("method", "path", "data", "status"), TRANSPARENCY)
def test_proxy_answers_as_ollama_does(
    method: str, path: str, data: bytes | None, status: int
) -> None:
    """
    Through the proxy, every route answers with Ollama's own status,
    Content-Type, Location and body, byte for byte.
    """
    chain, direct = Chain(), Direct()
    for fake in (chain.fake, direct.fake):
        fake.blobs.add(sha256(KNOWN_BLOB))
    proxied = call(chain, method, path, data=data)
    expected = direct.call(method, path, data)
    assert expected.code == status
    assert proxied.code == expected.code
    assert proxied.header(b"content-type") == expected.header(b"content-type")
    assert proxied.header(b"location") == expected.header(b"location")
    assert proxied.body == expected.body


@pytest.mark.parametrize(("method", "path", "data", "status"), TRANSPARENCY)
def test_ollama_receives_the_request_as_sent(
    method: str, path: str, data: bytes | None, status: int
) -> None:
    """
    Ollama receives exactly one request per client request, with the
    client's method, path and query, and body, unchanged.
    """
    chain = Chain()
    call(chain, method, path, data=data)
    received = only(chain.fake.received)
    sent = data or b""
    assert received.method == method.encode()
    assert received.uri == path.encode()
    assert received.body_length == len(sent)
    assert received.body_sha256 == hashlib.sha256(sent).hexdigest()
    if not path.startswith("/api/blobs/"):
        assert received.body == sent


def test_trailing_slash_redirect_reaches_the_client() -> None:
    """
    Ollama's 301 for a trailing slash goes to the client with its Location;
    the proxy does not follow it.
    """
    chain = Chain()
    reply = call(chain, "GET", "/proxy/api/tags/")
    assert reply.code == 301
    assert reply.header(b"location") == [b"/api/tags"]
    assert [r.uri for r in chain.fake.received] == [b"/api/tags/"]


# -- 2. paths and query strings ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/api/tags?a=%2F&b=x+y&c", b"/api/tags?a=%2F&b=x+y&c"),
        ("/proxy/api/tags?a=%2F&b=x+y&c", b"/api/tags?a=%2F&b=x+y&c"),
        ("/api/tags?x=%20%25%3F&x=2", b"/api/tags?x=%20%25%3F&x=2"),
        ("/api/blobs/sha256%3Aabc", b"/api/blobs/sha256%3Aabc"),
        ("/proxy/api/chat", b"/api/chat"),
        ("/proxy/", b"/"),
        ("/proxy", b"/"),
        ("/proxy?x=1", b"/?x=1"),
        ("/proxy/proxy/api/tags", b"/proxy/api/tags"),
        ("/proxyfoo", b"/proxyfoo"),
        ("/proxyfoo?x=1", b"/proxyfoo?x=1"),
        ("/api/proxy/tags", b"/api/proxy/tags"),
    ],
)
def test_target_reaches_ollama_intact(path: str, upstream: bytes) -> None:
    """
    The path and query string reach Ollama exactly as sent, minus one leading
    C{/proxy} path segment (and nothing that merely starts with C{/proxy}).
    """
    chain = Chain()
    call(chain, "GET", path)
    assert only(chain.fake.received).uri == upstream


def test_proxyfoo_is_not_the_prefix() -> None:
    """
    C{/proxyfoo} is an unknown path to Ollama, whose 404 the client gets.
    """
    chain = Chain()
    reply = call(chain, "GET", "/proxyfoo/api/tags")
    assert reply.code == 404
    assert reply.body == b"404 page not found"
    assert only(chain.fake.received).uri == b"/proxyfoo/api/tags"


def test_seed_request_streams_ndjson() -> None:
    """
    The seed's curl command (C{X-API-Key}, C{/proxy/api/chat}, its JSON body)
    gets a streamed NDJSON chat answer.
    """
    chain = Chain()
    chain.fake.models.append("deepseek-r1:70b")
    reply = call(
        chain,
        "POST",
        "/proxy/api/chat",
        key=None,
        headers={"X-API-Key": KEY, "Content-Type": "application/json"},
        data=SEED_BODY,
    )
    assert reply.code == 200
    assert reply.header(b"content-type") == [b"application/x-ndjson"]
    lines = [json.loads(line) for line in reply.body.splitlines()]
    assert len(lines) == 6
    assert "".join(line["message"]["content"] for line in lines) == (
        "tok0 tok1 tok2 tok3 tok4 "
    )
    assert [line["done"] for line in lines] == [False] * 5 + [True]
    received = only(chain.fake.received)
    assert (received.method, received.uri, received.body) == (b"POST", b"/api/chat", SEED_BODY)


# -- 3. authentication ------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x", KEY[:-1]])
def test_without_the_key_401_and_nothing_reaches_ollama(key: str | None) -> None:
    """
    No key or a wrong one: a 401 in Ollama's JSON error shape, with
    C{WWW-Authenticate: Bearer}, and Ollama never hears of the request.
    """
    chain = Chain()
    reply = call(chain, "POST", "/api/chat", key=key, data=chat())
    assert reply.code == 401
    is_ollama_error(reply)
    assert reply.header(b"www-authenticate") == [b"Bearer"]
    assert chain.fake.received == []


@pytest.mark.parametrize("path", ["/api/tags", "/proxy/api/tags"])
def test_x_api_key_header_works(path: str) -> None:
    """
    The key sent as C{X-API-Key} (the seed's header) is accepted.
    """
    chain = Chain()
    reply = call(chain, "GET", path, key=None, headers={"X-API-Key": KEY})
    assert reply.code == 200
    assert [m["name"] for m in reply.json()["models"]] == chain.fake.models


def test_wrong_x_api_key_is_refused() -> None:
    """
    A wrong C{X-API-Key} is a 401 like a wrong bearer token.
    """
    chain = Chain()
    reply = call(chain, "GET", "/api/tags", key=None, headers={"X-API-Key": "wrong"})
    assert reply.code == 401
    assert chain.fake.received == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/", b"Ollama is running"),
        ("HEAD", "/", b""),
        ("GET", "/api/version", b'{"version":"0.33.0"}'),
        ("HEAD", "/api/version", b""),
        ("GET", "/proxy/", b"Ollama is running"),
        ("GET", "/proxy", b"Ollama is running"),
        ("HEAD", "/proxy/", b""),
        ("GET", "/proxy/api/version", b'{"version":"0.33.0"}'),
        ("GET", "/api/version?x=1", b'{"version":"0.33.0"}'),
    ],
)
def test_open_routes_need_no_key(method: str, path: str, body: bytes) -> None:
    """
    The liveness routes answer without a key, with or without C{/proxy}.
    """
    chain = Chain()
    reply = call(chain, method, path, key=None)
    assert reply.code == 200
    assert reply.body == body
    assert only(chain.fake.received).method == method.encode()


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/"), ("GET", "/api/version"), ("HEAD", "/proxy/api/version")]
)
def test_open_route_without_key_refuses_a_body(method: str, path: str) -> None:
    """
    A request without a key on an open route may not carry a body: it is
    refused with 413 and never reaches Ollama, so nobody without a key can
    hold one of Ollama's connections for as long as a body takes.  With a
    key, or without a body, it goes through.
    """
    chain = Chain()
    reply = call(chain, method, path, key=None, data=b'{"padding": "x"}')
    assert reply.code == 413
    if method != "HEAD":
        assert json.loads(reply.body) == {"error": "a request without a key cannot have a body"}
    assert chain.fake.received == []
    assert call(chain, method, path, key=None).code == 200
    assert call(chain, method, path, data=b"{}").code == 200


def test_no_open_routes_means_root_needs_a_key() -> None:
    """
    With no open routes configured, even C{GET /} needs a key.
    """
    chain = Chain(open_routes="")
    reply = call(chain, "GET", "/", key=None)
    assert reply.code == 401
    assert chain.fake.received == []
    assert call(chain, "GET", "/").code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/version"),
        ("GET", "/api/version/"),
        ("GET", "/API/version"),
        ("GET", "/api/Version"),
        ("GET", "//api/version"),
        ("GET", "/api//version"),
        ("GET", "/api/version%2F"),
        ("GET", "/proxy/api/version/"),
        ("GET", "/proxyapi/version"),
        ("GET", "/api/tags"),
        ("HEAD", "/api/tags"),
        ("GET", "/api/ps"),
        ("DELETE", "/api/delete"),
    ],
)
def test_other_spellings_of_open_routes_need_a_key(method: str, path: str) -> None:
    """
    Only the exact open routes are open: other methods, trailing slashes,
    other cases and doubled slashes need a key.
    """
    chain = Chain()
    reply = call(chain, method, path, key=None)
    assert reply.code == 401
    assert chain.fake.received == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/proxy/v1/completions"),
        ("GET", "/v1"),
    ],
)
def test_401_on_v1_has_openai_shape(method: str, path: str) -> None:
    """
    On the OpenAI-compatible routes the 401 body has OpenAI's error shape.
    """
    chain = Chain()
    reply = call(chain, method, path, key=None, data=chat() if method == "POST" else None)
    assert reply.code == 401
    is_openai_error(reply)
    assert reply.header(b"www-authenticate") == [b"Bearer"]
    assert chain.fake.received == []


# -- 4. request headers -----------------------------------------------------

CLIENT_HEADERS: dict[str, str | list[str]] = {
    "X-API-Key": KEY,
    "Cookie": "session=s3cret",
    "Origin": "https://chat.example.com",
    "Referer": "https://chat.example.com/page",
    "Proxy-Authorization": "Basic dXNlcjpwYXNz",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Upgrade": "foo/1",
    "Connection": "X-Drop-Me",
    "X-Drop-Me": "1",
    "User-Agent": "ollama-python/0.4.7 (x86_64 linux) Python/3.11",
    "Accept": "application/x-ndjson",
    "Content-Type": "application/json",
    "X-Stainless-Os": "Linux",
    "X-Custom": ["one", "two"],
}


def _received_headers() -> Headers:
    chain = Chain()
    reply = call(chain, "POST", "/api/chat", headers=CLIENT_HEADERS, data=chat())
    assert reply.code == 200
    return only(chain.fake.received).headers


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "X-API-Key",
        "Cookie",
        "Origin",
        "Referer",
        "Proxy-Authorization",
        "Keep-Alive",
        "TE",
        "Upgrade",
        "X-Drop-Me",
    ],
)
def test_private_and_hop_by_hop_headers_do_not_reach_ollama(name: str) -> None:
    """
    Credentials, cookies, browser origins, hop-by-hop headers and the
    headers C{Connection} names stay at the proxy.
    """
    assert _received_headers().getRawHeaders(name.encode()) is None


def test_client_connection_header_does_not_reach_ollama() -> None:
    """
    The client's C{Connection} value (naming its own hop-by-hop headers) is
    not forwarded.
    """
    values = _received_headers().getRawHeaders(b"connection") or []
    assert not any(b"x-drop-me" in v.lower() for v in values)


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("User-Agent", [b"ollama-python/0.4.7 (x86_64 linux) Python/3.11"]),
        ("Accept", [b"application/x-ndjson"]),
        ("Content-Type", [b"application/json"]),
        ("X-Stainless-Os", [b"Linux"]),
        ("X-Custom", [b"one", b"two"]),
        ("Host", [b"127.0.0.1:11434"]),
    ],
)
def test_end_to_end_headers_reach_ollama(name: str, values: list[bytes]) -> None:
    """
    Ordinary headers reach Ollama unchanged (a repeated one with all its
    values), and C{Host} is Ollama's own, not the client's.
    """
    assert _received_headers().getRawHeaders(name.encode()) == values


# -- 5. response headers ----------------------------------------------------


def _held_reply(headers: Mapping[bytes, bytes]) -> Reply:
    """
    A chat answer whose head the test sets: C{headers}, then one line.
    """
    chain = Chain()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    held = chain.fake.held[-1]
    for name, value in headers.items():
        held.request.setHeader(name, value)
    held.send_head()
    held.write_line({"a": 1})
    held.finish()
    chain.flush()
    return _read(chain.result(d), chain.flush)


UPSTREAM_HEADERS = {
    b"Connection": b"X-Secret",
    b"X-Secret": b"1",
    b"Keep-Alive": b"timeout=5",
    b"X-Kept": b"yes",
}


def test_end_to_end_response_headers_reach_the_client() -> None:
    """
    An ordinary header of Ollama's response reaches the client, with the body.
    """
    reply = _held_reply(UPSTREAM_HEADERS)
    assert reply.header(b"x-kept") == [b"yes"]
    assert reply.header(b"content-type") == [b"application/x-ndjson"]
    assert reply.body == b'{"a":1}\n'


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            b"X-Secret",
            marks=pytest.mark.xfail(
                strict=True,
                reason="Twisted's HTTP client keeps the response's Connection header "
                "to itself, so the names it lists cannot be seen; Ollama never lists any",
            ),
        ),
        b"Keep-Alive",
    ],
)
def test_hop_by_hop_response_headers_stay_at_the_proxy(name: bytes) -> None:
    """
    Ollama's hop-by-hop headers, and those its C{Connection} header names,
    do not reach the client.
    """
    assert _held_reply(UPSTREAM_HEADERS).header(name) is None


def test_upstream_connection_value_is_not_forwarded() -> None:
    """
    The C{Connection} header the client gets (if any) is the proxy's own,
    never Ollama's list of its hop-by-hop headers.
    """
    values = _held_reply(UPSTREAM_HEADERS).header(b"connection") or []
    assert not any(b"x-secret" in v.lower() for v in values)


@pytest.mark.parametrize(
    ("agent", "method", "path", "key", "status"),
    [
        (None, "GET", "/api/tags", KEY, 200),
        (None, "POST", "/api/chat", KEY, 200),
        (None, "GET", "/", None, 200),
        (None, "GET", "/api/nothing", KEY, 404),
        (None, "GET", "/api/tags", None, 401),
        (FailingAgent(ConnectionRefusedError()), "GET", "/api/tags", KEY, 502),
    ],
)
def test_no_server_header(
    agent: IAgent | None, method: str, path: str, key: str | None, status: int
) -> None:
    """
    No C{Server} header reaches the client, on relayed answers or on the
    proxy's own errors.
    """
    chain = Chain(agent=agent)
    reply = call(chain, method, path, key=key, data=chat() if method == "POST" else None)
    assert reply.code == status
    assert reply.header(b"server") is None


def test_no_server_header_on_internal_error(observe_errors: ErrorCollector) -> None:
    """
    No C{Server} header on the 500 of a bug either.
    """
    chain = Chain(agent=FailingAgent(RuntimeError("bug"), raises=True))
    reply = call(chain, "GET", "/api/tags")
    assert reply.code == 500
    assert reply.header(b"server") is None
    assert observe_errors.errors
    observe_errors.errors.clear()


# -- 6. Ollama unreachable --------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(), DNSLookupError("no such host: ollama.internal")],
    ids=["refused", "dns"],
)
@pytest.mark.parametrize("path", ["/api/chat", "/proxy/api/chat"])
def test_unreachable_ollama_is_502(error: Exception, path: str) -> None:
    """
    When Ollama cannot be reached, the client gets a 502 whose Ollama-shaped
    error says so and names the address tried (never a key).
    """
    chain = Chain(agent=FailingAgent(error))
    reply = call(chain, "POST", path, data=chat())
    assert reply.code == 502
    message = is_ollama_error(reply)
    assert message.startswith("cannot reach Ollama at http://127.0.0.1:11434: ")
    assert KEY not in message


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(), DNSLookupError("no such host: ollama.internal")],
    ids=["refused", "dns"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/proxy/v1/chat/completions"])
def test_unreachable_ollama_on_v1_is_openai_shaped_502(error: Exception, path: str) -> None:
    """
    On C{/v1}, the 502 for an unreachable Ollama has OpenAI's error shape,
    and names the address tried.
    """
    chain = Chain(agent=FailingAgent(error))
    reply = call(chain, "POST", path, data=chat(stream=True))
    assert reply.code == 502
    assert is_openai_error(reply).startswith("cannot reach Ollama at http://127.0.0.1:11434: ")


# -- 7. a bug in the proxy --------------------------------------------------


@pytest.mark.parametrize(
    ("path", "check"),
    [("/api/chat", is_ollama_error), ("/v1/chat/completions", is_openai_error)],
)
def test_bug_is_a_bare_500_and_is_logged(
    path: str, check: Callable[[Reply], str], observe_errors: ErrorCollector
) -> None:
    """
    An unexpected exception becomes a 500 saying only "internal error",
    without a traceback, and is logged with its traceback.
    """
    chain = Chain(agent=FailingAgent(RuntimeError("kaboom in the relay"), raises=True))
    reply = call(chain, "POST", path, data=chat())
    assert reply.code == 500
    assert check(reply) == INTERNAL
    for leak in (b"Traceback", b"RuntimeError", b"kaboom", b".py"):
        assert leak not in reply.body
    logged = [e["log_failure"] for e in observe_errors.errors if e.get("log_failure")]
    assert [f.type for f in logged] == [RuntimeError]
    observe_errors.errors.clear()


def test_a_bug_after_the_answer_ended_is_logged_not_answered(
    observe_errors: ErrorCollector, access_events: list[LogEvent]
) -> None:
    """
    A bug in what a request does after its answer has ended (the relay ends
    the response with Ollama's last byte: here, settling its tokens) is
    logged, and recorded as what it was: the client has had its whole
    answer, with its status, and nothing is written after it.
    """
    chain = Chain()
    reserve = chain.quotas.reserve

    def settle_badly(key: ApiKey, tokens: int) -> Callable[[int], None]:
        reserve(key, tokens)

        def settle(used: int) -> None:
            raise RuntimeError("kaboom after the answer")

        return settle

    chain.quotas.reserve = settle_badly  # type: ignore[method-assign]
    reply = call(chain, "POST", "/api/chat", data=chat())
    assert reply.code == 200
    assert json.loads(reply.body.splitlines()[-1])["done"] is True
    [access] = access_events
    assert (access["status"], access["outcome"]) == (200, "internal_error")
    logged = [e["log_failure"].type for e in observe_errors.errors if e.get("log_failure")]
    assert logged == [RuntimeError]
    observe_errors.errors.clear()


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [(RuntimeError("kaboom before the pipeline"), 500, INTERNAL),
     (ProxyError(503, "not now"), 503, "not now")],
    ids=["bug", "proxy-error"],
)
def test_an_error_that_escapes_the_pipeline_is_answered(
    error: Exception, code: int, message: str, observe_errors: ErrorCollector
) -> None:
    """
    An error raised outside the pipeline's own handling, on one of Ollama's
    fixed routes (served without Klein's routing, C{web/front.py}), is
    answered as Klein's error handlers answer one on the proxy's other
    routes, and the response ends.
    """
    chain = Chain()

    def fail() -> None:
        raise error

    chain.proxy._metrics.stream_started = fail  # type: ignore[method-assign]
    reply = call(chain, "GET", "/api/tags")
    assert (reply.code, is_ollama_error(reply)) == (code, message)
    logged = [e["log_failure"].type for e in observe_errors.errors if e.get("log_failure")]
    assert logged == ([RuntimeError] if code == 500 else [])
    observe_errors.errors.clear()


# -- 8. the access log ------------------------------------------------------


@dataclass(frozen=True)
class Logged:
    """
    What the access event of one request should say.
    """

    method: str
    path: str
    status: int
    key: str
    outcome: str


ACCESS = [
    pytest.param(
        None, "GET", "/proxy/api/tags", KEY, {},
        Logged("GET", "/api/tags", 200, "alice", "completed"), id="proxied",
    ),
    pytest.param(
        None, "POST", "/api/chat", KEY, {},
        Logged("POST", "/api/chat", 200, "alice", "completed"), id="streamed",
    ),
    pytest.param(
        None, "POST", "/v1/chat/completions?x=1", KEY, {},
        Logged("POST", "/v1/chat/completions", 200, "alice", "completed"), id="v1 query",
    ),
    pytest.param(
        None, "GET", "/api/tags", None, {"X-API-Key": KEY},
        Logged("GET", "/api/tags", 200, "alice", "completed"), id="x-api-key",
    ),
    pytest.param(
        None, "GET", "/api/nothing", KEY, {},
        Logged("GET", "/api/nothing", 404, "alice", "completed"), id="ollama 404",
    ),
    pytest.param(
        None, "GET", "/proxy/", None, {},
        Logged("GET", "/", 200, "-", "completed"), id="open route",
    ),
    pytest.param(
        None, "HEAD", "/api/version", KEY, {},
        Logged("HEAD", "/api/version", 200, "alice", "completed"), id="open route with key",
    ),
    pytest.param(
        None, "GET", "/api/tags", None, {},
        Logged("GET", "/api/tags", 401, "-", "rejected"), id="no key",
    ),
    pytest.param(
        None, "GET", "/proxy/api/tags", "wrong-key-0123456789", {},
        Logged("GET", "/api/tags", 401, "-", "rejected"), id="wrong key",
    ),
    pytest.param(
        FailingAgent(ConnectionRefusedError()), "POST", "/proxy/api/chat", KEY, {},
        Logged("POST", "/api/chat", 502, "alice", "upstream_error"), id="unreachable",
    ),
    pytest.param(
        FailingAgent(DNSLookupError("x")), "GET", "/v1/models", KEY, {},
        Logged("GET", "/v1/models", 502, "alice", "upstream_error"), id="dns",
    ),
]


def _access(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_namespace") == "ollamaproxy.access"]


@pytest.mark.parametrize(("agent", "method", "path", "key", "headers", "logged"), ACCESS)
def test_one_access_event_per_request(
    agent: IAgent | None,
    method: str,
    path: str,
    key: str | None,
    headers: dict[str, str],
    logged: Logged,
) -> None:
    """
    Every request ends with exactly one access event saying who asked for
    what and how it ended.
    """
    chain = Chain(agent=agent)
    with capturedLogs() as events:
        reply = call(
            chain, method, path, key=key, headers=headers,
            data=chat() if method == "POST" else None,
        )
    assert reply.code == logged.status
    [event] = _access(list(events))
    assert {f: event[f] for f in ("method", "path", "status", "key", "outcome")} == {
        "method": logged.method,
        "path": logged.path,
        "status": logged.status,
        "key": logged.key,
        "outcome": logged.outcome,
    }


@pytest.mark.parametrize(("agent", "method", "path", "key", "headers", "logged"), ACCESS)
def test_no_key_in_any_log_event(
    agent: IAgent | None,
    method: str,
    path: str,
    key: str | None,
    headers: dict[str, str],
    logged: Logged,
) -> None:
    """
    Neither the real key nor a wrong one presented appears in any field of
    any event logged during a request, nor in its formatted text.
    """
    chain = Chain(agent=agent)
    with capturedLogs() as events:
        call(
            chain, method, path, key=key, headers=headers,
            data=chat() if method == "POST" else None,
        )
    secrets = {KEY, "wrong-key-0123456789"}
    assert _access(list(events))
    for event in events:
        texts = [formatEvent(event)] + [f"{v!s} {v!r}" for v in event.values()]
        for secret in secrets:
            assert not any(secret in text for text in texts), event


def test_access_event_waits_for_the_end_of_the_stream() -> None:
    """
    A streamed answer is logged once, when its body has ended, with the
    number of bytes sent.
    """
    chain = Chain()
    with capturedLogs() as events:
        d = chain.request("POST", "/api/chat", data=chat("hold"))
        held = chain.fake.held[-1]
        held.write_line({"a": 1})
        chain.flush()
        collector = chain.stream(chain.result(d))
        assert _access(list(events)) == []
        held.finish()
        chain.flush()
        chain.result(collector.done)
    [event] = _access(list(events))
    assert event["outcome"] == "completed"
    assert event["status"] == 200
    assert event["sent_bytes"] == len(collector.body) == len(b'{"a":1}\n')


def test_bug_is_logged_as_a_500(observe_errors: ErrorCollector) -> None:
    """
    A request that hit a bug is logged with status 500, not as completed.
    """
    chain = Chain(agent=FailingAgent(RuntimeError("kaboom"), raises=True))
    with capturedLogs() as events:
        reply = call(chain, "GET", "/api/tags")
    observe_errors.errors.clear()
    assert reply.code == 500
    [event] = _access(list(events))
    assert event["status"] == 500
    assert event["outcome"] != "completed"


def test_a_client_that_left_the_queue_is_logged_with_its_wait() -> None:
    """
    A request whose client left while it waited in the fair queue is
    logged with the time it waited, and with C{-} for the status it never
    had, not C{None}.
    """
    chain = Chain(parallel=1)
    with capturedLogs() as events:
        first = chain.request("POST", "/api/chat", data=chat("hold"))
        waiting = chain.request("POST", "/api/chat", data=chat("hold"))
        chain.clock.advance(0.685)
        waiting.cancel()
        chain.failure(waiting)
        chain.flush()
        [event] = _access(list(events))
        chain.fake.held[0].finish()
        chain.flush()
        chain.body(chain.result(first))
    assert (event["status"], event["outcome"]) == (None, "client_disconnected")
    assert event["queued"] == pytest.approx(0.685)
    assert formatEvent(event) == (
        "127.0.0.1 alice POST /api/chat - client_disconnected 0B 0.685s queued 0.685s"
    )


def test_a_request_that_timed_out_in_the_queue_is_logged_with_its_wait() -> None:
    """
    A request refused after waiting C{--queue-timeout} seconds in the fair
    queue is logged with that wait.
    """
    chain = Chain(parallel=1, queue_timeout=30)
    with capturedLogs() as events:
        first = chain.request("POST", "/api/chat", data=chat("hold"))
        queued = chain.request("POST", "/api/chat", data=chat("hold"))
        chain.clock.advance(30)
        chain.flush()
        assert chain.result(queued).code == 503
        [event] = _access(list(events))
        chain.fake.held[0].finish()
        chain.flush()
        chain.body(chain.result(first))
    assert (event["outcome"], event["queued"]) == ("queue_timeout", 30)
    assert " queued 30.000s " in formatEvent(event)


@pytest.mark.parametrize(
    ("agent", "key", "code"),
    [
        pytest.param(None, "wrong-key-0123456789", 401, id="refused by the proxy"),
        pytest.param(FailingAgent(RuntimeError("kaboom"), raises=True), KEY, 500, id="bug"),
    ],
)
def test_the_body_of_an_error_answer_is_counted(
    agent: IAgent | None, key: str, code: int, observe_errors: ErrorCollector
) -> None:
    """
    The bytes of an error the proxy answers itself (its JSON body) are
    counted in the access event, as the bytes of any other answer.
    """
    chain = Chain(agent=agent)
    with capturedLogs() as events:
        reply = call(chain, "GET", "/api/tags", key=key)
    observe_errors.errors.clear()
    assert reply.code == code
    [event] = _access(list(events))
    assert reply.body
    assert event["sent_bytes"] == len(reply.body)
    assert f" {code} " in formatEvent(event)
    assert f" {len(reply.body)}B " in formatEvent(event)


@pytest.mark.parametrize(
    ("backends", "named"),
    [
        pytest.param([["llama3.2:latest"]], False, id="one"),
        pytest.param([["llama3.2:latest"], ["mistral:latest"]], True, id="several"),
    ],
)
def test_the_access_line_names_the_backend_when_there_are_several(
    backends: list[list[str]], named: bool
) -> None:
    """
    With several backends the access line says which one the request went
    to; with one, it does not repeat its address on every line.  The
    event's C{upstream} field names it either way.
    """
    chain = Chain(backends=backends)
    chain.pool.refresh_all()
    chain.flush()
    with capturedLogs() as events:
        assert call(chain, "POST", "/api/chat", data=chat()).code == 200
    [event] = _access(list(events))
    assert event["upstream"] == OLLAMA
    assert (f" backend {OLLAMA}" in formatEvent(event)) is named


WEBUI = "olpk_webuikeywebuikeywebuikeywebuikey00"
USER_HEADER = "X-OpenWebUI-User-Id"


def webui_chain(**options: Any) -> Chain:
    """
    The chain with a second key, C{webui}, whose front-end names its users
    in C{X-OpenWebUI-User-Id}, beside C{alice}, which names none.
    """
    chain = Chain(**options)
    chain.keys.replace([*chain.keys,
                        ApiKey("webui", digest(WEBUI), user_header=USER_HEADER)])
    return chain


def test_users_behind_one_key_take_turns(access_events: list[LogEvent]) -> None:
    """
    At --parallel 1, one user's batch behind the C{webui} key waits behind
    its first request; another user's request of the same key, sent after
    the batch, is the next to reach Ollama.  Each access event names its
    user, and the text line shows it.
    """
    chain = webui_chain(parallel=1)
    batch = [chain.request("POST", "/api/chat", key=WEBUI, data=chat("hold", n=i),
                           headers={USER_HEADER: "batch-user"}) for i in range(4)]
    other = chain.request("POST", "/api/chat", key=WEBUI, data=chat("hold", n="other"),
                          headers={USER_HEADER: "chat-user"})
    assert chain.router.queue.waiting() == {"webui": 4}
    for held in range(5):
        chain.fake.held[held].finish()
        chain.flush()
    assert [r.json()["n"] for r in chain.fake.received] == [0, "other", 1, 2, 3]
    for d in [*batch, other]:
        chain.body(chain.result(d))
    users = [e["user"] for e in access_events]
    assert sorted(users) == ["batch-user"] * 4 + ["chat-user"]
    [line] = [e["line"] for e in access_events if e["user"] == "chat-user"]
    assert " user chat-user" in line


def test_a_request_naming_no_user_is_the_keys_anonymous_user(
    access_events: list[LogEvent],
) -> None:
    """
    A request of a key with a user header that sends none is served, as
    the key's anonymous user: its access event's user is empty, and its
    text line names none.
    """
    chain = webui_chain()
    response = chain.respond("POST", "/api/chat", key=WEBUI, data=chat(stream=False))
    assert response.code == 200
    chain.body(response)
    [event] = access_events
    assert event["user"] == "" and " user" not in event["line"]


@pytest.mark.parametrize("value", ["bob smith", "x" * 129, "a/b", "b\u00f6b"])
def test_a_user_that_is_no_user_is_refused(access_events: list[LogEvent], value: str) -> None:
    """
    A user header's value beyond the bound, or with a character outside
    letters, digits and C{-._@+:}, is a 400 in Ollama's shape, recorded as
    rejected; nothing reaches Ollama.
    """
    chain = webui_chain()
    response = chain.respond("POST", "/api/chat", key=WEBUI, data=chat(stream=False),
                             headers={USER_HEADER: value})
    assert response.code == 400
    assert list(json.loads(chain.body(response))) == ["error"]
    assert chain.fake.received == []
    [event] = access_events
    assert (event["status"], event["outcome"], event["user"]) == (400, "rejected", None)


def test_the_user_header_is_read_only_for_keys_that_name_it(
    access_events: list[LogEvent],
) -> None:
    """
    A key that names no user header is one user: the header, whatever its
    value, is neither read nor refused, and its access event has no user.
    Ollama receives the header either way, as it receives any header the
    proxy does not keep to itself.
    """
    chain = webui_chain()
    for key, value in ((KEY, "not a user!"), (WEBUI, "alice@example.com")):
        response = chain.respond("POST", "/api/chat", key=key, data=chat(stream=False),
                                 headers={USER_HEADER: value,
                                          "X-OpenWebUI-User-Email": "a@example.com"})
        assert response.code == 200
        chain.body(response)
    assert [e["user"] for e in access_events] == [None, "alice@example.com"]
    assert [r.headers.getRawHeaders(USER_HEADER) for r in chain.fake.received] == [
        ["not a user!"], ["alice@example.com"]]
    assert all("a@example.com" not in e["line"] for e in access_events)


def test_a_key_sent_as_a_user_is_refused(access_events: list[LogEvent]) -> None:
    """
    A client that sends a key as its user (a front-end set up to send its
    key there) is refused with a 400 that does not repeat it; nothing goes
    to Ollama, and the key is in no event.
    """
    chain = webui_chain()
    with capturedLogs() as events:
        response = chain.respond("POST", "/api/chat", key=WEBUI, data=chat(stream=False),
                                 headers={USER_HEADER: WEBUI})
        body = chain.body(response).decode()
    assert response.code == 400
    assert "credential" in body and WEBUI not in body
    assert chain.fake.received == []
    [event] = access_events
    assert event["status"] == 400 and not event["user"]
    assert WEBUI not in event["line"]
    # Nor in any other event the request logged (the access event's fields
    # included).
    assert events and not [e for e in events if WEBUI in repr(e) + formatEvent(e)]
