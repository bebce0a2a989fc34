# -*- test-case-name: tests.backends.test_router,tests.backends.test_collate -*-
"""
Backends that nothing is sent to, for tests of the router's choices.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.iweb import IAgent

from ollamaproxy.backends.pool import Backend
from ollamaproxy.backends.router import Lease
from ollamaproxy.backends.upstream import Upstream
from ollamaproxy.model_names import resolve

LLAMA, MISTRAL, QWEN = resolve("llama3.2"), resolve("mistral"), resolve("qwen3")


def backend(clock: Clock, name: str, models: tuple[str, ...] = (), loaded: tuple[str, ...] = (),
            parallel: int = 2) -> Backend:
    """
    A backend at C{http://NAME} that has C{models}; nothing is sent to it.
    """
    upstream = Upstream(cast(IAgent, None), f"http://{name}".encode(), clock, 600, 600)
    return Backend(upstream, parallel, models=frozenset(map(resolve, models)),
                   loaded=frozenset(map(resolve, loaded)))


def now(d: Deferred[Lease]) -> Lease:
    """
    The lease C{d} has fired with; the test fails if it has not.
    """
    results: list[Lease] = []
    d.addCallback(results.append)
    assert results, "no backend yet"
    return results[0]
