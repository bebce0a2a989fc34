# -*- test-case-name: tests.test_tap -*-
"""
Running the proxy under twistd: the command-line options and the service
they describe.

Both the twistd plugin (C{twistd ollamaproxy ...}) and C{ollamaproxy.tac}
build their service here, from the same L{Options}.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from secrets import token_hex
from typing import TYPE_CHECKING

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from ollamaproxy import __version__
from ollamaproxy.admission.auth import Authenticator
from ollamaproxy.admission.caps import Caps
from ollamaproxy.admission.first_key import keys_to_accept, operator_keys
from ollamaproxy.admission.key_sources import FILE
from ollamaproxy.admission.keys import KeyStore
from ollamaproxy.admission.limits import GuessThrottle, KeyLimits, Limits, Throttle
from ollamaproxy.admission.quotas import QuotaBook, QuotaSeed
from ollamaproxy.admission.reload import KeysReloader, sighup_installer
from ollamaproxy.assembly import Assembled, assemble
from ollamaproxy.backends.headers import via_mark
from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.probe import UpstreamProbe
from ollamaproxy.backends.router import Router
from ollamaproxy.backends.upstream import PoolService, Upstream, agent_for, connection_pool
from ollamaproxy.checks import check_log_dir, check_usage_file
from ollamaproxy.config import Config, ConfigError
from ollamaproxy.open_files import connection_limit, raise_open_files_limit
from ollamaproxy.options import repeating, twistd_options
from ollamaproxy.reactors import IDaemonReactor, daemon_reactor
from ollamaproxy.readiness import Readiness
from ollamaproxy.record.logs import LogFilesService
from ollamaproxy.record.metrics import Metrics, MetricsResource
from ollamaproxy.record.redact import Redactor
from ollamaproxy.record.usage import ThreadWorker, UsageCollector, UsageStore
from ollamaproxy.redis.limits import RedisLimits, RedisThrottle
from ollamaproxy.redis.link import RedisLink, open_link, subscriber
from ollamaproxy.redis.queue import RedisQueue
from ollamaproxy.web.client_address import TrustedProxies
from ollamaproxy.web.cors import Cors
from ollamaproxy.web.in_flight import InFlight
from ollamaproxy.web.site import ProxySite

if TYPE_CHECKING:
    from ollamaproxy.postgres.shared import SharedDatabase

log = Logger()


@twistd_options
class ProxyOptions(usage.Options):
    """
    The options of C{twistd ollamaproxy}, one for each field of
    L{Config} (L{twistd_options}).  Each option can also be given as an
    environment variable, C{OLLAMAPROXY_} and the option's name in capitals
    with C{_} for C{-} (C{--api-key} is C{OLLAMAPROXY_API_KEY}); the option
    wins when both are given.
    """

    synopsis = "[options]"
    longdesc = (
        "An Ollama server that needs a key: relays the whole Ollama API "
        "(/, /api/*, /v1/*, and the same under /proxy/) to an Ollama server, "
        "streaming every response as it comes.  At start the open files "
        "limit is raised to the hard limit, and idle client connections "
        "are closed, the longest idle first, before descriptors run out.  "
        "Every option can also be set "
        "by an environment variable: OLLAMAPROXY_ and the option name in "
        "capitals with _ for - (e.g. OLLAMAPROXY_API_KEY, which keeps the key "
        "out of ps); docs/configuration.md lists them all.  With no key "
        "configured anywhere, the first start makes one, stores its hash in "
        "the keys file, and prints it once."
    )

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        for name in repeating():
            self[name] = []
        self._environ = os.environ if environ is None else environ

    def opt_version(self) -> None:
        """Print the version of ollamaproxy and exit"""
        sys.stdout.write(f"ollamaproxy {__version__}\n")
        sys.stdout.flush()
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.config = Config.from_sources(self, self._environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class Options(ProxyOptions):
    """
    L{ProxyOptions} as twistd and the C{.tac} file read them: a mistake
    stops the start with one line on standard error and a non-zero exit
    status.  (twistd answers a L{usage.UsageError} with its whole help
    screen before the reason, and a C{.tac} file's exception with a
    traceback.)
    """

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(
                f"ollamaproxy: {e} (see 'twistd ollamaproxy --help')"
            ) from None


def makeService(options: Options) -> IService:
    """
    The proxy service for twistd.  Called before twistd starts logging, so a
    key made on first start goes to the terminal only, never into a log.
    """
    from twisted.internet import reactor

    try:
        check_files(options.config)
        return build_service(
            options.config,
            daemon_reactor(reactor),
            announce=_to_terminal,
            open_files=raise_open_files_limit(),
        )
    except (usage.UsageError, ValueError, OSError) as e:
        # A bad endpoint string, an unreadable keys file or TLS key: say
        # what is wrong, without a traceback.
        raise SystemExit(f"ollamaproxy: {e}") from None


def check_files(config: Config) -> None:
    """
    See that the files the proxy writes can be written: the log directory
    and the usage database; then say where usage is kept.

    @raise ConfigError: If one cannot, saying why.
    """
    if config.log_dir:
        check_log_dir(config.log_dir)
    check_usage_file(config.usage_file)
    # The check opened an existing file: at start, as for PostgreSQL and
    # Redis, a line says which engine is in use and whether it answered.
    answered = (
        "it opens" if os.path.exists(config.usage_file) else "new, it is made at start"
    )
    if config.database:
        log.info(
            "The SQLite file {path} keeps usage while PostgreSQL does not answer: {answered}",
            path=config.usage_file,
            answered=answered,
        )
    else:
        log.info("Usage is kept in the SQLite file {path}: {answered}",
                 path=config.usage_file, answered=answered)


def listen(description: str, factory: Site, reactor: IDaemonReactor, option: str) -> IService:
    """
    A service listening on an endpoint string.

    @raise ConfigError: If the string does not describe an endpoint the
        proxy can listen on, naming the option and the string.
    """
    try:
        return strports.service(description, factory, reactor=reactor)
    except Exception as e:
        reason = str(e) or type(e).__name__
        unknown = re.search(r"unexpected keyword argument '([^']*)'", reason)
        if unknown:
            reason = f"unknown parameter {unknown.group(1)!r}"
        elif isinstance(e, ValueError) and "invalid literal for int()" in reason:
            reason = "the port must be a number"
        elif description.startswith("ssl:") and isinstance(e, OSError):
            reason += " (an ssl: endpoint needs privateKey=KEY.pem and certKey=CERT.pem)"
        raise ConfigError(
            f"{option}: cannot listen on {description!r}: {reason}; for example tcp:5000, "
            "tcp:5000:interface=127.0.0.1 or ssl:5443:privateKey=key.pem:certKey=cert.pem"
        ) from None


def _shared_database(
    config: Config, reactor: IDaemonReactor, now: datetime, announce: Callable[[str], None]
) -> SharedDatabase:
    """
    Connect to C{--database} at start (L{ollamaproxy.postgres.shared}).

    @raise ConfigError: If the proxy cannot start with it.
    """
    try:
        from ollamaproxy.postgres.shared import SharedDatabase
    except ImportError:
        raise ConfigError(
            "--database needs psycopg: pip install 'ollamaproxy[postgresql]'"
        ) from None
    return SharedDatabase.at_start(config, reactor, now, announce)


def _to_terminal(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


class StopInOrder(MultiService):
    """
    A L{MultiService} that stops its children one after another, the last
    started first, each after the one before has finished stopping.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        stopped: Deferred[None] = succeed(None)
        for child in reversed(list(self)):
            stopped.addBoth(_stop, child)
        return stopped


def _stop(_: object, service: IService) -> Deferred[None]:
    return maybeDeferred(service.stopService)


class Listeners(MultiService):
    """
    The listening endpoints.  One that cannot listen (a port in use, say)
    stops the start with a one-line reason rather than a traceback.
    """

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"ollamaproxy: {e}") from None


class DrainDelay(Service):
    """
    The first service to stop: it says what is draining and for how long,
    turns C{/-/ready} to 503 (L{InFlight.withdraw}), and with
    C{--drain-delay} keeps the ports open that long.  A load balancer
    learns of the stop only at its next probe and routes requests here
    until then; refused at a closed port, they would fail.

    @param clock: Times the delay.
    """

    def __init__(
        self, in_flight: InFlight, delay: float, grace_period: float, clock: IReactorTime
    ) -> None:
        self._in_flight = in_flight
        self._delay = delay
        self._grace_period = grace_period
        self._clock = clock

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        self._in_flight.withdraw()
        if not self._delay:
            self._ports_close("Stopping")
            return None
        log.info(
            "Stopping with {count} request(s) in flight: /-/ready answers 503 while requests "
            "are still served for {delay:g} s (--drain-delay), then the ports close and the "
            "requests in flight get up to {grace:g} s to finish (--grace-period)",
            count=len(self._in_flight),
            delay=self._delay,
            grace=self._grace_period,
        )
        return deferLater(self._clock, self._delay, self._ports_close, "Drain delay over")

    def _ports_close(self, why: str) -> None:
        log.info(
            "{why}: the ports close; {count} request(s) in flight get up to {grace:g} s to "
            "finish (--grace-period)",
            why=why,
            count=len(self._in_flight),
            grace=self._grace_period,
        )


class DrainService(Service):
    """
    On stop, lets requests in flight finish for a grace period.
    """

    def __init__(self, in_flight: InFlight, grace_period: float) -> None:
        self._in_flight = in_flight
        self._grace_period = grace_period

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self._in_flight.drain(self._grace_period)


def build_service(
    config: Config,
    reactor: IDaemonReactor,
    announce: Callable[[str], None],
    open_files: int | None = None,
) -> MultiService:
    """
    Wire the proxy together: keys, the upstream client, the pipeline, the
    listening endpoints and the log files.

    @param reactor: The reactor to listen, connect and tell time with.
    @param announce: Shows text to the person starting the proxy (a key made
        on first start).
    @param open_files: The limit on open files, which bounds the client
        connections kept open; L{None} for no bound.
    """
    keys, shared = _keys(config, reactor, announce)
    pool = connection_pool(reactor)
    backends = _backends(config, reactor, pool)
    metrics = Metrics()
    backend_pool = BackendPool(backends, on_load=metrics.model_loaded)
    router = _router(config, reactor, backend_pool)
    readiness = Readiness()
    usage_store = _usage_store(config, reactor, shared, readiness, metrics)
    quotas = _quotas(reactor, readiness, metrics)
    redis = _redis(config, reactor, readiness, metrics)
    limits, throttle = _limits(config, reactor, quotas, redis)
    assembled = _proxy(config, keys, router, limits, throttle, reactor, metrics, usage_store,
                       readiness)
    site = _site(config, assembled, reactor, metrics, open_files)
    # Stopping runs bottom-up: say so on /-/ready (and keep serving for
    # --drain-delay), stop listening, let requests in flight finish, write
    # the last usage, close Ollama connections, and only then close the
    # log files.
    children: list[IService] = [
        *_log_files(config),
        PoolService(pool),
        backend_pool,
        usage_store,
        assembled.recorder,  # Stops before the store: writes what it holds.
        # The store's first work is making the file, the next this read.
        QuotaSeed(quotas, reactor, usage_store.tokens_by_key),
        # Stops after the requests in flight have ended and released.
        *([] if redis is None else [redis, _shared_queue(config, reactor, router, redis)]),
        *_key_watchers(config, keys, shared, reactor),
        DrainService(assembled.in_flight, config.grace_period),
        # The console's sampler; it stops before the drain, ending open feeds.
        assembled.console.sampler,
        _listeners(config, site, metrics, readiness, reactor),
        # It stops before the pool it uses is closed (and after the drain
        # delay, during which requests are still routed by its probes).
        UpstreamProbe([backend.upstream for backend in backends]),
        # Last: it stops first, turning /-/ready to 503 before the ports
        # close.
        DrainDelay(assembled.in_flight, config.drain_delay, config.grace_period, reactor),
    ]
    service = StopInOrder()
    for child in children:
        child.setServiceParent(service)
    return service


def _router(config: Config, reactor: IReactorTime, pool: BackendPool) -> Router:
    """
    The router that gives requests their backends, with the fair queue's
    options.
    """
    return Router(pool, reactor, config.max_queue, config.queue_timeout, config.fair_share,
                  config.output_token_weight, config.affinity_slack, config.switch_hold)


def _shared_queue(
    config: Config, reactor: IDaemonReactor, router: Router, redis: RedisLink
) -> RedisQueue:
    """
    The fair queue and the named models' slots, shared through C{redis} by
    every proxy using it; it stops before the link (started after it).
    """
    assert config.redis is not None
    return RedisQueue(redis, router, reactor, subscriber(config.redis, reactor),
                      config.redis_lease, config.max_queue, config.queue_timeout)


def _keys(
    config: Config, reactor: IDaemonReactor, announce: Callable[[str], None]
) -> tuple[KeyStore, SharedDatabase | None]:
    """
    The keys the proxy accepts: from C{--api-key} and the keys file (made,
    with a first key, if there is none), or with C{--database} from the
    database too.

    @return: The keys, and the database if there is one.
    """
    now = datetime.fromtimestamp(reactor.seconds(), UTC)
    if not config.database:
        return keys_to_accept(config.api_key, config.keys_file, now, announce), None
    shared = _shared_database(config, reactor, now, announce)
    return shared.store, shared


def _backends(config: Config, reactor: IDaemonReactor, pool: HTTPConnectionPool) -> list[Backend]:
    """
    One backend for each C{--upstream}, all connecting through C{pool}.
    """
    agent = agent_for(reactor, pool, config.connect_timeout)
    # A token of this process's own, so that a chain of proxies works and
    # only a request coming back to this very process is a loop.
    via = via_mark(token_hex(6))
    return [
        Backend(
            Upstream(
                agent=agent,
                base=setting.url.encode("ascii"),
                clock=reactor,
                header_timeout=config.header_timeout,
                idle_timeout=config.idle_timeout,
                via=via,
            ),
            setting.parallel,
        )
        for setting in config.upstreams
    ]


def _usage_store(
    config: Config,
    reactor: IDaemonReactor,
    shared: SharedDatabase | None,
    readiness: Readiness,
    metrics: Metrics,
) -> UsageStore:
    """
    Where usage is recorded: the usage file, or with C{--database} the
    database, and the metrics that count it.
    """
    usage_worker = ThreadWorker(reactor)
    if shared is None:
        usage_store = UsageStore(config.usage_file, reactor, worker=usage_worker)
    else:
        usage_store = shared.usage_store(usage_worker)
        # Reported, not required: the proxy serves without PostgreSQL
        # (README, "When PostgreSQL is down"), and every proxy turning
        # not-ready at once would make its outage a full one.
        readiness.add("database", lambda: shared.ready, required=False)
    metrics.registry.register(
        UsageCollector(usage_store, None if shared is None else lambda: shared.ready)
    )
    return usage_store


def _quotas(reactor: IDaemonReactor, readiness: Readiness, metrics: Metrics) -> QuotaBook:
    """
    The keys' token quotas.  They count from what the usage store recorded
    this day and month (with C{--database}, every proxy's); keys with a
    quota wait (503) until that is read.
    """
    quotas = QuotaBook(reactor, metrics.quota_refused)
    readiness.add("quotas", lambda: quotas.loaded)
    return quotas


def _redis(
    config: Config, reactor: IDaemonReactor, readiness: Readiness, metrics: Metrics
) -> RedisLink | None:
    """
    The link to C{--redis}, if one is given.
    """
    if config.redis is None:
        return None
    return open_link(config.redis, config.redis_failure, config.redis_lease, reactor,
                     readiness, metrics.registry)


def _limits(
    config: Config, reactor: IDaemonReactor, quotas: QuotaBook, redis: RedisLink | None
) -> tuple[Limits, Throttle]:
    """
    Each key's limits and the wrong-key throttle: kept in this process, or
    shared by every proxy using C{redis}, with the in-process ones standing
    in while it is down (C{--redis-failure}).
    """
    limits = KeyLimits(reactor, quotas)
    guesses = GuessThrottle(reactor)
    if redis is None:
        return limits, guesses
    return (
        RedisLimits(redis, limits, reactor, config.redis_failure, config.redis_lease,
                    quotas=quotas),
        RedisThrottle(redis, guesses, reactor),
    )


def _clear_keys(config: Config) -> list[str]:
    """
    The keys known in clear, to blank wherever they show: the C{--api-key},
    whatever its shape.  (The keys file's keys are known by digest and
    blanked word by word.)
    """
    return [config.api_key] if config.api_key else []


def _caps(config: Config, router: Router) -> Caps:
    """
    The caps on C{keep_alive} and C{num_ctx}, with the context rule's
    source of loaded contexts, the router, unless C{--keep-loaded-context
    no}.
    """
    return Caps(config.max_keep_alive, config.max_num_ctx,
                router.loaded_context if config.keep_loaded_context else None)


def _proxy(
    config: Config,
    keys: KeyStore,
    router: Router,
    limits: Limits,
    throttle: Throttle,
    reactor: IDaemonReactor,
    metrics: Metrics,
    usage_store: UsageStore,
    readiness: Readiness,
) -> Assembled:
    """
    The pipeline and its parts, from the settings and the parts it works
    with.
    """
    return assemble(
        router,
        Authenticator(keys, config.open_routes, reactor),
        limits,
        reactor,
        metrics,
        readiness,
        cors=Cors(config.cors_origins),
        usage=usage_store,
        body_sample_bytes=config.body_sample_bytes,
        redact=Redactor(keys.is_key, _clear_keys(config)),
        trusted_proxies=TrustedProxies(config.trusted_proxies),
        caps=_caps(config, router),
        throttle=throttle,
    )


def _site(
    config: Config, assembled: Assembled, reactor: IDaemonReactor, metrics: Metrics,
    open_files: int | None,
) -> ProxySite:
    """
    The HTTP server in front of the app: timeouts, body limits, and as
    many connections as the open files limit allows.
    """
    return ProxySite(
        assembled.proxy.resource(),
        config.client_timeout,
        config.max_body_size,
        reactor,
        body_sample_bytes=config.body_sample_bytes,
        min_body_rate=config.min_body_rate,
        max_connections=0 if open_files is None else connection_limit(open_files),
        record=assembled.recorder.record,
        count_shed=metrics.connection_shed,
    )


def _log_files(config: Config) -> list[IService]:
    """
    The rotating log files, if C{--log-dir} is given.
    """
    if not config.log_dir:
        return []
    return [
        LogFilesService(
            config.log_dir,
            globalLogPublisher,
            config.log_max_bytes,
            config.log_backups,
            Redactor(secrets=_clear_keys(config)),
        )
    ]


def _key_watchers(
    config: Config, keys: KeyStore, shared: SharedDatabase | None, reactor: IDaemonReactor
) -> list[IService]:
    """
    What keeps the keys current: the keys file, reloaded when it changes or
    on SIGHUP, and with C{--database} the database, polled.
    """
    reloader = KeysReloader(
        keys if shared is None else shared.sources.part(FILE),
        config.keys_file,
        operator_keys(config.api_key) if shared is None else [],
        reactor,
        # Looked up when a signal comes, not now: test reactors lack it.
        install_sighup=sighup_installer(lambda f: reactor.callFromThread(f)),
    )
    return [reloader] if shared is None else [reloader, shared.keys_poller()]


def _listeners(
    config: Config, site: Site, metrics: Metrics, readiness: Readiness, reactor: IDaemonReactor
) -> Listeners:
    """
    The endpoints of C{--listen} serving C{site}, and of C{--metrics-listen}
    serving the metrics alone.
    """
    listeners = Listeners()
    for endpoint in config.listen:
        if endpoint.startswith(("tcp:", "reuseport:")) and "interface=" not in endpoint:
            log.warn(
                "Listening on {endpoint} on every interface without TLS: keys "
                "cross the network in clear text.  Use an ssl: endpoint, or a "
                "TLS terminator in front.",
                endpoint=endpoint,
            )
        listen(endpoint, site, reactor, "--listen").setServiceParent(listeners)
    if config.metrics_listen:
        metrics_site = Site(MetricsResource(metrics, readiness), reactor=reactor)
        metrics_site.noisy = False
        listen(config.metrics_listen, metrics_site, reactor, "--metrics-listen").setServiceParent(
            listeners
        )
    return listeners
