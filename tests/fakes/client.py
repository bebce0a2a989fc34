# -*- test-case-name: tests.integration.test_twistd -*-
"""
A real HTTP client for the integration tests, reading bodies as they arrive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse

from tests.fakes.ollama import HOLD, HeldStream

WAIT_LIMIT = 20.0
HELD_CHAT = json.dumps({"model": HOLD, "messages": [{"role": "user", "content": "hi"}]}).encode()
"""A chat whose answer the test writes by hand (L{HeldStream})."""
CHAT = json.dumps(
    {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
     "options": {"num_predict": 5, "fake_delay": 0.02}}
)


class Arrivals(Protocol):
    """
    A body, chunk by chunk, with the time each chunk arrived.

    @ivar keep: Whether to keep the chunks, or only count their bytes.
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.chunks: list[tuple[float, bytes]] = []
        self.size = 0
        self.done: Deferred[None] = Deferred()

    @property
    def body(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.keep:
            self.chunks.append((time.monotonic(), data))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def agent(reactor: Any, tls: IPolicyForHTTPS | None = None) -> Agent:
    """
    An agent that keeps no connection after its response.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    if tls is None:
        return Agent(reactor, pool=pool)
    return Agent(reactor, contextFactory=tls, pool=pool)


async def request(
    agent: Agent,
    method: bytes,
    url: str,
    headers: Mapping[str, str] | None = None,
    body: IBodyProducer | None = None,
) -> IResponse:
    response: IResponse = await agent.request(
        method,
        url.encode("ascii"),
        Headers({k: [v] for k, v in (headers or {}).items()}),
        body,
    )
    return response


def body(data: bytes) -> IBodyProducer:
    """
    A request body.
    """
    return FileBodyProducer(BytesIO(data))


async def read(response: IResponse, keep: bool = True) -> Arrivals:
    """
    Start reading a response's body.
    """
    arrivals = Arrivals(keep=keep)
    response.deliverBody(arrivals)
    return arrivals


async def wait_for(
    reactor: Any, condition: Callable[[], bool], what: str = "a condition",
    seconds: float = WAIT_LIMIT,
) -> None:
    """
    Wait until C{condition()} holds, polling, for at most C{seconds}
    (L{WAIT_LIMIT} unless told).
    """
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(reactor, 0.01)


async def wait_for_call(
    reactor: Any, check: Callable[[], Awaitable[bool]], what: str = "a condition",
    seconds: float = WAIT_LIMIT,
) -> None:
    """
    L{wait_for} for a condition only a call can tell (to Redis, to the
    proxy): until C{await check()} holds, asking every 20 ms, for at most
    C{seconds}.
    """
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(reactor, 0.02)


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    """
    A L{Deferred} that fires after C{seconds} of real time.
    """
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def chat_lines(reactor: Any, url: str, key: str, tls: Any = None) -> list[Any]:
    """
    A streamed chat through the proxy, as parsed NDJSON lines.
    """
    response = await request(
        agent(reactor, tls), b"POST", url + "/api/chat",
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        body(CHAT.encode()),
    )
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/x-ndjson"]
    arrivals = await read(response)
    await arrivals.done
    return [json.loads(line) for line in arrivals.body.splitlines()]


def has_lines(client: Arrivals, count: int) -> bool:
    """
    Whether C{client} has C{count} whole lines, no more.
    """
    return client.body.count(b"\n") == count


async def write_line_by_line(
    reactor: Any, held: HeldStream, client: Arrivals, count: int, written: int = 0
) -> None:
    """
    Write C{{"n": i, "done": false}} for each C{i} below C{count} (but the
    first C{written}, already written), each only once C{client} has every
    line before it, and then C{{"n": count, "done": true}}, and wait until
    the answer ends: whatever buffers a stream on the way fails the wait.
    """
    for i in range(count):
        if i >= written:
            held.write_line({"n": i, "done": False})
        await wait_for(reactor, partial(has_lines, client, i + 1), f"line {i}")
    held.write_line({"n": count, "done": True})
    held.finish()
    await client.done
