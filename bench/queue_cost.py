#!/usr/bin/env python3
"""
The fair queue's own cost per request: the router's work to give a request
a slot and take it back, with a slot free (no wait), and through the queue
(every slot busy, many keys waiting, each request served in its turn), in
microseconds of the reactor thread per request.

    python3 bench/queue_cost.py

Nothing here touches the network, and the reactor does not run: the router
and queue are driven by hand, with the reactor's own timers for the queue's
timeouts (as in the daemon: a heap, where a test Clock's sorted list would
make the figures its own).  Each figure is the best of a few runs on this
machine; compare them within one run, not across machines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent

from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.router import Lease, Router
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.model_names import resolve

MODEL = resolve("llama3.2")
REQUESTS = 10_000


def router(backends: int, parallel: int) -> Router:
    clock = cast(IReactorTime, reactor)
    pool = BackendPool([
        Backend(Upstream(cast(IAgent, None), f"http://gpu{n}".encode(), clock, 600, 600),
                parallel, models=frozenset({MODEL}))
        for n in range(backends)
    ])
    return Router(pool, clock, max_queue=REQUESTS, queue_timeout=3600)


def free_slots(backends: int) -> float:
    """
    Seconds for REQUESTS requests that each find a slot free at once.
    """
    r = router(backends, parallel=REQUESTS)
    started = time.perf_counter()
    for n in range(REQUESTS):
        leases: list[Lease] = []
        r.acquire(f"key{n % 50}", MODEL, runs=True).addCallback(leases.append)
        leases[0].release()
    return time.perf_counter() - started


def through_the_queue(backends: int, keys: int) -> float:
    """
    Seconds for REQUESTS requests that all wait (one slot per backend),
    from C{keys} keys, each served when the one before it releases.
    """
    r = router(backends, parallel=1)
    held = [r.acquire("first", MODEL, runs=True) for _ in range(backends)]
    leases: list[Lease] = []
    for d in held:
        d.addCallback(leases.append)
    waiting: list[Deferred[Lease]] = []
    started = time.perf_counter()
    for n in range(REQUESTS):
        d = r.acquire(f"key{n % keys}", MODEL, runs=True)
        d.addCallback(leases.append)
        waiting.append(d)
    while leases:
        leases.pop(0).release()
    elapsed = time.perf_counter() - started
    assert all(d.called for d in waiting)
    return elapsed


def best(run: Callable[..., float], *args: int, runs: int = 3) -> float:
    return min(run(*args) for _ in range(runs)) / REQUESTS * 1e6


def main() -> None:
    print(f"{REQUESTS} requests; microseconds of router work per request (best of 3)")
    print("| case | µs per request |")
    print("|---|---|")
    for backends in (1, 2):
        free = best(free_slots, backends)
        print(f"| {backends} backend(s), slot free | {free:.1f} |")
        for keys in (1, 10, 100):
            queued = best(through_the_queue, backends, keys)
            print(f"| {backends} backend(s), queued, {keys} keys waiting | {queued:.1f} "
                  f"({queued / free:.1f} times a free slot) |")


if __name__ == "__main__":
    main()
