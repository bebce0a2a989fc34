"""
Tests for L{tests.fakes.ollama}: the fake must speak Ollama's wire formats,
since the proxy's tests trust it.  Everything runs in memory, without a
running reactor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from treq import collect, content
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IResponse

from tests.fakes.ollama import MODEL_ERROR, FakeOllama, in_memory_client

BASE = "http://127.0.0.1:11434"


def _fired(d: Deferred[Any]) -> bool:
    """
    Whether a Deferred has a result by now (C{called} is also true while it
    waits on another Deferred).
    """
    box: list[Any] = []

    def peek(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(peek)
    return bool(box)


def _result(d: Deferred[Any]) -> Any:
    """
    The result a Deferred already has; fails the test if it has none.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


@dataclass
class Env:
    """
    A fake, a clock, and a treq client wired to the fake in memory.
    """

    check_host: bool = True
    clock: Clock = field(default_factory=Clock)
    fake: FakeOllama = field(init=False)
    agent: RequestTraversalAgent = field(init=False)
    client: HTTPClient = field(init=False)

    def __post_init__(self) -> None:
        self.fake = FakeOllama(self.clock, check_host=self.check_host)
        self.agent, self.client = in_memory_client(self.fake)

    def send(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[bytes | str, list[bytes | str]] | None = None) -> Deferred[Any]:
        """
        Start a request (JSON body unless C{raw}) and pump it.
        """
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        d: Deferred[Any] = self.client.request(method, BASE + path, data=data, headers=headers)
        self.agent.flush()
        return d

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[IResponse, bytes]:
        """
        A complete request: the response and its whole body.
        """
        response: IResponse = _result(self.send(method, path, body, **kw))
        d = content(response)
        self.agent.flush()
        return response, _result(d)


def _header(response: IResponse, name: bytes) -> bytes | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def test_root() -> None:
    """GET / answers the exact liveness text; HEAD / has the headers only."""
    env = Env()
    response, body = env.call("GET", "/")
    assert (response.code, body) == (200, b"Ollama is running")
    assert _header(response, b"content-type") == b"text/plain; charset=utf-8"
    assert _header(response, b"server") is None
    response, body = env.call("HEAD", "/")
    assert (response.code, body, _header(response, b"content-length")) == (200, b"", b"17")


def test_version() -> None:
    """/api/version is compact JSON with charset and no trailing newline."""
    response, body = Env().call("GET", "/api/version")
    assert body == b'{"version":"0.33.0"}'
    assert _header(response, b"content-type") == b"application/json; charset=utf-8"


def test_tags_shape() -> None:
    """/api/tags lists the configured models with Ollama's fields, in order."""
    _, body = Env().call("GET", "/api/tags")
    models = json.loads(body)["models"]
    assert [m["name"] for m in models] == ["llama3.2:latest", "mistral:latest"]
    assert list(models[0]) == ["name", "model", "modified_at", "size", "digest", "details"]
    assert len(models[0]["digest"]) == 64 and models[0]["details"]["family"] == "llama"


def test_chat_stream() -> None:
    """A streamed chat is NDJSON: one object per line, the last one done."""
    env = Env()
    response, body = env.call("POST", "/api/chat", {
        "model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 3}})
    assert _header(response, b"content-type") == b"application/x-ndjson"
    assert body.endswith(b"\n") and b"\n\n" not in body
    lines = [json.loads(line) for line in body.splitlines()]
    assert [line["message"]["content"] for line in lines] == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 3
    assert list(lines[0]) == ["model", "created_at", "message", "done"]
    assert lines[0]["model"] == "llama3.2" and lines[0]["created_at"] == "1970-01-01T00:00:00Z"


def test_generate_no_stream() -> None:
    """stream false gives one JSON object, charset type, no trailing newline."""
    response, body = Env().call("POST", "/api/generate",
                                {"model": "mistral", "prompt": "x", "stream": False})
    assert _header(response, b"content-type") == b"application/json; charset=utf-8"
    assert not body.endswith(b"\n")
    obj = json.loads(body)
    assert obj["response"] == "tok0 tok1 tok2 tok3 tok4 "
    assert (obj["done"], obj["done_reason"], obj["eval_count"]) == (True, "stop", 5)


def test_load_reply() -> None:
    """An empty prompt only loads the model: JSON even though streaming was asked."""
    response, body = Env().call("POST", "/api/generate", {"model": "mistral"})
    assert _header(response, b"content-type") == b"application/json; charset=utf-8"
    assert json.loads(body)["done_reason"] == "load"


def test_v1_chat_sse() -> None:
    """/v1 streaming is SSE in the current chunk format, ending with [DONE]."""
    env = Env()
    response, body = env.call("POST", "/v1/chat/completions", {
        "model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "max_tokens": 2, "stream_options": {"include_usage": True}})
    assert _header(response, b"content-type") == b"text/event-stream"
    events = body.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [
        {"role": "assistant", "content": "tok0 "}, {"content": "tok1 "}, {}]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 2
    assert list(chunks[0]) == ["id", "object", "created", "model", "system_fingerprint",
                               "choices"]


def test_v1_no_stream() -> None:
    """/v1 without stream is plain application/json ending with a newline."""
    response, body = Env().call("POST", "/v1/completions", {"model": "mistral", "prompt": "a"})
    assert _header(response, b"content-type") == b"application/json"
    assert body.endswith(b"}\n")
    assert json.loads(body)["choices"][0]["text"] == "tok0 tok1 tok2 tok3 tok4 "


def test_held_stream() -> None:
    """Model "hold" sends the head, then exactly what the test writes, when it writes it."""
    env = Env()
    response: IResponse = _result(env.send("POST", "/api/chat", {
        "model": "hold", "messages": [{"role": "user", "content": "hi"}]}))
    assert _header(response, b"content-type") == b"application/x-ndjson"
    held = env.fake.held[-1]
    chunks: list[bytes] = []
    done = collect(response, chunks.append)
    env.agent.flush()
    assert chunks == []
    held.write_line({"a": 1})
    env.agent.flush()
    assert chunks == [b'{"a":1}\n']
    held.write_raw(b"partial")
    env.agent.flush()
    assert chunks[-1] == b"partial" and not _fired(done)
    held.finish()
    env.agent.flush()
    assert _fired(done) and not held.disconnected.called and env.fake.connections_lost == 0


def test_held_abort() -> None:
    """HeldStream.abort drops the connection mid-body; that is not counted as the client's."""
    env = Env()
    response = _result(env.send("POST", "/api/generate", {"model": "hold", "prompt": "x"}))
    done = collect(response, lambda data: None)
    env.fake.held[-1].abort()
    env.agent.flush()
    failures: list[Failure] = []
    done.addErrback(failures.append)
    assert failures and env.fake.connections_lost == 0


def test_slowhead() -> None:
    """Model "slowhead" sends nothing until the test writes; a client hang-up is seen."""
    env = Env()
    d = env.send("POST", "/api/generate", {"model": "slowhead", "prompt": "x"})
    held = env.fake.held[-1]
    assert not _fired(d) and not held.head_sent
    held.write_line({"response": "x"})
    env.agent.flush()
    assert _header(_result(d), b"content-type") == b"application/x-ndjson"
    d2 = env.send("POST", "/api/generate", {"model": "slowhead", "prompt": "x"})
    d2.cancel()
    env.agent.flush()
    d2.addErrback(lambda f: f.trap(ResponseNeverReceived))
    assert env.fake.held[-1].disconnected.called and env.fake.connections_lost == 1


class _HangUp(Protocol):
    """
    Reads a response body and closes the connection after the first chunk.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.transport.stopProducing()  # type: ignore[union-attr]


def test_stream_client_hangs_up() -> None:
    """A client closing mid-stream is counted and the fake stops writing."""
    env = Env()
    response = _result(env.send("POST", "/api/chat", {
        "model": "mistral", "messages": [{"role": "user", "content": "hi"}],
        "options": {"fake_delay": 1}}))
    reader = _HangUp()
    response.deliverBody(reader)
    env.agent.flush()
    assert len(reader.chunks) == 1 and env.fake.connections_lost == 1
    env.clock.advance(10)
    env.agent.flush()
    assert len(reader.chunks) == 1 and not env.clock.getDelayedCalls()


def test_slowhead_release() -> None:
    """HeldStream.release lets a held request stream its tokens normally."""
    env = Env()
    d = env.send("POST", "/api/chat", {"model": "slowhead", "options": {"num_predict": 1},
                                       "messages": [{"role": "user", "content": "x"}]})
    env.fake.held[-1].release()
    env.agent.flush()
    lines = _result(content(_result(d))).splitlines()
    assert [json.loads(line)["done"] for line in lines] == [False, True]


def test_broken_stream() -> None:
    """Model "broken" streams two tokens, then Ollama's error line, and no done line."""
    _, body = Env().call("POST", "/api/chat", {
        "model": "broken", "messages": [{"role": "user", "content": "hi"}]})
    lines = [json.loads(line) for line in body.splitlines()]
    assert len(lines) == 3 and lines[-1] == {"error": MODEL_ERROR}
    assert not any(line.get("done") for line in lines)


def test_fake_delay() -> None:
    """options.fake_delay spaces the lines on the clock given to the fake."""
    env = Env()
    response = _result(env.send("POST", "/api/generate", {
        "model": "mistral", "prompt": "x", "options": {"num_predict": 2, "fake_delay": 1.5}}))
    chunks: list[bytes] = []
    done = collect(response, chunks.append)
    env.agent.flush()
    assert len(chunks) == 1
    env.clock.advance(1.5)
    env.agent.flush()
    assert len(chunks) == 2 and not _fired(done)
    env.clock.advance(1.5)
    env.agent.flush()
    assert len(chunks) == 3 and _fired(done)
    assert json.loads(chunks[-1])["created_at"] == "1970-01-01T00:00:01.5Z"


def test_long_stream_in_batches() -> None:
    """Long streams are written in batches, one per reactor turn (clock.advance(0))."""
    env = Env()
    response = _result(env.send("POST", "/api/generate", {
        "model": "mistral", "prompt": "x", "options": {"num_predict": 2000}}))
    chunks: list[bytes] = []
    done = collect(response, chunks.append)
    env.agent.flush()
    assert 0 < len(chunks) < 2001
    while not _fired(done):
        env.clock.advance(0)
        env.agent.flush()
    assert len(chunks) == 2001 and json.loads(chunks[-1])["eval_count"] == 2000


def test_delete() -> None:
    """DELETE /api/delete takes a JSON body: 200 empty, then 404 in Ollama's words."""
    env = Env()
    response, body = env.call("DELETE", "/api/delete", {"model": "mistral:latest"})
    assert (response.code, body, _header(response, b"content-type")) == (200, b"", None)
    assert env.fake.models == ["llama3.2:latest"]
    assert env.fake.received[-1].json() == {"model": "mistral:latest"}
    response, body = env.call("DELETE", "/api/delete", {"model": "mistral:latest"})
    assert (response.code, body) == (404, b'{"error":"model \'mistral:latest\' not found"}')


def test_blobs() -> None:
    """Blob uploads are checked against their digest and recorded by size and hash only."""
    env = Env()
    data = b"GGUF" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    response, _ = env.call("HEAD", "/api/blobs/" + digest)
    assert response.code == 404
    response, body = env.call("POST", "/api/blobs/" + digest, raw=data)
    assert (response.code, body) == (201, b"")
    record = env.fake.received[-1]
    assert (record.body, record.body_length, record.body_sha256) == (b"", 4000, digest[7:])
    response, _ = env.call("HEAD", "/api/blobs/" + digest)
    assert response.code == 200
    wrong = "sha256:" + "0" * 64
    response, body = env.call("POST", "/api/blobs/" + wrong, raw=data)
    assert response.code == 400
    assert json.loads(body) == {"error": f'digest mismatch, expected "{wrong}", got "{digest}"'}


def test_unknown_path_and_method() -> None:
    """gin's plain-text 404 and 405, and its trailing-slash redirects."""
    env = Env()
    response, body = env.call("GET", "/api/nothing")
    assert (response.code, body) == (404, b"404 page not found")
    assert _header(response, b"content-type") == b"text/plain"
    response, body = env.call("GET", "/api/chat")
    assert (response.code, body) == (405, b"405 method not allowed")
    response, _ = env.call("HEAD", "/api/ps")
    assert response.code == 405
    agent = RequestTraversalAgent(env.fake)
    response = _result(agent.request(b"GET", BASE.encode() + b"/api/tags/?x=1"))
    assert (response.code, _header(response, b"location")) == (301, b"/api/tags?x=1")
    response = _result(agent.request(b"POST", BASE.encode() + b"/api/chat/"))
    assert (response.code, _header(response, b"location")) == (307, b"/api/chat")


def test_errors() -> None:
    """Bad bodies and unknown models get Ollama's error texts."""
    env = Env()
    assert env.call("POST", "/api/chat", raw=b"")[1] == b'{"error":"missing request body"}'
    response, body = env.call("POST", "/api/chat", raw=b"{oops")
    assert response.code == 400 and json.loads(body)["error"].startswith("invalid character")
    response, body = env.call("POST", "/api/chat", {"model": "nope", "messages": []})
    assert (response.code, body) == (404, b'{"error":"model \'nope\' not found"}')
    response, body = env.call("POST", "/api/embed", {"model": "nope", "input": "x"})
    assert json.loads(body) == {"error": 'model "nope" not found, try pulling it first'}
    response, body = env.call("POST", "/v1/chat/completions", {
        "model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert body == (b'{"error":{"message":"model \'nope\' not found","type":"not_found_error",'
                    b'"param":null,"code":null}}\n')


def test_host_guard() -> None:
    """A public Host gets 403 with an empty body; local names and private IPs pass."""
    env = Env()
    response, body = env.call("GET", "/api/tags", headers={"Host": ["evil.example.com"]})
    assert (response.code, body, _header(response, b"content-type")) == (403, b"", None)
    for host in ["localhost:11434", "ollama.internal", "10.1.2.3:80", "[::1]:11434"]:
        assert env.call("GET", "/api/version", headers={"Host": [host]})[0].code == 200
    relaxed = Env(check_host=False)
    assert relaxed.call("GET", "/", headers={"Host": ["evil.example.com"]})[0].code == 200


def test_pull_progress() -> None:
    """A pull streams progress lines ending with success, then the model is listed."""
    env = Env()
    _, body = env.call("POST", "/api/pull", {"model": "qwen3"})
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    assert "qwen3:latest" in env.fake.models


def test_received() -> None:
    """Every request is recorded with its raw URI, headers and body."""
    env = Env()
    env.call("POST", "/api/show?verbose=1", {"name": "mistral"},
             headers={"Authorization": ["Bearer k"]})
    record = env.fake.received[-1]
    assert (record.method, record.uri) == (b"POST", b"/api/show?verbose=1")
    assert record.headers.getRawHeaders(b"authorization") == [b"Bearer k"]
    assert record.json() == {"name": "mistral"}
