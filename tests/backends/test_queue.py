"""
Tests for L{ollamaproxy.backends.queue}: fair waiting for a busy model.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ollamaproxy.backends.queue import FairQueue
from ollamaproxy.errors import ProxyError


class Slots:
    """
    A grant function with C{free} slots per model, recording who got one.
    """

    def __init__(self) -> None:
        self.free: dict[str, int] = {}
        self.order: list[str] = []

    def __call__(self, wants: str) -> str | None:
        if self.free.get(wants, 0) <= 0:
            return None
        self.free[wants] -= 1
        return wants


def collect(d: Deferred[str], into: list[str], label: str) -> None:
    d.addCallback(lambda _: into.append(label))


def serve_one_at_a_time(queue: FairQueue[str, str], times: int) -> None:
    """
    Free a slot of model C{m} C{times} times, one at a time, each taken
    before the next is freed: the fair queue's order, one turn after another.
    """
    slots = Slots()
    for _ in range(times):
        slots.free["m"] = 1
        queue.serve(slots)


def test_keys_are_served_in_turn() -> None:
    """
    One key's burst of 100 and another key's one request just after: the
    second key's request is served next, not 101st; each key's own requests
    in the order they came.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    served: list[str] = []
    for i in range(100):
        collect(queue.wait("burst", "m"), served, f"burst-{i}")
    collect(queue.wait("other", "m"), served, "other")
    serve_one_at_a_time(queue, 3)
    assert served == ["burst-0", "other", "burst-1"]
    assert queue.waiting() == {"burst": 98}


def test_three_keys_round_robin() -> None:
    """
    With three keys waiting, slots go A, B, C, A, B, C.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    served: list[str] = []
    for key in "AAABBBCCC":
        collect(queue.wait(key, "m"), served, key)
    slots = Slots()
    slots.free["m"] = 6
    queue.serve(slots)
    assert served == list("ABCABC")
    assert len(queue) == 3


def test_weighted_keys_share_turns_by_weight() -> None:
    """
    A key of weight 3 and one of weight 1, both with plenty waiting: slots
    go three to one; the light key is still served before the heavy one's
    second turn, not after its whole burst.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    served: list[str] = []
    for _ in range(20):
        collect(queue.wait("heavy", "m", weight=3), served, "H")
        collect(queue.wait("light", "m", weight=1), served, "L")
    slots = Slots()
    slots.free["m"] = 16
    queue.serve(slots)
    assert "".join(served) == "HLHHHLHHHLHHHLHH"


def test_an_idle_key_earns_no_credit() -> None:
    """
    A key served much while the others caught up owes no turns when it
    waits again, and a key never seen gets no extra ones: both take turns
    from the present, as equals, in the order they came.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    for _ in range(10):
        queue.served("busy")
    for _ in range(10):
        queue.served("other")
    served: list[str] = []
    for key in ("busy", "busy", "newcomer", "newcomer"):
        collect(queue.wait(key, "m"), served, key)
    slots = Slots()
    slots.free["m"] = 4
    queue.serve(slots)
    assert served == ["busy", "newcomer", "busy", "newcomer"]


def test_a_key_is_not_held_up_by_another_model() -> None:
    """
    A slot free for one model goes to the first request that wants it,
    whatever waits for other models.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    served: list[str] = []
    collect(queue.wait("A", "busy"), served, "A-busy")
    collect(queue.wait("B", "free"), served, "B-free")
    slots = Slots()
    slots.free["free"] = 1
    queue.serve(slots)
    assert served == ["B-free"]
    assert queue.waiting() == {"A": 1}


def test_cancel_leaves_the_queue() -> None:
    """
    A request whose client left is taken out of the queue, never served,
    and its timer is gone.
    """
    clock = Clock()
    queue: FairQueue[str, str] = FairQueue(clock, limit=512, timeout=60)
    served: list[str] = []
    gone = queue.wait("A", "m")
    collect(queue.wait("B", "m"), served, "B")
    errors: list[object] = []
    gone.addErrback(lambda f: errors.append(f.trap(CancelledError)))
    gone.cancel()
    assert errors == [CancelledError]
    assert len(queue) == 1
    slots = Slots()
    slots.free["m"] = 5
    queue.serve(slots)
    assert served == ["B"]
    assert clock.getDelayedCalls() == []


def test_a_request_that_waits_too_long_gets_503() -> None:
    """
    After the queue timeout the request fails with 503 and Retry-After, and
    leaves the queue.
    """
    clock = Clock()
    queue: FairQueue[str, str] = FairQueue(clock, limit=512, timeout=30)
    failures: list[Failure] = []
    queue.wait("A", "m").addErrback(failures.append)
    clock.advance(29)
    assert failures == []
    clock.advance(1)
    [failure] = failures
    error = failure.value
    assert isinstance(error, ProxyError)
    assert error.code == 503
    assert error.headers == {b"Retry-After": b"30"}
    assert len(queue) == 0


def test_full_queue_refuses_at_once() -> None:
    """
    Beyond the limit, while every key holds one place, a newcomer is
    refused with 503 without waiting; so is one whose key holds a place
    less than the key with the most (taking a place would only swap them),
    and nobody waiting is failed.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=2, timeout=30)
    failures: list[Failure] = []
    queue.wait("A", "m").addErrback(failures.append)
    queue.wait("B", "m").addErrback(failures.append)
    with pytest.raises(ProxyError) as raised:
        queue.wait("C", "m")
    assert raised.value.code == 503
    assert raised.value.outcome == "queue_full"
    assert b"Retry-After" in raised.value.headers
    queue.limit = 3
    queue.wait("A", "m").addErrback(failures.append)
    with pytest.raises(ProxyError):
        queue.wait("B", "m")
    assert failures == []
    assert queue.waiting() == {"A": 2, "B": 1}


def refused(d: Deferred[str]) -> ProxyError:
    """
    The error C{d} has failed with.
    """
    failures: list[Failure] = []
    d.addErrback(failures.append)
    [failure] = failures
    assert isinstance(failure.value, ProxyError)
    return failure.value


def test_a_newcomer_takes_the_newest_place_of_the_key_holding_all() -> None:
    """
    A key holding all 4 places and another key's single request: the
    newcomer waits, and the holder's newest request fails with 503,
    Retry-After and the outcome queue_full; its older ones keep their
    places, and the newcomer is served in its turn.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=4, timeout=30)
    held = [queue.wait("A", "m") for _ in range(4)]
    served: list[str] = []
    collect(queue.wait("B", "m"), served, "B")
    error = refused(held[3])
    assert (error.code, error.outcome) == (503, "queue_full")
    assert error.headers == {b"Retry-After": b"30"}
    assert queue.waiting() == {"A": 3, "B": 1}
    for i in range(3):
        collect(held[i], served, f"A{i}")
    slots = Slots()
    slots.free["m"] = 4
    queue.serve(slots)
    assert served == ["A0", "B", "A1", "A2"]


def test_among_equal_holders_the_newest_place_is_given_up() -> None:
    """
    Two keys holding two places each in a full queue and a third key with
    nothing waiting: it gets in, in place of the request that came last.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=4, timeout=30)
    a1, b1, b2, a2 = (queue.wait(key, "m") for key in "ABBA")
    queue.wait("C", "m")
    assert refused(a2).outcome == "queue_full"
    assert queue.waiting() == {"A": 1, "B": 2, "C": 1}
    for d in (a1, b1, b2):
        assert not d.called


def test_retry_after_follows_the_pace_of_slots() -> None:
    """
    Retry-After is the requests ahead for the same kind of slot and the
    refused one itself, times the measured seconds between two slots
    freeing, at least 1 and at most the timeout; the queue timeout's 503
    says the same.
    """
    clock = Clock()
    pace: dict[str, float] = {"m": 4.0}
    queue: FairQueue[str, str] = FairQueue(clock, limit=2, timeout=30, pace=pace.get)
    first = queue.wait("A", "m")
    other = queue.wait("B", "n")
    with pytest.raises(ProxyError) as raised:
        queue.wait("C", "m")
    assert raised.value.headers == {b"Retry-After": b"8"}  # A's, then C's
    pace["m"] = 0.1
    assert queue.retry_after("m") == 1.0
    pace["m"] = 100.0
    assert queue.retry_after("m") == 30.0
    assert queue.retry_after("n") == 30.0  # nothing measured for n
    pace["m"] = 2.5
    clock.advance(30)
    assert refused(first).headers == {b"Retry-After": b"3"}  # itself, at 2.5 s
    assert refused(other).headers == {b"Retry-After": b"30"}


def test_served_requests_leave_no_timer() -> None:
    """
    A served request's timeout is cancelled.
    """
    clock = Clock()
    queue: FairQueue[str, str] = FairQueue(clock, limit=5, timeout=30)
    queue.wait("A", "m")
    slots = Slots()
    slots.free["m"] = 1
    queue.serve(slots)
    assert clock.getDelayedCalls() == []


def test_a_key_served_without_waiting_has_had_its_turn() -> None:
    """
    A key whose requests got slots without waiting comes after a key that
    has not been served, though it queued first.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    served: list[str] = []
    queue.served("burst")
    collect(queue.wait("burst", "m"), served, "burst")
    collect(queue.wait("other", "m"), served, "other")
    slots = Slots()
    slots.free["m"] = 1
    queue.serve(slots)
    assert served == ["other"]


def test_a_freed_slot_asks_once_per_kind_not_once_per_request() -> None:
    """
    Hundreds waiting for one busy model, from one key or many: when a slot
    frees, the queue asks for a slot once to serve the next request and
    once to find the model full again, not once for every request waiting
    (which made each freed slot cost time in proportion to the queue).
    """
    for keys in (1, 50):
        queue: FairQueue[str, str] = FairQueue(Clock(), limit=1000, timeout=60)
        for n in range(500):
            queue.wait(f"key{n % keys}", "m")
        slots = CountingSlots()
        slots.free["m"] = 1
        queue.serve(slots)
        assert slots.asked == 2, keys
        assert len(queue) == 499


class CountingSlots(Slots):
    """
    L{Slots} that count how often they are asked.
    """

    asked = 0

    def __call__(self, wants: str) -> str | None:
        self.asked += 1
        return super().__call__(wants)


def test_a_request_that_holds_the_line_is_not_served_past() -> None:
    """
    A request that holds the line and finds nothing free when its turn
    comes keeps every later request waiting, even one whose slot is free,
    until it is served itself; one that came before it is still served.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60,
                                           holds=lambda wants: wants == "whole")
    served: list[str] = []
    collect(queue.wait("a", "m"), served, "a")
    collect(queue.wait("b", "whole"), served, "b")
    collect(queue.wait("c", "n"), served, "c")
    slots = Slots()
    slots.free.update(m=1, n=1)
    queue.serve(slots)
    assert served == ["a"]
    assert queue.waiting() == {"b": 1, "c": 1}
    slots.free["whole"] = 1
    queue.serve(slots)
    assert served == ["a", "b", "c"]


def test_a_turn_moves_a_key_on_by_its_cost() -> None:
    """
    A slot moves its key's finish on by the request's cost over the key's
    weight: a key whose requests cost 20 times another's gets a turn for
    every 20 of the other's, both waiting.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    served: list[str] = []
    for _ in range(3):
        collect(queue.wait("long", "m", cost=600), served, "L")
    for _ in range(50):
        collect(queue.wait("short", "m", cost=30), served, "S")
    slots = Slots()
    slots.free["m"] = 42
    queue.serve(slots)
    assert "".join(served) == "L" + "S" * 20 + "L" + "S" * 20
    assert queue.finish("long") == 1200
    assert queue.finish("short") == 1200


def test_a_charge_trues_the_cost_up_but_banks_no_credit() -> None:
    """
    A charge moves a served key's finish by the difference over its
    weight, up or down; a key charged back below the present does not get
    the turns it would have banked: it takes turns from the present, in
    turn with a key never served.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    queue.served("a", weight=2, cost=100)
    queue.charge("a", 2, 60)
    assert queue.finish("a") == 80
    queue.charge("a", 2, -1000)
    assert queue.finish("a") == -420
    served: list[str] = []
    for key in ("a", "a", "a", "b", "b", "b"):
        collect(queue.wait(key, "m", cost=10), served, key)
    slots = Slots()
    slots.free["m"] = 4
    queue.serve(slots)
    assert served == ["a", "b", "a", "b"]


def test_one_users_batch_does_not_hold_back_the_others_behind_its_key() -> None:
    """
    Two users behind one key: one with 20 long requests waiting, the
    other's one request, sent after them all, is served next; then the
    first user's again.
    """
    clock = Clock()
    queue: FairQueue[str, str] = FairQueue(clock, limit=512, timeout=60)
    served: list[str] = []
    for i in range(20):
        collect(queue.wait("webui", "m", cost=2000, user="batch"), served, f"batch-{i}")
    clock.advance(1)
    collect(queue.wait("webui", "m", cost=50, user="chat"), served, "chat")
    serve_one_at_a_time(queue, 3)
    assert served == ["batch-0", "chat", "batch-1"]
    assert queue.waiting() == {"webui": 18}


def test_a_key_with_users_still_gets_one_keys_share() -> None:
    """
    A key with two users busy gets the share of one key against another
    key, not two shares; within it, its users take turns.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    served: list[str] = []
    for _ in range(5):
        collect(queue.wait("webui", "m", user="a"), served, "a")
    for _ in range(5):
        collect(queue.wait("webui", "m", user="b"), served, "b")
    for _ in range(5):
        collect(queue.wait("batch", "m"), served, "batch")
    slots = Slots()
    slots.free["m"] = 6
    queue.serve(slots)
    assert served == ["a", "batch", "b", "batch", "a", "batch"]
    assert queue.finish("webui") == queue.finish("batch") == 3


def test_the_anonymous_user_is_one_more_user() -> None:
    """
    Requests of a key with users that name none are the key's anonymous
    user: they take turns with the named users, not one turn each.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    served: list[str] = []
    for _ in range(3):
        collect(queue.wait("webui", "m", user=""), served, "anonymous")
    collect(queue.wait("webui", "m", user="alice"), served, "alice")
    slots = Slots()
    slots.free["m"] = 3
    queue.serve(slots)
    assert served == ["anonymous", "alice", "anonymous"]


def test_an_idle_user_rejoins_at_the_keys_present() -> None:
    """
    A user served ten times while another was idle does not owe it ten
    turns: the newcomer starts at the key's present, and they alternate,
    as an idle key rejoins the queue at its present.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    for _ in range(10):
        queue.served("webui", cost=1, user="a")
    assert queue.user_finish("webui", "a") == 10
    served: list[str] = []
    for _ in range(3):
        collect(queue.wait("webui", "m", user="a"), served, "a")
    for _ in range(3):
        collect(queue.wait("webui", "m", user="b"), served, "b")
    slots = Slots()
    slots.free["m"] = 4
    queue.serve(slots)
    assert served == ["b", "a", "b", "a"]


def test_a_charge_moves_the_users_turns_too() -> None:
    """
    The true-up of a served request moves its user's finish within the key
    as it moves the key's: a user whose request cost more than estimated
    waits longer for its next turn.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=512, timeout=60)
    queue.served("webui", weight=2, cost=100, user="a")
    queue.charge("webui", 2, 300, user="a")
    assert queue.finish("webui") == 200
    assert queue.user_finish("webui", "a") == 400
    queue.served("webui", weight=2, cost=100, user="b")
    served: list[str] = []
    collect(queue.wait("webui", "m", cost=100, user="a"), served, "a")
    collect(queue.wait("webui", "m", cost=100, user="b"), served, "b")
    slots = Slots()
    slots.free["m"] = 1
    queue.serve(slots)
    assert served == ["b"]


def test_users_waiting_for_a_busy_model_are_asked_for_once() -> None:
    """
    Hundreds waiting for one busy model from fifty users of one key: a
    freed slot asks for a slot once to serve the next and once to find the
    model full again, not once per user.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=1000, timeout=60)
    for n in range(500):
        queue.wait("webui", "m", user=f"user{n % 50}")
    slots = CountingSlots()
    slots.free["m"] = 1
    queue.serve(slots)
    assert slots.asked == 2
    assert len(queue) == 499


def test_a_users_request_leaves_when_cancelled_or_timed_out() -> None:
    """
    A user's waiting request leaves the queue when its client goes or its
    wait times out, as any other: nothing of it is left waiting.
    """
    clock = Clock()
    queue: FairQueue[str, str] = FairQueue(clock, limit=512, timeout=60)
    cancelled = queue.wait("webui", "m", user="alice")
    expired = queue.wait("webui", "m", user="bob")
    cancelled.addErrback(lambda f: f.trap(CancelledError))
    cancelled.cancel()
    assert queue.waiting() == {"webui": 1}
    failures: list[Failure] = []
    expired.addErrback(failures.append)
    clock.advance(60)
    assert len(queue) == 0 and queue.waiting() == {}
    error = failures[0].value
    assert isinstance(error, ProxyError) and error.code == 503


def test_a_full_queue_is_shared_among_a_keys_users() -> None:
    """
    A full queue held by one user behind a key: another user of the same
    key, with nothing waiting, takes the place of that user's newest
    request, which gets the 503, and again while it holds fewer than the
    other less one; then it is refused.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=4, timeout=60)
    failures: dict[str, Failure] = {}

    def note(failure: Failure, label: str) -> None:
        failures[label] = failure

    for label in ("flood-0", "flood-1", "flood-2", "flood-3"):
        queue.wait("webui", "m", user="flood").addErrback(note, label)
    queue.wait("webui", "m", user="chat")
    assert list(failures) == ["flood-3"] and len(queue) == 4
    error = failures["flood-3"].value
    assert isinstance(error, ProxyError) and error.code == 503
    assert queue.waiting() == {"webui": 4}
    queue.wait("webui", "m", user="chat")
    assert list(failures) == ["flood-3", "flood-2"]
    with pytest.raises(ProxyError):
        queue.wait("webui", "m", user="chat")


def test_the_place_a_key_gives_up_is_its_busiest_users() -> None:
    """
    A newcomer of another key takes its place from the key holding the
    most, and there from the user holding the most, not from the user
    who came last with one request.
    """
    queue: FairQueue[str, str] = FairQueue(Clock(), limit=4, timeout=60)
    failed: list[str] = []

    def note(failure: Failure, label: str) -> None:
        failed.append(label)

    for label in ("flood-0", "flood-1", "flood-2"):
        queue.wait("webui", "m", user="flood").addErrback(note, label)
    queue.wait("webui", "m", user="chat").addErrback(note, "chat")
    queue.wait("other", "m")
    assert failed == ["flood-2"]
