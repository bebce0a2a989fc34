"""
Fixtures for the few tests that need real sockets and real processes, all on
127.0.0.1: a fake Ollama on a real port, and the proxy as a real C{twistd}
process (their pieces are in L{tests.fakes.twistd}).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.web.server import Site

from tests.fakes.ollama import FakeOllama
from tests.fakes.twistd import TwistdLauncher, Upstream


@pytest_twisted.async_yield_fixture
async def upstream(reactor: Any) -> AsyncIterator[Upstream]:
    """
    A fake Ollama on 127.0.0.1, on a port of the system's choosing.
    """
    fake = FakeOllama(reactor)
    site = Site(fake)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield Upstream(fake, port)
    await maybeDeferred(port.stopListening)


@pytest.fixture
def reactor() -> Any:
    """
    The reactor pytest-twisted runs.
    """
    from twisted.internet import reactor

    return reactor


@pytest_twisted.async_yield_fixture
async def twistd(reactor: Any, tmp_path: Path) -> AsyncIterator[TwistdLauncher]:
    """
    Start twistd processes; they are all stopped when the test ends.
    """
    launcher = TwistdLauncher(reactor, tmp_path)
    yield launcher
    await launcher.stop_all()
