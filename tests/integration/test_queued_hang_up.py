"""
A queued request whose client hangs up, on real sockets: the proxy stops
reading a body past 256 KiB that Ollama has not taken, and a client whose
socket is not read is a client whose hang-up is not seen.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred

from tests.fakes.client import HELD_CHAT, agent, body, read, request, sleep, wait_for
from tests.fakes.twistd import TEST_KEY, TwistdLauncher, Upstream, proxy_args

# More than the proxy holds before it pauses a client (256 KiB) and the
# kernel's buffers on both sides hold, less than it holds for a waiting
# request (16 MiB).
MOST_SENT = 12 * 1024 * 1024


async def send_until_held(reactor: Any, client: socket.socket) -> int:
    """
    Send a chat's body in one endless chunk until the socket takes no more
    for half a second (the proxy stopped reading), or C{MOST_SENT} bytes.

    @return: How many bytes were sent.
    """
    client.setblocking(False)
    piece = b"x" * 65536
    sent = 0
    blocked_since: float | None = None
    while sent < MOST_SENT:
        try:
            sent += client.send(piece)
            blocked_since = None
        except BlockingIOError:
            now = time.monotonic()
            blocked_since = blocked_since or now
            if now - blocked_since > 0.5:
                break
            await sleep(reactor, 0.02)
    return sent


@pytest_twisted.ensureDeferred
async def test_a_paused_client_that_hangs_up_while_queued_never_reaches_ollama(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    At --parallel 1, with a chat running, a second chat sent in chunks (a
    body the proxy does not read for its model) waits in the queue while
    its client sends megabytes and then closes its socket: the proxy sees
    the client leave while it waits (its access line says so), and the
    request never reaches Ollama, not even once the first has ended.
    """
    proxy = await twistd.start(proxy_args(upstream.url, "--parallel", "1"))
    first = Deferred.fromCoroutine(
        request(agent(reactor), b"POST", proxy.url + "/api/chat", {"X-API-Key": TEST_KEY},
                body(HELD_CHAT))
    )
    await wait_for(reactor, lambda: bool(upstream.fake.held), "the first chat to reach Ollama")
    client = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        client.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: "
            + TEST_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (64 * 1024 * 1024)
            + b'{"model": "hold", "messages": [{"role": "user", "content": "'
        )
        sent = await send_until_held(reactor, client)
    finally:
        client.close()
    assert sent > 1024 * 1024
    try:
        await wait_for(reactor, lambda: "POST /api/chat - client_disconnected" in proxy.output,
                       "the proxy to see the queued client leave")
    finally:
        upstream.fake.held[0].finish()
    arrivals = await read(await first)
    await arrivals.done
    await wait_for(reactor, lambda: "POST /api/chat 200 completed" in proxy.output,
                   "the first chat's access line")
    assert len(upstream.fake.received) == 1, proxy.output
