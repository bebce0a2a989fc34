# -*- test-case-name: tests.backends.test_router -*-
"""
Giving a request a backend: the one small question the app asks.

C{router.acquire(model, key)} fires with a L{Lease} on a backend once one
may run the request; C{lease.release()} gives the slot back when the request
has ended.  A request naming model M goes only to a healthy backend that has
M; among those, to one that has M in memory (no load time), then to the one
with the fewest requests in flight.  When every such backend already runs
C{parallel} requests for M, the request waits in the fair queue
(L{ollamaproxy.backends.queue}).  A request naming no model goes to the
healthy backend with the fewest requests in flight, at once.

With a single backend the proxy decides nothing about models: every request
goes to it, and Ollama answers for a model it does not have, as it would
without the proxy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.queue import FairQueue, busy
from ollamaproxy.errors import ProxyError
from ollamaproxy.model_names import ModelName

#: Ollama's usual C{OLLAMA_MAX_QUEUE}.
DEFAULT_MAX_QUEUE = 512
DEFAULT_QUEUE_TIMEOUT = 300.0


@dataclass(eq=False)
class Lease:
    """
    A request's slot on a backend.

    @ivar backend: Where the request goes.
    @ivar model: The model it named, if any.
    @ivar queued: Seconds it waited for the slot.
    """

    backend: Backend
    model: ModelName | None
    queued: float
    _router: Router = field(repr=False)
    _released: bool = False

    def release(self) -> None:
        """
        The request has ended: its slot goes to the next in line.  Only the
        first call counts.
        """
        if not self._released:
            self._released = True
            self._router._release(self)


class Router:
    """
    Chooses a backend for each request, and queues requests fairly while
    every backend that could run them is busy.
    """

    def __init__(
        self,
        pool: BackendPool,
        clock: IReactorTime,
        max_queue: int = DEFAULT_MAX_QUEUE,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
    ) -> None:
        self.pool = pool
        self._clock = clock
        self.queue: FairQueue[tuple[ModelName | None, float, frozenset[Backend]], Lease] = (
            FairQueue(clock, max_queue, queue_timeout)
        )
        pool.on_change = self._serve_queue

    @property
    def backends(self) -> list[Backend]:
        return self.pool.backends

    def acquire(
        self, model: ModelName | None, key: str, exclude: Iterable[Backend] = ()
    ) -> Deferred[Lease]:
        """
        A backend for a request naming C{model}, for key C{key}.

        @param exclude: Backends not to use (one that just failed this
            request).
        @return: Fires with a L{Lease} at once, or once the request's turn has
            come; cancelling it leaves the queue.
        @raise ProxyError: 404 if no backend has the model, 503 if none that
            has it is healthy, or the queue is full.
        """
        excluded = frozenset(exclude)
        self._check_available(model, excluded)
        now = self._clock.seconds()
        if not len(self.queue):
            lease = self._grant((model, now, excluded))
            if lease is not None:
                return succeed(lease)
        waiting = self.queue.wait(key, (model, now, excluded))
        self._serve_queue()
        return waiting

    def failed(self, lease: Lease, reason: str) -> None:
        """
        The request could not reach its backend (nothing was sent): mark
        the backend unhealthy and give the slot back.
        """
        self.pool.failed(lease.backend, reason)
        lease.release()

    def _check_available(self, model: ModelName | None, excluded: frozenset[Backend]) -> None:
        having = [b for b in self.backends if model is None or self._has(b, model)]
        if not having:
            assert model is not None
            raise ProxyError(404, f"model '{model.canonical}' not found on any backend",
                             outcome="rejected")
        if not any(b.healthy and b not in excluded for b in having):
            what = "any model" if model is None else f"model '{model.canonical}'"
            raise busy(f"no healthy backend has {what}", 1)

    def _has(self, backend: Backend, model: ModelName) -> bool:
        return len(self.backends) == 1 or backend.has(model)

    def _grant(self, wants: tuple[ModelName | None, float, frozenset[Backend]]) -> Lease | None:
        model, since, excluded = wants
        free = [
            b for b in self.backends
            if b.healthy and b not in excluded and b.free_for(model)
            and (model is None or self._has(b, model))
        ]
        if not free:
            return None
        backend = min(free, key=lambda b: (model is None or model not in b.loaded, b.in_flight))
        backend.running[model] += 1
        return Lease(backend, model, self._clock.seconds() - since, self)

    def _release(self, lease: Lease) -> None:
        running = lease.backend.running
        running[lease.model] -= 1
        if running[lease.model] <= 0:
            del running[lease.model]
        self._serve_queue()

    def _serve_queue(self) -> None:
        if len(self.queue):
            self.queue.serve(self._grant)
