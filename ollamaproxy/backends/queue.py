# -*- test-case-name: tests.backends.test_queue -*-
"""
Waiting fairly for a busy model.

When every backend that has a model is running as many requests for it as
it may, a new request waits here.  Waiting requests of different keys are
served in turn, round-robin across keys, and a key's own requests in the
order they came: one key's burst of a hundred does not delay another key's
one request by a hundred turns.

A wait is a L{Deferred}: cancelling it (the client left) takes the request
out of the queue, and a request that waits longer than the timeout fails
with a 503 that says when to try again.  Neither ever reaches Ollama.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ollamaproxy.errors import ProxyError

W = TypeVar("W")  # what a waiter wants (a model name)
G = TypeVar("G")  # what it is granted (a lease on a backend)


def busy(message: str, retry_after: float) -> ProxyError:
    """
    A 503 that says when to try again.
    """
    seconds = str(max(1, math.ceil(retry_after))).encode("ascii")
    return ProxyError(503, message, {b"Retry-After": seconds}, outcome="rejected")


@dataclass(eq=False)
class _Waiter(Generic[W, G]):
    key: str
    wants: W
    since: float
    granted: Deferred[G]
    timer: IDelayedCall | None = None


@dataclass
class FairQueue(Generic[W, G]):
    """
    Requests waiting for a slot, served round-robin across keys.

    @ivar clock: Tells time for the timeout.
    @ivar limit: The most requests that may wait in all; beyond it a new one
        is refused with 503 at once.
    @ivar timeout: Seconds a request may wait before it is refused with 503.
    """

    clock: IReactorTime
    limit: int
    timeout: float
    # Keys with waiting requests, in the order they are next served.
    _keys: OrderedDict[str, deque[_Waiter[W, G]]] = field(default_factory=OrderedDict)
    _size: int = 0

    def __len__(self) -> int:
        return self._size

    def waiting(self) -> dict[str, int]:
        """
        How many requests each key has waiting.
        """
        return {key: len(waiters) for key, waiters in self._keys.items()}

    def wait(self, key: str, wants: W) -> Deferred[G]:
        """
        Wait in line for C{wants}.

        @return: Fires with what L{serve} grants; fails with a 503
            L{ProxyError} after C{timeout} seconds; cancelling it leaves the
            queue.
        @raise ProxyError: 503 at once if C{limit} requests already wait.
        """
        if self._size >= self.limit:
            raise busy(f"too many requests waiting ({self.limit}); try again shortly",
                       self.timeout)

        def leave(_: Deferred[G]) -> None:
            self._remove(waiter)

        waiter: _Waiter[W, G] = _Waiter(key, wants, self.clock.seconds(), Deferred(leave))
        waiter.timer = self.clock.callLater(self.timeout, self._expire, waiter)
        self._keys.setdefault(key, deque()).append(waiter)
        self._size += 1
        return waiter.granted

    def serve(self, grant: Callable[[W], G | None]) -> None:
        """
        Give slots to waiting requests, one key at a time in turn, for as
        long as C{grant} finds one: each key's first request that C{grant}
        accepts is served, and the key goes to the back of the line.

        @param grant: Returns what a request wanting C{W} gets now, or
            L{None} if nothing is free for it.
        """
        served = True
        while served and self._size:
            served = False
            for key in list(self._keys):
                waiters = self._keys[key]
                for waiter in waiters:
                    granted = grant(waiter.wants)
                    if granted is not None:
                        self._remove(waiter)
                        self._keys.pop(key, None)
                        if waiters:
                            self._keys[key] = waiters  # to the back of the line
                        waiter.granted.callback(granted)
                        served = True
                        break
                else:
                    continue
                break

    def _expire(self, waiter: _Waiter[W, G]) -> None:
        waiter.timer = None
        self._remove(waiter)
        waiter.granted.errback(busy(
            f"no backend was free for {self.timeout:g} seconds; try again shortly",
            self.timeout,
        ))

    def _remove(self, waiter: _Waiter[W, G]) -> None:
        waiters = self._keys.get(waiter.key)
        if waiters is None or waiter not in waiters:
            return
        waiters.remove(waiter)
        self._size -= 1
        if not waiters:
            del self._keys[waiter.key]
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
