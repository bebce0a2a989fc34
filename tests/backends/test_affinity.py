"""
Tests for L{ollamaproxy.backends.affinity}: a conversation's next turn goes
to the backend of its last, through the router, within the slack, while
that backend may take it; memory bounded.
"""

from __future__ import annotations

from ollamaproxy.backends.affinity import Affinity
from ollamaproxy.backends.router import Lease, Router
from tests.fakes.chain import Chain
from tests.fakes.routers import LLAMA, MISTRAL, now

ONE, TWO = b"1" * 16, b"2" * 16


def four(parallel: int = 2) -> Chain:
    """
    A chain of four backends that each have llama3.2 and mistral.
    """
    return Chain(backends=[["llama3.2", "mistral"]] * 4, parallel=parallel)


def turn(router: Router, conversation: bytes | None, key: str = "k") -> Lease:
    """
    A turn of C{conversation} for llama3.2 that gets its slot at once.
    """
    return now(router.acquire(key, LLAMA, runs=True, conversation=conversation))


def home_on_second(chain: Chain) -> Lease:
    """
    Send conversation ONE's first turn to the second backend (the first is
    busy then) and end it; return a lease that keeps nothing busy.
    """
    busy = turn(chain.router, None)
    first = turn(chain.router, ONE)
    assert (busy.backend, first.backend, first.placement) == (
        chain.backends[0], chain.backends[1], "new")
    busy.release()
    first.release()
    return first


def test_the_next_turn_goes_home() -> None:
    """
    With every backend idle, the router would send a turn to the first
    listed; a turn of a conversation whose last turn went to the second
    goes there, and says it went home.
    """
    chain = four()
    home_on_second(chain)
    again = turn(chain.router, ONE)
    assert (again.backend, again.placement) == (chain.backends[1], "home")
    assert turn(chain.router, None).backend is chain.backends[0]


def test_a_home_busier_than_the_slack_loses_the_turn() -> None:
    """
    A home running more than C{slack} requests more than the least busy
    candidate loses the turn to the router's choice, and the conversation
    moves there; at the slack it keeps it.
    """
    chain = four(parallel=8)
    chain.router.affinity = Affinity(2, chain.clock)
    home_on_second(chain)
    home = chain.backends[1]
    elsewhere = [b for b in chain.backends if b is not home]
    pinned = [now(chain.router.acquire("k", LLAMA, runs=True, exclude=elsewhere))
              for _ in range(2)]
    kept = turn(chain.router, ONE)  # 2 against 0: at the slack
    assert (kept.backend, kept.placement) == (home, "home")
    moved = turn(chain.router, ONE)  # 3 against 0: over it
    assert (moved.backend, moved.placement) == (chain.backends[0], "moved")
    assert chain.router.affinity.home(ONE) is chain.backends[0]
    for lease in [*pinned, kept, moved]:
        lease.release()


def test_slack_zero_goes_home_only_on_a_tie() -> None:
    """
    C{--affinity-slack 0}: the home gets the turn while it is as idle as
    the least busy candidate, not when it runs one more.
    """
    chain = four()
    chain.router.affinity = Affinity(0, chain.clock)
    home_on_second(chain)
    assert turn(chain.router, ONE).backend is chain.backends[1]  # 0 against 0
    again = turn(chain.router, ONE)  # 1 against 0
    assert (again.backend, again.placement) == (chain.backends[0], "moved")


def test_an_unhealthy_home_is_left() -> None:
    """
    A home that is unhealthy gets no turn: the conversation moves.
    """
    chain = four()
    home_on_second(chain)
    chain.backends[1].healthy = False
    lease = turn(chain.router, ONE)
    assert (lease.backend, lease.placement) == (chain.backends[0], "moved")


def test_a_home_out_for_the_model_is_left() -> None:
    """
    A home whose generations of the model hung (out for it) gets no turn
    of that model.
    """
    chain = four()
    home_on_second(chain)
    chain.backends[1].hung.add(LLAMA)
    assert turn(chain.router, ONE).backend is chain.backends[0]


def test_a_home_without_the_model_is_left() -> None:
    """
    A home that no longer has the model (deleted there) gets no turn.
    """
    chain = four()
    home_on_second(chain)
    chain.backends[1].models = frozenset({MISTRAL})
    assert turn(chain.router, ONE).backend is chain.backends[0]


def test_a_full_home_is_left() -> None:
    """
    A home with no free slot for the model does not make the turn wait:
    it goes where a slot is free.
    """
    chain = four(parallel=1)
    home_on_second(chain)
    holding = now(chain.router.acquire("k", LLAMA, runs=True, exclude=[
        b for b in chain.backends if b is not chain.backends[1]]))
    assert holding.backend is chain.backends[1]
    assert turn(chain.router, ONE).backend is chain.backends[0]


def test_a_home_that_unloaded_the_model_loses_to_one_that_has_it_loaded() -> None:
    """
    A home whose runner of the model is gone (and its caches with it) loses
    the turn to a backend that has the model loaded; while no candidate has
    it loaded, the home keeps it.
    """
    chain = four()
    home_on_second(chain)
    went = turn(chain.router, ONE)
    assert went.backend is chain.backends[1]
    went.release()
    chain.backends[2].loaded = frozenset({LLAMA})
    lease = turn(chain.router, ONE)
    assert (lease.backend, lease.placement) == (chain.backends[2], "moved")


def test_new_conversations_spread_over_idle_backends() -> None:
    """
    While every backend is idle, the router sends every request to the
    first listed; new conversations go each to the backend home to the
    fewest, so four conversations live on four backends.
    """
    chain = four()
    homes = []
    for number in range(4):
        lease = turn(chain.router, bytes([number]) * 16)
        homes.append(lease.backend)
        lease.release()
    assert set(homes) == set(chain.backends)


def test_a_queued_turn_moves_its_conversation_where_its_slot_freed() -> None:
    """
    A turn that waited in the fair queue takes the first slot that frees,
    and its conversation lives there from then on.
    """
    chain = Chain(backends=[["llama3.2"]] * 2, parallel=1)
    home = turn(chain.router, ONE)
    other = turn(chain.router, None)
    waiting = chain.router.acquire("k", LLAMA, runs=True, conversation=ONE)
    assert not waiting.called
    other.release()
    lease = now(waiting)
    assert (lease.backend, lease.placement) == (other.backend, "moved")
    assert chain.router.affinity is not None
    assert chain.router.affinity.home(ONE) is other.backend
    home.release()


def test_turns_go_home_only_among_several_backends_and_not_when_off() -> None:
    """
    With one backend there is nothing to choose, and C{--affinity-slack
    off} remembers no conversation: no lease says where it went.
    """
    one = Chain()
    assert one.router.affinity is None
    assert turn(one.router, ONE).placement is None
    chain = four()
    off = Router(chain.pool, chain.clock, affinity_slack=None)
    assert off.affinity is None
    assert turn(off, ONE).placement is None


def test_memory_is_bounded_least_recently_used_first() -> None:
    """
    The conversations remembered are at most the bound; the one whose last
    turn is oldest is forgotten first, and a forgotten one starts anew.
    """
    chain = four()
    a, b = chain.backends[:2]
    affinity = Affinity(2, chain.clock, size=3)
    for number in range(3):
        affinity.went(bytes([number]), a, LLAMA)
    assert affinity.went(bytes([0]), b, LLAMA) == "moved"  # 0 is now the newest
    affinity.went(bytes([3]), a, LLAMA)  # 1 is forgotten
    assert len(affinity) == 3
    assert affinity.home(bytes([1])) is None
    assert (affinity.home(bytes([0])), affinity.home(bytes([2]))) == (b, a)
    assert affinity.went(bytes([1]), a, LLAMA) == "new"
    assert len(affinity) == 3


def test_new_conversations_go_where_fewest_live_within_the_slack() -> None:
    """
    A new conversation goes to the backend home to the fewest conversations
    among those at most C{slack} busier than the router's choice, not past
    the slack.
    """
    chain = four(parallel=8)
    chain.router.affinity = Affinity(1, chain.clock)
    for number in range(3):  # one conversation on each of the first three
        lease = turn(chain.router, bytes([number]) * 16)
        lease.release()
    idle = chain.backends[3]
    pinned = [now(chain.router.acquire("k", LLAMA, runs=True, exclude=chain.backends[:3]))
              for _ in range(2)]
    assert all(p.backend is idle for p in pinned)
    # The fourth, home to none, runs 2 against 0: past the slack of 1.
    assert turn(chain.router, b"m" * 16).backend is chain.backends[0]
    pinned[0].release()
    # It runs 1 against 0 now: within the slack, and home to the fewest.
    assert turn(chain.router, b"n" * 16).backend is idle


def test_a_moved_conversation_goes_where_fewest_live() -> None:
    """
    A conversation whose home is past the slack moves, not to the router's
    own choice, but to the candidate within the slack whose slots hold the
    fewest conversations: a move that lands on a crowded backend evicts
    another conversation's cache there.
    """
    chain = four(parallel=8)
    affinity = chain.router.affinity = Affinity(1, chain.clock)
    first, home, third, last = chain.backends
    affinity.went(ONE, home, LLAMA)
    for number, backend in enumerate([first, first, third]):
        affinity.went(bytes([number]) * 16, backend, LLAMA)
    pinned = [now(chain.router.acquire("k", LLAMA, runs=True, exclude=[first, third, last]))
              for _ in range(2)]
    lease = turn(chain.router, ONE)  # home runs 2 against 0: past the slack
    assert (lease.backend, lease.placement) == (last, "moved")
    for held in [*pinned, lease]:
        held.release()


def test_a_home_loading_the_model_keeps_its_turn() -> None:
    """
    A home that runs the model although its listing does not show it
    loaded yet (it is loading it, for this conversation's last turn or
    another's) keeps the turn against a backend that has it loaded: its
    runner, and the caches in it, are there.
    """
    chain = four()
    assert chain.router.affinity is not None
    home = chain.backends[1]
    chain.router.affinity.went(ONE, home, LLAMA)
    chain.backends[0].loaded = frozenset({LLAMA})
    loading = now(chain.router.acquire("k", LLAMA, runs=True, exclude=[
        b for b in chain.backends if b is not home]))
    assert LLAMA not in home.loaded
    lease = turn(chain.router, ONE)
    assert (lease.backend, lease.placement) == (home, "home")
    loading.release()


def test_new_conversations_spread_over_backends_loading_the_model() -> None:
    """
    While the first backend's listing shows the model loaded and the others
    are still loading it (they run its requests), new conversations do not
    all start on the first: the loading ones hold the model as much.
    """
    chain = four()
    assert chain.router.affinity is not None
    first, *others = chain.backends
    first.loaded = frozenset({LLAMA})
    for number in range(3):
        chain.router.affinity.went(bytes([number]) * 16, first, LLAMA)
    loading = [now(chain.router.acquire("k", LLAMA, runs=True, exclude=[
        b for b in chain.backends if b is not backend])) for backend in others]
    lease = turn(chain.router, b"n" * 16)
    assert (lease.backend in others, lease.placement) == (True, "new")
    for held in [*loading, lease]:
        held.release()


def test_new_conversations_are_weighed_against_slots() -> None:
    """
    A new conversation goes to the backend with the fewest conversations
    for each of its slots, and a backend whose effective parallel is
    lowered has fewer: one conversation on its one slot is more crowded
    than two on four.
    """
    chain = four(parallel=4)
    assert chain.router.affinity is not None
    roomy, lowered, third, last = chain.backends
    lowered.effective[LLAMA] = 1
    for number, backend in enumerate([roomy, roomy, lowered, *[third] * 3, *[last] * 3]):
        chain.router.affinity.went(bytes([number]) * 16, backend, LLAMA)
    lease = turn(chain.router, b"n" * 16)
    assert lease.backend is roomy


def test_a_conversation_leaves_a_home_with_more_conversations_than_slots() -> None:
    """
    A home that holds more conversations than it has slots makes their
    turns evict each other's caches; a turn of one of them moves to a
    candidate with a slot no conversation holds, where it misses once and
    then stays.  While no candidate has such a slot, it stays home.
    """
    chain = four(parallel=2)
    affinity = chain.router.affinity
    assert affinity is not None
    first, home, third, last = chain.backends
    owners = [home, home, home, first, first, third, third, last, last]
    for number, backend in enumerate(owners):
        affinity.went(bytes([number]) * 16, backend, LLAMA)
    stays = turn(chain.router, bytes([0]) * 16)
    assert (stays.backend, stays.placement) == (home, "home")
    stays.release()
    affinity.went(bytes([8]) * 16, first, LLAMA)  # the last backend has room now
    lease = turn(chain.router, bytes([0]) * 16)
    assert (lease.backend, lease.placement) == (last, "moved")
    again = turn(chain.router, bytes([0]) * 16)
    assert (again.backend, again.placement) == (last, "home")


def test_past_the_slack_a_turn_moves_only_where_a_slot_has_room() -> None:
    """
    A home past the slack (with a free slot) keeps the turn while every
    candidate's slots all hold living conversations: moved, it would miss
    and evict one of them.  Once a candidate has a slot no living
    conversation holds, the turn moves there.
    """
    chain = four(parallel=4)
    affinity = chain.router.affinity = Affinity(1, chain.clock)
    first, home, third, last = chain.backends
    owners = [home, *[home] * 3, *[first] * 4, *[third] * 4, *[last] * 4]
    for number, backend in enumerate(owners):
        affinity.went(bytes([number]) * 16, backend, LLAMA)
    pinned = [now(chain.router.acquire("k", LLAMA, runs=True, exclude=[first, third, last]))
              for _ in range(2)]
    stays = turn(chain.router, bytes([0]) * 16)  # 2 against 0: past the slack
    assert (stays.backend, stays.placement) == (home, "home")
    stays.release()
    affinity.went(bytes([15]) * 16, first, LLAMA)  # the last backend has room now
    lease = turn(chain.router, bytes([0]) * 16)
    assert (lease.backend, lease.placement) == (last, "moved")
    for held in [*pinned, lease]:
        held.release()


def test_a_conversation_idle_for_long_holds_no_slot() -> None:
    """
    A conversation whose last turn is older than C{live} seconds is still
    remembered (its next turn goes home) but no longer counts as holding a
    slot's cache on its backend: new conversations go there again.
    """
    chain = four()
    affinity = chain.router.affinity = Affinity(2, chain.clock, live=60)
    first, *others = chain.backends
    for number in range(2):
        affinity.went(bytes([number]) * 16, first, LLAMA)
    chain.clock.advance(61)
    for number, backend in enumerate(others, start=2):
        affinity.went(bytes([number]) * 16, backend, LLAMA)
    lease = turn(chain.router, b"n" * 16)
    assert (lease.backend, lease.placement) == (first, "new")
    lease.release()
    again = turn(chain.router, bytes([0]) * 16)
    assert (again.backend, again.placement) == (first, "home")


def test_new_conversations_go_where_a_living_one_ran_the_model() -> None:
    """
    A backend whose listing does not show the model (it is read every few
    seconds) but that ran a living conversation's turn of it has it warm:
    a new conversation may go there though the router's choice has the
    model loaded, while backends where it is cold are left out.
    """
    chain = four()
    affinity = chain.router.affinity
    assert affinity is not None
    loaded, warm = chain.backends[:2]
    loaded.loaded = frozenset({LLAMA})
    for number in range(3):
        affinity.went(bytes([number]) * 16, loaded, LLAMA)
    affinity.went(b"w" * 16, warm, LLAMA)
    lease = turn(chain.router, b"n" * 16)
    assert (lease.backend, lease.placement) == (warm, "new")


def test_conversations_are_counted_per_model() -> None:
    """
    Each model's runner has its own slots: conversations of another model
    on a backend do not crowd a new conversation's model there.
    """
    chain = four(parallel=4)
    affinity = chain.router.affinity
    assert affinity is not None
    first, second, third, last = chain.backends
    for number in range(4):
        affinity.went(bytes([number]) * 16, first, MISTRAL)
    owners = [second, third, third, last, last]
    for number, backend in enumerate(owners, start=4):
        affinity.went(bytes([number]) * 16, backend, LLAMA)
    assert turn(chain.router, b"n" * 16).backend is first


def test_a_new_conversation_goes_past_the_slack_for_a_slot_with_room() -> None:
    """
    When every backend within the slack has each slot's cache held by a
    living conversation, a new conversation goes to one past the slack
    that has a slot no living conversation holds (it has a free slot, so
    it runs at once), rather than start evicting its neighbours' caches.
    """
    chain = four(parallel=4)
    affinity = chain.router.affinity = Affinity(1, chain.clock)
    idle, roomy, *full = chain.backends
    owners = [*[idle] * 4, *[roomy] * 3, *[full[0]] * 4, *[full[1]] * 4]
    for number, backend in enumerate(owners):
        affinity.went(bytes([number]) * 16, backend, LLAMA)
    busy = [now(chain.router.acquire("k", LLAMA, runs=True, exclude=[idle, *full]))
            for _ in range(3)]
    lease = turn(chain.router, b"n" * 16)  # roomy runs 3 against 0: past the slack
    assert (lease.backend, lease.placement) == (roomy, "new")
    for held in [*busy, lease]:
        held.release()
