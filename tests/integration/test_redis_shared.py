"""
Two real C{twistd} proxies on two ports sharing one real Redis (started
by the test, with a password): a key's rpm, max_streams and token quota,
and the wrong-key throttle, hold across them; a proxy killed with
C{SIGKILL} mid-stream holds its stream only until its lease expires; Redis
stopped and restarted mid-run leaves every request answered, and both the
outage and the recovery are logged.  With C{--parallel 1}, the backend's
one slot is shared by both, in one fair order, and a killed proxy's slot
is freed within its lease.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from ollamaproxy.admission.keys import digest
from ollamaproxy.redis.limits import PREFIX
from tests.fakes.client import agent, body, read, request, sleep, wait_for, wait_for_call
from tests.fakes.engines import RedisServer
from tests.fakes.twistd import TEST_KEY, Twistd, TwistdLauncher, Upstream, proxy_args

PASSWORD = "redis-test-password-1234"
# Named keys of the test, by name: each with one limit.
KEYS: dict[str, tuple[str, dict[str, Any]]] = {
    "rate": ("olpk_ratekeyratekeyratekeyratekeyratekey0", {"rpm": 4}),
    "streams": ("olpk_streamskeystreamskeystreamskeystrea", {"max_streams": 1}),
    "quota": ("olpk_quotakeyquotakeyquotakeyquotakeyquo", {"tokens_per_day": 5}),
    "flood": ("olpk_floodkeyfloodkeyfloodkeyfloodkeyflo", {}),
    "solo": ("olpk_solokeysolokeysolokeysolokeysolokeys", {}),
    "team": ("olpk_teamkeyteamkeyteamkeyteamkeyteamkeyt", {"user_header": "X-User"}),
}


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A Redis that asks for a password, stopped when the test ends.
    """
    folder = tmp_path / "redis"
    folder.mkdir()
    with RedisServer(folder, password=PASSWORD) as server:
        yield server


@pytest_twisted.async_yield_fixture
async def pair(
    twistd: TwistdLauncher, upstream: Upstream, redis: RedisServer
) -> AsyncIterator[list[Twistd]]:
    """
    Two proxies using the same Redis (its URL, with the password, in
    OLLAMAPROXY_REDIS) and the same keys file, with leases of 3 s.
    """
    proxies = await _start_two(twistd, upstream, redis)
    yield proxies
    for proxy in proxies:
        assert PASSWORD not in proxy.output


async def _start_two(
    twistd: TwistdLauncher, upstream: Upstream, redis: RedisServer, *options: str
) -> list[Twistd]:
    """
    Start two proxies with C{options}, on C{redis} (its URL in
    OLLAMAPROXY_REDIS), the keys of L{KEYS} in one keys file and leases of
    3 s, and wait until each has reached Redis.
    """
    (twistd.directory / "keys.json").write_text(json.dumps({"keys": [
        {"name": name, "hash": "sha256:" + digest(key).hex(), **limits}
        for name, (key, limits) in KEYS.items()
    ]}))
    proxies = [
        await twistd.start(
            proxy_args(upstream.url, *options, "--redis-lease", "3",
                       "--usage-file", f"usage{i}.db"),
            env={"OLLAMAPROXY_REDIS": redis.url},
        )
        for i in range(2)
    ]
    for proxy in proxies:
        await wait_for(twistd.reactor, _logged(proxy, "Limits are shared through Redis"),
                       "the proxy to reach Redis")
    return proxies


def _logged(proxy: Twistd, text: str) -> Callable[[], bool]:
    return lambda: text in proxy.output


async def call(
    reactor: Any, proxy: Twistd, key: str, model: str | None = None
) -> tuple[int, bytes]:
    """
    C{GET /api/tags}, or a chat with C{model}, with C{key}: the status and
    the body.
    """
    headers = {"Authorization": f"Bearer {key}"}
    if model is None:
        response = await request(agent(reactor), b"GET", proxy.url + "/api/tags", headers)
    else:
        data = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        response = await request(agent(reactor), b"POST", proxy.url + "/api/chat",
                                 {**headers, "Content-Type": "application/json"},
                                 body(data.encode()))
    arrivals = await read(response)
    await arrivals.done
    code: int = response.code
    return code, arrivals.body


@pytest_twisted.ensureDeferred
async def test_limits_hold_across_proxies(
    reactor: Any, pair: list[Twistd], upstream: Upstream
) -> None:
    """
    rpm 4 lets 4 requests through two proxies, not 8; max_streams 1 refuses
    a second stream on the other proxy, and takes it once the first ended;
    a quota crossed through one proxy refuses on the other; ten wrong keys
    through both make the next one 429.
    """
    a, b = pair
    rate = KEYS["rate"][0]
    codes = [(await call(reactor, (a, b)[i % 2], rate))[0] for i in range(6)]
    assert codes == [200, 200, 200, 200, 429, 429]

    streams = KEYS["streams"][0]
    first = Deferred.fromCoroutine(call(reactor, a, streams, "hold"))
    await wait_for(reactor, lambda: len(upstream.fake.held) == 1, "the held stream")
    code, answer = await call(reactor, b, streams)
    assert code == 429
    assert json.loads(answer) == {"error": "key 'streams' already has 1 requests in flight"}
    _end(upstream.fake.held[0])
    assert (await first)[0] == 200

    # The release reaches Redis just after the response: bounded retries.
    async def given_back() -> bool:
        return (await call(reactor, b, streams))[0] == 200

    await wait_for_call(reactor, given_back, "the stream to be given back")

    quota = KEYS["quota"][0]
    assert (await call(reactor, a, quota, "llama3.2"))[0] == 200
    answers = []

    async def refused() -> bool:
        answers.append(await call(reactor, b, quota))
        return answers[-1][0] == 429

    await wait_for_call(reactor, refused, "the other proxy to refuse the quota", seconds=2.5)
    assert "has used its 5 tokens for today (UTC)" in json.loads(answers[-1][1])["error"]

    wrong = "olpk_wrongkeywrongkeywrongkeywrongkeywron"
    codes = [(await call(reactor, (a, b)[i % 2], wrong))[0] for i in range(11)]
    assert codes == [401] * 10 + [429]
    # The right key from that address still works.
    assert (await call(reactor, a, TEST_KEY))[0] == 200


@pytest_twisted.ensureDeferred
async def test_lease_of_killed_proxy_expires(
    reactor: Any, pair: list[Twistd], upstream: Upstream
) -> None:
    """
    A proxy killed with SIGKILL mid-stream never releases its stream: the
    other proxy refuses the key until the lease (3 s here) expires, then
    serves it.
    """
    a, b = pair
    streams = KEYS["streams"][0]
    held = Deferred.fromCoroutine(call(reactor, a, streams, "hold"))
    held.addErrback(lambda _: None)
    await wait_for(reactor, lambda: len(upstream.fake.held) == 1, "the held stream")
    os.kill(a.pid, signal.SIGKILL)
    await a.protocol.ended
    assert (await call(reactor, b, streams))[0] == 429
    waited = 0
    while (await call(reactor, b, streams))[0] == 429:
        waited += 1
        assert waited < 100, "the lease never expired"
        await sleep(reactor, 0.1)
    assert waited >= 10  # it did hold for a while: about 3 s


@pytest_twisted.ensureDeferred
async def test_redis_stopped_and_restarted(
    reactor: Any, pair: list[Twistd], redis: RedisServer
) -> None:
    """
    Redis stopped mid-run: each proxy answers every request within a few
    seconds, keeping the limits itself (the default policy, local: rpm 4 per
    proxy), logs the outage once; once Redis is back, it logs so and the
    limits are shared again.
    """
    a, b = pair
    rate = KEYS["rate"][0]
    redis.stop()
    started = reactor.seconds()
    codes = [(await call(reactor, a, rate))[0] for _ in range(5)]
    assert codes == [200, 200, 200, 200, 429]
    assert reactor.seconds() - started < 10
    await wait_for(reactor, lambda: "cannot be reached" in a.output, "the outage logged")
    redis.start()
    for proxy in pair:
        await wait_for(reactor, _logged(proxy, "answers again"), "the recovery logged")
    codes = [(await call(reactor, (a, b)[i % 2], rate))[0] for i in range(5)]
    assert codes == [200, 200, 200, 200, 429]
    for proxy in pair:
        assert proxy.output.count("cannot be reached") == 1
        assert "Traceback" not in proxy.output and "Unhandled" not in proxy.output


@pytest_twisted.ensureDeferred
async def test_closed_policy(
    reactor: Any, twistd: TwistdLauncher, upstream: Upstream, redis: RedisServer
) -> None:
    """
    Under --redis-failure closed, with Redis stopped: a key with limits gets
    503 with Retry-After within seconds, a key without limits is served,
    and /-/ready answers 503 naming redis, until Redis is back.
    """
    (twistd.directory / "keys.json").write_text(json.dumps({"keys": [
        {"name": "rate", "hash": "sha256:" + digest(KEYS["rate"][0]).hex(), "rpm": 4}
    ]}))
    proxy = await twistd.start(
        proxy_args(upstream.url, "--redis-failure", "closed"),
        env={"OLLAMAPROXY_REDIS": redis.url},
    )
    await wait_for(reactor, _logged(proxy, "Limits are shared through Redis"), "Redis reached")

    async def ready() -> int:
        response = await request(agent(reactor), b"GET", proxy.url + "/-/ready")
        await (await read(response)).done
        code: int = response.code
        return code

    # Ready once the token quotas are read from the usage file, too.
    async def is_ready() -> bool:
        return await ready() == 200

    await wait_for_call(reactor, is_ready, "the proxy to be ready")
    assert await ready() == 200
    redis.stop()
    started = reactor.seconds()
    code, answer = await call(reactor, proxy, KEYS["rate"][0])
    assert reactor.seconds() - started < 5
    assert code == 503
    assert "Redis" in json.loads(answer)["error"]
    assert (await call(reactor, proxy, TEST_KEY))[0] == 200
    assert await ready() == 503
    redis.start()
    await wait_for(reactor, _logged(proxy, "answers again"), "the recovery logged")
    assert await ready() == 200
    assert (await call(reactor, proxy, KEYS["rate"][0]))[0] == 200


@pytest_twisted.async_yield_fixture
async def one_slot(
    twistd: TwistdLauncher, upstream: Upstream, redis: RedisServer
) -> AsyncIterator[list[Twistd]]:
    """
    Two proxies on one Redis in front of one Ollama that runs one request
    at a time (C{--parallel 1}), with leases of 3 s.
    """
    yield await _start_two(twistd, upstream, redis, "--parallel", "1")


def _waiting_in_redis(redis: RedisServer, count: int) -> bool:
    """
    Whether C{count} requests wait in the shared queue (its waiters' set).
    """
    return redis.command("ZCARD", f"{PREFIX}q:waiters") == f":{count}\r\n".encode()


def _held_chat(
    reactor: Any, proxy: Twistd, key: str, tag: str, user: str | None = None
) -> Deferred[tuple[int, bytes]]:
    """
    A streamed chat with the fake's C{hold} model, its message C{tag}, for
    C{user} (in the header C{X-User}) if given.
    """
    data = json.dumps({"model": "hold", "messages": [{"role": "user", "content": tag}]})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if user is not None:
        headers["X-User"] = user

    async def chat() -> tuple[int, bytes]:
        response = await request(agent(reactor), b"POST", proxy.url + "/api/chat", headers,
                                 body(data.encode()))
        arrivals = await read(response)
        await arrivals.done
        code: int = response.code
        return code, arrivals.body

    return Deferred.fromCoroutine(chat())


def _running(upstream: Upstream) -> list[Any]:
    """
    The held streams Ollama is running now.
    """
    return [h for h in upstream.fake.held if not h.gone]


def _tag(held: Any) -> str:
    """
    The message of the request a held stream answers.
    """
    content: str = json.loads(held.request.content.getvalue())["messages"][0]["content"]
    return content


def _end(held: Any) -> None:
    """
    End a held stream with its last line, done.
    """
    held.write_line({"model": "hold", "done": True})
    held.finish()


async def _finish_in_turn(
    reactor: Any, upstream: Upstream, turns: int, settle: float | None = None
) -> list[str]:
    """
    End the held streams one at a time, each once it has started, and
    return their tags in the order they ran.  With C{settle}, check before
    each turn that no request runs beside the one of the turn, and wait
    C{settle} seconds after each start, for one that would.
    """
    order = []
    for turn in range(turns):
        if settle is not None:
            assert len(upstream.fake.held) == turn + 1, "a request ran beside another"
        held = upstream.fake.held[turn]
        order.append(_tag(held))
        _end(held)
        if turn < turns - 1:
            await wait_for(reactor, lambda t=turn: len(upstream.fake.held) > t + 1,  # type: ignore[misc]
                           "the next request to run")
            if settle is not None:
                await sleep(reactor, settle)
    return order


@pytest_twisted.ensureDeferred
async def test_one_slot_one_order_for_both_proxies(
    reactor: Any, one_slot: list[Twistd], upstream: Upstream, redis: RedisServer
) -> None:
    """
    A key flooding proxy A with four requests and another key's single
    request on proxy B just after: Ollama never runs more than one at a
    time (sampled every 5 ms throughout), and B's request runs next, one
    turn after the flood's first, not after the whole flood.
    """
    a, b = one_slot
    most = [0]

    def sample() -> None:
        most[0] = max(most[0], len(_running(upstream)))

    sampling = LoopingCall(sample)
    sampling.clock = reactor
    sampling.start(0.005)
    flood, solo = KEYS["flood"][0], KEYS["solo"][0]
    answers = [_held_chat(reactor, a, flood, "flood-0")]
    await wait_for(reactor, lambda: len(upstream.fake.held) == 1, "the first stream")
    for i in range(1, 4):
        # One at a time: requests sent together may reach the proxy in any
        # order, and a key's own are served in the order they came.
        answers.append(_held_chat(reactor, a, flood, f"flood-{i}"))
        await wait_for(reactor, partial(_waiting_in_redis, redis, i), f"flood-{i} to wait")
    answers.append(_held_chat(reactor, b, solo, "solo"))
    await wait_for(reactor, partial(_waiting_in_redis, redis, 4), "the solo request to wait")
    order = await _finish_in_turn(reactor, upstream, 5, settle=0.1)
    sampling.stop()
    assert [(await answer)[0] for answer in answers] == [200] * 5
    assert order == ["flood-0", "solo", "flood-1", "flood-2", "flood-3"]
    assert most[0] == 1


@pytest_twisted.ensureDeferred
async def test_users_of_a_key_share_its_turns_across_proxies(
    reactor: Any, one_slot: list[Twistd], upstream: Upstream, redis: RedisServer
) -> None:
    """
    One user of a key with a user header floods proxy A with four
    requests; another user of the same key sends one to proxy B just
    after: B's user runs next, one turn after the flood's first.
    """
    a, b = one_slot
    team = KEYS["team"][0]
    answers = [_held_chat(reactor, a, team, "ann-0", "ann")]
    await wait_for(reactor, lambda: len(upstream.fake.held) == 1, "the first stream")
    answers += [_held_chat(reactor, a, team, f"ann-{i}", "ann") for i in range(1, 4)]
    await wait_for(reactor, partial(_waiting_in_redis, redis, 3), "the flood to wait in Redis")
    answers.append(_held_chat(reactor, b, team, "bob", "bob"))
    await wait_for(reactor, partial(_waiting_in_redis, redis, 4), "bob's request to wait")
    order = await _finish_in_turn(reactor, upstream, 5)
    assert [(await answer)[0] for answer in answers] == [200] * 5
    # Ann's three came together, on connections of their own: in any order.
    assert order[:2] == ["ann-0", "bob"]
    assert sorted(order[2:]) == ["ann-1", "ann-2", "ann-3"]


@pytest_twisted.ensureDeferred
async def test_killed_proxy_frees_its_slot(
    reactor: Any, one_slot: list[Twistd], upstream: Upstream
) -> None:
    """
    A proxy killed with SIGKILL while its request holds the one slot: the
    request waiting on the other proxy runs once the lease (3 s) has
    expired and a round has swept it, not before, and not much later.
    """
    a, b = one_slot
    held = _held_chat(reactor, a, TEST_KEY, "dies")
    held.addErrback(lambda _: None)
    await wait_for(reactor, lambda: len(upstream.fake.held) == 1, "the held stream")
    waiting = _held_chat(reactor, b, KEYS["solo"][0], "waits")
    await sleep(reactor, 0.3)
    assert len(upstream.fake.held) == 1
    os.kill(a.pid, signal.SIGKILL)
    await a.protocol.ended
    killed = reactor.seconds()
    await wait_for(reactor, lambda: len(upstream.fake.held) == 2, "the slot freed")
    assert 1.5 < reactor.seconds() - killed < 8  # the lease, a round, a loaded machine
    _end(upstream.fake.held[1])
    assert (await waiting)[0] == 200


@pytest_twisted.ensureDeferred
async def test_queue_through_a_redis_outage(
    reactor: Any, one_slot: list[Twistd], upstream: Upstream, redis: RedisServer
) -> None:
    """
    Redis stopped while proxy A runs a request on the slot Redis gave it:
    that request ends and gives its slot back in A (A's next request runs
    at once, on A's own queue), B serves on its own too; once Redis is
    back, the slot is shared again: A's request running, B's waits.
    """
    a, b = one_slot

    async def finish(index: int, answer: Deferred[tuple[int, bytes]]) -> None:
        await wait_for(reactor, lambda: len(upstream.fake.held) > index, "the stream")
        _end(upstream.fake.held[index])
        assert (await answer)[0] == 200

    first = _held_chat(reactor, a, TEST_KEY, "before")
    await wait_for(reactor, lambda: len(upstream.fake.held) == 1, "the first stream")
    redis.stop()
    await finish(0, first)
    for proxy in one_slot:
        await wait_for(reactor, _logged(proxy, "cannot be reached"), "the outage logged")
    await finish(1, _held_chat(reactor, a, TEST_KEY, "during-a"))
    await finish(2, _held_chat(reactor, b, TEST_KEY, "during-b"))
    redis.start()
    for proxy in one_slot:
        await wait_for(reactor, _logged(proxy, "the fair queue are shared again"),
                       "the recovery logged")
    running = _held_chat(reactor, a, TEST_KEY, "after-a")
    await wait_for(reactor, lambda: len(upstream.fake.held) == 4, "A's stream")
    waiting = _held_chat(reactor, b, KEYS["solo"][0], "after-b")
    await sleep(reactor, 0.3)
    assert len(upstream.fake.held) == 4
    await finish(3, running)
    await finish(4, waiting)
    for proxy in one_slot:
        assert proxy.output.count("cannot be reached") == 1
        assert "its own fair queue" in proxy.output
        assert "Traceback" not in proxy.output and "Unhandled" not in proxy.output
