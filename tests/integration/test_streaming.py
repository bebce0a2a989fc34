"""
Streaming as only real sockets show it: timing of lines through a real
C{twistd} proxy, and the proxy's memory during a long stream.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.web.server import Site

from tests.fakes.bulk import Bulk
from tests.fakes.client import (
    agent,
    body,
    read,
    request,
    sleep,
    wait_for,
    write_line_by_line,
)
from tests.fakes.twistd import TEST_KEY, TwistdLauncher, Upstream, held_stream, proxy_args

BULK_BYTES = 100 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_each_line_reaches_the_client_before_the_next_is_written(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    The first line of a slow stream reaches the client while Ollama has not
    yet written the rest: nothing on the way buffers a stream.
    """
    proxy = await twistd.start(proxy_args(upstream.url))
    held, client = await held_stream(reactor, upstream, proxy)
    await write_line_by_line(reactor, held, client, 3)
    assert [json.loads(line)["n"] for line in client.body.splitlines()] == [0, 1, 2, 3]


@pytest_twisted.ensureDeferred
async def test_a_line_split_across_writes_arrives_whole(
    reactor: Any, upstream: Upstream, twistd: TwistdLauncher
) -> None:
    """
    Half a line from Ollama is held back until its end arrives, and then the
    whole line goes out.
    """
    proxy = await twistd.start(proxy_args(upstream.url))
    held, client = await held_stream(reactor, upstream, proxy)
    held.write_raw(b'{"n":0}\n{"n":')
    await wait_for(reactor, lambda: client.size > 0, "the first line")
    await sleep(reactor, 0.3)
    assert client.body == b'{"n":0}\n'
    held.write_raw(b'1,"done":true}\n')
    await wait_for(reactor, lambda: client.size > 8, "the second line")
    assert [chunk for _, chunk in client.chunks] == [b'{"n":0}\n', b'{"n":1,"done":true}\n']
    held.finish()
    await client.done


@pytest_twisted.ensureDeferred
async def test_long_stream_does_not_grow_memory(reactor: Any, twistd: TwistdLauncher) -> None:
    """
    100 MB streamed through the proxy: its resident memory grows by less than
    20 MB, sampled all along the stream.
    """
    site = Site(Bulk(BULK_BYTES))
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        proxy = await twistd.start(
            proxy_args(f"http://127.0.0.1:{port.getHost().port}")
        )
        client = agent(reactor)
        warm = await read(await request(client, b"POST", proxy.url + "/api/chat",
                                         {"X-API-Key": TEST_KEY}, body(b"{}")), keep=False)
        # The first stream settles the allocator; measure the second.
        await warm.done
        before = proxy.rss_kb()
        peak = before
        response = await request(client, b"POST", proxy.url + "/api/chat",
                                 {"X-API-Key": TEST_KEY}, body(b"{}"))
        stream = await read(response, keep=False)
        while not stream.done.called:
            peak = max(peak, proxy.rss_kb())
            await sleep(reactor, 0.02)
        await stream.done
        assert stream.size >= BULK_BYTES
        assert peak - before < 20 * 1024, f"grew from {before} kB to {peak} kB"
    finally:
        await port.stopListening()
