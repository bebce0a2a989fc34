# -*- test-case-name: tests.test_layout -*-
"""
Which markers a test gets from where it is and what it uses: the rule
C{tests/conftest.py} applies to every collected test.

A rule by location and fixture, rather than a C{pytestmark} line in each
file, cannot be forgotten by a new test: a test placed under
C{tests/integration/}, or one that asks for a real engine, is marked.
"""

from __future__ import annotations

from collections.abc import Iterable

# The fixtures under which every real engine starts (tests/fakes/engines.py):
# a test that uses one, directly or through another fixture, starts
# PostgreSQL or Redis.
ENGINE_FIXTURES = frozenset({"postgres_cluster", "redis_server"})
# Modules (paths under tests/) that start an engine of their own, not
# through a fixture above.
ENGINE_MODULES = frozenset({"integration/test_redis_shared.py"})
# Modules (paths under tests/) that drive Chromium.
BROWSER_MODULES = frozenset({"integration/test_console_browser.py"})


def marks_for(where: str, fixtures: Iterable[str], engines: bool = False) -> frozenset[str]:
    """
    The markers of a test.

    A test that starts a real engine is C{integration} wherever it is, so
    that C{pytest -m "not integration"} needs nothing but Python, even for a
    test not yet moved under C{tests/integration/}.

    @param where: The test's module, as a POSIX path under C{tests/}.
    @param fixtures: Every fixture the test uses, directly or not.
    @param engines: Whether the test (or its parameter) is already marked
        C{engines}.
    """
    marks: set[str] = set()
    if engines or where in ENGINE_MODULES or ENGINE_FIXTURES.intersection(fixtures):
        marks |= {"engines", "integration"}
    if where.startswith("integration/"):
        marks.add("integration")
    if where in BROWSER_MODULES:
        marks.add("browser")
    return frozenset(marks)
