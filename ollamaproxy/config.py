# -*- test-case-name: tests.test_config,tests.test_options -*-
"""
The proxy's settings: one frozen object, and the table of options it is
made from.

Each field of L{Config} is declared once, with L{option}, L{repeated} or
L{flag}: its option's name, its environment variable, how its text is read,
its default (in one form: the text an operator would type), its help line
and its documentation.  From that declaration come twistd's options
(L{ollamaproxy.options.twistd_options}), the environment that the C{.tac}
file reads (L{Config.from_sources}), and C{docs/configuration.md}
(C{python -m ollamaproxy.options}).

This module is in the base layer: it reads every setting into a plain,
checked value (a tuple of networks, an address, a number of seconds) and
imports no room; L{ollamaproxy.tap} builds the rooms' objects from them.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, TypeVar, overload
from urllib.parse import urlsplit

from ollamaproxy.durations import keep_alive_cap
from ollamaproxy.errors import ConfigError as ConfigError
from ollamaproxy.origins import DEFAULT_ORIGINS, parse_origins
from ollamaproxy.redis_address import RedisAddress, parse_failure_policy, parse_redis_url

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_PREFIX = "OLLAMAPROXY_"
# How long a crashed proxy's requests stay counted in Redis at the least:
# leases are renewed six times within it.
MIN_REDIS_LEASE = 3.0
# A key chosen by the operator: shorter ones can be guessed by someone who
# may try keys for as long as they like.
MIN_API_KEY_LENGTH = 16
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_ENDPOINT = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# The key under which a field's metadata holds its Option.
_OPTION = "ollamaproxy.option"


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
    @ivar parallel: Requests it may run at once for each model; 0, as
        C{--upstream} reads a URL without C{#parallel=N}, stands for the
        proxy's C{--parallel}, which L{Config} puts in its place.
    """

    url: str
    parallel: int = 0


@dataclass(frozen=True)
class Option:
    """
    One setting as the operator gives it: an option of C{twistd ollamaproxy},
    or its environment variable (the only way for the C{.tac} file).

    @ivar name: The option's name, C{max-queue}; its variable is
        C{OLLAMAPROXY_} and the name in capitals with C{_} for C{-}.
    @ivar metavar: What its value is called in the documentation.
    @ivar parse: Reads a value (for a repeating option, each item) given as
        text, with the option's name for its errors, into the value of its
        L{Config} field.
    @ivar default: The default, as text read by C{parse} like a value given;
        L{None} for none.
    @ivar help: The line of C{twistd ollamaproxy --help}.
    @ivar doc: Its meaning in C{docs/configuration.md} (Markdown).
    @ivar repeats: Given once for each value; its variable holds them all,
        comma-separated.
    @ivar flag: On or off, without a value; its variable is on when set to
        1, true, yes or on.
    @ivar blank: Whether C{''} is a value of its own (C{''} for none) rather
        than the same as not giving the option.
    @ivar fallback: Another variable read when the option's own is unset.
    @ivar default_from: Finds the default in the environment, for a default
        that depends on it; the field's own default is then C{""}.
    @ivar shown_default: The default in words, where its text would not do.
    @ivar short: A one-letter name for the option.
    """

    metavar: str
    parse: Callable[[str, str], Any]
    default: str | None
    help: str
    doc: str
    name: str = ""
    repeats: bool = False
    flag: bool = False
    blank: bool = False
    fallback: str | None = None
    default_from: Callable[[Mapping[str, str]], str] | None = None
    shown_default: str | None = None
    short: str | None = None

    @property
    def variable(self) -> str:
        """
        The environment variable for this option.
        """
        return env_variable(self.name)

    @property
    def shown(self) -> str:
        """
        The default as the help and the documentation show it.
        """
        if self.flag:
            return "off"
        return self.shown_default or self.default or "none"

    def read(self, options: Mapping[str, object], environ: Mapping[str, str]) -> Any:
        """
        This option's value: given in C{options}, else in its environment
        variable, else the default.

        @param options: Option values by name; L{None} or an empty list
            means not given.
        @raise ConfigError: If the value is unusable, naming the option.
        """
        given = options.get(self.name)
        if self.flag:
            return bool(given) or (environ.get(self.variable) or "").strip().lower() in _TRUE
        if self.repeats:
            return self._read_items(given, environ)
        text = None if given is None else str(given)
        if text is None or (text == "" and not self.blank):
            text = environ.get(self.variable)
        if text is None or (text == "" and not self.blank):
            if self.default_from is not None:
                return self.default_from(environ)
            text = self.default
        return None if text is None else self.parse(self.name, text)

    def _read_items(self, given: object, environ: Mapping[str, str]) -> tuple[Any, ...]:
        """
        The values of a repeating option: each one given as an option is
        kept whole (a path in an endpoint may hold a space), while its
        variable is a comma- or space-separated list.
        """
        if isinstance(given, str):
            items = [given]
        else:
            items = [str(item) for item in given] if isinstance(given, list | tuple) else []
        if not items:
            fallback = environ.get(self.fallback) if self.fallback else None
            items = _split(environ.get(self.variable) or fallback or self.default or "")
        if not items:
            raise ConfigError(f"--{self.name}: give at least one, e.g. {self.default}")
        return tuple(self.parse(self.name, item) for item in items)


@overload
def option(parse: Callable[[str, str], T], default: str, **spec: Any) -> T: ...


@overload
def option(parse: Callable[[str, str], T], default: None, **spec: Any) -> T | None: ...


def option(parse: Callable[[str, str], T], default: str | None, **spec: Any) -> Any:
    """
    Declare a field of L{Config} with the option that sets it; C{spec} is the
    rest of its L{Option}.  Its name is the field's, C{-} for C{_}, unless
    C{name} is given.

    @return: The field, with the default read by C{parse}: what a field
        holds when its option is not given.
    """
    declared = Option(spec.pop("metavar"), parse, default, **spec)
    value = None if default is None else parse(declared.name or "default", default)
    return field(default=value, metadata={_OPTION: declared})


def repeated(parse: Callable[[str, str], T], default: str, **spec: Any) -> tuple[T, ...]:
    """
    Declare a field of L{Config} set by an option that may be given more
    than once, each value read by C{parse}.
    """
    declared = Option(spec.pop("metavar"), parse, default, repeats=True, **spec)
    value = tuple(parse("default", item) for item in _split(default))
    return field(default=value, metadata={_OPTION: declared})


def flag(**spec: Any) -> bool:
    """
    Declare a field of L{Config} set by an option without a value.
    """
    declared = Option("", _text, None, flag=True, **spec)
    return field(default=False, metadata={_OPTION: declared})


def _text(name: str, value: str) -> str:
    return value


def _whole(name: str, value: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"--{name}: {value!r} is not a whole number")
    return int(value)


def _positive(name: str, value: str) -> int:
    count = _whole(name, value)
    if count < 1:
        raise ConfigError(f"--{name}: {value!r} must be 1 or more")
    return count


def _seconds(name: str, value: str, allow_zero: bool = False) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"--{name}: {value!r} is not a number of seconds") from None
    if not (seconds > 0 or (allow_zero and seconds == 0)):
        least = "at least" if allow_zero else "more than"
        raise ConfigError(f"--{name}: must be {least} 0 seconds, not {value}")
    return seconds


def _seconds_or_zero(name: str, value: str) -> float:
    return _seconds(name, value, allow_zero=True)


def _redis_lease(name: str, value: str) -> float:
    """
    C{--redis-lease}: at least L{MIN_REDIS_LEASE} seconds, so that a
    renewal (every sixth of it) that Redis answers late still comes in time.
    """
    lease = _seconds(name, value)
    if lease < MIN_REDIS_LEASE:
        raise ConfigError(f"--{name}: must be at least {MIN_REDIS_LEASE:g} seconds, "
                          f"not {value}")
    return lease


def _api_key(name: str, value: str) -> str:
    """
    The operator's own key: at least L{MIN_API_KEY_LENGTH} characters.  The
    message never shows the key.
    """
    if len(value) < MIN_API_KEY_LENGTH:
        raise ConfigError(
            f"--{name}: a key must be at least {MIN_API_KEY_LENGTH} characters long, "
            f"this one has {len(value)} (make a strong one with 'ollamaproxy keys add NAME')"
        )
    return value


def _endpoint(name: str, value: str) -> str:
    """
    A Twisted server endpoint string, checked only for its shape here: the
    reactor reads the rest when the proxy starts listening.
    """
    if not _ENDPOINT.match(value):
        raise ConfigError(
            f"--{name}: {value!r} is not an endpoint string such as "
            "tcp:5000 or ssl:5443:privateKey=key.pem:certKey=cert.pem"
        )
    return value


def _slack(name: str, value: str) -> int | None:
    """
    A whole number of requests, or C{off}: L{None}.
    """
    if value.strip().lower() == "off":
        return None
    return _whole(name, value)


def _yes_no(name: str, value: str) -> bool:
    """
    A switch that is on by default, so that it needs a value to turn off:
    the words a flag's variable takes for on (C{1}, C{true}, C{yes},
    C{on}), or their opposites.
    """
    word = value.strip().lower()
    if word not in _TRUE + _FALSE:
        raise ConfigError(f"--{name}: {value!r} is not yes or no")
    return word in _TRUE


def _keep_alive(name: str, value: str) -> float:
    """
    A cap on C{keep_alive} (L{ollamaproxy.durations.keep_alive_cap}).
    """
    try:
        return keep_alive_cap(value)
    except ValueError as e:
        raise ConfigError(f"--{name}: {e}") from None


def _split(value: str) -> list[str]:
    """
    Split a comma- or whitespace-separated list, dropping empty items.
    """
    return value.replace(",", " ").split()


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


def parse_networks(name: str, value: str) -> tuple[Network, ...]:
    """
    Parse addresses and networks (CIDR), IPv4 or IPv6, separated by commas
    or spaces, as C{--trusted-proxies} gives them; a single address is a
    C{/32} or C{/128}.  An empty value is none.

    @raise ConfigError: For an item that is neither.
    """
    networks = []
    for item in _split(value):
        try:
            networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
        except ValueError:
            raise ConfigError(
                f"--{name}: {item!r} is not an IP address or network such as "
                "10.0.0.5, 10.0.0.0/8 or fd00::/8"
            ) from None
    return tuple(networks)


def parse_upstream(name: str, value: str) -> UpstreamSetting:
    """
    An C{--upstream} value: an Ollama address (L{parse_ollama_host}), with
    C{#parallel=N} after it for a server whose parallelism differs.
    """
    address, _, fragment = value.partition("#")
    parallel = 0
    if fragment:
        setting, _, count = fragment.partition("=")
        if setting.strip() != "parallel":
            raise ConfigError(
                f"--{name}: {value!r}: after '#' only parallel=N is understood"
            )
        parallel = _positive(name, count.strip())
    return UpstreamSetting(parse_ollama_host(address), parallel)


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


def _routes(name: str, value: str) -> frozenset[Route]:
    return parse_routes(value)


def _origins(name: str, value: str) -> tuple[str, ...]:
    return parse_origins(value, option=name)


def _database(name: str, value: str) -> str:
    return parse_database_url(value) or ""


def _redis(name: str, value: str) -> RedisAddress:
    return parse_redis_url(value)


def _failure_policy(name: str, value: str) -> str:
    return parse_failure_policy(value)


#: What the fair queue shares out (C{--fair-share}).
FAIR_SHARES: Final = ("gpu-time", "tokens", "requests")


def _fair_share(name: str, value: str) -> str:
    if value not in FAIR_SHARES:
        raise ConfigError(f"--{name}: {value!r} is not one of {', '.join(FAIR_SHARES)}")
    return value


def _token_weight(name: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise ConfigError(f"--{name}: {value!r} is not a number") from None
    if not 0 <= weight < math.inf:  # nan too
        raise ConfigError(f"--{name}: must be 0 or more, not {value}")
    return weight


_CLEAR_TEXT = "Prefer the variable, since options show in `ps`."


@dataclass(frozen=True)
class Config:
    """
    Everything the proxy needs to know to run: the table of its options.

    Each field is one option, declared with its name, variable, parser,
    default, help and documentation; see the module's docstring.  A field's
    default is its option's default, read as the option would be, except
    for the files whose place depends on the environment (C{""} here).
    """

    listen: tuple[str, ...] = repeated(
        _endpoint, "tcp:5000", metavar="ENDPOINT",
        help="Endpoint to accept clients on (a Twisted endpoint string, repeatable; for TLS: "
        "ssl:5443:privateKey=key.pem:certKey=cert.pem; reuseport:5000 to share the port "
        "with other ollamaproxy processes)",
        doc="where clients connect: a [Twisted endpoint string]"
        "(https://docs.twisted.org/en/stable/core/howto/endpoints.html#servers), repeatable "
        "(`tcp:5000:interface=127.0.0.1`, `ssl:5443:privateKey=key.pem:certKey=cert.pem`, "
        "`unix:/run/ollamaproxy.sock`, and `reuseport:5000` for several proxies on one port)",
    )
    upstreams: tuple[UpstreamSetting, ...] = repeated(
        parse_upstream, "http://127.0.0.1:11434", name="upstream", metavar="URL", short="u",
        fallback="OLLAMA_HOST",
        shown_default="$OLLAMA_HOST, else http://127.0.0.1:11434",
        help="An Ollama server to relay to, read like OLLAMA_HOST; repeatable, for several "
        "servers behind one proxy; URL#parallel=N where its parallelism differs",
        doc="Ollama's address, read the way Ollama's clients read `OLLAMA_HOST`: `gpu-box` "
        "means `http://gpu-box:11434`, `https://h` means port 443, a path prefix is kept.  "
        "Repeatable: several Ollama servers behind one proxy; `URL#parallel=N` for a server "
        "whose parallelism differs",
    )
    parallel: int = option(
        _positive, "4", metavar="N",
        help="Requests each backend may run at once for each model (Ollama's "
        "OLLAMA_NUM_PARALLEL); more wait in a queue, served in turn across keys",
        doc="requests each backend may run at once for each model (Ollama's "
        "`OLLAMA_NUM_PARALLEL`); more wait in the fair queue",
    )
    max_queue: int = option(
        _whole, "512", metavar="N",
        help="Requests that may wait in all; beyond it 503 with Retry-After",
        doc="requests that may wait in all (Ollama's `OLLAMA_MAX_QUEUE`); beyond it `503` "
        "with `Retry-After`, nothing sent",
    )
    # A request queued for longer than a generation usually takes to start
    # is better told to come back.
    queue_timeout: float = option(
        _seconds, "300", metavar="S",
        help="Seconds a request may wait for a busy model before it gets 503",
        doc="seconds a request may wait for a busy model; then `503` with `Retry-After`, "
        "never sent",
    )
    # A switch costs a load, about 5 s for an 8B model (bench/gpu_sim.md),
    # through which every slot of the backend idles.  A waiting request is
    # passed over for one hold in all (collate.py), so with three models
    # taking turns holds average half of it: ten seconds, two loads, lets
    # as many requests share a switch as a hold of one load does with two
    # models, and a fifth of the switches Ollama alone makes on the
    # simulator (bench/README.md, "models").
    switch_hold: float = option(
        _seconds_or_zero, "10", metavar="S",
        help="Seconds a backend keeps serving the requests waiting for the model it holds "
        "before it switches to another model; 0 switches at once",
        doc="seconds a backend that would have to switch models for the next request in "
        "line first serves the requests waiting for the model it holds; then it drains for "
        "the switch (no more requests for the old model) until it goes.  `0` turns it off",
    )
    fair_share: str = option(
        _fair_share, "gpu-time", metavar="WHAT",
        help="What the fair queue shares out between keys: 'gpu-time' (each key's turns "
        "cost the GPU seconds its requests took, as Ollama reports them), 'tokens' (their "
        "tokens) or 'requests' (a turn each)",
        doc="what the fair queue shares out between keys: `gpu-time` (the seconds of GPU "
        "each request took: Ollama's `prompt_eval_duration` plus `eval_duration`, else its "
        "tokens at the model's measured seconds per token), `tokens` (each request costs its "
        "prompt tokens plus its output tokens times `--output-token-weight`) or `requests` "
        "(a turn each, whatever it costs)",
    )
    # Generating a token takes a pass of the model; a prompt's are read
    # many at a time: Sheng et al.'s Virtual Token Counter weighs them 2:1.
    output_token_weight: float = option(
        _token_weight, "2", metavar="W",
        help="Under --fair-share tokens, what an output token costs against a prompt token",
        doc="under `--fair-share tokens`, what a generated token costs against a prompt "
        "token (the GPU's work: a prompt is read many tokens at a time)",
    )
    max_keep_alive: float | None = option(
        _keep_alive, None, metavar="DURATION",
        help="Longest keep_alive a request may ask for (10m, 1h); one over it, or -1 "
        "(for ever), is clamped to it",
        doc="longest `keep_alive` a request may ask for (`10m`, `1h`); one over it, or `-1` "
        "(for ever), is clamped to it",
    )
    max_num_ctx: int | None = option(
        _positive, None, metavar="N",
        help="Largest options.num_ctx a request may ask for; larger is clamped to it",
        doc="largest `options.num_ctx` a request may ask for; larger is clamped to it",
    )
    keep_loaded_context: bool = option(
        _yes_no, "yes", metavar="yes|no",
        help="Send a request for a loaded model that asks for a smaller num_ctx, or none, "
        "with the context it is loaded with, so that it is not reloaded",
        doc="send a request for a loaded model that asks for a smaller `options.num_ctx`, or "
        "none, with the context its runner is loaded with (the one the proxy last sent it "
        "with, else the backends' `/api/ps`), "
        "so that Ollama does not reload it; `no` sends every request as it came; "
        "`--max-num-ctx` still bounds it",
    )
    # Ollama keeps a prompt cache per slot: a turn sent where the last went
    # evaluates only what is new.  Two requests' wait is what a GPU's
    # prefill of a long history costs, about.
    affinity_slack: int | None = option(
        _slack, "2", metavar="N|off",
        help="Send a conversation's next turn to the backend that served the last while it "
        "runs at most N requests more than the least busy one; off: never",
        doc="send a conversation's next turn to the backend that served its last turn (where "
        "Ollama holds its prompt in cache), while that backend is healthy, has the model, "
        "has a free slot and runs at most N requests more than the least busy backend that "
        "could take it; `0` only on a tie, `off` routes every turn as if it were the first "
        "(see [Conversations go home](backends.md#conversations-go-home))",
    )
    api_key: str | None = option(
        _api_key, None, metavar="KEY",
        help="A key clients must send (Authorization: Bearer KEY or X-API-Key: KEY), at "
        "least 16 characters.  Prefer OLLAMAPROXY_API_KEY: options show in ps.",
        doc="one key of at least 16 characters (shorter ones stop the start), named "
        f"`api-key` in logs.  {_CLEAR_TEXT}",
    )
    keys_file: str = option(
        _text, "", metavar="PATH", default_from=default_keys_file,
        shown_default="$XDG_CONFIG_HOME/ollamaproxy/keys.json or "
        "~/.config/ollamaproxy/keys.json",
        help="JSON file of named, hashed keys",
        doc="many named keys, stored as hashes, reloaded when it changes; also read by "
        "`ollamaproxy keys`",
    )
    log_dir: str | None = option(
        _text, None, metavar="DIR",
        help="Directory for rotating log files (ollamaproxy.log, ollamaproxy.json)",
        doc="rotating log files `ollamaproxy.log` (text) and `ollamaproxy.json` (JSON lines); "
        "created if missing, and the start fails if they cannot be written",
    )
    open_routes: frozenset[Route] = option(
        _routes, "GET /,HEAD /,GET /api/version,HEAD /api/version", metavar="LIST", blank=True,
        help="Comma-separated 'METHOD /path' routes served without a key; '' for none",
        doc="routes served without a key (chat UIs and Open WebUI probe these, some without "
        "sending the key); `''` for none",
    )
    connect_timeout: float = option(
        _seconds, "10", metavar="S",
        help="Seconds to wait for a connection to Ollama",
        doc="seconds to connect to Ollama",
    )
    # Ollama sends a response head with its first byte of output: after
    # loading a model for a stream, after the whole answer for "stream":
    # false.  Both can take minutes on a busy GPU box.
    header_timeout: float = option(
        _seconds, "600", metavar="S",
        help="Seconds to wait for Ollama's response head; with \"stream\": false that is "
        "the whole answer",
        doc="seconds to wait for Ollama's response head (model loading; with "
        "`\"stream\": false` the whole answer) before answering 504, or, for a "
        "generation whose body the proxy holds, sending it once to another backend "
        "that has the model",
    )
    idle_timeout: float = option(
        _seconds, "600", metavar="S",
        help="Seconds Ollama may stay silent in the middle of a response",
        doc="seconds Ollama may stay silent in the middle of a response (the client then "
        "gets an error line and a cut stream); there is no limit on a stream's total length",
    )
    client_timeout: float = option(
        _seconds, "60", metavar="S",
        help="Seconds a client may take to send a request's line and headers, and may stay "
        "silent while sending a body or between requests",
        doc="seconds a client may take to send a request's line and headers (a slowloris is "
        "dropped), and may stay silent while sending a body or between requests; never "
        "applies while a response streams",
    )
    # Chat answers run for minutes; most finish within half a minute of a
    # restart.  systemd's stop timeout in contrib/ is longer than this.
    grace_period: float = option(
        _seconds_or_zero, "30", metavar="S",
        help="Seconds requests in flight get to finish when the proxy stops (SIGTERM)",
        doc="on SIGTERM, seconds that requests in flight get to finish before their "
        "connections are closed",
    )
    # A load balancer sees /-/ready turn 503 only at its next probe, and
    # keeps routing here meanwhile: 0 for one box with no balancer in front.
    drain_delay: float = option(
        _seconds_or_zero, "0", metavar="S",
        help="Seconds the proxy keeps accepting on SIGTERM while /-/ready answers 503, "
        "before it stops listening and --grace-period starts; for load balancers",
        doc="on SIGTERM, seconds the proxy keeps accepting and serving requests while "
        "`/-/ready` answers `503`, so that a load balancer probing it looks away before the "
        "port closes; then it stops listening and `--grace-period` starts "
        "([deployment](deployment.md#behind-a-load-balancer))",
    )
    # Model uploads (POST /api/blobs) are often tens of GB: no limit unless
    # asked.
    max_body_size: int = option(
        parse_size, "0", metavar="SIZE", shown_default="0 (no limit)",
        help="Largest request body accepted (413 beyond it), in bytes or with K, M, G, T; "
        "0 for no limit: model uploads are often tens of GB",
        doc="largest request body, in bytes or with `K`, `M`, `G`, `T`; larger ones get "
        "`413` with a message that states the limit; `0` for no limit (model uploads are "
        "often tens of GB, hence no default limit)",
    )
    # A body, once the proxy reads it, must average this many bytes a second
    # over each client timeout: a trickled body cannot hold a connection to
    # Ollama, and a 20 GB upload over a link of 8 kbit/s still passes.
    min_body_rate: int = option(
        parse_size, "1K", metavar="SIZE",
        help="Slowest a request body may arrive once the proxy reads it, in bytes a second "
        "(K, M suffixes) averaged over each --client-timeout; a slower client gets 408 and "
        "is dropped; 0 for no minimum",
        doc="slowest a request body may arrive once the proxy reads it, in bytes a second "
        "(with `K`, `M`), averaged over each `--client-timeout`; a slower client gets `408` "
        "and is dropped; `0` for no minimum",
    )
    cors_origins: tuple[str, ...] = option(
        _origins, ",".join(DEFAULT_ORIGINS), metavar="LIST", blank=True,
        shown_default="browser extensions, localhost pages, app://, file://, tauri://, "
        "vscode-webview://, vscode-file://",
        help="Comma-separated browser origins allowed to call the proxy (one * wildcard "
        "each; '*' for all, '' for none but the proxy's own host)",
        doc="browser origins allowed to call the proxy, one `*` wildcard each; `*` for all, "
        "`''` for none but the proxy's own host",
    )
    usage_file: str = option(
        _text, "", metavar="PATH", default_from=default_usage_file,
        shown_default="$XDG_STATE_HOME/ollamaproxy/usage.sqlite3 or "
        "~/.local/state/ollamaproxy/usage.sqlite3",
        help="SQLite database of requests and tokens per key and model (see 'ollamaproxy "
        "usage'); keys' token quotas count from it at start",
        doc="requests and tokens per key and model (`ollamaproxy usage` reads it); token "
        "quotas read this day's and month's from it at start",
    )
    metrics_listen: str | None = option(
        _endpoint, None, metavar="ENDPOINT",
        shown_default="none; /metrics on the main endpoints needs an admin key",
        help="A separate endpoint serving Prometheus metrics without a key, e.g. "
        "tcp:9100:interface=127.0.0.1",
        doc="a separate endpoint serving `/metrics` (Prometheus) without a key",
    )
    log_max_bytes: int = option(
        parse_size, "10M", metavar="SIZE",
        help="Size at which a log file is rotated, in bytes or with K, M, G",
        doc="size at which a log file is rotated",
    )
    log_backups: int = option(
        _whole, "10", metavar="N",
        help="Rotated log files kept of each kind",
        doc="rotated log files kept of each kind",
    )
    log_bodies: bool = flag(
        help="Log the start of every request and response body, for debugging (credentials "
        "in them are blanked)",
        doc="log the start of every request and response body, for debugging (credentials "
        "in them are blanked); its variable is on when set to `1`, `true`, `yes` or `on`",
    )
    log_body_bytes: int = option(
        parse_size, "4K", metavar="SIZE",
        help="With --log-bodies: how much of each body is logged",
        doc="with `--log-bodies`: how much of each body is logged",
    )
    trusted_proxies: tuple[Network, ...] = option(
        parse_networks, "", metavar="LIST", shown_default="none",
        help="Comma-separated addresses and networks (10.0.0.5, 10.0.0.0/8, fd00::/8) of the "
        "proxies in front (TLS terminators, load balancers) whose X-Forwarded-For or "
        "Forwarded header names the client, for logs and limits; ignored from anyone else",
        doc="addresses and networks (`10.0.0.5,10.0.0.0/8,fd00::/8`) of the TLS terminators "
        "or load balancers in front, whose `X-Forwarded-For` or `Forwarded` header names "
        "the client",
    )
    database: str | None = option(
        _database, None, metavar="URL",
        help="A postgresql:// URL: usage per key and model, and keys, shared by every proxy "
        "using it (see 'ollamaproxy usage --database', 'ollamaproxy keys ... --database'); "
        "the usage file then only keeps usage while the database is down. Prefer "
        "OLLAMAPROXY_DATABASE when the URL holds a password",
        doc="a `postgresql://USER:PASSWORD@HOST:5432/DATABASE` URL (or `postgres://`): "
        "usage and keys shared by every proxy that uses it; any other URL stops the "
        f"start.  {_CLEAR_TEXT}",
    )
    # A field, as every option() here is (ruff sees only this one's type as mutable).
    redis: RedisAddress | None = option(  # noqa: RUF009
        _redis, None, metavar="URL", shown_default="none; in this process",
        help="Keep each key's rpm, max_streams and token quotas, the wrong-key "
        "throttle, and the fair queue with each backend's --parallel, in this Redis, "
        "shared by every proxy using it: "
        "redis://[user:password@]host:port/db, rediss:// for TLS; prefer OLLAMAPROXY_REDIS "
        "when there is a password",
        doc="keep each key's `rpm`, `max_streams` and token quotas, the wrong-key "
        "throttle, and the fair queue with each backend's `--parallel`, in this Redis, "
        "shared by every proxy using it: "
        "`redis://[user:password@]host:port/db`, `rediss://` for TLS; give a URL with a "
        "password in the variable, since options show in `ps`",
    )
    # A Redis outage should not take every GPU away: each proxy then keeps
    # the limits itself.
    redis_failure: str = option(
        _failure_policy, "local", metavar="POLICY",
        help="While Redis cannot be reached: 'local' (this proxy keeps the limits itself) "
        "or 'closed' (keys with limits get 503)",
        doc="while Redis cannot be reached: `local` (each proxy keeps the limits itself) or "
        "`closed` (keys with limits get `503`)",
    )
    # How long a crashed proxy's requests stay counted in Redis; leases are
    # renewed six times within it.
    redis_lease: float = option(
        _redis_lease, "30", metavar="S",
        help="Seconds a request (running or waiting) stays counted in Redis after its proxy "
        "died (its lease is renewed six times as often)",
        doc="seconds a request (running or waiting) stays counted in Redis after its proxy "
        "died; a live proxy "
        "renews its requests six times as often",
    )

    def __post_init__(self) -> None:
        """
        Give each upstream without its own C{#parallel=N} the proxy's
        C{--parallel}: the one option whose value depends on another's.
        """
        object.__setattr__(self, "upstreams", tuple(
            replace(upstream, parallel=upstream.parallel or self.parallel)
            for upstream in self.upstreams
        ))

    @property
    def body_sample_bytes(self) -> int:
        """
        How much of each body is logged: C{log_body_bytes} with
        C{--log-bodies}, else nothing.
        """
        return self.log_body_bytes if self.log_bodies else 0

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
        return cls(**{name: spec.read(options, environ) for name, spec in table()})


def table() -> tuple[tuple[str, Option], ...]:
    """
    The options, in the order of their fields in L{Config}: each with the
    name of its field.
    """
    return tuple(
        (each.name, replace(spec, name=spec.name or each.name.replace("_", "-")))
        for each in fields(Config)
        if isinstance(spec := each.metadata.get(_OPTION), Option)
    )


def option_named(name: str) -> Option:
    """
    The option of this name, for the C{ollamaproxy} command, whose
    C{--keys-file}, C{--usage-file} and C{--database} mean what the
    daemon's do.

    @raise KeyError: If there is none.
    """
    return {spec.name: spec for _, spec in table()}[name]


# The defaults that other modules build with: read from the table.
DEFAULT_PARALLEL = Config.parallel
DEFAULT_MAX_QUEUE = Config.max_queue
DEFAULT_QUEUE_TIMEOUT = Config.queue_timeout
DEFAULT_FAIR_SHARE = Config.fair_share
DEFAULT_OUTPUT_TOKEN_WEIGHT = Config.output_token_weight
DEFAULT_AFFINITY_SLACK = Config.affinity_slack
DEFAULT_SWITCH_HOLD = Config.switch_hold
DEFAULT_REDIS_LEASE = Config.redis_lease
DEFAULT_OPEN_ROUTES = str(option_named("open-routes").default)
