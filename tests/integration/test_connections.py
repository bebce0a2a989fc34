"""
What only real sockets show about connections: idle sockets by the hundred
under a small descriptor limit, C{Expect: 100-continue}, and a trickled body.
"""

from __future__ import annotations

import errno
import hashlib
import json
import select
import socket
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from tests.fakes.client import agent, read, request, wait_for
from tests.fakes.twistd import TEST_KEY, TwistdLauncher, Upstream, proxy_args

OPEN_FILES = 256
IDLE_SOCKETS = 400


@pytest_twisted.ensureDeferred
async def test_idle_sockets_do_not_lock_out_a_real_request(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    Under a limit of 256 open files, a client holding 400 idle connections
    does not stop another client's request: the proxy closes idle
    connections, the longest idle first, rather than running out of
    descriptors.  It says what limit it runs with.
    """
    # A queue long enough for every idle socket to reach the proxy.
    args = [
        "tcp:0:interface=127.0.0.1:backlog=1024" if arg.startswith("tcp:0:") else arg
        for arg in proxy_args(upstream.url)
    ]
    proxy = await twistd.start(args, open_files=OPEN_FILES)
    assert f"Open files limit: {OPEN_FILES}" in proxy.output
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_SOCKETS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            idle.append(sock)
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", proxy.port)) in (0, errno.EINPROGRESS)
        # Until every one is connected (or refused): past its accept queue,
        # the kernel has them try again.
        await wait_for(reactor, lambda: _all_settled(idle), "the idle sockets to connect")
        response = await Deferred.fromCoroutine(
            request(agent(reactor), b"GET", proxy.url + "/api/version", {"X-API-Key": TEST_KEY})
        ).addTimeout(15, reactor)
        assert response.code == 200
        await (await read(response)).done
    finally:
        for sock in idle:
            sock.close()
    await wait_for(reactor, lambda: "idle connection(s) closed" in proxy.output,
                   "the proxy to log the connections it closed")


def _all_settled(sockets: list[socket.socket]) -> bool:
    """
    Whether every socket's connection attempt is over: it is writable, or
    failed.
    """
    poll = select.poll()
    for sock in sockets:
        poll.register(sock, select.POLLOUT)
    return len(poll.poll(0)) == len(sockets)


class _Raw(Protocol):
    """
    Sends bytes as told and keeps every byte it receives.
    """

    def __init__(self) -> None:
        self.received = b""
        self.ready: Deferred[None] = Deferred()
        self.closed = False

    def connectionMade(self) -> None:
        self.ready.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True


async def _connect(reactor: Any, port: int) -> _Raw:
    raw = _Raw()
    reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(lambda: raw))
    await raw.ready.addTimeout(10, reactor)
    return raw


def _head(path: str, key: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {key}\r\n"
        f"Expect: 100-continue\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_only_after_the_key(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A client waiting for C{100 Continue} with a wrong key gets its 401 and
    never the go-ahead; with the right key it gets the go-ahead, sends the
    body, and gets the answer.
    """
    proxy = await twistd.start(proxy_args(upstream.url))
    refused = await _connect(reactor, proxy.port)
    refused.transport.write(_head("/api/chat", "olpk_wrong", 100))  # type: ignore[union-attr]
    await wait_for(reactor, lambda: refused.closed, "the refused request to be closed")
    assert refused.received.startswith(b"HTTP/1.1 401 ")
    assert b"100 Continue" not in refused.received

    chat = json.dumps({"model": "llama3.2", "stream": False,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    accepted = await _connect(reactor, proxy.port)
    accepted.transport.write(_head("/api/chat", TEST_KEY, len(chat)))  # type: ignore[union-attr]
    await wait_for(reactor, lambda: b"\r\n\r\n" in accepted.received, "the go-ahead")
    assert accepted.received == b"HTTP/1.1 100 Continue\r\n\r\n"
    accepted.transport.write(chat)  # type: ignore[union-attr]
    await wait_for(reactor, lambda: b"HTTP/1.1 200 OK" in accepted.received, "the answer")
    accepted.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_trickled_body_is_dropped(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    A body sent a byte at a time, each well within the client timeout, is
    dropped with 408 once a client timeout has brought less than the
    minimum rate.
    """
    proxy = await twistd.start(proxy_args(upstream.url, "--client-timeout", "1",
                                          "--min-body-rate", "1K"))
    path = "/api/blobs/sha256:" + hashlib.sha256(b"x" * 100_000).hexdigest()
    raw = await _connect(reactor, proxy.port)
    raw.transport.write(_head(path, TEST_KEY, 100_000))  # type: ignore[union-attr]
    trickle = LoopingCall(lambda: raw.transport.write(b"x"))  # type: ignore[union-attr]
    trickle.clock = reactor
    trickle.start(0.1)
    try:
        await wait_for(reactor, lambda: raw.closed, "the trickling client to be dropped")
    finally:
        trickle.stop()
    assert b"HTTP/1.1 408 " in raw.received
