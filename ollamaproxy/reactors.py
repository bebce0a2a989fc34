# -*- test-case-name: tests.test_tap -*-
"""
The reactor the daemon runs on, named by the interfaces its parts use.

Each part takes the one interface it needs (L{IReactorTime} to tell time,
L{IReactorTCP} to connect); the few that hand the reactor on to several
(the daemon's wiring, PostgreSQL's and Redis's set-up) take
L{IDaemonReactor}, which Twisted's reactors provide whole.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)


class IDaemonReactor(
    IReactorCore,
    IReactorTCP,
    IReactorTime,
    IReactorThreads,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
):
    """
    What the daemon's parts use of the reactor, together: connecting and
    listening, time, threads, and name resolution.
    """


def daemon_reactor(reactor: object) -> IDaemonReactor:
    """
    C{reactor} (Twisted's global reactor, or a test's fake) as the daemon's
    parts use it: Twisted's reactors provide each interface of
    L{IDaemonReactor} without declaring the union.
    """
    return cast(IDaemonReactor, reactor)
