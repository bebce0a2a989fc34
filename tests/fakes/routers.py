# -*- test-case-name: tests.backends.test_collate,tests.backends.test_effective -*-
"""
Backends that nothing is sent to, for tests of the router's choices.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

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


class _Head:
    """
    A response head of the given content type: all a lease reads of it.
    """

    def __init__(self, content_type: bytes) -> None:
        self.headers = Headers({b"content-type": [content_type]})


def first_byte(lease: Lease, content_type: bytes = b"application/x-ndjson") -> Lease:
    """
    Tell C{lease} its answer has begun, streamed unless C{content_type} says
    otherwise.
    """
    lease.answering(cast(IResponse, _Head(content_type)))
    return lease
