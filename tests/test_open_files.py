"""
Tests for L{ollamaproxy.open_files}: the open files limit and the client
connections it leaves room for.
"""

from __future__ import annotations

import resource

from twisted.logger import capturedLogs

from ollamaproxy.open_files import MINIMUM_CONNECTIONS, connection_limit, raise_open_files_limit


def test_connection_limit_leaves_room_for_ollama_and_the_rest() -> None:
    """
    Each client connection may need one towards Ollama, and the pool and
    the proxy's files need some: the systemd default of 1024 leaves room for
    448 client connections, and a tiny limit still for a few.
    """
    assert connection_limit(1024) == 448
    assert connection_limit(65536) == 32704
    assert connection_limit(100) == MINIMUM_CONNECTIONS


def test_soft_limit_is_raised_to_the_hard_limit_and_logged() -> None:
    """
    At start the soft limit on open files goes up to the hard limit, and one
    line says what it is.
    """
    set_to: list[tuple[int, int]] = []
    with capturedLogs() as events:
        limit = raise_open_files_limit(lambda: (1024, 524288), set_to.append)
    assert limit == 524288
    assert set_to == [(524288, 524288)]
    [event] = events
    assert (event["limit"], event["connections"]) == (524288, connection_limit(524288))


def test_a_limit_that_cannot_be_raised_is_kept() -> None:
    """
    If the system refuses, the proxy runs with the limit it has, and says
    so.
    """

    def refuse(limits: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    with capturedLogs() as events:
        limit = raise_open_files_limit(lambda: (1024, 4096), refuse)
    assert limit == 1024
    assert [e["log_level"].name for e in events] == ["warn", "info"]


def test_an_unlimited_hard_limit_is_left_alone() -> None:
    """
    An unlimited hard limit cannot be the soft limit: the soft one stays.
    """
    set_to: list[tuple[int, int]] = []
    with capturedLogs():
        limit = raise_open_files_limit(lambda: (1024, resource.RLIM_INFINITY), set_to.append)
    assert (limit, set_to) == (1024, [])
