# -*- test-case-name: tests.redis.test_link -*-
"""
The connection to Redis, and whether Redis is up.

Every call has a timeout, so a request waits a second or two at most for
Redis, never for ever.  One failed call marks Redis down: from then on the
limits answer without asking it (L{ollamaproxy.redis.limits}), and a
C{PING} every few seconds tells when it is back.  Each change is logged
once, and shown by the metric C{ollamaproxy_redis_up}.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from secrets import token_hex
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ollamaproxy.errors import ConfigError
from ollamaproxy.reactors import IDaemonReactor
from ollamaproxy.readiness import Readiness
from ollamaproxy.redis_address import RedisAddress

log = Logger()

# Long enough for a Redis across a data centre under load, short enough
# that a request refused or let in without it still gets an answer soon.
DEFAULT_TIMEOUT = 1.5


class RedisDown(Exception):
    """
    Redis could not be asked: it is down, or did not answer in time.
    """


class RedisClient(Protocol):
    """
    What the link needs of a Redis client (txredisapi's has it).
    """

    def eval(self, script: str, keys: list[str] = ..., args: list[Any] = ...) -> Deferred[Any]:
        """
        Run a Lua script (by its digest once Redis knows it).
        """

    def ping(self) -> Deferred[Any]:
        """
        Ask Redis whether it is there.
        """

    def disconnect(self) -> Deferred[Any]:
        """
        Close the connection and stop reconnecting.
        """


class RedisLink(Service):
    """
    Calls Redis with a timeout, and knows whether it is up.

    @ivar up: Whether the last call succeeded.  L{False} until the first
        C{PING} has its answer.
    @param connect: Makes a client that connects (and reconnects) to Redis;
        called again if a client gives up (see L{TxRedisClient.gave_up}).
    @param clock: Times the calls out, and the rounds.
    @param shown: Names Redis in logs (no password).
    @param while_down: What the log says the proxy does while Redis is
        down (the failure policy).
    @param interval: Seconds between rounds: a C{PING}, then, if Redis
        answered, the C{each_round} work.
    @param registry: Where the metric C{ollamaproxy_redis_up} goes.
    """

    def __init__(
        self,
        connect: Callable[[], RedisClient],
        clock: IReactorTime,
        shown: str,
        while_down: str,
        interval: float = 5.0,
        timeout: float = DEFAULT_TIMEOUT,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._connect = connect
        self._client: RedisClient | None = None
        self._clock = clock
        self._shown = shown
        self._while_down = while_down
        self._timeout = timeout
        self._interval = interval
        self._rounds: list[Callable[[], Deferred[Any]]] = []
        self._on_down: list[Callable[[], None]] = []
        self._loop: LoopingCall | None = None
        self._known = False
        self.up = False
        #: This proxy's name in Redis, at random: what it names there (its
        #: requests' leases, its queue's tickets and channel) is its own.
        self.instance = token_hex(6)
        self._serial = itertools.count()
        self._gauge = Gauge(
            "ollamaproxy_redis_up",
            "1 while the Redis that keeps the shared limits answers, 0 while not.",
            registry=registry,
        )
        self._gauge.set(0)

    def unique(self) -> str:
        """
        A name that no other proxy on this Redis gives, nor this one again.
        """
        return f"{self.instance}:{next(self._serial)}"

    def each_round(self, work: Callable[[], Deferred[Any]]) -> None:
        """
        Run C{work} every round while Redis is up (renewing leases, adding
        tokens counted while it was down).
        """
        self._rounds.append(work)

    def on_down(self, react: Callable[[], None]) -> None:
        """
        Call C{react} each time Redis goes down (not at a start that finds
        it down): what waits for an answer from Redis must stop waiting.
        """
        self._on_down.append(react)

    def call(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        """
        Run a script in Redis.

        @return: Fires with its answer, or fails with L{RedisDown} (at once
            if Redis is known to be down, else within the timeout).
        """
        if not self.up or self._client is None:
            return fail(RedisDown(f"Redis at {self._shown} is down"))
        return self._ask(self._client.eval(script, keys, args))

    def _ask(self, asked: Deferred[Any]) -> Deferred[Any]:
        asked.addTimeout(self._timeout, self._clock)
        asked.addErrback(self._failed)
        return asked

    def _failed(self, failure: Failure) -> Failure:
        reason = _reason(failure)
        self._went_down(reason)
        return Failure(RedisDown(reason))

    def _went_down(self, reason: str) -> None:
        was_up = self.up
        if self.up or not self._known:
            log.warn(
                "Redis at {redis} cannot be reached ({reason}): {policy}",
                redis=self._shown,
                reason=reason,
                policy=self._while_down,
            )
        self.up = False
        self._known = True
        self._gauge.set(0)
        if was_up:
            for react in self._on_down:
                react()

    def _came_up(self) -> None:
        if not self.up:
            if self._known:
                log.info("Redis at {redis} answers again: limits and the fair queue are "
                         "shared again",
                         redis=self._shown)
            else:
                log.info("Limits are shared through Redis at {redis}", redis=self._shown)
        self.up = True
        self._known = True
        self._gauge.set(1)

    async def round(self) -> None:
        """
        One round: see whether Redis is (still, again) up, then do the work
        of each round.  Never fails.
        """
        if self._client is None:
            return
        if not self.up and getattr(self._client, "gave_up", False):
            # txredisapi stops for good after a refused login; Redis may
            # have been loading, or the password changed back.
            stale, self._client = self._client, self._connect()
            stale.disconnect().addErrback(lambda _: None)
        # Also while up: a proxy that has nothing to ask Redis learns of an
        # outage all the same.
        try:
            await self._ask(self._client.ping())
        except RedisDown:
            return
        self._came_up()
        for work in self._rounds:
            try:
                await work()
            except RedisDown:
                return
            except Exception:
                # A mistake of ours must not stop the rounds, and with them
                # the renewals and the PINGs.
                log.failure("A round of the Redis link failed")

    def startService(self) -> None:
        super().startService()
        self._client = self._connect()
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.round()))
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("The Redis round failed", f)
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        client, self._client = self._client, None
        self.up = False
        if client is None:
            return None
        stopped: Deferred[None] = client.disconnect()
        stopped.addErrback(lambda _: None)
        return stopped


def _reason(failure: Failure) -> str:
    from twisted.internet.defer import CancelledError, TimeoutError

    if failure.check(TimeoutError, CancelledError):
        return "no answer in time"
    return f"{type(failure.value).__name__}: {failure.value}"


class TxRedisClient:
    """
    A txredisapi client on one connection, reconnecting when it is lost.

    Built from txredisapi's factory rather than its C{lazyConnection}, so
    that the connection uses our reactor's endpoint, checks a TLS server's
    certificate against its host name, and retries every few seconds at
    most.
    """

    def __init__(self, address: RedisAddress, reactor: IReactorTCP, timeout: float) -> None:
        import txredisapi  # type: ignore[import-untyped]

        self._factory = txredisapi.RedisFactory(
            address.shown,
            address.db or None,
            1,
            isLazy=True,
            password=address.password,
            username=address.username,
            replyTimeout=timeout,
        )
        # Reconnect within a few seconds of Redis's return.
        self._factory.maxDelay = 2
        # What the first connection attempt makes of the factory's Deferred
        # is told by the link's PING instead.
        self._factory.deferred.addErrback(lambda _: None)
        _connect(self._factory, address, reactor, timeout)
        self._handler = self._factory.handler

    @property
    def gave_up(self) -> bool:
        """
        Whether it stopped reconnecting of its own (a refused login).
        """
        return bool(self._factory.stopped and not self._factory.disconnectCalled)

    def eval(self, script: str, keys: list[str] = [], args: list[Any] = []) -> Deferred[Any]:  # noqa: B006
        d: Deferred[Any] = self._handler.eval(script, keys, args)
        return d

    def ping(self) -> Deferred[Any]:
        d: Deferred[Any] = self._handler.ping()
        return d

    def disconnect(self) -> Deferred[Any]:
        d: Deferred[Any] = self._factory.disconnect()
        return d


def _connect(factory: Any, address: RedisAddress, reactor: IReactorTCP, timeout: float) -> None:
    """
    Start C{factory}'s connection to C{address} through our reactor's
    endpoint, checking a TLS server's certificate against its host name.
    """
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
    from twisted.internet.ssl import optionsForClientTLS

    endpoint: Any = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    if address.tls:
        endpoint = wrapClientTLS(optionsForClientTLS(address.host), endpoint)
    factory.startConnecting(endpoint)


class Subscription(Protocol):
    """
    A channel listened to.
    """

    def close(self) -> Deferred[Any]:
        """
        Stop listening, and close the connection.
        """


#: Listens to a channel: each message, as text, goes to the callable.
Subscribe = Callable[[str, Callable[[str], None]], Subscription]


class TxRedisSubscription:
    """
    A txredisapi connection of its own (one that has subscribed can send no
    other command) that listens to one channel, subscribing again each time
    it reconnects.  Messages published while it is away are lost: what
    listens must not depend on them alone.
    """

    def __init__(
        self,
        address: RedisAddress,
        reactor: IReactorTCP,
        timeout: float,
        channel: str,
        heard: Callable[[str], None],
    ) -> None:
        import txredisapi
        from twisted.internet.defer import inlineCallbacks

        class Listener(txredisapi.SubscriberProtocol):  # type: ignore[misc]
            @inlineCallbacks
            def connectionMade(self) -> Any:
                yield txredisapi.SubscriberProtocol.connectionMade(self)
                if not self.connected:
                    return
                try:
                    answer = yield self.subscribe(channel)
                    if isinstance(answer, Exception):
                        raise answer
                except Exception as e:
                    # A user not allowed SUBSCRIBE or the channel: grants
                    # then come only with each round, seconds late.
                    log.warn("Redis refused to let this proxy listen on {channel} ({reason}): "
                             "the fair queue's grants wait for the next round",
                             channel=channel, reason=str(e))

            def messageReceived(self, pattern: object, to: object, message: object) -> None:
                heard(message.decode() if isinstance(message, bytes) else str(message))

        self._factory = txredisapi.RedisFactory(
            address.shown, address.db or None, 1, isLazy=True, password=address.password,
            username=address.username,
        )
        self._factory.protocol = Listener
        self._factory.maxDelay = 2
        self._factory.deferred.addErrback(lambda _: None)
        _connect(self._factory, address, reactor, timeout)

    def close(self) -> Deferred[Any]:
        d: Deferred[Any] = self._factory.disconnect()
        return d


def subscriber(address: RedisAddress, reactor: IReactorTCP) -> Subscribe:
    """
    How the proxy listens to a channel of the Redis at C{address}.
    """
    return lambda channel, heard: TxRedisSubscription(address, reactor, DEFAULT_TIMEOUT,
                                                      channel, heard)


_WHILE_DOWN = {
    "local": "until it answers, this proxy keeps each key's limits, and its own fair "
    "queue, by itself (--redis-failure local)",
    "closed": "until it answers, keys with limits get 503, and this proxy keeps its own "
    "fair queue (--redis-failure closed)",
}


def open_link(
    address: RedisAddress,
    policy: str,
    lease: float,
    reactor: IDaemonReactor,
    readiness: Readiness,
    registry: CollectorRegistry,
) -> RedisLink:
    """
    The link to the Redis of C{--redis}, as the proxy runs it: a round six
    times a lease, and ready while Redis answers (or, under the C{local}
    policy, always: the proxy serves without it).

    @raise ConfigError: If the Redis client is not installed.
    """
    need_client()
    link = RedisLink(
        lambda: TxRedisClient(address, reactor, DEFAULT_TIMEOUT),
        reactor,
        address.shown,
        _WHILE_DOWN[policy],
        interval=lease / 6,
        registry=registry,
    )
    readiness.add("redis", lambda: link.up, required=policy == "closed")
    return link


def need_client() -> None:
    """
    See that the Redis client library is installed.

    @raise ConfigError: If it is not, saying what to install.
    """
    try:
        import txredisapi  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--redis: the Redis client is not installed: pip install 'ollamaproxy[redis]'"
        ) from None
