# -*- test-case-name: tests.test_readiness -*-
"""
Whether this proxy can serve: for load balancers and Kubernetes.

Each part the proxy needs (its backends, the shared engines it was pointed
at, not shutting down) adds a check; C{GET /-/ready} answers 200 when every
check passes and 503, naming the ones that fail, when one does.  A part the
proxy serves without, though worse (PostgreSQL, or Redis under the C{local}
failure policy), is reported but does not make the proxy unready: every
proxy shares it, so turning them all unready at once would make its outage
a full one.  The path cannot collide with Ollama's routes, and it needs no
key: it says nothing but the names of the checks (no address, no key, no
model).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

READY_PATH: Final = b"/-/ready"


class Readiness:
    """
    The checks that decide whether this proxy can serve.
    """

    def __init__(self) -> None:
        self._checks: dict[str, tuple[Callable[[], bool], bool]] = {}

    def add(self, name: str, check: Callable[[], bool], required: bool = True) -> None:
        """
        Report C{check}, which tells, cheaply and without I/O, whether that
        part works now.

        @param name: Names the part in the answer (C{backends}, C{redis}).
        @param required: Whether the proxy is unready while it fails; if
            not, it is named under C{degraded}.
        """
        self._checks[name] = (check, required)

    def answer(self) -> tuple[int, bytes]:
        """
        The status and JSON body of an answer to C{GET /-/ready}.
        """
        checks = {name: check() for name, (check, _) in self._checks.items()}
        failing = [name for name, ok in checks.items() if not ok and self._checks[name][1]]
        degraded = [name for name, ok in checks.items() if not ok and not self._checks[name][1]]
        document: dict[str, object] = {"ready": not failing, "checks": checks}
        if degraded:
            document["degraded"] = degraded
        if failing:
            document = {"error": "not ready: " + ", ".join(failing), **document}
        return (503 if failing else 200), json.dumps(document).encode("utf-8") + b"\n"
