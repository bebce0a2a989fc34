"""
Tests for L{ollamaproxy.backends.effective}: a backend that runs fewer of a
model's requests at once than C{--parallel} gets fewer, and more again when
it runs more.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from ollamaproxy.backends.effective import EVIDENCE, PROBE_AFTER
from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.router import Lease, Router
from tests.fakes.routers import LLAMA, backend, first_byte

PARALLEL = 4


class Ollama:
    """
    Drives a router's leases as a backend with C{slots} slots, given first
    come, first served to the requests sent: a request in a slot reads its
    prompt for C{prefill} steps, then its first byte comes; the rest wait
    inside it with none.  Each step one answer ends (L{finish}).
    """

    def __init__(self, router: Router, backend: Backend, slots: int, prefill: int = 0) -> None:
        self.router, self.backend, self.slots, self.prefill = router, backend, slots, prefill
        self.step = 0
        self.sent: list[Lease] = []
        self.started: dict[Lease, int] = {}
        self.answering: list[Lease] = []

    def send(self, count: int) -> None:
        """
        C{count} requests for llama3.2 come; each sent is noted.
        """
        for _ in range(count):
            d: Deferred[Lease] = self.router.acquire("k", LLAMA, runs=True)
            d.addCallback(self._sent)
        self._answer()

    def _sent(self, lease: Lease) -> Lease:
        self.sent.append(lease)
        return lease

    def _answer(self) -> None:
        for lease in self.sent:
            if lease not in self.started and len(self.started) < self.slots:
                self.started[lease] = self.step
        for lease, at in self.started.items():
            if lease not in self.answering and self.step - at >= self.prefill:
                self.answering.append(first_byte(lease))

    def finish(self) -> None:
        """
        The next step: the oldest answer, if any, ends; its slot goes to
        the next waiting inside.
        """
        self.step += 1
        if self.answering:
            lease = self.answering.pop(0)
            self.sent.remove(lease)
            del self.started[lease]
            lease.release()
        self._answer()


def setup(slots: int, prefill: int = 0) -> tuple[Clock, Backend, Router, Ollama]:
    clock = Clock()
    a = backend(clock, "a", ("llama3.2",), parallel=PARALLEL)
    r = Router(BackendPool([a]), clock, queue_timeout=6000)
    return clock, a, r, Ollama(r, a, slots, prefill)


def test_a_backend_that_answers_one_at_a_time_is_sent_one_at_a_time() -> None:
    """
    Ollama answering one of the four sent at once: after L{EVIDENCE}
    releases with others waiting for their first byte, the backend's
    effective parallel for the model is 1 (one log line), and once those
    sent have ended, one at a time is sent.
    """
    clock, a, r, ollama = setup(slots=1)
    ollama.send(30)
    assert len(ollama.sent) == PARALLEL
    with capturedLogs() as events:
        for _ in range(EVIDENCE):
            clock.advance(1)
            ollama.finish()
    assert a.effective == {LLAMA: 1}
    assert r.effective.lowered() == [(a, "llama3.2:latest", 1)]
    [line] = [e for e in events if "at most" in e.get("log_format", "")]
    assert (line["seen"], line["parallel"], line["model"]) == (1, PARALLEL, "llama3.2:latest")
    for _ in range(PARALLEL):
        clock.advance(1)
        ollama.finish()
    assert len(ollama.sent) == 1


def test_a_backend_that_answers_all_it_is_sent_keeps_its_parallel() -> None:
    """
    Ollama answering all four at once, however long the queue: nothing is
    lowered.  Nor by answers that are not streamed, whose first byte comes
    with their end, while others are in flight.
    """
    clock, a, r, ollama = setup(slots=PARALLEL)
    ollama.send(30)
    for _ in range(20):
        clock.advance(1)
        ollama.finish()
    assert a.effective == {} and r.effective.lowered() == []
    clock, a, r, ollama = setup(slots=PARALLEL)
    leases: list[Lease] = []
    for _ in range(3 * PARALLEL):
        r.acquire("k", LLAMA, runs=True).addCallback(leases.append)
    while leases:
        first_byte(leases.pop(0), b"application/json; charset=utf-8").release()
    assert a.effective == {}


def test_requests_reading_their_prompts_are_not_taken_for_waiting_ones() -> None:
    """
    A backend running all four, each new request reading its prompt while
    the others answer (so three answer at once, and one always has no first
    byte when an answer ends): nothing is lowered, for the request without
    a first byte came after the answer that ends had its own.
    """
    clock, a, r, ollama = setup(slots=PARALLEL, prefill=1)
    ollama.send(60)
    for _ in range(40):
        clock.advance(1)
        ollama.finish()
    assert len(ollama.answering) == PARALLEL - 1
    assert a.effective == {} and r.effective.lowered() == []


def test_the_effective_parallel_is_raised_when_the_backend_runs_more() -> None:
    """
    L{PROBE_AFTER} seconds after a lowering the backend may take one more:
    if it answers both at once, its effective parallel is 2 (one log line),
    and later 3, then its whole C{parallel} again.
    """
    clock, a, r, ollama = setup(slots=1)
    ollama.send(200)
    for _ in range(EVIDENCE + PARALLEL):
        ollama.finish()
    assert a.effective == {LLAMA: 1}
    ollama.slots = PARALLEL  # the VRAM is free again
    with capturedLogs() as events:
        for _ in range(3):
            clock.advance(PROBE_AFTER)
            ollama.finish()
            ollama.finish()
    assert a.effective == {} and r.effective.lowered() == []
    assert [e["seen"] for e in events if "again" in e.get("log_format", "")] == [2, 3, 4]


def test_a_try_that_finds_no_more_waits_twice_as_long() -> None:
    """
    A try of one more while the backend still answers one at a time: the
    evidence lowers it to 1 again, with no log line, and the next try comes
    after twice L{PROBE_AFTER}.
    """
    clock, a, _, ollama = setup(slots=1)
    ollama.send(200)
    for _ in range(EVIDENCE + PARALLEL):
        ollama.finish()
    clock.advance(PROBE_AFTER)
    with capturedLogs() as events:
        ollama.finish()
        assert a.effective == {LLAMA: 2}
        for _ in range(EVIDENCE):
            ollama.finish()
    assert a.effective == {LLAMA: 1}
    assert not [e for e in events if "at most" in e.get("log_format", "")]
    clock.advance(PROBE_AFTER)
    ollama.finish()
    assert a.effective == {LLAMA: 1}
    clock.advance(PROBE_AFTER)
    ollama.finish()
    assert a.effective == {LLAMA: 2}
