"""
Several Ollama servers behind one proxy, through the whole chain in memory:
routing by model, merged listings, failover, the fair queue, caps.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent
from twisted.web.client import ResponseFailed
from twisted.web.iweb import IResponse

from ollamaproxy.admission.caps import Caps
from ollamaproxy.admission.estimate import DEFAULT_OUTPUT_TOKENS
from ollamaproxy.admission.keys import ApiKey, digest
from ollamaproxy.admission.policy import MAX_CHECKED_BODY
from ollamaproxy.model_names import resolve
from tests.fakes.agents import Refusing, Silent
from tests.fakes.backends import HI, OTHER, USER, two_backends
from tests.fakes.chain import HEADER_TIMEOUT, Chain, chat
from tests.fakes.ollama import EVAL_NS, PROMPT_EVAL_NS


def test_a_request_goes_to_the_backend_that_has_its_model() -> None:
    """
    Each chat reaches only the fake that has its model.
    """
    chain = two_backends()
    for model, number in (("mistral", 1), ("llama3.2", 0)):
        response = chain.respond("POST", "/api/chat", data=chat(model, stream=False))
        assert response.code == 200
        chain.body(response)
        assert [r.json()["model"] for r in chain.fakes[number].received] == [model]


def test_a_model_on_no_backend_is_404_and_nothing_is_sent() -> None:
    """
    M on no backend: 404 in Ollama's shape, no fake receives anything.
    """
    chain = two_backends()
    response = chain.respond("POST", "/api/chat", data=chat("qwen3"))
    assert response.code == 404
    assert "qwen3:latest" in json.loads(chain.body(response))["error"]
    assert all(fake.received == [] for fake in chain.fakes)


def test_listings_are_merged_and_filtered() -> None:
    """
    /api/tags and /v1/models list the union over the backends, each model
    once; a key limited to models sees only its own; HEAD gives the length.
    """
    chain = two_backends()
    names = {m["name"] for m in json.loads(chain.body(chain.respond("GET", "/api/tags")))["models"]}
    assert names == {"llama3.2:latest", "mistral:latest", "hold:latest"}
    ids = [m["id"] for m in json.loads(chain.body(chain.respond("GET", "/v1/models")))["data"]]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 3
    chain.keys.replace([*chain.keys,
                        ApiKey("limited", digest(USER), models=("mistral",))])
    limited = chain.body(chain.respond("GET", "/api/tags", key=USER))
    assert [m["name"] for m in json.loads(limited)["models"]] == ["mistral:latest"]
    head = chain.respond("HEAD", "/api/tags", key=USER)
    assert head.headers.getRawHeaders(b"content-length") == [str(len(limited)).encode()]


def test_failover_before_the_first_byte(access_events: list[LogEvent]) -> None:
    """
    A backend that refuses connections is marked unhealthy, and the
    request goes to another backend that has its model, without an error
    the client can see; the access line names the backend that answered.
    """
    chain = two_backends()
    chain.backends[0].upstream = replace(chain.backends[0].upstream, agent=Refusing())
    response = chain.respond("POST", "/api/chat", data=chat("hold"))
    assert response.code == 200
    assert not chain.backends[0].healthy
    assert len(chain.fakes[1].received) == 1
    chain.fakes[1].held[-1].finish()
    chain.body(response)
    assert access_events[-1]["upstream"] == "http://127.0.0.1:11435"


def _hung_pair(**kwargs: Any) -> Chain:
    """
    Two backends that both have C{slowhead} (whose head the test sends),
    and have said so.
    """
    chain = Chain(backends=[["slowhead:latest"], ["slowhead:latest"]], **kwargs)
    chain.pool.refresh_all()
    chain.flush()
    return chain


def _header_timeout_passes(chain: Chain) -> None:
    """
    C{--header-timeout} runs out, and what it sets off (the cut, the send
    to another backend, the 504) has happened.
    """
    chain.clock.advance(HEADER_TIMEOUT)
    chain.flush()


def test_a_hung_generation_is_sent_again_to_another_backend(
    access_events: list[LogEvent],
) -> None:
    """
    A backend that takes a generation but sends no response head within
    --header-timeout is out of rotation for that model (healthy for
    others), its connection is closed, and the request, its body held
    whole, is sent once more, unchanged, to the other backend that has
    the model: the client gets that one's answer.  The access line names
    the backend it ended on, says it was retried and why, and its first
    byte counts the time waited on the hung one.  The next request goes
    to the other backend at once.
    """
    chain = _hung_pair()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    assert len(chain.fakes[0].received) == 1
    _header_timeout_passes(chain)
    assert chain.fakes[0].held[0].disconnected.called
    assert chain.backends[0].healthy
    assert not chain.backends[0].serves(resolve("slowhead"))
    [again] = chain.fakes[1].received
    assert again.body == chain.fakes[0].received[0].body
    assert chain.pending(d)
    chain.clock.advance(2)
    chain.fakes[1].held[0].release()
    chain.flush()
    response = chain.result(d)
    assert response.code == 200
    assert json.loads(chain.body(response).splitlines()[-1])["done"] is True
    [line] = access_events
    assert (line["outcome"], line["status"]) == ("completed", 200)
    assert line["upstream"] == "http://127.0.0.1:11435"
    assert line["first_byte"] == HEADER_TIMEOUT + 2
    assert line["notes"] == ("retried after http://127.0.0.1:11434: Ollama sent no "
                             f"response within {HEADER_TIMEOUT:g} seconds")
    assert "[retried after http://127.0.0.1:11434" in line["line"]
    chain.request("POST", "/api/chat", data=chat("slowhead"))
    assert len(chain.fakes[0].received) == 1
    assert len(chain.fakes[1].received) == 2


def test_a_hung_generation_is_sent_again_only_once(access_events: list[LogEvent]) -> None:
    """
    When the backend it is sent again to hangs too, the client gets the
    504 after two header timeouts, the bound on its wait; both backends
    are out for the model, and neither gets the request a third time.
    """
    chain = _hung_pair()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    _header_timeout_passes(chain)
    assert chain.pending(d)
    _header_timeout_passes(chain)
    response = chain.result(d)
    assert response.code == 504
    chain.body(response)
    assert [len(fake.received) for fake in chain.fakes] == [1, 1]
    assert not any(b.serves(resolve("slowhead")) for b in chain.backends)
    [line] = access_events
    assert line["outcome"] == "timeout"
    assert line["upstream"] == "http://127.0.0.1:11435"
    assert chain.clock.getDelayedCalls() == []


def test_a_hung_generation_waits_for_a_slot_on_the_other_backend(
    access_events: list[LogEvent],
) -> None:
    """
    At --parallel 1, a request sent again while the other backend's one
    slot is taken waits in the fair queue for it, as any request does,
    and its access line's wait is that one.  (A header timeout shorter than
    the idle timeout, so that the other answer is not cut meanwhile.)
    """
    chain = _hung_pair(parallel=1, header_timeout=60)
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    other = chain.request("POST", "/api/chat",
                          data=chat("slowhead", messages=[{"role": "user", "content": "2"}]))
    assert [len(fake.received) for fake in chain.fakes] == [1, 1]
    chain.fakes[1].held[0].send_head()
    chain.flush()
    chain.clock.advance(60)
    chain.flush()
    assert len(chain.fakes[1].received) == 1
    chain.clock.advance(3)
    chain.fakes[1].held[0].finish()
    chain.flush()
    chain.body(chain.result(other))
    assert len(chain.fakes[1].received) == 2
    chain.fakes[1].held[1].finish()
    chain.flush()
    response = chain.result(d)
    assert response.code == 200
    chain.body(response)
    line = access_events[-1]
    assert line["notes"].startswith("retried after http://127.0.0.1:11434")
    assert line["queued"] == 3


def test_a_request_that_takes_no_slot_is_not_sent_again() -> None:
    """
    Only a request that runs a model is sent again: one that takes no
    slot (a model's details) and times out gets the 504, and the other
    backend gets nothing.
    """
    chain = Chain(backends=[["llama3.2:latest"]] * 2, agent=Silent())
    chain.pool.refresh_all()
    chain.flush()
    d = chain.request("POST", "/api/show", data=b'{"model": "llama3.2"}')
    _header_timeout_passes(chain)
    response = chain.result(d)
    assert response.code == 504
    chain.body(response)
    assert chain.fakes[1].received == []


def test_a_hung_generation_with_no_other_backend_is_504(access_events: list[LogEvent]) -> None:
    """
    When no other backend has the model, the request hung on its only
    one gets the 504, as with a single backend, not the 503 of a model
    no healthy backend has; the other backend gets nothing.
    """
    chain = Chain(backends=[["slowhead:latest"], ["llama3.2:latest"]])
    chain.pool.refresh_all()
    chain.flush()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    _header_timeout_passes(chain)
    response = chain.result(d)
    assert response.code == 504
    assert "no response within" in json.loads(chain.body(response))["error"]
    assert chain.fakes[1].received == []
    assert access_events[-1]["notes"] == ""


def test_a_streamed_body_that_hung_is_not_sent_again() -> None:
    """
    A body the proxy did not read whole (compressed, or too large to
    read: it streamed on as it came) cannot be sent again: the request
    that hung gets the 504, and the other backend gets nothing.
    """
    chain = _hung_pair()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"),
                      headers={"Content-Encoding": "identity"})
    assert len(chain.fakes[0].received) == 1
    _header_timeout_passes(chain)
    response = chain.result(d)
    assert response.code == 504
    chain.body(response)
    assert chain.fakes[1].received == []


def test_a_client_that_left_is_not_sent_again(access_events: list[LogEvent]) -> None:
    """
    A client that hangs up while its request hangs is not sent again
    when the header timeout comes; one that hangs up while it is being
    sent again closes that backend's connection too.
    """
    chain = _hung_pair()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    d.cancel()
    chain.flush()
    chain.failure(d)
    _header_timeout_passes(chain)
    assert chain.fakes[1].received == []
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    _header_timeout_passes(chain)
    assert len(chain.fakes[1].received) == 1
    d.cancel()
    chain.flush()
    chain.failure(d)
    assert chain.fakes[1].held[0].disconnected.called
    assert [e["outcome"] for e in access_events] == ["client_disconnected"] * 2
    assert chain.clock.getDelayedCalls() == []


def test_a_backend_that_breaks_before_its_head_is_not_retried() -> None:
    """
    Failover only before anything was sent: a backend that received the
    request (body and all) and then dropped the connection before its
    head gives the client a 502, and the request never reaches the other
    backend; the backend that broke is marked unhealthy.
    """
    chain = Chain(backends=[["slowhead:latest"], ["slowhead:latest"]])
    chain.pool.refresh_all()
    chain.flush()
    d = chain.request("POST", "/api/chat", data=chat("slowhead"))
    [received] = chain.fakes[0].received
    assert received.json()["messages"] == HI
    chain.fakes[0].held[-1].abort()
    chain.flush()
    response = chain.result(d)
    assert response.code == 502
    chain.body(response)
    assert chain.fakes[1].received == []
    assert not chain.backends[0].healthy


def test_a_backend_that_cuts_its_body_is_not_retried() -> None:
    """
    Never after the first byte: a backend that sent its head and then
    broke off mid-body gives the client a cut stream, and the request
    never reaches the other backend.
    """
    chain = two_backends()
    d = chain.request("POST", "/api/chat", data=chat("hold"))
    held = chain.fakes[0].held[-1]
    held.write_raw(b'{"a":1}\n')
    chain.flush()
    client = chain.stream(chain.result(d))
    held.abort()
    chain.flush()
    assert chain.failure(client.done).check(ResponseFailed)
    assert client.body.startswith(b'{"a":1}\n')
    assert "broke off" in json.loads(client.body.split(b"\n")[1])["error"]
    assert chain.fakes[1].received == []


def test_one_unreachable_backend_is_a_502_not_a_loop() -> None:
    """
    With one backend that cannot be reached, the client gets the 502 that
    names it, once.
    """
    chain = Chain(agent=Refusing())
    response = chain.respond("GET", "/api/tags")
    assert response.code == 502
    assert "http://127.0.0.1:11434" in json.loads(chain.body(response))["error"]


def test_keys_are_served_in_turn(access_events: list[LogEvent]) -> None:
    """
    At --parallel 1, one key's burst waits behind its first request; a
    second key's request, sent after the burst, is the next to reach
    Ollama, and its access line says how long it was queued.
    """
    chain = Chain(parallel=1)
    chain.keys.replace([*chain.keys, ApiKey("user", digest(USER)),
                        ApiKey("other", digest(OTHER))])
    burst = [chain.request("POST", "/api/chat", key=USER, data=chat("hold", n=i))
             for i in range(4)]
    chain.clock.advance(3)
    other = chain.request("POST", "/api/chat", key=OTHER, data=chat("hold", n="other"))
    assert [r.json()["n"] for r in chain.fake.received] == [0]
    assert chain.router.queue.waiting() == {"user": 3, "other": 1}
    chain.clock.advance(2)
    chain.fake.held[0].finish()
    chain.flush()
    assert [r.json()["n"] for r in chain.fake.received] == [0, "other"]
    chain.fake.held[1].finish()
    chain.flush()
    assert [r.json()["n"] for r in chain.fake.received] == [0, "other", 1]
    for held in range(2, 5):
        chain.fake.held[held].finish()
        chain.flush()
    for d in [*burst, other]:
        chain.body(chain.result(d))
    [line] = [e for e in access_events if e["key"] == "other"]
    assert line["queued"] == 2
    assert "queued 2.000s" in line["line"]


def test_a_client_that_leaves_while_queued_never_reaches_ollama() -> None:
    """
    A queued request whose client hangs up leaves the queue, and no
    backend ever sees it.
    """
    chain = Chain(parallel=1)
    first = chain.request("POST", "/api/chat", data=chat("hold"))
    waiting = chain.request("POST", "/api/chat", data=chat("hold"))
    assert len(chain.router.queue) == 1
    waiting.cancel()
    chain.failure(waiting)  # the client's own Deferred: its request was cancelled
    chain.flush()
    assert len(chain.router.queue) == 0
    chain.fake.held[0].finish()
    chain.flush()
    chain.body(chain.result(first))
    assert len(chain.fake.received) == 1


def test_full_queue_and_queue_timeout_are_503_with_retry_after() -> None:
    """
    Beyond --max-queue a request gets 503 with Retry-After at once; one
    that waits longer than --queue-timeout gets 503 then; neither is sent.
    """
    chain = Chain(parallel=1, max_queue=1, queue_timeout=30)
    chain.request("POST", "/api/chat", data=chat("hold"))
    queued = chain.request("POST", "/api/chat", data=chat("hold"))
    refused = chain.respond("POST", "/api/chat", data=chat("hold"))
    assert refused.code == 503
    assert refused.headers.getRawHeaders(b"retry-after") == [b"30"]
    chain.body(refused)
    chain.clock.advance(30)
    chain.flush()
    timed_out = chain.result(queued)
    assert timed_out.code == 503
    assert timed_out.headers.getRawHeaders(b"retry-after") == [b"30"]
    chain.body(timed_out)
    assert len(chain.fake.received) == 1
    chain.fake.held[0].finish()
    chain.flush()


def test_a_key_holding_the_waiting_room_gives_up_its_newest_place(
    access_events: list[LogEvent],
) -> None:
    """
    At --max-queue 3, one key holding every place and another key's single
    request: that request waits, and the holder's newest request's client
    gets 503 with Retry-After at once, its access line saying queue_full;
    neither the evicted request nor any other beyond the first reaches
    Ollama before its turn.
    """
    chain = Chain(parallel=1, max_queue=3, queue_timeout=30)
    chain.keys.replace([*chain.keys, ApiKey("user", digest(USER)),
                        ApiKey("other", digest(OTHER))])
    burst = [chain.request("POST", "/api/chat", key=USER, data=chat("hold", n=i))
             for i in range(4)]
    assert chain.router.queue.waiting() == {"user": 3}
    other = chain.request("POST", "/api/chat", key=OTHER, data=chat("hold", n="other"))
    chain.flush()
    assert chain.router.queue.waiting() == {"user": 2, "other": 1}
    evicted = chain.result(burst[3])
    assert evicted.code == 503
    assert evicted.headers.getRawHeaders(b"retry-after") == [b"30"]
    chain.body(evicted)
    assert [(e["key"], e["outcome"]) for e in access_events] == [("user", "queue_full")]
    assert [r.json()["n"] for r in chain.fake.received] == [0]
    for held in range(4):
        chain.fake.held[held].finish()
        chain.flush()
    assert [r.json()["n"] for r in chain.fake.received] == [0, "other", 1, 2]
    for d in [*burst[:3], other]:
        chain.body(chain.result(d))


def test_keep_alive_over_the_cap_is_clamped(access_events: list[LogEvent]) -> None:
    """
    keep_alive -1 (for ever) and a huge num_ctx are clamped to the caps
    before they reach Ollama, and the access line says so; a request within
    the caps reaches Ollama byte for byte.
    """
    chain = Chain(caps=Caps(keep_alive=600, num_ctx=8192))
    body = chat("llama3.2", stream=False, keep_alive=-1, options={"num_ctx": 131072})
    chain.body(chain.respond("POST", "/api/chat", data=body))
    sent = chain.fake.received[-1].json()
    assert (sent["keep_alive"], sent["options"]["num_ctx"]) == ("10m", 8192)
    assert "keep_alive forever clamped to 10m" in access_events[-1]["notes"]
    within = chat("llama3.2", stream=False, keep_alive="5m")
    chain.body(chain.respond("POST", "/api/chat", data=within))
    assert chain.fake.received[-1].body == within


def test_a_key_s_own_cap_is_tighter() -> None:
    """
    A key's max_keep_alive below the proxy's wins.
    """
    chain = Chain(caps=Caps(keep_alive=3600))
    chain.keys.replace([*chain.keys,
                        ApiKey("user", digest(USER), caps=Caps(keep_alive=60))])
    chain.body(chain.respond("POST", "/api/chat", key=USER,
                             data=chat("llama3.2", stream=False, keep_alive="1h")))
    assert chain.fake.received[-1].json()["keep_alive"] == "1m"


def test_a_pulled_model_can_be_used_at_once() -> None:
    """
    A model pulled through the proxy lands on the first backend, whose
    models are asked again, so a chat for it is routed there at once.
    """
    chain = two_backends()
    pulled = chain.respond("POST", "/api/pull", data=json.dumps(
        {"model": "qwen3", "stream": False}).encode())
    assert pulled.code == 200
    chain.body(pulled)
    chain.flush()
    response = chain.respond("POST", "/api/chat", data=chat("qwen3", stream=False))
    assert response.code == 200
    chain.body(response)
    assert chain.fakes[0].received[-1].json()["model"] == "qwen3"


def test_a_merged_listing_sends_no_key_and_skips_a_backend_that_fails(
    access_events: list[LogEvent],
) -> None:
    """
    Each backend is asked for the listing without the client's key; one
    that cannot be reached is marked unhealthy and the others' models are
    listed; the access line names the backends that answered.
    """
    chain = two_backends()
    chain.backends[1].upstream = replace(chain.backends[1].upstream, agent=Refusing())
    response = chain.respond("GET", "/api/tags", key=USER)
    assert response.code == 200
    names = {m["name"] for m in json.loads(chain.body(response))["models"]}
    assert names == {"llama3.2:latest", "hold:latest"}
    assert not chain.backends[1].healthy
    [asked] = chain.fakes[0].received
    assert asked.headers.getRawHeaders(b"authorization") is None
    assert USER.encode() not in b"".join(v for _, vs in asked.headers.getAllRawHeaders()
                                         for v in vs)
    assert access_events[-1]["upstream"] == "http://127.0.0.1:11434"



def test_a_body_the_proxy_does_not_read_waits_its_turn_too() -> None:
    """
    Chats whose body the proxy does not read for a key it need not check
    (declared over the 16 MiB it reads here; sent in chunks or compressed
    alike) still take slots, a whole backend each: at --parallel 1 the
    second waits in the fair queue and reaches Ollama once the first has
    ended.
    """
    chain = Chain(parallel=1)
    padded = chat("hold", pad=" " * MAX_CHECKED_BODY)
    unread = [chain.request("POST", "/api/chat", data=padded) for _ in range(2)]
    assert len(chain.fake.received) == 1
    assert chain.router.queue.waiting() == {"alice": 1}
    chain.fake.held[0].finish()
    chain.flush()
    chain.body(chain.result(unread[0]))
    assert len(chain.fake.received) == 2
    chain.fake.held[1].finish()
    chain.flush()
    chain.body(chain.result(unread[1]))


def test_a_heavier_key_gets_more_turns() -> None:
    """
    A key of weight 2 and a key of weight 1, both with requests waiting at
    --parallel 1: the slots go two to one, as the fake upstream sees them.
    """
    chain = Chain(parallel=1)
    chain.keys.replace([*chain.keys,
                        ApiKey("user", digest(USER), weight=2), ApiKey("other", digest(OTHER))])
    first = chain.request("POST", "/api/chat", data=chat("hold", n="first"))
    waiting = [chain.request("POST", "/api/chat", key=key, data=chat("hold", n=f"{name}{i}"))
               for i in range(3) for key, name in ((USER, "u"), (OTHER, "o"))]
    for held in range(7):
        chain.fake.held[held].finish()
        chain.flush()
    assert [r.json()["n"] for r in chain.fake.received] == [
        "first", "u0", "o0", "u1", "u2", "o1", "o2"]
    for d in [first, *waiting]:
        chain.body(chain.result(d))


def _answer_all(chain: Chain, sent: list[Deferred[IResponse]]) -> None:
    """
    Move time on until Ollama has had every request of C{sent}, and read
    every answer.
    """
    while len(chain.fake.received) < len(sent):
        chain.clock.advance(0.01)
        chain.flush()
    chain.clock.advance(1)  # the last request's answer
    chain.flush()
    for d in sent:
        chain.body(chain.result(d))


def test_keys_get_equal_tokens_through_the_proxy() -> None:
    """
    Through the whole chain at --parallel 1, under --fair-share tokens: a
    key asking for 600 tokens a request and one asking for 30, both backlogged, are served by what
    Ollama counts, not by turns: the short key reaches Ollama about 20
    times for each of the long key's, and the tokens each was served
    (prompt, and output counted twice) stay within 10 % of each other.
    """
    chain = Chain(parallel=1, fair_share="tokens")
    chain.keys.replace([*chain.keys, ApiKey("user", digest(USER)),
                        ApiKey("other", digest(OTHER))])
    asked = {"user": 600, "other": 30}
    sent = [chain.request("POST", "/api/chat", key=key,
                          data=chat(stream=False, fake_delay=0.001,
                                    options={"num_predict": asked[name]}))
            for key, name, count in ((USER, "user", 10), (OTHER, "other", 150))
            for _ in range(count)]
    _answer_all(chain, sent)
    # While both were backlogged: the first 125 requests to reach Ollama.
    served = [r.json()["options"]["num_predict"] for r in chain.fake.received[:125]]
    assert 18 * served.count(600) <= served.count(30) <= 22 * served.count(600)
    # Ollama's counts: a prompt of one word ("hi"), the output asked for.
    long, short = served.count(600) * 1201, served.count(30) * 61
    assert abs(long - short) <= 0.1 * max(long, short)


def _hang_up_after(chain: Chain, response: Deferred[IResponse], pieces: int) -> None:
    """
    Have the held chat's stream relay C{pieces} tokens, and its client
    hang up.
    """
    held = chain.fake.held[-1]
    for _ in range(pieces):
        held.write_line({"model": "hold", "message": {"content": "tok "}, "done": False})
    chain.flush()
    client = chain.stream(chain.result(response))
    client.disconnect()
    chain.flush()
    chain.failure(client.done)


def test_a_cut_stream_costs_its_key_what_the_meter_counted() -> None:
    """
    Under --fair-share tokens, a client that reads 15 tokens of a stream
    and hangs up: its key is charged in the fair queue what the meter
    counted, its prompt as
    estimated from the request and the 15 pieces relayed (counted twice),
    not the 512 tokens its request was estimated to generate.
    """
    chain = Chain(parallel=1, fair_share="tokens")
    body = chat("hold")
    response = chain.request("POST", "/api/chat", data=body)
    prompt = math.ceil(len(body) / 4)
    assert chain.router.queue.finish("alice") == prompt + 2 * DEFAULT_OUTPUT_TOKENS
    _hang_up_after(chain, response, 15)
    assert chain.router.queue.finish("alice") == prompt + 2 * 15


def test_keys_get_equal_gpu_seconds_through_the_proxy() -> None:
    """
    Through the whole chain at --parallel 1, under --fair-share gpu-time
    (the default): a key whose chats read 2000 words and ask for 10 tokens
    and one whose chats say "hi" and ask for 200, both backlogged, are
    served equal GPU seconds as the fake Ollama reports them (within
    10 %), not equal tokens: a chat of the first reaches Ollama about 5.7
    times for each of the second's, where tokens would give it a third.
    """
    chain = Chain(parallel=1)
    chain.keys.replace([*chain.keys, ApiKey("user", digest(USER)),
                        ApiKey("other", digest(OTHER))])
    reading = [{"role": "user", "content": "w " * 2000}]
    bodies = {USER: chat(stream=False, fake_delay=0.0001, messages=reading,
                         options={"num_predict": 10}),
              OTHER: chat(stream=False, fake_delay=0.0001, options={"num_predict": 200})}
    sent = [chain.request("POST", "/api/chat", key=key, data=bodies[key])
            for key, count in ((USER, 220), (OTHER, 45)) for _ in range(count)]
    _answer_all(chain, sent)
    # While both were backlogged: the first 200 requests to reach Ollama.
    served = [r.json()["options"]["num_predict"] for r in chain.fake.received[:200]]
    readers, writers = served.count(10), served.count(200)
    reader = readers * (2000 * PROMPT_EVAL_NS + 10 * EVAL_NS)
    writer = writers * (1 * PROMPT_EVAL_NS + 200 * EVAL_NS)
    assert abs(reader - writer) <= 0.1 * max(reader, writer)
    assert 4 * writers <= readers


def test_a_v1_answer_costs_its_tokens_at_the_measured_rates() -> None:
    """
    Under --fair-share gpu-time, a C{/v1} answer, which reports tokens but
    no durations, costs its key its prompt and output tokens at the seconds
    per token measured from the model's earlier answers that had them.
    """
    chain = Chain()
    chain.body(chain.respond("POST", "/api/chat", data=chat(stream=False)))
    before = chain.router.queue.finish("alice")
    body = json.dumps({"model": "llama3.2", "max_tokens": 7,
                       "messages": [{"role": "user", "content": "one two three"}]}).encode()
    answer = chain.respond("POST", "/v1/chat/completions", data=body)
    assert json.loads(chain.body(answer))["usage"]["prompt_tokens"] == 3
    assert chain.router.queue.finish("alice") - before == pytest.approx(
        (3 * PROMPT_EVAL_NS + 7 * EVAL_NS) / 1e9)


def test_a_cut_stream_costs_its_tokens_at_the_measured_rates() -> None:
    """
    Under --fair-share gpu-time, a request is charged at its slot its
    estimate at its model's measured rates (the prompt estimated, 512
    tokens of output), and when a client hangs up after 15 tokens, the
    prompt estimated and the 15 pieces relayed at those rates.
    """
    chain = Chain(parallel=1)
    first = chain.request("POST", "/api/chat", data=chat("hold"))
    held = chain.fake.held[-1]
    held.write_line({"model": "hold", "message": {"content": ""}, "done": True,
                     "prompt_eval_count": 10, "prompt_eval_duration": 1_000_000_000,
                     "eval_count": 20, "eval_duration": 4_000_000_000})
    held.finish()
    chain.flush()
    chain.body(chain.result(first))
    before = chain.router.queue.finish("alice")
    body = chat("hold")
    response = chain.request("POST", "/api/chat", data=body)
    prompt = math.ceil(len(body) / 4)
    assert chain.router.queue.finish("alice") - before == pytest.approx(
        prompt * 0.1 + DEFAULT_OUTPUT_TOKENS * 0.2)
    _hang_up_after(chain, response, 15)
    assert chain.router.queue.finish("alice") - before == pytest.approx(
        prompt * 0.1 + 15 * 0.2)
