"""
Tests for access control through the whole proxy, in memory: scopes, model
allow-lists, limits, key guessing, expiry and revocation.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from ollamaproxy.keys import ApiKey, digest
from ollamaproxy.limits import GuessThrottle
from tests.chain import KEY, Chain

USER_KEY = "olpk_userkeyuserkeyuserkeyuserkeyuser00"
MESSAGES = [{"role": "user", "content": "hi"}]


def chain_with(**fields: Any) -> Chain:
    """
    A chain whose keys are alice's admin key and a user key with C{fields}.
    """
    chain = Chain()
    user = ApiKey(name="user", digest=digest(USER_KEY), **fields)
    chain.keys.replace([*chain.keys._by_digest.values(), user])
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
        ("DELETE", "/api/delete/"),
        ("DELETE", "/api/%64elete"),
        ("DELETE", "/API/delete"),
        ("DELETE", "//api/delete"),
        ("DELETE", "/api/./delete"),
        ("DELETE", "/api/tags/../delete"),
        ("DELETE", "/v1/../api/delete"),
        ("DELETE", "/v1/%2e%2e/api/delete"),
        ("POST", "/api/delete"),
        ("PUT", "/api/delete"),
        ("PATCH", "/api/tags"),
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("POST", "/api/blobs/sha256:" + "0" * 64),
        ("HEAD", "/api/blobs/sha256:" + "0" * 64),
        ("GET", "/api/me"),
        ("POST", "/api/signout"),
        ("POST", "/api/experimental/web_search"),
        ("DELETE", "/v1/models/llama3.2"),
    ],
)
def test_user_key_cannot_manage_models_by_any_spelling(method: str, path: str) -> None:
    """
    A key without the admin scope gets 403 for model management and account
    routes however the path is spelled, and nothing reaches Ollama.
    """
    chain = chain_with()
    code, body = call(chain, method, path, {"model": "llama3.2"})
    assert code == 403
    if method != "HEAD":
        error = json.loads(body)["error"]
        assert "may not use" in (error["message"] if path.startswith("/v1/") else error)
    assert chain.fake.received == []


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


def test_key_guessing_is_throttled_but_a_working_key_is_not() -> None:
    """
    After ten wrong keys from an address, more guesses get 429 without being
    checked, while a key that already worked from there still works.
    """
    chain = chain_with()
    assert call(chain, "GET", "/api/tags")[0] == 200
    for i in range(10):
        assert call(chain, "GET", "/api/tags", key=f"guess-{i}")[0] == 401
    response = chain.respond("GET", "/api/tags", key=USER_KEY[:-1] + "1")
    assert response.code == 429
    assert response.headers.getRawHeaders(b"retry-after") == [b"60"]
    assert call(chain, "GET", "/api/tags")[0] == 200
    chain.clock.advance(61)
    assert call(chain, "GET", "/api/tags", key="guess")[0] == 401


def test_guess_throttle_is_per_address() -> None:
    """
    One address guessing does not throttle another.
    """
    from twisted.internet.task import Clock

    throttle = GuessThrottle(Clock(), failures=2)
    throttle.failed("10.0.0.1")
    throttle.failed("10.0.0.1")
    with pytest.raises(Exception, match="too many"):
        throttle.check("10.0.0.1", b"x")
    throttle.check("10.0.0.2", b"x")


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
    chain.keys.replace([k for k in chain.keys._by_digest.values() if k.name != "user"])
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
