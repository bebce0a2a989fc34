"""
The console's live feed and its Now view, in memory: what a running stream
shows, coalescing on the timer, a feed that stops when its client goes
away, bounded memory.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse

from ollamaproxy.admission.keys import ADMIN, ApiKey, digest
from ollamaproxy.console.sampler import HEARTBEAT, TICK, Sampler
from tests.fakes.chain import KEY, Chain, Collector, chat
from tests.fakes.console import INFERENCE_KEY, add_inference_key
from tests.fakes.ollama import HeldStream


def open_feed(chain: Chain, key: str | None = KEY) -> tuple[Any, Collector]:
    response = chain.respond("GET", "/-/console/api/feed", key=key)
    return response, chain.stream(response)


def messages(collector: Collector) -> list[dict[str, Any]]:
    return [json.loads(line) for line in collector.body.splitlines()]


def tick(chain: Chain) -> None:
    """
    Let one sampling period pass, and move the bytes it wrote.
    """
    chain.clock.advance(TICK)
    chain.flush()


def started(chain: Chain) -> Sampler:
    sampler = chain.console.sampler
    sampler.startService()
    return sampler


def watching_a_held_chat(
    chain: Chain,
) -> tuple[Sampler, Collector, Deferred[IResponse], HeldStream]:
    """
    A started sampler, a feed open on it, and a chat whose stream Ollama
    holds open: the chat's reply, and Ollama's side of its stream.
    """
    sampler = started(chain)
    _, feed = open_feed(chain)
    reply = chain.request("POST", "/api/chat", data=chat("hold"))
    held = chain.fake.held[-1]
    chain.flush()
    return sampler, feed, reply, held


def test_feed_shows_a_running_stream_with_its_model_and_tokens_and_drops_it_when_it_ends() -> None:
    """
    A stream in flight shows in the feed with its key's name, its model, its
    backend, its tokens so far (pieces relayed) and its rate; once it ends,
    the next update lists no request.
    """
    chain = Chain()
    sampler, feed, reply, held = watching_a_held_chat(chain)
    for n in range(3):
        held.write_line({"model": "hold", "message": {"content": f"t{n}"}, "done": False})
    chain.flush()
    tick(chain)
    for n in range(3):
        held.write_line({"model": "hold", "message": {"content": f"u{n}"}, "done": False})
    chain.flush()
    tick(chain)
    [row] = messages(feed)[-1]["requests"]
    assert row["key"] == "alice"
    assert row["model"] == "hold:latest"
    assert row["backend"] == "http://127.0.0.1:11434"
    assert row["state"] == "running"
    assert row["tokens"] == 6
    assert row["tokens_per_second"] == 3 / TICK
    assert row["started"] == 0.0
    held.write_line({"model": "hold", "message": {"content": ""}, "done": True})
    held.finish()
    chain.flush()
    chain.body(chain.result(reply))
    tick(chain)
    assert messages(feed)[-1]["requests"] == []
    sampler.stopService()


def test_feed_rows_name_the_route_and_the_client_address() -> None:
    """
    A request in flight shows with the route it took and the address of
    the client that sent it, so that an operator can tell who runs what.
    """
    chain = Chain()
    sampler, feed, _, held = watching_a_held_chat(chain)
    tick(chain)
    [row] = messages(feed)[-1]["requests"]
    assert (row["route"], row["client"]) == ("/api/chat", "127.0.0.1")
    held.finish()
    chain.flush()
    sampler.stopService()


def test_feed_rows_name_the_user_behind_a_key() -> None:
    """
    A request in flight of a key that names its users shows the user it
    is for (C{""} for the key's anonymous user); one of a key that names
    none shows none (L{None}), whatever headers it sent.
    """
    chain = Chain()
    chain.keys.replace([*chain.keys,
                        ApiKey("webui", digest(WEBUI), user_header="X-OpenWebUI-User-Id")])
    sampler = started(chain)
    _, feed = open_feed(chain)
    for key, headers in ((WEBUI, {"X-OpenWebUI-User-Id": "3f2b6c1e-8a4d"}), (WEBUI, {}),
                         (KEY, {"X-OpenWebUI-User-Id": "mallory"})):
        chain.request("POST", "/api/chat", key=key, data=chat("hold"), headers=headers)
        chain.clock.advance(1)
    chain.flush()
    tick(chain)
    rows = messages(feed)[-1]["requests"]
    assert [(row["key"], row["user"]) for row in rows] == [
        ("webui", "3f2b6c1e-8a4d"), ("webui", ""), ("alice", None)]
    for held in chain.fake.held:
        held.finish()
    chain.flush()
    sampler.stopService()


WEBUI = "olpk_webuikeywebuikeywebuikeywebuikey00"


def test_feed_sends_nothing_while_nothing_changes_and_pings_now_and_then() -> None:
    """
    Coalescing: with nothing moving, ticks send nothing; a ping comes every
    L{HEARTBEAT} seconds, so that a console can tell a quiet proxy from a
    lost connection.  Updates never come more often than once a tick.
    """
    chain = Chain()
    sampler = started(chain)
    _, feed = open_feed(chain)
    assert [m["type"] for m in messages(feed)] == ["update"]
    for _ in range(int(HEARTBEAT / TICK) - 1):
        tick(chain)
    assert len(messages(feed)) == 1
    tick(chain)
    assert [m["type"] for m in messages(feed)] == ["update", "ping"]
    sampler.stopService()


def test_feed_coalesces_many_chunks_into_one_update_a_tick() -> None:
    """
    However many chunks a stream relays between two ticks, the feed sends
    one update for them, at the tick.
    """
    chain = Chain()
    sampler, feed, _, held = watching_a_held_chat(chain)
    tick(chain)
    before = len(messages(feed))
    for n in range(100):
        held.write_line({"model": "hold", "message": {"content": f"t{n}"}, "done": False})
        chain.flush()
    assert len(messages(feed)) == before
    tick(chain)
    assert len(messages(feed)) == before + 1
    assert messages(feed)[-1]["requests"][0]["tokens"] == 100
    held.finish()
    chain.flush()
    sampler.stopService()


def test_feed_stops_and_is_forgotten_when_its_client_goes_away() -> None:
    """
    When the page goes away (its connection closes), the proxy forgets the
    subscriber: nothing more is written for it, and no timer of its is left.
    """
    chain = Chain()
    sampler = started(chain)
    _, feed = open_feed(chain)
    assert sampler.subscribers == 1
    feed.disconnect()
    feed.done.addErrback(lambda _: None)
    chain.flush()
    assert sampler.subscribers == 0
    sampler.stopService()
    assert chain.clock.getDelayedCalls() == []


def test_feed_ends_when_the_proxy_stops() -> None:
    """
    Stopping the proxy ends every open feed cleanly (the response
    finishes), and stops the sampling timer.
    """
    chain = Chain()
    sampler = started(chain)
    _, feed = open_feed(chain)
    sampler.stopService()
    chain.flush()
    chain.result(feed.done)
    assert sampler.subscribers == 0
    assert chain.clock.getDelayedCalls() == []


def test_a_paused_feed_is_skipped_and_catches_up_when_it_reads_again() -> None:
    """
    A console that stops reading (its connection paused by backpressure)
    gets nothing queued for it; when it reads again it gets the state as it
    is then, in one message.
    """
    chain = Chain()
    sampler = started(chain)
    writes: list[bytes] = []
    subscriber = sampler.subscribe(writes.append)
    subscriber.pauseProducing()
    chain.request("POST", "/api/chat", data=chat("hold"))
    chain.flush()
    for _ in range(10):
        tick(chain)
    assert len(writes) == 1
    subscriber.resumeProducing()
    tick(chain)
    assert len(writes) == 2
    assert len(json.loads(writes[-1])["requests"]) == 1
    sampler.unsubscribe(subscriber)
    chain.fake.held[-1].finish()
    chain.flush()
    sampler.stopService()


def test_history_is_bounded_and_sent_whole_to_a_new_feed() -> None:
    """
    The totals' history keeps the last ten minutes only, however long the
    proxy runs: memory stays steady for a console open a day.  A new feed
    gets it all in its first message.
    """
    chain = Chain()
    sampler = started(chain)
    for _ in range(3 * int(600 / TICK)):
        tick(chain)
    writes: list[bytes] = []
    subscriber = sampler.subscribe(writes.append)
    first = json.loads(writes[0])
    assert first["reset"] is True
    assert len(first["points"]) == int(600 / TICK)
    assert len(sampler.snapshot()["history"]) == int(600 / TICK)
    sampler.unsubscribe(subscriber)
    sampler.stopService()


def test_totals_count_running_and_queued_requests() -> None:
    """
    A request waiting in the fair queue shows as queued, in the Now view's
    rows, its key's waiting count, and the totals.
    """
    chain = Chain(parallel=1)
    sampler = started(chain)
    chain.request("POST", "/api/chat", data=chat("hold"))
    waiting = chain.request("POST", "/api/chat", data=chat("hold"))
    tick(chain)
    snapshot = sampler.snapshot()
    assert [row["state"] for row in snapshot["requests"]] == ["running", "queued"]
    assert snapshot["waiting"] == {"alice": 1}
    assert snapshot["history"][-1][1:3] == [1, 1]
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    chain.fake.held[-1].finish()
    chain.flush()
    sampler.stopService()


def test_the_feed_needs_an_admin_key() -> None:
    """
    The feed without a key is 401, with an inference key 403, with a wrong
    key 401, each in C{{"error": ...}} shape; no subscriber is made.
    """
    chain = Chain()
    add_inference_key(chain)
    sampler = started(chain)
    for key, code in ((None, 401), (INFERENCE_KEY, 403), ("olpk_wrong" + "x" * 30, 401)):
        response = chain.respond("GET", "/-/console/api/feed", key=key)
        assert response.code == code
        assert "error" in json.loads(chain.body(response))
    assert sampler.subscribers == 0
    sampler.stopService()


#: A second admin key, C{carol}, whose feeds the tests open and then revoke.
CAROL_KEY = "olpk_consolecarolkeyconsolecarolkeycons"


def revoke(chain: Chain, change: str) -> None:
    """
    Take C{carol}'s key away as the keys file would: revoked (the key is
    gone), expired (the clock passes its expiry) or narrowed (an inference
    key now).
    """
    others = [key for key in chain.keys if key.name != "carol"]
    if change == "revoked":
        chain.keys.replace(others)
    elif change == "narrowed":
        chain.keys.replace([*others, ApiKey("carol", digest(CAROL_KEY))])
    else:
        chain.clock.advance(60)


@pytest.mark.parametrize("change", ["revoked", "expired", "narrowed"])
def test_a_feed_ends_within_five_seconds_of_its_key_being_taken_away(change: str) -> None:
    """
    An open feed is checked again at every tick: once its key is revoked,
    expires or loses the admin scope, the feed ends (its response finishes)
    within 5 seconds, and is forgotten; a feed of another key goes on.
    """
    chain = Chain()
    expires = datetime.fromtimestamp(chain.clock.seconds() + 30, UTC)
    chain.keys.replace([*(k for k in chain.keys if k.name != "carol"),
                        ApiKey("carol", digest(CAROL_KEY), scopes=frozenset({ADMIN}),
                               expires=expires)])
    sampler = started(chain)
    _, feed = open_feed(chain, CAROL_KEY)
    _, other = open_feed(chain)
    tick(chain)
    assert sampler.subscribers == 2
    revoke(chain, change)
    for _ in range(int(5 / TICK)):
        tick(chain)
    chain.result(feed.done)
    assert sampler.subscribers == 1
    assert chain.pending(other.done)
    sampler.stopService()
    chain.flush()
    chain.result(other.done)


def test_a_paused_feed_of_a_revoked_key_ends_too() -> None:
    """
    A feed whose client stopped reading is still checked: its key revoked,
    it ends and is forgotten rather than waiting to catch up.
    """
    chain = Chain()
    sampler = started(chain)
    writes: list[bytes] = []
    subscriber = sampler.subscribe(writes.append, lambda: chain.keys.find(KEY) is not None)
    subscriber.pauseProducing()
    tick(chain)
    chain.keys.replace([])
    tick(chain)
    assert sampler.subscribers == 0
    assert chain.result(subscriber.ended) is None
    sampler.stopService()
