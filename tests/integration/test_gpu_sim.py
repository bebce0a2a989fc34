"""
The simulated GPU (bench/gpu_sim.py) as it is run: its own process on a
real port, with the proxy as a real C{twistd} in front of it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tests.fakes.client import chat_lines
from tests.fakes.twistd import REPO, START_TIMEOUT, TEST_KEY, TwistdLauncher, proxy_args

SCRIPT = REPO / "bench" / "gpu_sim.py"


class SimulatorProcess(ProcessProtocol):
    """
    C{python bench/gpu_sim.py 0 ...}: tells the port it listens on, and
    when it ends.
    """

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        marker = b"listening on 127.0.0.1:"
        if not self.listening.called and marker in self.output and b"\n" in self.output:
            self.listening.callback(int(self.output.split(marker)[1].split(b"\n")[0]))

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(reason)
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_the_proxy_streams_a_chat_from_the_simulator(
    reactor: Any, twistd: TwistdLauncher
) -> None:
    """
    A chat through the proxy reaches the simulator, whose answer streams
    back line by line with its final figures: the tokens asked, the load
    time given, and the whole prompt counted.
    """
    simulator = SimulatorProcess()
    args = [sys.executable, str(SCRIPT), "0", "--model", "llama3.2", "--load-seconds", "0.2"]
    reactor.spawnProcess(simulator, sys.executable, args, env=dict(os.environ), path=str(REPO))
    try:
        port = await simulator.listening.addTimeout(START_TIMEOUT, reactor)
        proxy = await twistd.start(proxy_args(f"http://127.0.0.1:{port}"))
        lines = await chat_lines(reactor, proxy.url, TEST_KEY)
        assert [line["message"]["content"] for line in lines[:-1]] == \
            ["t0", " t1", " t2", " t3", " t4"]
        final = lines[-1]
        assert (final["done"], final["eval_count"], final["prompt_eval_count"]) == (True, 5, 3)
        assert final["load_duration"] >= 200_000_000
    finally:
        if simulator.transport is not None and not simulator.ended.called:
            simulator.transport.signalProcess("KILL")
        await simulator.ended
