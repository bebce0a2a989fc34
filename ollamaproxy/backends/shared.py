# -*- test-case-name: tests.backends.test_router -*-
"""
The seam between the router and a fair queue kept outside this process.

The router keeps its own fair queue (L{ollamaproxy.backends.queue}) and the
slots of its backends (L{ollamaproxy.backends.router}): that is the
in-process scheduler.  Under C{--redis}, the slots of each backend's named
models and the order of the requests waiting for them are kept in Redis
instead, for every proxy together (L{ollamaproxy.redis.queue}); the router
then asks a L{SharedQueue} for those slots, and gives the lease back to it.
The shared queue lives in a room above this one, so the router knows it
only by this protocol.

Only a request that runs a model the router can name is asked of the
shared queue; requests that take no slot, and those of
L{ollamaproxy.backends.router.UNREAD_MODEL} (a whole backend), stay in
this process's queue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred

from ollamaproxy.model_names import ModelName

if TYPE_CHECKING:
    from ollamaproxy.backends.pool import Backend
    from ollamaproxy.backends.router import Lease


@dataclass(frozen=True, eq=False)
class Ask:
    """
    A request's ask for a slot of a named model.

    @ivar key: Whose turn it is charged to.
    @ivar model: The model it runs.
    @ivar backends: Where it may run, the best first (the model loaded,
        fewer requests in flight): the shared queue takes the first with a
        free slot.
    @ivar weight: The key's share of turns.
    @ivar cost: What its slot is charged when it is given (trued up at
        release).
    @ivar since: When it came, for the lease's C{queued}.
    @ivar lease: Makes the request's lease on the backend the shared queue
        gave it, under the shared queue's name for the slot (counted in the
        backend's requests in flight, billed for the true-up, and given
        back to the shared queue when it ends).
    @ivar local: Waits for it in this process's queue instead: what the
        shared queue falls back to when it cannot be asked.
    @ivar user: Who it is for behind its key, whose share of the key's
        turns it has (L{ollamaproxy.backends.queue}); L{None} for a key
        that names no users.
    """

    key: str
    model: ModelName
    backends: list[Backend]
    weight: float
    cost: float
    since: float
    lease: Callable[[Backend, str], Lease]
    local: Callable[[], Deferred[Lease]]
    user: str | None = None


class SharedQueue(Protocol):
    """
    Slots and turns kept for many proxies at once.
    """

    def take(self, ask: Ask) -> Deferred[Lease]:
        """
        A lease for C{ask}: at once, or after its turn among the requests
        of every proxy; cancelling it leaves the queue.

        The lease fails with a 503 if too many requests wait, at once or
        when a newcomer takes its place (the fair waiting room,
        L{ollamaproxy.backends.queue}).
        """

    def waiting(self) -> dict[str, int]:
        """
        How many of this proxy's requests each key has waiting in it.
        """

    def give_back(
        self, ticket: str, key: str, charge: float, user: str | None, user_charge: float
    ) -> None:
        """
        The request its C{ticket} (L{Ask.lease}) names has ended (its
        backend's count is already down): free its slot, and move C{key}'s
        finish on by C{charge} (already divided by the key's weight;
        negative when it cost less than charged), and its C{user}'s, if it
        names one, by C{user_charge}, in the key's own time.
        """
