"""
Tests for access control through the whole proxy, in memory: scopes, model
allow-lists, limits, key guessing, expiry and revocation.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from ollamaproxy.admission.keys import ApiKey, digest
from ollamaproxy.admission.limits import GuessThrottle
from ollamaproxy.admission.policy import MAX_CHECKED_BODY
from ollamaproxy.errors import ProxyError
from tests.fakes.chain import KEY, Chain, chat

USER_KEY = "olpk_userkeyuserkeyuserkeyuserkeyuser00"
MESSAGES = [{"role": "user", "content": "hi"}]


def chain_with(**fields: Any) -> Chain:
    """
    A chain whose keys are alice's admin key and a user key with C{fields}.
    """
    chain = Chain()
    user = ApiKey(name="user", digest=digest(USER_KEY), **fields)
    chain.keys.replace([*chain.keys, user])
    return chain


def call(chain: Chain, method: str, path: str, body: Any = None, key: str = USER_KEY) -> tuple[
    int, bytes
]:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    response = chain.respond(method, path, key=key, data=data)
    return response.code, chain.body(response)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/delete"),
        ("DELETE", "/proxy/api/delete"),
        ("DELETE", "/api/%64elete"),
        ("DELETE", "/api%2Fdelete"),
        ("POST", "/api/pull"),
        ("POST", "/api/%70ull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("POST", "/api/blobs/sha256:" + "0" * 64),
        ("HEAD", "/api/blobs/sha256:" + "0" * 64),
        ("POST", "/api/me"),
        ("POST", "/api/signout"),
        ("DELETE", "/api/user/keys/c29tZWtleQ"),
        ("POST", "/api/experimental/web_search"),
        ("POST", "/api/experimental/web_fetch"),
        ("GET", "/api/experimental/model-recommendations"),
    ],
)
def test_user_key_cannot_manage_models_by_any_spelling(method: str, path: str) -> None:
    """
    A key without the admin scope gets 403 for model management, account
    and experimental routes, percent-escaped or not, with a message naming
    the scope it lacks; nothing reaches Ollama.
    """
    chain = chain_with()
    code, body = call(chain, method, path, {"model": "llama3.2"})
    assert code == 403
    if method != "HEAD":
        assert "needs the 'admin' scope" in json.loads(body)["error"]
    assert chain.fake.received == []


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("DELETE", "/api/delete/", 404),
        ("DELETE", "/API/delete", 404),
        ("DELETE", "//api/delete", 404),
        ("DELETE", "/api/./delete", 404),
        ("DELETE", "/api/tags/../delete", 404),
        ("DELETE", "/v1/../api/delete", 404),
        ("DELETE", "/v1/%2e%2e/api/delete", 404),
        ("POST", "/api/chta", 404),
        ("POST", "/v1/unknown", 404),
        ("GET", "/favicon.ico", 404),
        ("POST", "/api/delete", 405),
        ("PUT", "/api/delete", 405),
        ("PATCH", "/api/tags", 405),
        ("GET", "/api/me", 405),
        ("DELETE", "/v1/models/llama3.2", 405),
    ],
)
def test_user_key_on_no_route_is_told_it_is_no_route(method: str, path: str, code: int) -> None:
    """
    A path or method Ollama does not serve is a 404 or 405 that says so,
    telling a typo from a missing scope; nothing reaches Ollama.
    """
    chain = chain_with()
    answer_code, body = call(chain, method, path, {"model": "llama3.2"})
    assert answer_code == code
    error = json.loads(body)["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert ("not one of Ollama's routes" if code == 404 else "only with") in message
    assert chain.fake.received == []


def test_admin_key_passes_unknown_routes_on() -> None:
    """
    An admin key (not limited to models) may use a route the proxy does not
    know yet: Ollama answers it.
    """
    chain = chain_with()
    assert call(chain, "POST", "/api/new-in-ollama", {"x": 1}, key=KEY)[0] == 404
    assert [r.uri for r in chain.fake.received] == [b"/api/new-in-ollama"]


def test_admin_key_can_manage_models() -> None:
    """
    An admin key may delete a model.
    """
    chain = chain_with()
    assert call(chain, "DELETE", "/api/delete", {"model": "mistral"}, key=KEY)[0] == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/tags", None),
        ("HEAD", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("POST", "/api/show", {"model": "llama3.2"}),
        ("POST", "/api/chat", {"model": "llama3.2", "messages": MESSAGES}),
        ("POST", "/api/generate", {"model": "llama3.2", "prompt": "hi"}),
        ("POST", "/api/embed", {"model": "llama3.2", "input": "hi"}),
        ("POST", "/api/embeddings", {"model": "llama3.2", "prompt": "hi"}),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"model": "llama3.2", "messages": MESSAGES}),
    ],
)
def test_user_key_may_use_inference_routes(method: str, path: str, body: Any) -> None:
    """
    Every key may use the inference and read routes.
    """
    assert call(chain_with(), method, path, body)[0] == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"model": "mistral", "messages": MESSAGES}),
        ("/api/generate", {"model": "mistral:latest", "prompt": "hi"}),
        ("/api/embed", {"model": "mistral", "input": "hi"}),
        ("/api/show", {"name": "mistral"}),
        ("/api/chat", {"model": "llama3.2", "Model": "mistral", "messages": MESSAGES}),
        ("/v1/chat/completions", {"model": "mistral", "messages": MESSAGES}),
        ("/proxy/api/chat", {"model": "mistral", "messages": MESSAGES}),
    ],
)
def test_model_outside_the_allow_list_is_refused(path: str, body: Any) -> None:
    """
    A key limited to llama3* cannot use mistral, whichever field, spelling
    or route names it; nothing reaches Ollama.
    """
    chain = chain_with(models=("llama3*",))
    code, answer = call(chain, "POST", path, body)
    assert code == 403
    assert "mistral" in answer.decode()
    assert chain.fake.received == []


def test_repeated_model_field_counts_every_value() -> None:
    """
    Ollama takes the last of repeated fields; every one is checked.
    """
    chain = chain_with(models=("llama3*",))
    raw = b'{"model": "llama3.2", "model": "mistral", "messages": []}'
    assert call(chain, "POST", "/api/chat", raw)[0] == 403


def test_model_in_the_allow_list_streams() -> None:
    """
    A request for an allowed model is checked and then sent on whole.
    """
    chain = chain_with(models=("llama3*",))
    code, body = call(chain, "POST", "/api/chat", {"model": "llama3.2", "messages": MESSAGES})
    assert code == 200
    assert json.loads(body.splitlines()[-1])["done"] is True
    assert chain.fake.received[-1].json()["model"] == "llama3.2"


@pytest.mark.parametrize(
    ("path", "field", "identity"),
    [("/api/tags", "models", "name"), ("/v1/models", "data", "id")],
)
def test_listings_show_only_allowed_models(path: str, field: str, identity: str) -> None:
    """
    Model listings show a limited key only its models.
    """
    chain = chain_with(models=("llama3*",))
    code, body = call(chain, "GET", path)
    assert code == 200
    assert [m[identity] for m in json.loads(body)[field]] == ["llama3.2:latest"]
    assert len(json.loads(call(chain, "GET", path, key=KEY)[1])[field]) == 2


def test_running_models_listing_is_filtered() -> None:
    """
    /api/ps shows a limited key only its models.
    """
    chain = chain_with(models=("llama3*",))
    for model in ("llama3.2", "mistral"):
        call(chain, "POST", "/api/generate", {"model": model, "prompt": "hi"}, key=KEY)
    _, body = call(chain, "GET", "/api/ps")
    assert [m["name"] for m in json.loads(body)["models"]] == ["llama3.2:latest"]


def test_openai_model_path_is_checked() -> None:
    """
    GET /v1/models/NAME is refused for a model outside the allow-list.
    """
    chain = chain_with(models=("llama3*",))
    assert call(chain, "GET", "/v1/models/mistral")[0] == 403


def test_rate_limit_answers_429_with_retry_after() -> None:
    """
    A key over its requests a minute gets 429 with Retry-After, and is let
    in again once the minute has refilled a token.
    """
    chain = chain_with(rpm=2)
    assert call(chain, "GET", "/api/tags")[0] == 200
    assert call(chain, "GET", "/api/tags")[0] == 200
    response = chain.respond("GET", "/api/tags", key=USER_KEY)
    assert response.code == 429
    assert response.phrase == b"Too Many Requests"
    assert response.headers.getRawHeaders(b"retry-after") == [b"30"]
    assert "2 requests a minute" in json.loads(chain.body(response))["error"]
    chain.clock.advance(30)
    assert call(chain, "GET", "/api/tags")[0] == 200
    assert call(chain, "GET", "/api/tags", key=KEY)[0] == 200


def test_concurrent_stream_limit() -> None:
    """
    A key with one stream allowed gets 429 for a second while the first
    runs, and may start another once it has ended.
    """
    chain = chain_with(max_streams=1)
    d = chain.request("POST", "/api/chat", key=USER_KEY,
                      data=json.dumps({"model": "hold", "messages": MESSAGES}).encode())
    assert call(chain, "GET", "/api/tags")[0] == 429
    chain.fake.held[-1].finish()
    chain.flush()
    chain.body(chain.result(d))
    assert call(chain, "GET", "/api/tags")[0] == 200


@implementer(IBodyProducer)
class _NeverEnding:
    """
    A request body of a million bytes of which nothing ever comes.
    """

    length = 1_000_000

    def startProducing(self, consumer: object) -> Deferred[None]:
        return Deferred()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def test_a_key_at_its_streams_is_refused_before_its_body_is_read() -> None:
    """
    The limits come before the body is read: while a key's one stream
    runs, its next request is answered 429 as soon as its head is in,
    though its body never comes, so that a key cannot make the proxy read
    many bodies at once.
    """
    chain = chain_with(max_streams=1)
    chain.request("POST", "/api/chat", key=USER_KEY,
                  data=json.dumps({"model": "hold", "messages": MESSAGES}).encode())
    waiting = chain.client._agent.request(
        b"POST", b"http://proxy.example:5000/api/chat",
        Headers({b"Authorization": [f"Bearer {USER_KEY}".encode()]}), _NeverEnding())
    chain.flush()
    response = chain.result(waiting)
    assert response.code == 429
    assert "already has 1 requests in flight" in json.loads(chain.body(response))["error"]
    chain.fake.held[-1].finish()
    chain.flush()


def test_a_request_its_plan_refuses_gives_its_stream_back() -> None:
    """
    A request admitted and then refused for its body (a model its key may
    not use) gives back its place among the key's requests in flight: a
    key with one stream allowed is let in again at once.
    """
    chain = chain_with(max_streams=1, models=("llama3*",))
    chat = {"model": "mistral", "messages": MESSAGES}
    assert [call(chain, "POST", "/api/chat", chat)[0] for _ in range(2)] == [403, 403]
    assert call(chain, "GET", "/api/tags")[0] == 200


def test_key_guessing_is_throttled_but_valid_keys_are_not() -> None:
    """
    After ten wrong keys from an address, more wrong keys get 429; every
    valid key from that address still works, including one never used
    from there before (a new colleague behind the same NAT, a rotated key).
    """
    chain = chain_with()
    for i in range(10):
        assert call(chain, "GET", "/api/tags", key=f"guess-{i}")[0] == 401
    response = chain.respond("GET", "/api/tags", key=USER_KEY[:-1] + "1")
    assert response.code == 429
    assert response.headers.getRawHeaders(b"retry-after") == [b"60"]
    assert call(chain, "GET", "/api/tags")[0] == 200
    assert call(chain, "GET", "/api/tags", key=KEY)[0] == 200
    chain.clock.advance(61)
    assert call(chain, "GET", "/api/tags", key="guess")[0] == 401


def test_guess_throttle_is_per_address() -> None:
    """
    One address guessing does not throttle another.
    """
    throttle = GuessThrottle(Clock(), failures=2)
    throttle.failed("10.0.0.1")
    throttle.failed("10.0.0.1")
    refused: list[Failure] = []
    throttle.failed("10.0.0.1").addErrback(refused.append)
    [failure] = refused
    error = failure.trap(ProxyError) and failure.value
    assert isinstance(error, ProxyError)
    assert error.code == 429 and "too many" in error.message
    counted: list[None] = []
    throttle.failed("10.0.0.2").addCallback(counted.append)
    assert counted == [None]


def test_expired_key_is_refused() -> None:
    """
    A key past its expiry time gets 401.
    """
    chain = chain_with(expires=datetime(1970, 1, 1, 0, 1, tzinfo=UTC))
    assert call(chain, "GET", "/api/tags")[0] == 200
    chain.clock.advance(60)
    code, body = call(chain, "GET", "/api/tags")
    assert code == 401
    assert "expired" in json.loads(body)["error"]


def test_key_revoked_during_a_stream() -> None:
    """
    Revoking a key lets its live stream finish, and refuses its next request.
    """
    chain = chain_with()
    d = chain.request("POST", "/api/chat", key=USER_KEY,
                      data=json.dumps({"model": "hold", "messages": MESSAGES}).encode())
    held = chain.fake.held[-1]
    held.write_line({"n": 0, "done": False})
    chain.flush()
    client = chain.stream(chain.result(d))
    chain.keys.replace([k for k in chain.keys if k.name != "user"])
    held.write_line({"n": 1, "done": True})
    held.finish()
    chain.flush()
    chain.result(client.done)
    assert client.body.count(b"\n") == 2
    assert call(chain, "GET", "/api/tags")[0] == 401


def test_preflight_is_answered_without_a_key() -> None:
    """
    A browser's preflight from an extension is answered 204 without a key,
    allowing the key headers, and never reaches Ollama.
    """
    chain = chain_with()
    response = chain.respond("OPTIONS", "/api/chat", key=None, headers={
        "Origin": "chrome-extension://abcdef",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    })
    assert response.code == 204
    headers = response.headers
    assert headers.getRawHeaders(b"access-control-allow-origin") == [b"chrome-extension://abcdef"]
    allowed = headers.getRawHeaders(b"access-control-allow-headers")[0].lower()
    assert b"authorization" in allowed and b"x-api-key" in allowed
    assert chain.fake.received == []


def test_preflight_from_a_foreign_origin_is_refused() -> None:
    """
    A preflight from a web page the proxy does not allow gets 403 and no
    CORS permission.
    """
    chain = chain_with()
    response = chain.respond("OPTIONS", "/api/chat", key=None, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
    })
    assert response.code == 403
    assert response.headers.getRawHeaders(b"access-control-allow-origin") is None


@pytest.mark.parametrize("key", [USER_KEY, "wrong"])
def test_allowed_origin_can_read_answers_and_errors(key: str) -> None:
    """
    Answers to an allowed origin, errors included, carry its CORS
    permission, so the page can read them; Origin never reaches Ollama.
    """
    chain = chain_with()
    response = chain.respond("GET", "/api/tags", key=key,
                             headers={"Origin": "http://localhost:3000"})
    chain.body(response)
    assert response.headers.getRawHeaders(b"access-control-allow-origin") == [
        b"http://localhost:3000"
    ]
    for received in chain.fake.received:
        assert not received.headers.hasHeader(b"origin")


def test_metrics_need_an_admin_key() -> None:
    """
    /metrics answers admin keys with Prometheus text counting the requests
    so far, other keys with 403, and no key with 401; it never reaches Ollama.
    """
    chain = chain_with()
    call(chain, "POST", "/api/chat", {"model": "llama3.2", "messages": MESSAGES})
    assert call(chain, "GET", "/metrics")[0] == 403
    assert call(chain, "GET", "/metrics", key="")[0] == 401
    code, body = call(chain, "GET", "/metrics", key=KEY)
    assert code == 200
    text = body.decode()
    assert 'ollamaproxy_requests_total{key="user",method="POST",outcome="completed",' \
        'route="/api/chat",status="200"} 1.0' in text
    assert 'ollamaproxy_tokens_total{key="user",kind="completion",model="llama3.2"} 5.0' in text
    assert all(r.uri != b"/metrics" for r in chain.fake.received)


def form(fields: list[tuple[str, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    """
    A multipart/form-data body with C{fields}, and its Content-Type.
    """
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value + b"\r\n"
        for name, value in fields
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/images/generations",
        "/v1/completions",
        "/v1/embeddings",
        "/api/%63hat",
        "/proxy/api/%63hat",
    ],
)
@pytest.mark.parametrize("admin", [False, True])
def test_limited_key_uses_no_other_model_by_any_route(path: str, admin: bool) -> None:
    """
    A key limited to llama3* gets 403 for mistral on every route that names
    a model in its JSON body, percent-escaped paths included, and with the
    admin scope too; nothing reaches Ollama.
    """
    scopes = frozenset({"inference", "admin"} if admin else {"inference"})
    chain = chain_with(models=("llama3*",), scopes=scopes)
    code, answer = call(chain, "POST", path, {"model": "mistral", "messages": MESSAGES})
    assert code == 403
    assert "mistral" in answer.decode()
    assert chain.fake.received == []


@pytest.mark.parametrize(
    ("fields", "query", "code"),
    [
        ([("model", b"mistral"), ("file", b"RIFF")], "", 403),
        ([("model", b"llama3.2"), ("model", b"mistral")], "", 403),
        ([("model", b"llama3.2")], "?model=mistral", 403),
        ([("file", b"RIFF")], "", 400),
    ],
    ids=["other-model", "second-field", "query-string", "no-model"],
)
@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/images/edits"])
def test_limited_key_form_routes_are_checked(
    path: str, fields: list[tuple[str, bytes]], query: str, code: int
) -> None:
    """
    On the form routes the model is read from the multipart form and the
    query string (Go's FormValue reads both); another model is 403, a form
    naming none is 400, and nothing reaches Ollama.
    """
    chain = chain_with(models=("llama3*",))
    body, content_type = form(fields)
    response = chain.respond("POST", path + query, key=USER_KEY, data=body,
                             headers={"Content-Type": content_type})
    assert response.code == code
    chain.body(response)
    assert chain.fake.received == []


def test_limited_key_allowed_form_model_goes_on() -> None:
    """
    A transcription naming an allowed model is sent on, body unchanged.
    """
    chain = chain_with(models=("llama3*",))
    body, content_type = form([("model", b"llama3.2"), ("file", b"RIFF....")])
    response = chain.respond("POST", "/v1/audio/transcriptions", key=USER_KEY, data=body,
                             headers={"Content-Type": content_type})
    chain.body(response)
    [received] = chain.fake.received
    assert received.body == body


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data; boundary=XyZ", b"--XyZ\r\nno header end"),
        ("multipart/form-data; boundary=XyZ", b"garbage"),
        ("multipart/form-data", b"--XyZ--\r\n"),
        ("application/x-www-form-urlencoded", b"model=llama3.2"),
    ],
    ids=["unterminated-part", "no-delimiter", "no-boundary", "not-multipart"],
)
def test_limited_key_malformed_form_is_refused(content_type: str, body: bytes) -> None:
    """
    A form the proxy cannot read is refused with 400, never sent unchecked.
    """
    chain = chain_with(models=("llama3*",))
    response = chain.respond("POST", "/v1/audio/transcriptions", key=USER_KEY, data=body,
                             headers={"Content-Type": content_type})
    assert response.code == 400
    chain.body(response)
    assert chain.fake.received == []


def test_limited_key_on_unknown_route_is_refused() -> None:
    """
    A key limited to models, even an admin one, cannot use a route the
    proxy does not know: it could name any model there.
    """
    chain = chain_with(models=("llama3*",), scopes=frozenset({"inference", "admin"}))
    code, answer = call(chain, "POST", "/api/new-in-ollama", {"model": "mistral"})
    assert code == 403
    assert "limited to some models" in answer.decode()
    assert chain.fake.received == []


@pytest.mark.parametrize("encoding", ["zstd", "gzip", "br"])
def test_limited_key_compressed_body_is_refused(encoding: str) -> None:
    """
    A body the proxy cannot read for its model (Content-Encoding) is refused
    with 400 for a limited key, never forwarded unchecked.
    """
    chain = chain_with(models=("llama3*",))
    response = chain.respond(
        "POST", "/v1/chat/completions", key=USER_KEY, data=b"\x28\xb5\x2f\xfd compressed",
        headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
    )
    assert response.code == 400
    assert "Content-Encoding" in chain.body(response).decode()
    assert chain.fake.received == []


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        ("llama3.2", True),
        ("LLAMA3.2", True),
        ("llama3.2:latest", True),
        ("Llama3.2:LATEST", True),
        ("registry.ollama.ai/library/llama3.2", True),
        ("library/llama3.2:latest", True),
        ("llama3.2:local", True),
        ("llama3.2:1b", False),
        ("someone/llama3.2", False),
        ("mistral", False),
    ],
)
def test_model_names_compared_as_ollama_resolves_them(model: str, allowed: bool) -> None:
    """
    A key allowed llama3.2 may use every spelling Ollama resolves to
    llama3.2:latest, and no other model.
    """
    chain = chain_with(models=("llama3.2",))
    code, _ = call(chain, "POST", "/api/show", {"model": model})
    assert (code != 403) is allowed


@pytest.mark.parametrize("model", ["gpt-oss:120b-cloud", "llama3.2:cloud", "Qwen3:CLOUD"])
def test_cloud_models_need_the_cloud_scope(model: str) -> None:
    """
    A cloud model runs on the server owner's ollama.com account: a key
    without the cloud scope gets 403 saying so; a key with it, and an admin
    key, go through.
    """
    body = {"model": model, "messages": MESSAGES}
    chain = chain_with()
    code, answer = call(chain, "POST", "/api/chat", body)
    assert code == 403
    assert "'cloud' scope" in answer.decode()
    assert chain.fake.received == []
    cloud = chain_with(scopes=frozenset({"inference", "cloud"}))
    call(cloud, "POST", "/api/chat", body)
    assert len(cloud.fake.received) == 1
    call(cloud, "POST", "/api/chat", body, key=KEY)
    assert len(cloud.fake.received) == 2


def test_cloud_model_by_path_needs_the_cloud_scope() -> None:
    """
    GET /v1/models/NAME-cloud is a cloud model too.
    """
    assert call(chain_with(), "GET", "/v1/models/gpt-oss:120b-cloud")[0] == 403


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"model": "llama3.2", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b'{"model": "llama3.2", "messages": [' + b"{}," * 200_000 + b"{}]}", "too many"),
        (b'{"model": "llama3.2", "x": [' + b"0," * 1_100_000 + b"0]}", "too many"),
        (b"[]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b'"model"', "must be a JSON object"),
        (b'{"model": 1}', "must be a string"),
        (b'{"model": "llama3.2"', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
    ids=["deep", "deep-inside", "many-objects", "many-values", "array", "null", "string",
         "number-model", "truncated", "not-utf8"],
)
def test_body_that_cannot_be_checked_is_400(body: bytes, message: str) -> None:
    """
    Nested, huge or odd JSON from a key whose body must be read gets a 400
    that says why, never a 500, and is not forwarded.
    """
    chain = chain_with(models=("llama3*",))
    code, answer = call(chain, "POST", "/api/chat", body)
    assert code == 400
    assert message in json.loads(answer)["error"]
    assert chain.fake.received == []


def test_body_over_the_check_limit_is_413_stating_it() -> None:
    """
    A body larger than the proxy reads to find its model gets 413 naming
    the limit.
    """
    chain = chain_with(models=("llama3*",))
    body = b'{"model": "llama3.2", "prompt": "' + b"x" * MAX_CHECKED_BODY + b'"}'
    code, answer = call(chain, "POST", "/api/generate", body)
    assert code == 413
    assert f"{MAX_CHECKED_BODY // 2**20} MiB" in json.loads(answer)["error"]
    assert chain.fake.received == []


def test_head_of_a_filtered_listing_has_the_filtered_length() -> None:
    """
    HEAD /api/tags for a limited key tells the length of its filtered
    listing, not of the whole one.
    """
    chain = chain_with(models=("llama3*",))
    _, filtered = call(chain, "GET", "/api/tags")
    response = chain.respond("HEAD", "/api/tags", key=USER_KEY)
    assert response.code == 200
    assert chain.body(response) == b""
    assert response.headers.getRawHeaders(b"content-length") == [str(len(filtered)).encode()]
    whole = call(chain, "GET", "/api/tags", key=KEY)[1]
    assert len(whole) != len(filtered)


def test_a_listing_that_cannot_be_read_is_502() -> None:
    """
    A listing the proxy must filter for a limited key, but that is not
    Ollama's JSON, is a 502 that says so, not a 500.
    """
    class NotAListing(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            return b"<html>not Ollama</html>"

    chain = Chain(agent=RequestTraversalAgent(NotAListing()))
    user = ApiKey(name="user", digest=digest(USER_KEY), models=("llama3*",))
    chain.keys.replace([*chain.keys, user])
    code, body = call(chain, "GET", "/api/tags")
    assert code == 502
    assert "could not be read" in json.loads(body)["error"]


@pytest.mark.parametrize(
    "body",
    [
        # Read as Go reads them: the model is found, and it is busy.
        json.dumps({"model": "hold", "messages": [{"role": "user", "content": "[" * 100_001}]}
                   ).encode(),
        b'{"model": "hold", "messages": []} trailing data',
        b'{"model": "hold", "messages": [{"role": "user", "content": "\xff"}]}',
        # Past what the check reads: the model is unknown, and takes the
        # whole backend.
        b'{"model": "hold", "x": [' + b"0," * 1_100_000 + b"0]}",
    ],
    ids=["brackets-in-a-string", "trailing-data", "invalid-utf8", "too-many-values"],
)
def test_a_body_the_check_cannot_name_a_model_of_waits_its_turn(body: bytes) -> None:
    """
    For a key whose body need not be checked (alice's: every scope), a chat
    the model check reads as Go does, or gives up on, waits in the fair
    queue behind a request for the same busy model at --parallel 1: it
    reaches Ollama only once that one has ended, never beside it.
    """
    chain = Chain(parallel=1)
    first = chain.request("POST", "/api/chat", key=KEY,
                          data=json.dumps({"model": "hold", "messages": MESSAGES}).encode())
    second = chain.request("POST", "/api/chat", key=KEY, data=body)
    assert len(chain.fake.received) == 1
    assert chain.router.queue.waiting() == {"alice": 1}
    chain.fake.held[0].finish()
    chain.flush()
    chain.body(chain.result(first))
    assert len(chain.fake.received) == 2
    # The fake answers what it reads as the model (it is not Go's decoder).
    for held in chain.fake.held[1:]:
        held.finish()
    chain.flush()
    chain.body(chain.result(second))


def _served_by(chain: Chain, body: bytes, key: str = KEY,
               headers: dict[str, str] | None = None) -> int:
    """
    Send a chat through C{chain}, and say which of its backends got it.
    """
    before = [len(fake.received) for fake in chain.fakes]
    response = chain.respond("POST", "/api/chat", key=key, data=body, headers=headers)
    assert response.code == 200
    chain.body(response)
    got = [n for n, fake in enumerate(chain.fakes) if len(fake.received) > before[n]]
    assert len(got) == 1
    return got[0]


def test_turns_of_a_conversation_go_home_through_the_proxy() -> None:
    """
    Three users' chats of three turns over four backends: each user's turns
    all go to the backend of its first, and the users' conversations live
    on three backends (the router alone sends every turn, one at a time,
    to the first backend).
    """
    chain = Chain(backends=[["llama3.2"]] * 4)
    homes: dict[int, set[int]] = {user: set() for user in range(3)}
    histories = {user: [{"role": "user", "content": f"I am user {user}"}] for user in range(3)}
    for number in range(3):
        for user, history in histories.items():
            homes[user].add(_served_by(chain, json.dumps(
                {"model": "llama3.2", "messages": history, "stream": False}).encode()))
            history += [{"role": "assistant", "content": f"answer {number}"},
                        {"role": "user", "content": f"question {number}"}]
    assert all(len(served) == 1 for served in homes.values())
    assert len(set.union(*homes.values())) == 3


def test_a_key_s_chat_id_header_names_the_conversation() -> None:
    """
    A key that names a chat id header has its requests' conversations known
    by it: chats that begin differently but carry one id go to one backend,
    and the header reaches Ollama unchanged.  Another key's requests
    carrying the header are known by their messages.
    """
    chain = Chain(backends=[["llama3.2"]] * 4)
    user = ApiKey(name="user", digest=digest(USER_KEY), chat_header="X-OpenWebUI-Chat-Id")
    chain.keys.replace([*chain.keys, user])
    header = {"X-OpenWebUI-Chat-Id": "chat-7"}
    served = {_served_by(chain, chat(messages=[{"role": "user", "content": f"q{n}"}]),
                         USER_KEY, header) for n in range(3)}
    assert len(served) == 1
    last = chain.fakes[served.pop()].received[-1]
    assert last.headers.getRawHeaders(b"x-openwebui-chat-id") == [b"chat-7"]
    others = {_served_by(chain, chat(messages=[{"role": "user", "content": f"q{n}"}]),
                         KEY, header) for n in range(3)}
    assert len(others) == 3


def test_a_chat_id_reaches_no_log() -> None:
    """
    The value of a key's chat id header names a conversation by its
    digest alone: it goes on to Ollama, as the client sent it, and into
    none of the proxy's log events (the access line included).
    """
    chain = Chain(backends=[["llama3.2"]] * 2)
    user = ApiKey(name="user", digest=digest(USER_KEY), chat_header="X-OpenWebUI-Chat-Id")
    chain.keys.replace([*chain.keys, user])
    with capturedLogs() as events:
        _served_by(chain, chat(), USER_KEY, {"X-OpenWebUI-Chat-Id": "chat-4f1d9e"})
    assert [e for e in events if e.get("log_namespace") == "ollamaproxy.access"]
    assert not [e for e in events if "chat-4f1d9e" in repr(e) + formatEvent(e)]


def test_a_key_sent_as_a_chat_id_is_refused() -> None:
    """
    A request whose key names a chat id header, carrying a key there, is
    refused with a 400 that does not repeat it: nothing reaches Ollama,
    and the key is in none of the proxy's log events.
    """
    chain = Chain(backends=[["llama3.2"]] * 2)
    user = ApiKey(name="user", digest=digest(USER_KEY), chat_header="X-OpenWebUI-Chat-Id")
    chain.keys.replace([*chain.keys, user])
    with capturedLogs() as events:
        response = chain.respond("POST", "/api/chat", key=USER_KEY, data=chat(),
                                 headers={"X-OpenWebUI-Chat-Id": KEY})
        body = chain.body(response).decode()
    assert response.code == 400
    assert "credential" in body and KEY not in body
    assert all(fake.received == [] for fake in chain.fakes)
    assert [e for e in events if e.get("log_namespace") == "ollamaproxy.access"]
    assert not [e for e in events if KEY in repr(e) + formatEvent(e)]
