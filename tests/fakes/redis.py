# -*- test-case-name: tests.redis.test_limits,tests.redis.test_link -*-
"""
A Redis client that answers as the test says, for the unit tests of
L{ollamaproxy.redis}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed


@dataclass
class Call:
    """
    One script call, and the L{Deferred} its answer goes to.
    """

    script: str
    keys: list[str]
    args: list[Any]
    answer: Deferred[Any]


@dataclass
class FakeRedis:
    """
    Records the calls; the test fires their answers.
    """

    calls: list[Call] = field(default_factory=list)
    pings: list[Deferred[Any]] = field(default_factory=list)
    gave_up: bool = False
    disconnected: bool = False

    def eval(self, script: str, keys: list[str] = [], args: list[Any] = []) -> Deferred[Any]:  # noqa: B006
        d: Deferred[Any] = Deferred()
        self.calls.append(Call(script, list(keys), list(args), d))
        return d

    def ping(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pings.append(d)
        return d

    def disconnect(self) -> Deferred[Any]:
        self.disconnected = True
        return succeed(None)
