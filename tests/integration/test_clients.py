"""
The proxy as real client libraries see it: ollama-python and the OpenAI
Python SDK, configured only with the proxy's address and the key, talk to a
real C{twistd} proxy in front of the fake Ollama on 127.0.0.1.

The libraries block, so each interaction runs whole (client made, used and
closed) in a thread of the reactor's pool, with explicit client timeouts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import ollama
import openai
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.fakes.ollama import MODEL_ERROR, ReceivedRequest
from tests.fakes.twistd import TEST_KEY, Twistd, TwistdLauncher, Upstream, proxy_args

TIMEOUT = 20.0
MODELS = ["llama3.2:latest", "mistral:latest"]
HI = [{"role": "user", "content": "hi"}]

_R = TypeVar("_R")


async def in_thread(f: Callable[[], _R]) -> _R:
    """
    Run a blocking client interaction in a thread and wait for its result.
    """
    return await deferToThread(f)


def requests_made(upstream: Upstream) -> list[ReceivedRequest]:
    """
    The requests Ollama received from the clients (the fake keeps the
    proxy's own checks apart).
    """
    return upstream.fake.received


def tokens(count: int) -> list[str]:
    """
    The texts of the fake's first C{count} tokens, in order.
    """
    return [f"tok{i} " for i in range(count)]


def ollama_client(proxy: Twistd, headers: dict[str, str] | None = None) -> ollama.Client:
    """
    ollama-python pointed at the proxy, as the README shows (the key as Bearer
    unless other C{headers} are given).
    """
    if headers is None:
        headers = {"Authorization": f"Bearer {TEST_KEY}"}
    return ollama.Client(host=proxy.url, headers=headers, timeout=TIMEOUT)


def openai_client(proxy: Twistd, key: str = TEST_KEY) -> openai.OpenAI:
    """
    The OpenAI SDK pointed at the proxy's C{/v1}, as the README shows.
    """
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, timeout=TIMEOUT, max_retries=0)


def fake_vector(text: str) -> list[float]:
    """
    The embedding the fake Ollama computes for C{text}.
    """
    raw = hashlib.sha256(text.encode()).digest()
    return [round(b / 127.5 - 1, 6) for b in raw[:4]]


@pytest.fixture(autouse=True)
def _clean_client_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The libraries read their settings from the environment too: make sure
    only what a test passes explicitly reaches the proxy.
    """
    for name in ("OLLAMA_API_KEY", "OLLAMA_HOST", "OPENAI_API_KEY", "OPENAI_BASE_URL",
                 "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def proxy_logs(twistd: TwistdLauncher) -> Iterator[None]:
    """
    Print every proxy's log at the end, so a failing test shows what the
    proxy saw (pytest shows captured output only for failures).
    """
    yield
    for started in twistd.started:
        print(f"--- proxy log (pid {started.pid}) ---\n{started.output}")


pytestmark = pytest.mark.usefixtures("proxy_logs")


# -- ollama-python ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ollama_list_shows_the_models(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    ollama-python's list() through the proxy returns Ollama's installed models.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> ollama.ListResponse:
        client = ollama_client(proxy)
        with client:
            return client.list()

    listed = await in_thread(interact)
    assert [m.model for m in listed.models] == MODELS
    assert [m.details.family if m.details else None for m in listed.models] == [
        "llama", "mistral"
    ]


@pytest_twisted.ensureDeferred
async def test_ollama_streamed_chat(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A streamed chat yields every token in order, as it is generated, then
    one final part with done true.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> list[tuple[float, ollama.ChatResponse]]:
        client = ollama_client(proxy)
        with client:
            stream = client.chat(model="llama3.2", messages=HI, stream=True,
                                 options={"num_predict": 4, "fake_delay": 0.25})
            return [(time.monotonic(), part) for part in stream]

    arrivals = await in_thread(interact)
    parts = [part for _, part in arrivals]
    assert [p.message.content for p in parts] == [*tokens(4), ""]
    assert [p.done for p in parts] == [False] * 4 + [True]
    assert parts[-1].done_reason == "length"
    assert parts[-1].eval_count == 4
    # Ollama wrote a line every 0.25 s: the parts must not arrive all at once.
    assert arrivals[-1][0] - arrivals[0][0] >= 0.5
    assert upstream.fake.received[-1].json()["stream"] is True


@pytest_twisted.ensureDeferred
async def test_ollama_chat_not_streamed(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    chat(stream=False) returns the whole answer in one response.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> ollama.ChatResponse:
        client = ollama_client(proxy)
        with client:
            return client.chat(model="llama3.2", messages=HI, stream=False,
                               options={"num_predict": 3})

    response = await in_thread(interact)
    assert response.message.role == "assistant"
    assert response.message.content == "".join(tokens(3))
    assert response.done is True
    assert response.done_reason == "length"
    assert response.eval_count == 3
    assert upstream.fake.received[-1].json()["stream"] is False


@pytest_twisted.ensureDeferred
async def test_ollama_streamed_generate(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A streamed generate yields every token in order, then a final part with
    done true and the context.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> list[ollama.GenerateResponse]:
        client = ollama_client(proxy)
        with client:
            return list(client.generate(model="mistral", prompt="hi", stream=True,
                                        options={"num_predict": 6}))

    parts = await in_thread(interact)
    assert [p.response for p in parts] == [*tokens(6), ""]
    assert [p.done for p in parts] == [False] * 6 + [True]
    assert [p.model for p in parts] == ["mistral"] * 7
    assert parts[-1].context == [1, 2, 3]
    assert parts[-1].eval_count == 6


@pytest_twisted.ensureDeferred
async def test_ollama_embed(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    embed() returns one vector per input, as Ollama computed them.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> ollama.EmbedResponse:
        client = ollama_client(proxy)
        with client:
            return client.embed(model="llama3.2", input=["first text", "second"])

    response = await in_thread(interact)
    assert [list(v) for v in response.embeddings] == [
        fake_vector("first text"), fake_vector("second")
    ]
    assert response.model == "llama3.2"
    assert response.prompt_eval_count == 3


@pytest_twisted.ensureDeferred
async def test_ollama_show(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    show() returns the model's details through the proxy.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> ollama.ShowResponse:
        client = ollama_client(proxy)
        with client:
            return client.show("llama3.2")

    shown = await in_thread(interact)
    assert shown.license == "fake license"
    assert shown.modelfile == "FROM llama3.2:latest\n"
    assert shown.capabilities == ["completion", "tools"]
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert upstream.fake.received[-1].json() == {"model": "llama3.2"}


@pytest_twisted.ensureDeferred
async def test_ollama_ps(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    ps() lists no model at first, and the model a generate loaded afterwards.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> tuple[ollama.ProcessResponse, ollama.ProcessResponse]:
        client = ollama_client(proxy)
        with client:
            before = client.ps()
            client.generate(model="mistral", prompt="hi", options={"num_predict": 1})
            return before, client.ps()

    before, after = await in_thread(interact)
    assert list(before.models) == []
    assert [m.model for m in after.models] == ["mistral:latest"]
    assert [m.context_length for m in after.models] == [4096]


@pytest_twisted.ensureDeferred
async def test_ollama_key_from_the_environment(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With only OLLAMA_API_KEY set, ollama-python sends it as Bearer and the
    proxy accepts it; without it, the same client is refused.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> list[ollama.ChatResponse]:
        client = ollama.Client(host=proxy.url, timeout=TIMEOUT)
        with client:
            return list(client.chat(model="llama3.2", messages=HI, stream=True,
                                    options={"num_predict": 2}))

    with pytest.raises(ollama.ResponseError) as refused:
        await in_thread(interact)
    assert refused.value.status_code == 401
    assert refused.value.error.startswith("missing API key")

    monkeypatch.setenv("OLLAMA_API_KEY", TEST_KEY)
    parts = await in_thread(interact)
    assert [p.message.content for p in parts] == [*tokens(2), ""]
    assert parts[-1].done is True


@pytest_twisted.ensureDeferred
async def test_ollama_wrong_key(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A wrong key makes ollama-python raise ResponseError with status 401, on
    plain and on streamed calls, and nothing reaches Ollama.
    """
    proxy = await twistd.start(proxy_args(upstream.url))
    wrong = {"Authorization": "Bearer olpk_wrongwrongwrongwrongwrongwrongwrongwr"}

    def listing() -> ollama.ListResponse:
        client = ollama_client(proxy, wrong)
        with client:
            return client.list()

    def chatting() -> list[ollama.ChatResponse]:
        client = ollama_client(proxy, wrong)
        with client:
            return list(client.chat(model="llama3.2", messages=HI, stream=True))

    for interact in (listing, chatting):
        with pytest.raises(ollama.ResponseError) as refused:
            await in_thread(interact)
        assert refused.value.status_code == 401
        assert refused.value.error == "invalid API key"
    assert requests_made(upstream) == []


@pytest_twisted.ensureDeferred
async def test_ollama_error_mid_stream(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    Ollama's error line in the middle of a stream reaches ollama-python,
    which raises ResponseError with Ollama's message after the tokens before it.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> tuple[list[str], ollama.ResponseError | None]:
        received: list[str] = []
        client = ollama_client(proxy)
        with client:
            try:
                for part in client.chat(model="broken", messages=HI, stream=True):
                    received.append(part.message.content or "")
            except ollama.ResponseError as e:
                return received, e
        return received, None

    received, error = await in_thread(interact)
    assert received == tokens(2)
    assert error is not None
    assert error.error == MODEL_ERROR


@pytest_twisted.ensureDeferred
async def test_ollama_x_api_key_header(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    ollama-python with the key in an X-API-Key header (and no Authorization)
    is served.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> tuple[ollama.ListResponse, list[ollama.ChatResponse]]:
        client = ollama_client(proxy, {"X-API-Key": TEST_KEY})
        with client:
            return client.list(), list(client.chat(
                model="llama3.2", messages=HI, stream=True, options={"num_predict": 3}))

    listed, parts = await in_thread(interact)
    assert [m.model for m in listed.models] == MODELS
    assert [p.message.content for p in parts] == [*tokens(3), ""]
    assert [p.done for p in parts] == [False] * 3 + [True]


# -- OpenAI Python SDK ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_openai_models_list(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    The OpenAI SDK's models.list() through the proxy returns Ollama's models.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> list[openai.types.Model]:
        with openai_client(proxy) as client:
            return list(client.models.list())

    models = await in_thread(interact)
    assert [m.id for m in models] == MODELS
    assert [m.owned_by for m in models] == ["library", "library"]


@pytest_twisted.ensureDeferred
async def test_openai_streamed_chat_completion(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A streamed chat completion yields the token deltas in order, then a
    chunk with the finish reason and one with the usage.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> list[openai.types.chat.ChatCompletionChunk]:
        with openai_client(proxy) as client, client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True, stream_options={"include_usage": True},
        ) as stream:
            return list(stream)

    chunks = await in_thread(interact)
    assert [[c.delta.content for c in chunk.choices] for chunk in chunks] == [
        *([text] for text in tokens(4)), [None], []
    ]
    assert [[c.finish_reason for c in chunk.choices] for chunk in chunks] == [
        [None], [None], [None], [None], ["length"], []
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert len({chunk.id for chunk in chunks}) == 1


@pytest_twisted.ensureDeferred
async def test_openai_chat_completion_not_streamed(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A chat completion without streaming returns the whole answer.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> openai.types.chat.ChatCompletion:
        with openai_client(proxy) as client:
            return client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    completion = await in_thread(interact)
    assert [c.message.content for c in completion.choices] == ["".join(tokens(2))]
    assert [c.finish_reason for c in completion.choices] == ["length"]
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    assert completion.model == "llama3.2"


@pytest_twisted.ensureDeferred
async def test_openai_completions(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    Legacy completions work through the proxy, whole and streamed.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> tuple[openai.types.Completion, list[openai.types.Completion]]:
        with openai_client(proxy) as client:
            whole = client.completions.create(model="mistral", prompt="hi", max_tokens=3)
            with client.completions.create(model="mistral", prompt="hi", max_tokens=3,
                                           stream=True) as stream:
                return whole, list(stream)

    whole, chunks = await in_thread(interact)
    assert [c.text for c in whole.choices] == ["".join(tokens(3))]
    assert [c.finish_reason for c in whole.choices] == ["length"]
    assert [[c.text for c in chunk.choices] for chunk in chunks] == [
        *([text] for text in tokens(3)), [""]
    ]
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None, None, None, "length"]


@pytest_twisted.ensureDeferred
async def test_openai_wrong_key(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A wrong key makes the OpenAI SDK raise AuthenticationError (401) with
    the proxy's message, and nothing reaches Ollama.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> openai.types.chat.ChatCompletion:
        with openai_client(proxy, key="olpk_wrongwrongwrongwrongwrongwrongwrongwr") as client:
            return client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}])

    with pytest.raises(openai.AuthenticationError) as refused:
        await in_thread(interact)
    assert refused.value.status_code == 401
    assert refused.value.body == {
        "message": "invalid API key", "type": "invalid_request_error", "param": None,
        "code": None,
    }
    assert requests_made(upstream) == []
    assert json.loads(refused.value.response.text)["error"]["message"] == "invalid API key"


@pytest_twisted.ensureDeferred
async def test_both_clients_under_the_proxy_prefix(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    Both libraries also work with the proxy's address ending in C{/proxy},
    whose path prefix they keep.
    """
    proxy = await twistd.start(proxy_args(upstream.url))

    def interact() -> tuple[list[ollama.ChatResponse], list[str]]:
        client = ollama.Client(host=proxy.url + "/proxy", timeout=TIMEOUT,
                               headers={"Authorization": f"Bearer {TEST_KEY}"})
        with client:
            parts = list(client.chat(model="llama3.2", messages=HI, stream=True,
                                     options={"num_predict": 2}))
        with openai.OpenAI(base_url=proxy.url + "/proxy/v1", api_key=TEST_KEY,
                           timeout=TIMEOUT, max_retries=0) as other:
            return parts, [m.id for m in other.models.list()]

    parts, models = await in_thread(interact)
    assert [p.message.content for p in parts] == [*tokens(2), ""]
    assert models == MODELS
    assert [r.uri for r in requests_made(upstream)] == [b"/api/chat", b"/v1/models"]
