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
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage
from twisted.web.server import Site

from ollamaproxy import __version__
from ollamaproxy.admission.auth import Authenticator
from ollamaproxy.admission.first_key import keys_to_accept, operator_keys
from ollamaproxy.admission.key_sources import FILE
from ollamaproxy.admission.limits import GuessThrottle, KeyLimits, Limits, Throttle
from ollamaproxy.admission.quotas import QuotaBook, QuotaSeed
from ollamaproxy.admission.reload import KeysReloader, sighup_installer
from ollamaproxy.assembly import assemble
from ollamaproxy.backends.headers import via_mark
from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.probe import UpstreamProbe
from ollamaproxy.backends.router import Router
from ollamaproxy.backends.upstream import PoolService, Upstream, agent_for, connection_pool
from ollamaproxy.checks import check_log_dir, check_usage_file
from ollamaproxy.config import (
    DEFAULT_CLIENT_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LOG_BACKUPS,
    DEFAULT_LOG_BODY_BYTES,
    DEFAULT_LOG_MAX_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MIN_BODY_RATE,
    DEFAULT_OPEN_ROUTES,
    DEFAULT_PARALLEL,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_REDIS_FAILURE,
    DEFAULT_REDIS_LEASE,
    Config,
    ConfigError,
)
from ollamaproxy.descriptors import connection_limit, raise_open_files_limit
from ollamaproxy.readiness import Readiness
from ollamaproxy.record.logs import LogFilesService
from ollamaproxy.record.metrics import Metrics, MetricsResource
from ollamaproxy.record.redact import Redactor
from ollamaproxy.record.usage import ThreadWorker, UsageCollector, UsageStore
from ollamaproxy.redis.limits import RedisLimits, RedisThrottle
from ollamaproxy.redis.link import RedisLink, open_link
from ollamaproxy.web.cors import Cors
from ollamaproxy.web.in_flight import InFlight
from ollamaproxy.web.site import ProxySite

if TYPE_CHECKING:
    from ollamaproxy.postgres.shared import SharedDatabase

log = Logger()


class ProxyOptions(usage.Options):
    """
    The options of C{twistd ollamaproxy}.  Each option can also be given as
    an environment variable, C{OLLAMAPROXY_} and the option's name in capitals
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
        "out of ps).  With no key configured anywhere, the first start makes "
        "one, stores its hash in the keys file, and prints it once."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        ["parallel", None, None,
         "Requests each backend may run at once for each model (Ollama's "
         "OLLAMA_NUM_PARALLEL); more wait in a queue, served in turn across keys "
         f"[default: {DEFAULT_PARALLEL}]"],
        ["max-queue", None, None,
         "Requests that may wait in all; beyond it 503 with Retry-After "
         f"[default: {DEFAULT_MAX_QUEUE}]"],
        ["queue-timeout", None, None,
         "Seconds a request may wait for a busy model before it gets 503 "
         f"[default: {DEFAULT_QUEUE_TIMEOUT:g}]"],
        ["max-keep-alive", None, None,
         "Longest keep_alive a request may ask for (10m, 1h); one over it, or -1 "
         "(for ever), is clamped to it [default: none]"],
        ["max-num-ctx", None, None,
         "Largest options.num_ctx a request may ask for; larger is clamped to it "
         "[default: none]"],
        ["api-key", None, None,
         "A key clients must send (Authorization: Bearer KEY or X-API-Key: "
         "KEY), at least 16 characters.  Prefer OLLAMAPROXY_API_KEY: options show in ps."],
        ["keys-file", None, None,
         "JSON file of named, hashed keys [default: "
         "$XDG_CONFIG_HOME/ollamaproxy/keys.json or ~/.config/ollamaproxy/keys.json]"],
        ["log-dir", None, None,
         "Directory for rotating log files (ollamaproxy.log, ollamaproxy.json) "
         "[default: none]"],
        ["open-routes", None, None,
         "Comma-separated 'METHOD /path' routes served without a key; '' for "
         f"none [default: {DEFAULT_OPEN_ROUTES}]"],
        ["connect-timeout", None, None,
         f"Seconds to wait for a connection to Ollama [default: {DEFAULT_CONNECT_TIMEOUT:g}]"],
        ["header-timeout", None, None,
         "Seconds to wait for Ollama's response head; with \"stream\": false "
         "that is the whole answer [default: "
         f"{DEFAULT_HEADER_TIMEOUT:g}]"],
        ["idle-timeout", None, None,
         "Seconds Ollama may stay silent in the middle of a response "
         f"[default: {DEFAULT_IDLE_TIMEOUT:g}]"],
        ["client-timeout", None, None,
         "Seconds a client may take to send a request's line and headers, and "
         "may stay silent while sending a body or between requests "
         f"[default: {DEFAULT_CLIENT_TIMEOUT:g}]"],
        ["cors-origins", None, None,
         "Comma-separated browser origins allowed to call the proxy (one * "
         "wildcard each; '*' for all, '' for none but the proxy's own host) "
         "[default: browser extensions, localhost pages, app://, file://, "
         "tauri://, vscode-webview://, vscode-file://]"],
        ["usage-file", None, None,
         "SQLite database of requests and tokens per key and model (see "
         "'ollamaproxy usage'); keys' token quotas count from it at start "
         "[default: $XDG_STATE_HOME/ollamaproxy/usage.sqlite3 "
         "or ~/.local/state/ollamaproxy/usage.sqlite3]"],
        ["metrics-listen", None, None,
         "A separate endpoint serving Prometheus metrics without a key, e.g. "
         "tcp:9100:interface=127.0.0.1 [default: none; /metrics on the main "
         "endpoints needs an admin key]"],
        ["log-max-bytes", None, None,
         "Size at which a log file is rotated, in bytes or with K, M, G "
         f"[default: {DEFAULT_LOG_MAX_BYTES}]"],
        ["log-backups", None, None,
         f"Rotated log files kept of each kind [default: {DEFAULT_LOG_BACKUPS}]"],
        ["log-body-bytes", None, None,
         "With --log-bodies: how much of each body is logged "
         f"[default: {DEFAULT_LOG_BODY_BYTES}]"],
        ["max-body-size", None, None,
         "Largest request body accepted (413 beyond it), in bytes or with K, M, "
         "G, T; 0 for no limit [default: 0: model uploads are often tens of GB]"],
        ["min-body-rate", None, None,
         "Slowest a request body may arrive once the proxy reads it, in bytes "
         "a second (K, M suffixes) averaged over each --client-timeout; a "
         "slower client gets 408 and is dropped; 0 for no minimum "
         f"[default: {DEFAULT_MIN_BODY_RATE}]"],
        ["trusted-proxies", None, None,
         "Comma-separated addresses and networks (10.0.0.5, 10.0.0.0/8, fd00::/8) of "
         "the proxies in front (TLS terminators, load balancers) whose X-Forwarded-For "
         "or Forwarded header names the client, for logs and limits; ignored from "
         "anyone else [default: none]"],
        ["database", None, None,
         "A postgresql:// URL: usage per key and model, and keys, shared by every proxy "
         "using it (see 'ollamaproxy usage --database', 'ollamaproxy keys ... --database'); "
         "the usage file then only keeps usage while the database is down. Prefer "
         "OLLAMAPROXY_DATABASE when the URL holds a password [default: none]"],
        ["grace-period", None, None,
         "Seconds requests in flight get to finish when the proxy stops "
         f"(SIGTERM) [default: {DEFAULT_GRACE_PERIOD:g}]"],
        ["redis", None, None,
         "Keep each key's rpm, max_streams and token quotas, and the wrong-key "
         "throttle, in this Redis, shared by every proxy using it: "
         "redis://[user:password@]host:port/db, rediss:// for TLS; prefer "
         "OLLAMAPROXY_REDIS when there is a password [default: none; in this process]"],
        ["redis-failure", None, None,
         "While Redis cannot be reached: 'local' (this proxy keeps the limits "
         "itself) or 'closed' (keys with limits get 503) "
         f"[default: {DEFAULT_REDIS_FAILURE}]"],
        ["redis-lease", None, None,
         "Seconds a request stays counted in Redis after its proxy died "
         f"(its lease is renewed six times as often) [default: {DEFAULT_REDIS_LEASE:g}]"],
    ]

    optFlags: ClassVar[list[list[str | None]]] = [
        ["log-bodies", None,
         "Log the start of every request and response body, for debugging "
         "(credentials in them are blanked; off by default)"],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self["listen"] = []
        self["upstream"] = []
        self._environ = os.environ if environ is None else environ

    def opt_upstream(self, url: str) -> None:
        """An Ollama server to relay to, read like OLLAMA_HOST; repeatable, for several servers behind one proxy; URL#parallel=N where its parallelism differs [default: $OLLAMA_HOST, else http://127.0.0.1:11434]"""  # noqa: E501
        self["upstream"].append(url)

    opt_u = opt_upstream

    def opt_listen(self, endpoint: str) -> None:
        """Endpoint to accept clients on (a Twisted endpoint string, repeatable; for TLS: ssl:5443:privateKey=key.pem:certKey=cert.pem; reuseport:5000 to share the port with other ollamaproxy processes) [default: tcp:5000]"""  # noqa: E501
        self["listen"].append(endpoint)

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
            reactor,
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
    and the usage database.

    @raise ConfigError: If one cannot, saying why.
    """
    if config.log_dir:
        check_log_dir(config.log_dir)
    check_usage_file(config.usage_file)


def listen(description: str, factory: Site, reactor: Any, option: str) -> IService:
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
    config: Config, reactor: Any, now: datetime, announce: Callable[[str], None]
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
    reactor: Any,
    announce: Callable[[str], None],
    open_files: int | None = None,
) -> MultiService:
    """
    Wire the proxy together: keys, the upstream client, the Klein app, the
    listening endpoints and the log files.

    @param reactor: The reactor to listen, connect and tell time with.
    @param announce: Shows text to the person starting the proxy (a key made
        on first start).
    @param open_files: The limit on open files, which bounds the client
        connections kept open; L{None} for no bound.
    """
    now = datetime.fromtimestamp(reactor.seconds(), UTC)
    shared = None
    if config.database:
        shared = _shared_database(config, reactor, now, announce)
        keys = shared.store
    else:
        keys = keys_to_accept(config.api_key, config.keys_file, now, announce)
    pool = connection_pool(reactor)
    agent = agent_for(reactor, pool, config.connect_timeout)
    # A token of this process's own, so that a chain of proxies works and
    # only a request coming back to this very process is a loop.
    via = via_mark(token_hex(6))
    backends = [
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
    backend_pool = BackendPool(backends)
    router = Router(backend_pool, reactor, config.max_queue, config.queue_timeout)
    auth = Authenticator(keys, config.open_routes, reactor)
    readiness = Readiness()
    metrics = Metrics()
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
    # Token quotas count from what the usage store recorded this day and
    # month (with --database, every proxy's); keys with a quota wait (503)
    # until that is read.
    quotas = QuotaBook(reactor, metrics.quota_refused)
    readiness.add("quotas", lambda: quotas.loaded)
    # The --api-key is known in clear: blanked wherever it shows, whatever
    # its shape; the keys file's keys, by digest, word by word.
    clear_keys = [config.api_key] if config.api_key else []
    limits: Limits = KeyLimits(reactor, quotas)
    guesses = GuessThrottle(reactor)
    throttle: Throttle = guesses
    redis: RedisLink | None = None
    if config.redis is not None:
        # Limits shared by every proxy using that Redis; the in-process ones
        # stand in while it is down (--redis-failure).
        redis = open_link(config.redis, config.redis_failure, config.redis_lease, reactor,
                          readiness, metrics.registry)
        limits = RedisLimits(redis, limits, reactor, config.redis_failure, config.redis_lease,
                             quotas=quotas)
        throttle = RedisThrottle(redis, guesses, reactor)
    assembled = assemble(
        router,
        auth,
        limits,
        reactor,
        metrics,
        readiness,
        cors=Cors(config.cors_origins),
        usage=usage_store,
        body_sample_bytes=config.log_body_bytes,
        redact=Redactor(keys.is_key, clear_keys),
        trusted_proxies=config.trusted_proxies,
        caps=config.caps,
        throttle=throttle,
    )
    site = ProxySite(
        assembled.proxy.resource(),
        config.client_timeout,
        config.max_body_size,
        reactor,
        body_sample_bytes=config.log_body_bytes,
        min_body_rate=config.min_body_rate,
        max_connections=0 if open_files is None else connection_limit(open_files),
        record=assembled.recorder.record,
        count_shed=metrics.connection_shed,
    )

    # Stopping runs bottom-up: stop listening, let requests in flight
    # finish, write the last usage, close Ollama connections, and only then
    # close the log files.
    service = StopInOrder()
    if config.log_dir:
        LogFilesService(
            config.log_dir,
            globalLogPublisher,
            config.log_max_bytes,
            config.log_backups,
            Redactor(secrets=clear_keys),
        ).setServiceParent(service)
    PoolService(pool).setServiceParent(service)
    backend_pool.setServiceParent(service)
    usage_store.setServiceParent(service)
    # Right after the store: its first work on the worker is making the
    # file, the next is this read, before any of this process's usage.
    QuotaSeed(
        quotas,
        reactor,
        usage_store.tokens_by_key,
    ).setServiceParent(service)
    if redis is not None:
        # Stops after the requests in flight have ended and released.
        redis.setServiceParent(service)
    KeysReloader(
        keys if shared is None else shared.sources.part(FILE),
        config.keys_file,
        operator_keys(config.api_key) if shared is None else [],
        reactor,
        # Looked up when a signal comes, not now: test reactors lack it.
        install_sighup=sighup_installer(lambda f: reactor.callFromThread(f)),
    ).setServiceParent(service)
    if shared is not None:
        shared.keys_poller().setServiceParent(service)
    DrainService(assembled.in_flight, config.grace_period).setServiceParent(service)
    # The console's sampler; it stops before the drain, ending open feeds.
    assembled.console.sampler.setServiceParent(service)
    listeners = Listeners()
    listeners.setServiceParent(service)
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
    # Last: it stops first, before the pool it uses is closed.
    UpstreamProbe([backend.upstream for backend in backends]).setServiceParent(service)
    return service
