"""
Tests for L{ollamaproxy.admission.quotas}: token quotas per key, through the whole
proxy in memory (L{tests.fakes.chain}), and their seeding from the usage store.

The fake Ollama reports as prompt tokens the words of the prompt, and
generates C{options.num_predict} tokens: a generate with the prompt C{"a b"}
and C{num_predict} 8 uses 10 tokens.
"""

from __future__ import annotations

import json
import math
from calendar import timegm
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs
from twisted.python.failure import Failure

from ollamaproxy.admission.keys import ApiKey, digest
from ollamaproxy.admission.limits import KeyLimits
from ollamaproxy.admission.quota_periods import window
from ollamaproxy.admission.quotas import QuotaBook, QuotaSeed
from ollamaproxy.errors import ProxyError
from ollamaproxy.record.usage_db import UsageFileError, tokens_by_key, write_rows
from tests.fakes.chain import IDLE_TIMEOUT, KEY, Chain, Collector
from tests.fakes.observers import ErrorCollector
from tests.fakes.ollama import HeldStream

USER_KEY = "olpk_quotakeyquotakeyquotakeyquotakey00"

T = TypeVar("T")


def at(text: str) -> float:
    """
    Seconds since the epoch of a UTC time such as C{2026-12-15T18:00:00}.
    """
    date, time = text.split("T")
    return float(timegm((*map(int, date.split("-")), *map(int, time.split(":")))))


def chain_at(when: str, **fields: Any) -> Chain:
    """
    A chain whose clock shows C{when}, with alice's admin key (no quota)
    and a key C{user} with C{fields}.
    """
    chain = Chain()
    chain.clock.advance(at(when))
    user = ApiKey(name="user", digest=digest(USER_KEY), **fields)
    chain.keys.replace([*chain.keys, user])
    return chain


def generate(chain: Chain, tokens: int = 8, key: str = USER_KEY) -> tuple[int, Any, Any]:
    """
    A streamed generate of C{tokens} tokens from a two-word prompt (so
    C{tokens + 2} in all): its status, its C{Retry-After} and its body's
    lines (or error body).
    """
    body = {"model": "llama3.2", "prompt": "a b", "options": {"num_predict": tokens}}
    response = chain.respond("POST", "/api/generate", key=key, data=json.dumps(body).encode())
    text = chain.body(response)
    retry_after = response.headers.getRawHeaders(b"retry-after")
    if response.code != 200:
        return response.code, retry_after, json.loads(text)
    return response.code, retry_after, [json.loads(line) for line in text.splitlines()]


def sent_to_ollama(chain: Chain) -> int:
    return len(chain.fake.received)


def test_refused_after_the_crossing_with_retry_after_until_midnight() -> None:
    """
    A key may use tokens until its daily quota is used up: the request
    that reaches it is served, the next gets 429 with Retry-After (seconds
    to the next UTC midnight) and the quota's message, and nothing of it
    reaches Ollama.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=20)
    assert generate(chain)[0] == 200  # 10 tokens
    assert generate(chain)[0] == 200  # 20: the quota, reached
    before = sent_to_ollama(chain)
    code, retry_after, body = generate(chain)
    assert (code, retry_after) == (429, [b"21600"])
    assert body == {
        "error": "key 'user' has used its 20 tokens for today (UTC); the quota resets at "
        "2026-12-16T00:00:00Z"
    }
    assert sent_to_ollama(chain) == before
    assert generate(chain)[0] == 429
    assert chain.quotas.used("user", "day") == 20


def test_openai_routes_are_refused_in_openai_shape() -> None:
    """
    On C{/v1}, the refusal has OpenAI's error shape and type.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=5)
    generate(chain)
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    response = chain.respond("POST", "/v1/chat/completions", key=USER_KEY,
                             data=json.dumps(body).encode())
    assert response.code == 429
    error = json.loads(chain.body(response))["error"]
    assert error["type"] == "rate_limit_error"
    assert "has used its 5 tokens for today (UTC)" in error["message"]


def test_the_crossing_stream_completes() -> None:
    """
    A stream that goes over the quota is never cut: it streams every
    token and its final object; so does one that started before the
    other ended, while the first one's reservation (67 tokens) left the
    key under its quota.  Both count what they used, not what they
    reserved, and the next request is refused.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=100)
    hold = {"model": "hold", "prompt": "a b", "options": {"num_predict": 50}}
    held_response = chain.request("POST", "/api/generate", key=USER_KEY,
                                  data=json.dumps(hold).encode())
    held = chain.fake.held[-1]
    code, _, lines = generate(chain, tokens=50)
    assert code == 200
    assert len(lines) == 51 and lines[-1]["done"] and lines[-1]["eval_count"] == 50
    held.release()
    chain.flush()
    body = chain.body(chain.result(held_response))
    assert json.loads(body.splitlines()[-1])["done"]
    assert chain.quotas.used("user", "day") == 104
    assert generate(chain)[0] == 429


def test_day_quota_resets_at_utc_midnight() -> None:
    """
    A key over its daily quota is refused until the next UTC midnight,
    and served from then on, its count started afresh.
    """
    chain = chain_at("2026-12-15T23:00:00", tokens_per_day=10)
    assert generate(chain)[0] == 200
    chain.clock.advance(3599)
    code, retry_after, _ = generate(chain)
    assert (code, retry_after) == (429, [b"1"])
    chain.clock.advance(1)
    assert generate(chain)[0] == 200
    assert chain.quotas.used("user", "day") == 10
    assert generate(chain)[0] == 429


def test_month_quota_resets_on_the_first() -> None:
    """
    A key over its monthly quota is refused, with Retry-After until the
    first of the next month, across the days in between; the month's
    message wins over the day's when both are used up.
    """
    chain = chain_at("2026-12-30T12:00:00", tokens_per_day=10, tokens_per_month=10)
    assert generate(chain)[0] == 200
    code, retry_after, body = generate(chain)
    assert (code, retry_after) == (429, [b"129600"])
    assert body["error"] == (
        "key 'user' has used its 10 tokens for this month (UTC); the quota resets at "
        "2027-01-01T00:00:00Z"
    )
    chain.clock.advance(12 * 3600)  # a new day, the same month
    code, retry_after, _ = generate(chain)
    assert (code, retry_after) == (429, [b"86400"])
    chain.clock.advance(86400)
    assert generate(chain)[0] == 200
    assert chain.quotas.used("user", "month") == 10


def test_a_key_without_quota_is_untouched() -> None:
    """
    A key without a quota is never refused, whatever it uses; its tokens
    are counted all the same, so that a quota given to it while the proxy
    runs (keys update) counts what it used today.
    """
    chain = chain_at("2026-12-15T18:00:00")
    for _ in range(5):
        assert generate(chain, tokens=100)[0] == 200
        assert generate(chain, tokens=100, key=KEY)[0] == 200
    assert chain.quotas.used("user", "day") == 510
    user = ApiKey(name="user", digest=digest(USER_KEY), tokens_per_day=1000)
    chain.keys.replace([*(k for k in chain.keys if k.name != "user"), user])
    assert generate(chain, tokens=500)[0] == 200
    assert generate(chain)[0] == 429


def test_refusals_are_counted_and_logged_with_their_reason() -> None:
    """
    A refusal is counted in C{ollamaproxy_quota_refusals_total} by key and
    period, and in the requests by status; its access line says why.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=5)
    generate(chain)
    with capturedLogs() as events:
        generate(chain)
        generate(chain)
    [first, _] = _access(list(events))
    assert (first["status"], first["outcome"]) == (429, "rejected")
    assert first["detail"].startswith("key 'user' has used its 5 tokens for today (UTC)")
    _, text = chain.metrics.render(None)
    assert b'ollamaproxy_quota_refusals_total{key="user",period="day"} 2.0' in text
    assert b'status="429"' in text


def _access(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_namespace") == "ollamaproxy.access"]


def test_keys_with_quota_wait_until_the_book_is_seeded() -> None:
    """
    Until what was used before the start is read, a key with a quota gets
    503 with Retry-After 1 and nothing reaches Ollama; a key without one
    is served.  Once seeded, the key is served, or refused if the seed
    shows it over its quota.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=100)
    chain.quotas.loaded = False
    before = sent_to_ollama(chain)
    code, retry_after, body = generate(chain)
    assert (code, retry_after) == (503, [b"1"])
    assert "token quotas are being loaded" in body["error"]
    assert sent_to_ollama(chain) == before
    assert generate(chain, key=KEY)[0] == 200
    now = chain.clock.seconds()
    chain.quotas.seed(window("day", now), {"user": 95}, window("month", now), {"user": 95})
    assert generate(chain)[0] == 200
    assert generate(chain)[0] == 429


def test_seed_left_out_for_a_period_that_ended() -> None:
    """
    Counts read for a day that has ended by the time they arrive are left
    out; the month's still count.
    """
    clock = Clock()
    clock.advance(at("2026-12-15T23:59:59"))
    book = QuotaBook(clock)
    day, month = window("day", clock.seconds()), window("month", clock.seconds())
    clock.advance(1)
    book.seed(day, {"user": 7}, month, {"user": 30})
    assert (book.used("user", "day"), book.used("user", "month")) == (0, 30)
    assert book.loaded


def _usage_file(tmp_path: Path) -> str:
    """
    A usage file with rows of last month, earlier this month, yesterday
    and today (2026-12-15).
    """
    path = str(tmp_path / "state" / "usage.sqlite3")
    write_rows(path, [
        (at("2026-11-30T23:59:30"), "user", "llama3.2", 1, 1000, 1000, 0),
        (at("2026-12-01T00:00:00"), "user", "llama3.2", 1, 30, 20, 0),
        (at("2026-12-14T23:59:59"), "user", "mistral", 1, 5, 5, 0),
        (at("2026-12-15T00:00:10"), "user", "llama3.2", 2, 40, 20, 0),
        (at("2026-12-15T09:00:00"), "other", "llama3.2", 1, 3, 4, 0),
        (at("2026-12-15T10:00:00"), "idle", "", 1, 0, 0, 0),
    ])
    return path


def test_tokens_by_key_since(tmp_path: Path) -> None:
    """
    C{tokens_by_key} sums prompt and completion tokens per key from a
    time on; keys without tokens, and a missing file, give none.
    """
    path = _usage_file(tmp_path)
    assert tokens_by_key(path, at("2026-12-01T00:00:00")) == {"user": 120, "other": 7}
    assert tokens_by_key(path, at("2026-12-15T00:00:00")) == {"user": 60, "other": 7}
    assert tokens_by_key(str(tmp_path / "missing.sqlite3"), 0.0) == {}


def _seed(book: QuotaBook, clock: Clock, read: Callable[[float], Deferred[dict[str, int]]]
          ) -> QuotaSeed:
    seed = QuotaSeed(book, clock, read)
    seed.startService()
    return seed


def test_a_quota_survives_a_restart(tmp_path: Path) -> None:
    """
    A new proxy's book starts from the tokens the usage file holds for
    this UTC day and month: a key that used its quota before the restart
    is refused after it, with the day's and the month's counted apart.
    """
    path = _usage_file(tmp_path)
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=70, tokens_per_month=1000)
    chain.quotas.loaded = False
    asked: list[float] = []

    def read(since: float) -> Deferred[dict[str, int]]:
        asked.append(since)
        return succeed(tokens_by_key(path, since))

    _seed(chain.quotas, chain.clock, read)
    assert sorted(asked) == [at("2026-12-01T00:00:00"), at("2026-12-15T00:00:00")]
    assert chain.quotas.loaded
    assert (chain.quotas.used("user", "day"), chain.quotas.used("user", "month")) == (60, 120)
    assert generate(chain)[0] == 200  # 60 + 10 = 70
    assert generate(chain)[0] == 429


def test_a_seed_that_cannot_be_read_is_logged_and_counts_from_now(
    observe_errors: ErrorCollector,
) -> None:
    """
    If the usage store cannot be read, that is logged and the quotas
    count from the start: keys with a quota are not locked out for good.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=10)
    chain.quotas.loaded = False
    with capturedLogs() as events:
        _seed(chain.quotas, chain.clock,
              lambda since: fail(UsageFileError("cannot read usage file x: it is a directory")))
    [logged] = [e for e in events if e.get("log_failure") is not None]
    assert "Cannot read this month's usage" in logged["log_format"]
    logged["log_failure"].trap(UsageFileError)
    [error] = observe_errors.errors
    assert error is logged
    observe_errors.errors.clear()
    assert chain.quotas.loaded
    assert generate(chain)[0] == 200
    assert generate(chain)[0] == 429


def held_generate(chain: Chain, **fields: Any) -> tuple[bytes, Deferred[Any]]:
    """
    Start a generate of the model C{hold} with C{user}'s key, which the
    test answers by hand (L{tests.fakes.ollama.HeldStream}): its body, and
    the client's response.
    """
    body = json.dumps({"model": "hold", "prompt": "a b", **fields}).encode()
    return body, chain.request("POST", "/api/generate", key=USER_KEY, data=body)


def streaming(chain: Chain, tokens: int) -> tuple[bytes, HeldStream, Collector]:
    """
    A L{held_generate} whose answer has streamed C{tokens} tokens to the
    client so far: its body, Ollama's held stream and the client's body.
    """
    request, response = held_generate(chain)
    held = chain.fake.held[-1]
    for _ in range(tokens):
        held.write_line({"model": "hold", "response": "tok ", "done": False})
    chain.flush()
    return request, held, chain.stream(chain.result(response))


def test_a_client_that_hangs_up_mid_stream_is_charged() -> None:
    """
    A client that reads 15 tokens of a stream and hangs up is charged
    those 15, as the relay counted them, and its prompt as estimated from
    the request (Ollama's own count never came); the record says both.
    Twelve such streams (24 tokens each) cannot get past a quota of 100.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=100)
    request, _, client = streaming(chain, 15)
    with capturedLogs() as events:
        client.disconnect()
        chain.flush()
    chain.failure(client.done)
    prompt = math.ceil(len(request) / 4)
    assert chain.quotas.used("user", "day") == 15 + prompt
    [summary] = [e for e in events if e.get("log_namespace") == "ollamaproxy.stream"]
    assert (summary["model"], summary["prompt_tokens"], summary["completion_tokens"]) == (
        "hold:latest", prompt, 15)
    assert summary["tokens_counted"] and summary["prompt_estimated"]
    codes = []
    for _ in range(11):
        answer = chain.result(held_generate(chain)[1])
        codes.append(answer.code)
        if answer.code == 200:
            for _ in range(15):
                chain.fake.held[-1].write_line({"model": "hold", "response": "x", "done": False})
            chain.flush()
            client = chain.stream(answer)
            client.disconnect()
            chain.flush()
            chain.failure(client.done)
    assert codes == [200] * 4 + [429] * 7
    assert chain.quotas.used("user", "day") == 5 * (15 + prompt)


def test_concurrent_streams_overshoot_by_at_most_one_request() -> None:
    """
    Eight streams started together on a key with 100 tokens a day: each
    one admitted reserves its expected cost (prompt and C{num_predict}),
    so only two get in (the second while the key had 33 left), and the key
    goes over its quota by less than one request's cost, not eight times.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=100)
    responses = [held_generate(chain, options={"num_predict": 50})[1] for _ in range(8)]
    answers = [chain.result(response) for response in responses]
    assert [answer.code for answer in answers] == [200, 200, 429, 429, 429, 429, 429, 429]
    for held in chain.fake.held:
        held.release()
    chain.flush()
    for answer in answers:
        chain.body(answer)
    assert 100 <= chain.quotas.used("user", "day") == 104 < 100 + 52


def test_a_reservation_is_given_back_when_nothing_was_generated() -> None:
    """
    A request that Ollama refuses (a model it does not have) costs
    nothing: its reservation is given back.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=100)
    body = json.dumps({"model": "nosuchmodel", "prompt": "a b"}).encode()
    response = chain.respond("POST", "/api/generate", key=USER_KEY, data=body)
    assert response.code == 404
    chain.body(response)
    assert chain.quotas.used("user", "day") == 0


def test_a_long_non_streamed_answer_is_charged() -> None:
    """
    A C{"stream": false} answer of about 210 kB, arriving in many pieces,
    is charged the counts of its final object, read from the end of the
    body however many pieces it spans.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=100)
    body = json.dumps({"model": "slowhead", "prompt": "a b", "stream": False}).encode()
    response = chain.request("POST", "/api/generate", key=USER_KEY, data=body)
    held = chain.fake.held[-1]
    held.send_head(content_type=b"application/json; charset=utf-8")
    held.write_raw(b'{"model":"slowhead","created_at":"2026-12-15T18:00:00Z","response":"')
    for _ in range(70):
        held.write_raw(b"tok " * 750)
        chain.flush()
    held.write_raw(b'","done":true,"done_reason":"stop","total_duration":1,'
                   b'"prompt_eval_count":26,"eval_count":500,"eval_duration":1}')
    held.finish()
    chain.flush()
    assert len(chain.body(chain.result(response))) > 210_000
    assert chain.quotas.used("user", "day") == 526
    assert generate(chain)[0] == 429


def test_embed_is_charged_with_its_model() -> None:
    """
    C{/api/embed} is metered: the C{prompt_eval_count} of its answer (which
    has no C{done}) counts against the quota and in usage, with the model
    that made it.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=100)
    request = {"model": "llama3.2", "input": ["one two three", "four five"]}
    with capturedLogs() as events:
        response = chain.respond("POST", "/api/embed", key=USER_KEY,
                                 data=json.dumps(request).encode())
        assert response.code == 200
        assert json.loads(chain.body(response))["prompt_eval_count"] == 5
    assert chain.quotas.used("user", "day") == 5
    [summary] = [e for e in events if e.get("log_namespace") == "ollamaproxy.stream"]
    assert (summary["model"], summary["prompt_tokens"]) == ("llama3.2", 5)
    assert not summary["prompt_estimated"]


def test_legacy_embeddings_are_charged_an_estimate() -> None:
    """
    C{/api/embeddings}, whose answer holds no count and no model, is
    charged its prompt as estimated from the request, under the model the
    request named, and says it was estimated.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=100)
    request = json.dumps({"model": "llama3.2", "prompt": "one two three"}).encode()
    with capturedLogs() as events:
        response = chain.respond("POST", "/api/embeddings", key=USER_KEY, data=request)
        chain.body(response)
    assert chain.quotas.used("user", "day") == math.ceil(len(request) / 4)
    [summary] = [e for e in events if e.get("log_namespace") == "ollamaproxy.stream"]
    assert (summary["model"], summary["completion_tokens"]) == ("llama3.2:latest", 0)
    assert summary["prompt_estimated"] and not summary["tokens_counted"]


def test_a_reservation_settles_in_the_day_it_was_made() -> None:
    """
    The book counts a reservation as used at once; settled in the same day,
    the tokens used replace it; settled in the next day, the reservation
    stays in the day it was made (forgotten with it) and the tokens used
    count in the new day, while the month, the same, settles the difference.
    """
    clock = Clock()
    clock.advance(at("2026-12-15T23:00:00"))
    book = QuotaBook(clock, loaded=True)
    user = ApiKey(name="user", digest=digest(USER_KEY))
    settle = book.reserve(user, 500)
    assert (book.used("user", "day"), book.used("user", "month")) == (500, 500)
    settle(120)
    assert (book.used("user", "day"), book.used("user", "month")) == (120, 120)
    late = book.reserve(user, 500)
    clock.advance(3600)
    late(40)
    assert (book.used("user", "day"), book.used("user", "month")) == (40, 160)


def test_a_reservation_that_crosses_the_quota_is_refused() -> None:
    """
    Two requests of a key admitted together (each found it under its
    quota): the first reserves its cost, which takes the key to its quota;
    the second's reservation checks the quota again and is refused with its
    429, and gives back its place among the key's requests in flight.
    """
    clock = Clock()
    clock.advance(at("2026-12-15T18:00:00"))
    limits = KeyLimits(clock, QuotaBook(clock, loaded=True))
    user = ApiKey(name="user", digest=digest(USER_KEY), tokens_per_day=100, max_streams=2)
    first, second = (_fired(limits.admit(user)) for _ in range(2))
    release = _fired(first.reserve(150))
    refused = second.reserve(10)
    failure = refused.result
    refused.addErrback(lambda _: None)
    assert isinstance(failure, Failure) and isinstance(failure.value, ProxyError)
    assert failure.value.code == 429
    assert "has used its 100 tokens for today" in failure.value.message
    release(50)
    # Both places are free: the refused request gave its own back.
    _fired(limits.admit(user))
    _fired(limits.admit(user))


def _fired(d: Deferred[T]) -> T:
    """
    The result of a L{Deferred} that has fired.
    """
    result = d.result
    assert not isinstance(result, Failure)
    return cast(T, result)


def test_a_model_pull_costs_no_tokens() -> None:
    """
    A model pull's NDJSON progress lines are no tokens: the meter counts
    only the answers of routes that run a model, so the key is charged
    nothing and the pull has no summary.
    """
    chain = chain_at("2026-12-15T18:00:00")
    with capturedLogs() as events:
        response = chain.respond("POST", "/api/pull", data=b'{"model": "qwen2.5:0.5b"}')
        assert response.code == 200
        assert len(chain.body(response).splitlines()) > 1
    assert chain.quotas.used("alice", "day") == 0
    assert [e for e in events if e.get("log_namespace") == "ollamaproxy.stream"] == []


@pytest.mark.parametrize("cut", ["broke off", "idle"])
def test_a_stream_ollama_cuts_is_charged(cut: str) -> None:
    """
    A stream that Ollama breaks off, or that is cut for its silence past
    C{--idle-timeout}, is charged the tokens relayed and its estimated
    prompt, as one whose client hangs up.
    """
    chain = chain_at("2026-12-15T18:00:00", tokens_per_day=100)
    request, held, client = streaming(chain, 10)
    if cut == "idle":
        chain.clock.advance(IDLE_TIMEOUT + 1)
    else:
        held.abort()
    chain.flush()
    chain.failure(client.done)
    assert chain.quotas.used("user", "day") == 10 + math.ceil(len(request) / 4)
