# -*- test-case-name: tests.test_config -*-
"""
The proxy's settings: one frozen object, built from command-line options and
environment variables.

Every default and every validation rule lives here.  The twistd plugin
(L{ollamaproxy.tap}) and the C{.tac} file both go through L{Config.from_sources},
so the two ways of running the proxy cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ollamaproxy.admission.caps import Caps, keep_alive_cap
from ollamaproxy.errors import ConfigError as ConfigError
from ollamaproxy.redis.url import RedisAddress, parse_failure_policy, parse_redis_url
from ollamaproxy.web.client_address import NOBODY, TrustedProxies, parse_trusted_proxies
from ollamaproxy.web.cors import DEFAULT_ORIGINS, parse_origins

DEFAULT_LISTEN = "tcp:5000"
# Ollama's own defaults: OLLAMA_NUM_PARALLEL and OLLAMA_MAX_QUEUE.
DEFAULT_PARALLEL = 4
DEFAULT_MAX_QUEUE = 512
# A request queued for longer than a generation usually takes to start is
# better told to come back.
DEFAULT_QUEUE_TIMEOUT = 300.0
DEFAULT_UPSTREAM = "http://127.0.0.1:11434"
DEFAULT_OPEN_ROUTES = "GET /,HEAD /,GET /api/version,HEAD /api/version"
DEFAULT_CONNECT_TIMEOUT = 10.0
# Ollama sends a response head with its first byte of output: after loading a
# model for a stream, after the whole answer for "stream": false.  Both can
# take minutes on a busy GPU box.
DEFAULT_HEADER_TIMEOUT = 600.0
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_CLIENT_TIMEOUT = 60.0
# Chat answers run for minutes; most finish within half a minute of a
# restart.  systemd's stop timeout in contrib/ is longer than this.
DEFAULT_GRACE_PERIOD = 30.0
# Model uploads (POST /api/blobs) are often tens of GB: no limit unless asked.
DEFAULT_MAX_BODY_SIZE = "0"
# A body, once the proxy reads it, must average this many bytes a second over
# each client timeout: a trickled body cannot hold a connection to Ollama,
# and a 20 GB upload over a link of 8 kbit/s still passes.
DEFAULT_MIN_BODY_RATE = "1K"
DEFAULT_LOG_MAX_BYTES = "10M"
DEFAULT_LOG_BACKUPS = 10
DEFAULT_LOG_BODY_BYTES = "4K"
# A Redis outage should not take every GPU away: each proxy then keeps the
# limits itself (see README, "Limits shared through Redis").
DEFAULT_REDIS_FAILURE = "local"
# How long a crashed proxy's requests stay counted in Redis; leases are
# renewed six times within it.
DEFAULT_REDIS_LEASE = 30.0
MIN_REDIS_LEASE = 3.0
# A key chosen by the operator: shorter ones can be guessed by someone who
# may try keys for as long as they like.
MIN_API_KEY_LENGTH = 16
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

ENV_PREFIX = "OLLAMAPROXY_"
DEFAULT_CORS_ORIGINS = ",".join(DEFAULT_ORIGINS)
_ENDPOINT = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S")


@dataclass(frozen=True)
class Route:
    """
    A method and an exact path, such as C{GET /api/version}.
    """

    method: bytes
    path: bytes


@dataclass(frozen=True)
class UpstreamSetting:
    """
    One Ollama server to relay to.

    @ivar url: Its base URL, normalised (L{parse_ollama_host}).
    @ivar parallel: Requests it may run at once for each model.
    """

    url: str
    parallel: int = DEFAULT_PARALLEL


DEFAULT_UPSTREAMS = (UpstreamSetting(DEFAULT_UPSTREAM),)


@dataclass(frozen=True)
class Config:
    """
    Everything the proxy needs to know to run.

    @ivar listen: Twisted server endpoint strings to accept clients on.
    @ivar upstreams: The Ollama servers, each with its base URL normalised
        (scheme, host, port and an optional path prefix; no trailing
        slash) and the requests it may run at once per model.
    @ivar max_queue: The most requests that may wait for a busy model.
    @ivar queue_timeout: Seconds a request may wait before it gets 503.
    @ivar caps: The proxy's caps on C{keep_alive} and C{num_ctx}.
    @ivar api_key: A single key given on the command line or in the
        environment, or L{None}.
    @ivar keys_file: The JSON keys file: loaded if it exists, created with a
        fresh key when no key is configured at all.
    @ivar log_dir: Where the rotating log files go, or L{None} for none.
    @ivar open_routes: Routes served without a key (liveness probes).
    @ivar connect_timeout: Seconds to wait for a TCP connection to Ollama.
    @ivar header_timeout: Seconds to wait for Ollama's response head.
    @ivar idle_timeout: Seconds Ollama may stay silent in the middle of a body.
    @ivar client_timeout: Seconds a client may take to send a request head,
        and may stay silent while sending a body or between requests.
    @ivar grace_period: Seconds in-flight requests get to finish on shutdown.
    @ivar max_body_size: The largest request body accepted, in bytes; 0 for
        no limit.
    @ivar min_body_rate: The slowest a request body may arrive, in bytes a
        second averaged over each client timeout; 0 for no minimum.
    @ivar cors_origins: Browser origins allowed to call the proxy.
    @ivar usage_file: The SQLite database of usage per key and model.
    @ivar metrics_listen: A separate endpoint serving only the metrics,
        without a key, or L{None}.
    @ivar log_max_bytes: Size at which a log file is rotated.
    @ivar log_backups: How many rotated log files of each kind are kept.
    @ivar log_body_bytes: How much of each request and response body is
        logged; 0 (the default) for none.
    @ivar trusted_proxies: The proxies in front whose C{X-Forwarded-For}
        or C{Forwarded} header names the client.
    @ivar database: The PostgreSQL URL where usage and keys are shared by
        every proxy, or L{None} for the usage file alone.
    @ivar redis: The Redis that keeps the limits shared by several proxies,
        or L{None} to keep them in this process.
    @ivar redis_failure: While Redis is down: C{local} (this process keeps
        the limits) or C{closed} (keys with limits get 503).
    @ivar redis_lease: Seconds a request stays counted in Redis once its
        proxy stops renewing it.
    """

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    upstreams: tuple[UpstreamSetting, ...] = DEFAULT_UPSTREAMS
    max_queue: int = DEFAULT_MAX_QUEUE
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    caps: Caps = field(default_factory=Caps)
    api_key: str | None = None
    keys_file: str = ""
    log_dir: str | None = None
    open_routes: frozenset[Route] = frozenset()
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT
    grace_period: float = DEFAULT_GRACE_PERIOD
    max_body_size: int = 0
    min_body_rate: int = 1024
    cors_origins: tuple[str, ...] = DEFAULT_ORIGINS
    usage_file: str = ""
    metrics_listen: str | None = None
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = DEFAULT_LOG_BACKUPS
    log_body_bytes: int = 0
    trusted_proxies: TrustedProxies = NOBODY
    database: str | None = None
    redis: RedisAddress | None = None
    redis_failure: str = DEFAULT_REDIS_FAILURE
    redis_lease: float = DEFAULT_REDIS_LEASE

    @classmethod
    def from_sources(
        cls, options: Mapping[str, object], environ: Mapping[str, str]
    ) -> Config:
        """
        Build the settings from parsed options, falling back to environment
        variables (C{OLLAMAPROXY_<OPTION>}), then to the defaults.

        @param options: Option values by option name (C{"api-key"}, ...);
            L{None} or an empty list means "not given".
        @param environ: The process environment.
        @raise ConfigError: If any value is unusable.
        """

        def get(name: str) -> str | None:
            value = options.get(name)
            if value is None:
                return environ.get(env_variable(name))
            return str(value)

        # Endpoints given as options stay whole (a key file's path may hold a
        # space); the environment variable is a comma- or space-separated list.
        listen_options = options.get("listen")
        if isinstance(listen_options, list) and listen_options:
            listen = [str(endpoint) for endpoint in listen_options]
        else:
            listen = _split(environ.get(env_variable("listen")) or DEFAULT_LISTEN)
        if not listen:
            raise ConfigError("--listen: give at least one endpoint, e.g. tcp:5000")
        metrics_listen = get("metrics-listen") or None
        for endpoint in [*listen, *([metrics_listen] if metrics_listen else [])]:
            if not _ENDPOINT.match(endpoint):
                raise ConfigError(
                    f"--listen: {endpoint!r} is not an endpoint string such as "
                    "tcp:5000 or ssl:5443:privateKey=key.pem:certKey=cert.pem"
                )
        upstream_options = options.get("upstream")
        if isinstance(upstream_options, str):
            upstream_options = [upstream_options]
        if isinstance(upstream_options, list) and upstream_options:
            upstreams = [str(url) for url in upstream_options]
        else:
            upstreams = _split(
                environ.get(env_variable("upstream")) or environ.get("OLLAMA_HOST") or ""
            ) or [DEFAULT_UPSTREAM]
        parallel = _positive("parallel", get("parallel"), DEFAULT_PARALLEL)
        max_keep_alive = get("max-keep-alive")
        max_num_ctx = get("max-num-ctx")
        open_routes = get("open-routes")
        cors_origins = get("cors-origins")
        log_bodies = _flag(options.get("log-bodies"), environ.get(env_variable("log-bodies")))
        log_body_bytes = parse_size(
            "log-body-bytes", get("log-body-bytes") or DEFAULT_LOG_BODY_BYTES
        )
        return cls(
            listen=tuple(listen),
            upstreams=tuple(parse_upstream(url, parallel) for url in upstreams),
            max_queue=_count("max-queue", get("max-queue"), DEFAULT_MAX_QUEUE),
            queue_timeout=_seconds("queue-timeout", get("queue-timeout"),
                                   DEFAULT_QUEUE_TIMEOUT),
            caps=Caps(
                None if max_keep_alive is None else parse_keep_alive_cap(
                    "max-keep-alive", max_keep_alive),
                None if max_num_ctx is None else _positive("max-num-ctx", max_num_ctx, 1),
            ),
            api_key=_api_key(get("api-key")),
            keys_file=keys_file_path(get("keys-file"), environ),
            log_dir=get("log-dir") or None,
            open_routes=parse_routes(
                DEFAULT_OPEN_ROUTES if open_routes is None else open_routes
            ),
            connect_timeout=_seconds("connect-timeout", get("connect-timeout"),
                                     DEFAULT_CONNECT_TIMEOUT),
            header_timeout=_seconds("header-timeout", get("header-timeout"),
                                    DEFAULT_HEADER_TIMEOUT),
            idle_timeout=_seconds("idle-timeout", get("idle-timeout"),
                                  DEFAULT_IDLE_TIMEOUT),
            client_timeout=_seconds("client-timeout", get("client-timeout"),
                                    DEFAULT_CLIENT_TIMEOUT),
            grace_period=_seconds("grace-period", get("grace-period"),
                                  DEFAULT_GRACE_PERIOD, allow_zero=True),
            cors_origins=parse_origins(
                DEFAULT_CORS_ORIGINS if cors_origins is None else cors_origins
            ),
            usage_file=usage_file_path(get("usage-file"), environ),
            metrics_listen=metrics_listen,
            log_max_bytes=parse_size(
                "log-max-bytes", get("log-max-bytes") or DEFAULT_LOG_MAX_BYTES
            ),
            log_backups=_count("log-backups", get("log-backups"), DEFAULT_LOG_BACKUPS),
            log_body_bytes=log_body_bytes if log_bodies else 0,
            max_body_size=parse_size(
                "max-body-size", get("max-body-size") or DEFAULT_MAX_BODY_SIZE
            ),
            min_body_rate=parse_size(
                "min-body-rate", get("min-body-rate") or DEFAULT_MIN_BODY_RATE
            ),
            trusted_proxies=parse_trusted_proxies(get("trusted-proxies") or ""),
            database=parse_database_url(get("database")),
            redis=parse_redis_url(redis) if (redis := get("redis")) else None,
            redis_failure=parse_failure_policy(get("redis-failure") or DEFAULT_REDIS_FAILURE),
            redis_lease=_redis_lease(get("redis-lease")),
        )


def _redis_lease(value: str | None) -> float:
    """
    C{--redis-lease}: at least L{MIN_REDIS_LEASE} seconds, so that a
    renewal (every sixth of it) that Redis answers late still comes in time.
    """
    lease = _seconds("redis-lease", value, DEFAULT_REDIS_LEASE)
    if lease < MIN_REDIS_LEASE:
        raise ConfigError(f"--redis-lease: must be at least {MIN_REDIS_LEASE:g} seconds, "
                          f"not {value}")
    return lease


def _api_key(value: str | None) -> str | None:
    """
    The operator's own key, if given: at least L{MIN_API_KEY_LENGTH}
    characters.  The message never shows the key.
    """
    if not value:
        return None
    if len(value) < MIN_API_KEY_LENGTH:
        raise ConfigError(
            f"--api-key: a key must be at least {MIN_API_KEY_LENGTH} characters long, "
            f"this one has {len(value)} (make a strong one with 'ollamaproxy keys add NAME')"
        )
    return value


def _split(value: str) -> list[str]:
    """
    Split a comma- or whitespace-separated list, dropping empty items.
    """
    return [item for item in value.replace(",", " ").split() if item]


def _count(name: str, value: str | None, default: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit():
        raise ConfigError(f"--{name}: {value!r} is not a whole number")
    return int(value)


def _positive(name: str, value: str | None, default: int) -> int:
    count = _count(name, value, default)
    if count < 1:
        raise ConfigError(f"--{name}: {value!r} must be 1 or more")
    return count


def _flag(option: object, variable: str | None) -> bool:
    """
    Whether a flag is on: given as an option, or its variable set to 1,
    true, yes or on.
    """
    return bool(option) or (variable or "").strip().lower() in ("1", "true", "yes", "on")


def _seconds(name: str, value: str | None, default: float, allow_zero: bool = False) -> float:
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"--{name}: {value!r} is not a number of seconds") from None
    if not (seconds > 0 or (allow_zero and seconds == 0)):
        least = "at least" if allow_zero else "more than"
        raise ConfigError(f"--{name}: must be {least} 0 seconds, not {value}")
    return seconds


def parse_size(name: str, value: str) -> int:
    """
    Parse a size in bytes, with an optional K, M, G or T suffix (powers of
    1024): C{"512M"}, C{"20G"}.

    @raise ConfigError: If it is not such a size.
    """
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text[-1:] in ("K", "M", "G", "T") else (text, "")
    if not number.isdigit():
        raise ConfigError(f"--{name}: {value!r} is not a size such as 1048576, 512M or 20G")
    return int(number) * _SIZE_UNITS[unit]


def show_size(size: int) -> str:
    """
    A size in bytes as people read it: C{10 MiB} for a whole number of a
    unit, else C{1000 bytes}.
    """
    for unit in ("T", "G", "M", "K"):
        if size >= _SIZE_UNITS[unit] and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]} {unit}iB"
    return f"{size} bytes"


def parse_routes(value: str) -> frozenset[Route]:
    """
    Parse C{"GET /,HEAD /api/version"} into routes.  An empty string means
    no open routes at all.

    @raise ConfigError: If an item is not C{METHOD /path}.
    """
    routes = set()
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        method, _, path = item.partition(" ")
        path = path.strip()
        if not (item.isascii() and method.isalpha() and path.startswith("/")):
            raise ConfigError(
                f"--open-routes: {item!r} is not of the form 'METHOD /path' "
                "(ASCII; percent-encode other characters)"
            )
        routes.add(Route(method.upper().encode("ascii"), path.encode("ascii")))
    return frozenset(routes)


def parse_upstream(value: str, parallel: int) -> UpstreamSetting:
    """
    An C{--upstream} value: an Ollama address (L{parse_ollama_host}), with
    C{#parallel=N} after it for a server whose parallelism differs.
    """
    address, _, fragment = value.partition("#")
    if fragment:
        name, _, count = fragment.partition("=")
        if name.strip() != "parallel":
            raise ConfigError(
                f"--upstream: {value!r}: after '#' only parallel=N is understood"
            )
        parallel = _positive("upstream", count.strip(), parallel)
    return UpstreamSetting(parse_ollama_host(address), parallel)


def parse_keep_alive_cap(name: str, value: str) -> float:
    """
    A C{keep_alive} cap (L{ollamaproxy.admission.caps.keep_alive_cap}).
    """
    try:
        return keep_alive_cap(value)
    except ValueError as e:
        raise ConfigError(f"--{name}: {e}") from None


def parse_ollama_host(value: str) -> str:
    """
    Read an Ollama address the way Ollama's own clients read C{OLLAMA_HOST}.

    Spaces and quotes around the value are ignored.  A bare host gets port
    11434; C{http://host} gets port 80 and C{https://host} port 443; an empty
    host means 127.0.0.1; a bare IPv6 address (C{::1}) is one host, not a
    host and a port; a path prefix is kept.  C{0.0.0.0:11434} (how people
    make Ollama listen everywhere) stays as it is: connecting to it reaches
    the local machine.

    @return: C{scheme://host:port} or C{scheme://host:port/prefix}.
    @raise ConfigError: For schemes other than http and https, or a bad port.
    """
    value = value.strip().strip("\"'").strip()
    scheme, sep, hostport = value.partition("://")
    port = 11434
    if not sep:
        scheme, hostport = "http", value
    elif scheme == "http":
        port = 80
    elif scheme == "https":
        port = 443
    else:
        raise ConfigError(
            f"--upstream: {value!r}: only http:// and https:// are supported"
        )
    if hostport.count(":") > 1 and "[" not in hostport:
        try:
            hostport = f"[{ipaddress.IPv6Address(hostport.split('/', 1)[0])}]" + (
                "/" + hostport.split("/", 1)[1] if "/" in hostport else ""
            )
        except ValueError:
            pass
    try:
        split = urlsplit(f"{scheme}://{hostport}")
        host = split.hostname or "127.0.0.1"
        port = split.port or port
    except ValueError as e:
        raise ConfigError(f"--upstream: {value!r}: {e}") from None
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            host = f"[{host}]"
    except ValueError:
        pass
    path = split.path.strip("/")
    return f"{scheme}://{host}:{port}" + (f"/{path}" if path else "")


def env_variable(option: str) -> str:
    """
    The environment variable for an option: C{--keys-file} is
    C{OLLAMAPROXY_KEYS_FILE}.
    """
    return ENV_PREFIX + option.upper().replace("-", "_")


def keys_file_path(given: str | None, environ: Mapping[str, str]) -> str:
    """
    The keys file: C{given} (an option's value), else C{$OLLAMAPROXY_KEYS_FILE},
    else the default.  The daemon and the C{ollamaproxy} command agree on it.
    """
    return given or environ.get(env_variable("keys-file")) or default_keys_file(environ)


def usage_file_path(given: str | None, environ: Mapping[str, str]) -> str:
    """
    The usage database, chosen as L{keys_file_path} chooses the keys file.
    """
    return given or environ.get(env_variable("usage-file")) or default_usage_file(environ)


def default_keys_file(environ: Mapping[str, str]) -> str:
    """
    Where the keys live when no C{--keys-file} is given:
    C{$XDG_CONFIG_HOME/ollamaproxy/keys.json}, by default under
    C{~/.config}.
    """
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".config"
    )
    return os.path.join(base, "ollamaproxy", "keys.json")


def default_usage_file(environ: Mapping[str, str]) -> str:
    """
    Where usage is kept when no file is given:
    C{$XDG_STATE_HOME/ollamaproxy/usage.sqlite3}, by default under
    C{~/.local/state}.
    """
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "ollamaproxy", "usage.sqlite3")


def parse_database_url(value: str | None) -> str | None:
    """
    A C{--database} value: a C{postgresql://} or C{postgres://} URL, or
    L{None} (or C{""}) for none.  The message never shows a password.

    @raise ConfigError: For any other kind of URL.
    """
    if not value:
        return None
    scheme, sep, _ = value.strip().partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigError(
            f"--database: {show_database_url(value)!r} is not a PostgreSQL URL such as "
            "postgresql://USER:PASSWORD@HOST:5432/DATABASE"
        )
    return value.strip()


def show_database_url(url: str) -> str:
    """
    A database URL fit for logs and messages: its password, if any, is
    C{***} (in the address or as a C{password=} parameter).
    """
    url = re.sub(r"^([^:/]*://[^/@:]*):[^/]*@", r"\1:***@", url)
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", url)
