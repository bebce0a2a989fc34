"""
Tests for L{ollamaproxy.tap}: the twistd options, the service they build,
the first-start key, and the plugin that makes C{twistd ollamaproxy} work.

Services are built on a L{MemoryReactorClock}: nothing listens, nothing
connects.
"""

# Twisted's usage.Options, MemoryReactorClock and Service are unannotated;
# pyproject.toml allows calling them (disallow_untyped_calls = false), and so
# does this file under a bare "mypy --strict".
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import os
import re
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from treq.testing import StubTreq
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceMaker, MultiService, Service
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from twisted.web.server import Site

from ollamaproxy import __version__, tap
from ollamaproxy.admission.keys import (
    ApiKey,
    digest,
    load_keys_file,
    looks_generated,
    write_keys_file,
)
from ollamaproxy.admission.quotas import QuotaSeed
from ollamaproxy.admission.reload import KeysReloader
from ollamaproxy.backends.gpu_time import FALLBACK_OUTPUT_SECONDS, FALLBACK_PROMPT_SECONDS
from ollamaproxy.backends.pool import Backend, BackendPool
from ollamaproxy.backends.probe import UpstreamProbe
from ollamaproxy.backends.upstream import PoolService, Upstream
from ollamaproxy.config import (
    DEFAULT_OPEN_ROUTES,
    Config,
    ConfigError,
    Route,
    UpstreamSetting,
    default_usage_file,
    parse_routes,
)
from ollamaproxy.console import Sampler
from ollamaproxy.exchange import Meter
from ollamaproxy.model_names import resolve
from ollamaproxy.open_files import connection_limit
from ollamaproxy.reactors import daemon_reactor
from ollamaproxy.record.logs import LogFilesService
from ollamaproxy.record.recorder import Recorder
from ollamaproxy.record.usage import UsageStore
from ollamaproxy.redis.link import RedisLink
from ollamaproxy.redis.queue import RedisQueue
from ollamaproxy.redis_address import parse_redis_url
from ollamaproxy.tap import (
    DrainDelay,
    DrainService,
    Listeners,
    Options,
    ProxyOptions,
    StopInOrder,
    build_service,
)
from ollamaproxy.web.front import Front
from ollamaproxy.web.site import ProxySite
from tests.fakes.chain import Chain

KEY_PATTERN = re.compile(r"olpk_[0-9A-Za-z]{38}")
LOCAL = "tcp:0:interface=127.0.0.1"


def parse(args: list[str], environ: dict[str, str] | None = None) -> ProxyOptions:
    """
    Parse a command line with the given environment (empty by default).
    """
    options = ProxyOptions(environ={} if environ is None else environ)
    options.parseOptions(args)
    return options


def base_config(tmp_path: Path, **changes: Any) -> Config:
    """
    A configuration that listens on 127.0.0.1 only and keeps its keys in
    C{tmp_path}.
    """
    config = Config(
        listen=(LOCAL,),
        keys_file=str(tmp_path / "config" / "ollamaproxy" / "keys.json"),
        usage_file=str(tmp_path / "state" / "usage.sqlite3"),
        open_routes=parse_routes(DEFAULT_OPEN_ROUTES),
    )
    return replace(config, **changes)


def children(service: MultiService) -> list[IService]:
    """
    The direct child services, in order.
    """
    return list(service)


def endpoint_services(service: MultiService) -> list[StreamServerEndpointService]:
    """
    The listening children of a service.
    """
    found: list[StreamServerEndpointService] = []
    for child in children(service):
        if isinstance(child, StreamServerEndpointService):
            found.append(child)
        elif isinstance(child, MultiService):
            found.extend(endpoint_services(child))
    return found


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No arguments and no environment give every option unset and the default Config."""
    monkeypatch.setenv("HOME", str(tmp_path))
    options = parse([])
    assert dict(options) == {
        "upstream": [],
        "parallel": None,
        "max-queue": None,
        "queue-timeout": None,
        "fair-share": None,
        "output-token-weight": None,
        "switch-hold": None,
        "max-keep-alive": None,
        "max-num-ctx": None,
        "keep-loaded-context": None,
        "affinity-slack": None,
        "api-key": None,
        "keys-file": None,
        "log-dir": None,
        "open-routes": None,
        "connect-timeout": None,
        "header-timeout": None,
        "idle-timeout": None,
        "client-timeout": None,
        "grace-period": None,
        "drain-delay": None,
        "max-body-size": None,
        "min-body-rate": None,
        "cors-origins": None,
        "usage-file": None,
        "metrics-listen": None,
        "log-max-bytes": None,
        "log-backups": None,
        "log-body-bytes": None,
        "trusted-proxies": None,
        "database": None,
        "redis": None,
        "redis-failure": None,
        "redis-lease": None,
        "log-bodies": 0,
        "listen": [],
    }
    assert options.config == Config(
        listen=("tcp:5000",),
        upstreams=(UpstreamSetting("http://127.0.0.1:11434"),),
        api_key=None,
        keys_file=f"{tmp_path}/.config/ollamaproxy/keys.json",
        log_dir=None,
        open_routes=frozenset(
            {
                Route(b"GET", b"/"),
                Route(b"HEAD", b"/"),
                Route(b"GET", b"/api/version"),
                Route(b"HEAD", b"/api/version"),
            }
        ),
        connect_timeout=10.0,
        header_timeout=600.0,
        idle_timeout=600.0,
        usage_file=f"{tmp_path}/.local/state/ollamaproxy/usage.sqlite3",
    )


def test_listen_repeated() -> None:
    """--listen may be given more than once; every endpoint is kept, in order."""
    options = parse(["--listen", LOCAL, "--listen", "unix:/tmp/ollamaproxy.sock"])
    assert options["listen"] == [LOCAL, "unix:/tmp/ollamaproxy.sock"]
    assert options.config.listen == (LOCAL, "unix:/tmp/ollamaproxy.sock")


def test_every_option() -> None:
    """Every option on the command line ends up in the Config."""
    options = parse(
        [
            "--listen", LOCAL,
            "--upstream", "https://gpu-box/ollama/",
            "--api-key", "secret-0123456789",
            "--keys-file", "/etc/ollamaproxy/keys.json",
            "--log-dir", "/var/log/ollamaproxy",
            "--open-routes", "get /health",
            "--connect-timeout", "2.5",
            "--header-timeout", "30",
            "--idle-timeout", "45",
        ]
    )
    assert options.config == Config(
        listen=(LOCAL,),
        upstreams=(UpstreamSetting("https://gpu-box:443/ollama"),),
        api_key="secret-0123456789",
        keys_file="/etc/ollamaproxy/keys.json",
        log_dir="/var/log/ollamaproxy",
        open_routes=frozenset({Route(b"GET", b"/health")}),
        connect_timeout=2.5,
        header_timeout=30.0,
        idle_timeout=45.0,
        usage_file=default_usage_file({}),
    )


def test_upstream_short_option() -> None:
    """-u is short for --upstream."""
    assert parse(["-u", "gpu-box:1234"]).config.upstreams[0].url == "http://gpu-box:1234"


def test_no_open_routes() -> None:
    """--open-routes '' leaves no route open."""
    assert parse(["--open-routes", ""]).config.open_routes == frozenset()


@pytest.mark.parametrize(
    "args",
    [
        ["--connect-timeout", "soon"],
        ["--header-timeout", "0"],
        ["--idle-timeout", "-5"],
        ["--upstream", "ftp://gpu-box"],
        ["--upstream", "gpu-box:99999"],
        ["--open-routes", "GET"],
        ["--fair-share", "bytes"],
        ["--output-token-weight", "-1"],
        ["--output-token-weight", "nan"],
        ["--output-token-weight", "many"],
        ["--listen", ","],
        ["--no-such-option"],
        ["extra-argument"],
    ],
)
def test_bad_value(args: list[str]) -> None:
    """A value the proxy cannot use is a usage error, not a traceback."""
    with pytest.raises(usage.UsageError):
        parse(args)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{twistd ollamaproxy --version} reaches the plugin's options, which
    print ollamaproxy's version (not only twistd's) and exit with status 0.
    """
    with pytest.raises(SystemExit) as e:
        parse(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"ollamaproxy {__version__}\n"


def test_bad_environment_value() -> None:
    """A bad value from the environment is a usage error too, naming the option."""
    with pytest.raises(usage.UsageError, match="--idle-timeout"):
        parse([], {"OLLAMAPROXY_IDLE_TIMEOUT": "never"})


def test_environment_used() -> None:
    """Environment variables set the options that are not given."""
    environ = {
        "OLLAMAPROXY_LISTEN": f"{LOCAL},unix:/tmp/p.sock",
        "OLLAMAPROXY_API_KEY": "env-key-0123456789",
        "OLLAMAPROXY_KEYS_FILE": "/env/keys.json",
        "OLLAMAPROXY_LOG_DIR": "/env/logs",
        "OLLAMAPROXY_OPEN_ROUTES": "",
        "OLLAMAPROXY_CONNECT_TIMEOUT": "1",
        "OLLAMAPROXY_HEADER_TIMEOUT": "2",
        "OLLAMAPROXY_IDLE_TIMEOUT": "3",
        "OLLAMA_HOST": "0.0.0.0",
    }
    assert parse([], environ).config == Config(
        listen=(LOCAL, "unix:/tmp/p.sock"),
        upstreams=(UpstreamSetting("http://0.0.0.0:11434"),),
        api_key="env-key-0123456789",
        keys_file="/env/keys.json",
        log_dir="/env/logs",
        open_routes=frozenset(),
        connect_timeout=1.0,
        header_timeout=2.0,
        idle_timeout=3.0,
        usage_file=default_usage_file(environ),
    )


def test_option_beats_environment() -> None:
    """An option given on the command line wins over its environment variable."""
    environ = {"OLLAMAPROXY_UPSTREAM": "env-host", "OLLAMAPROXY_API_KEY": "env-key-0123456789"}
    config = parse(["--upstream", "opt-host", "--api-key", "opt-key-0123456789"], environ).config
    assert (config.upstreams[0].url, config.api_key) == (
        "http://opt-host:11434", "opt-key-0123456789"
    )


def test_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options() without an environ reads the process environment (the .tac file's way)."""
    monkeypatch.setenv("OLLAMAPROXY_API_KEY", "from-os-environ-0123456789")
    options = Options()
    options.parseOptions([])
    assert options.config.api_key == "from-os-environ-0123456789"


def test_service_structure(tmp_path: Path) -> None:
    """
    One endpoint service per --listen, all serving one Site over the proxy's
    front resource (Ollama's fixed routes, then Klein's).
    """
    reactor = MemoryReactorClock()
    config = base_config(
        tmp_path, api_key="k", listen=(LOCAL, "tcp:8080:interface=\\:\\:1")
    )
    service = build_service(config, daemon_reactor(reactor), lambda text: None)
    kinds = [type(child) for child in children(service)]
    assert kinds == [PoolService, BackendPool, UsageStore, Recorder, QuotaSeed, KeysReloader,
                     DrainService, Sampler, Listeners, UpstreamProbe, DrainDelay]
    assert [type(child) for child in children(children(service)[8])] == [  # type: ignore[arg-type]
        StreamServerEndpointService,
        StreamServerEndpointService,
    ]
    listeners = endpoint_services(service)
    site = listeners[0].factory
    assert isinstance(site, Site)
    assert listeners[1].factory is site
    assert isinstance(site.resource, Front)


def test_site_is_bounded_by_the_open_files_limit(tmp_path: Path) -> None:
    """
    Given the open files limit, the site is built to keep no more client
    connections open than L{connection_limit} leaves room for (the formula
    is tested in test_open_files), and reads bodies at the configured
    minimum rate.
    """
    config = base_config(tmp_path, api_key="k", min_body_rate=2048)
    service = build_service(config, daemon_reactor(MemoryReactorClock()), lambda text: None,
                            open_files=1024)
    site = endpoint_services(service)[0].factory
    assert isinstance(site, ProxySite)
    assert (site.max_connections, site.min_body_rate) == (connection_limit(1024), 2048)
    unbounded = build_service(config, daemon_reactor(MemoryReactorClock()), lambda text: None)
    assert endpoint_services(unbounded)[0].factory.max_connections == 0


def test_endpoints_follow_listen(tmp_path: Path) -> None:
    """Started endpoint services listen on the configured ports, in order, on the given reactor."""
    reactor = MemoryReactorClock()
    config = base_config(
        tmp_path, api_key="k", listen=(LOCAL, "tcp:8080:interface=\\:\\:1")
    )
    service = build_service(config, daemon_reactor(reactor), lambda text: None)
    listeners = endpoint_services(service)
    for listener in listeners:
        listener.privilegedStartService()
        listener.startService()
    try:
        site = listeners[0].factory
        assert reactor.tcpServers == [(0, site, 50, "127.0.0.1"), (8080, site, 50, "::1")]
    finally:
        for listener in listeners:
            listener.stopService()


class _PortsTaken(MemoryReactorClock):
    def listenTCP(self, port: int, *args: Any, **kwargs: Any) -> Any:
        raise CannotListenError("127.0.0.1", port, OSError(98, "Address already in use"))


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """
    A listening port that cannot be had stops twistd with a one-line
    reason, not a traceback.
    """
    service = build_service(base_config(tmp_path, api_key="k"), daemon_reactor(_PortsTaken()),
                            lambda text: None)
    with pytest.raises(SystemExit) as stopped:
        service.privilegedStartService()
    assert str(stopped.value) == (
        "ollamaproxy: Couldn't listen on 127.0.0.1:0: [Errno 98] Address already in use."
    )


@pytest.mark.parametrize(
    ("endpoint", "warned"),
    [
        ("tcp:5000", True),
        ("reuseport:5000", True),
        ("tcp:5000:interface=127.0.0.1", False),
        ("reuseport:5000:interface=127.0.0.1", False),
        ("ssl:5443:privateKey=key.pem", False),
    ],
)
def test_clear_text_on_every_interface_is_warned_of(
    tmp_path: Path, endpoint: str, warned: bool
) -> None:
    """
    Listening without TLS on every interface, shared port or not, logs a
    warning that keys would cross the network in clear text.
    """
    config = base_config(tmp_path, api_key="k", listen=(endpoint,))
    with capturedLogs() as events:
        try:
            build_service(config, daemon_reactor(MemoryReactorClock()), lambda text: None)
        except ConfigError:  # the TLS key file does not exist; warned before
            pass
    clear_text = [e for e in events if "clear text" in formatEvent(e)]
    assert bool(clear_text) == warned


@pytest.mark.parametrize("log_dir", [None, "logs"])
def test_log_files_only_with_log_dir(tmp_path: Path, log_dir: str | None) -> None:
    """There is a LogFilesService exactly when --log-dir is set."""
    config = base_config(
        tmp_path, api_key="k", log_dir=None if log_dir is None else str(tmp_path / log_dir)
    )
    service = build_service(config, daemon_reactor(MemoryReactorClock()), lambda text: None)
    log_services = [s for s in children(service) if isinstance(s, LogFilesService)]
    assert len(log_services) == (0 if log_dir is None else 1)
    assert not (tmp_path / "logs").exists()


def test_first_start_makes_a_key(tmp_path: Path) -> None:
    """
    With no key anywhere, a key named default is made, stored as a hash and
    announced once; its creation time is the reactor's.
    """
    config = base_config(tmp_path)
    announced: list[str] = []
    reactor = MemoryReactorClock()
    reactor.advance(1_800_000_000)
    build_service(config, daemon_reactor(reactor), announced.append)

    assert len(announced) == 1
    found = set(KEY_PATTERN.findall(announced[0]))
    assert len(found) == 1
    key = found.pop()
    assert looks_generated(key)
    assert config.keys_file in announced[0]

    stored = load_keys_file(config.keys_file)
    assert [(k.name, k.digest) for k in stored] == [("default", digest(key))]
    assert stored[0].created == datetime.fromtimestamp(1_800_000_000, UTC)
    text = Path(config.keys_file).read_text()
    assert key not in text
    assert os.stat(config.keys_file).st_mode & 0o777 == 0o600


def test_second_start_is_quiet(tmp_path: Path) -> None:
    """A second start with the same keys file neither announces nor rewrites it."""
    config = base_config(tmp_path)
    announced: list[str] = []
    build_service(config, daemon_reactor(MemoryReactorClock()), announced.append)
    before = Path(config.keys_file).read_bytes()
    build_service(config, daemon_reactor(MemoryReactorClock()), announced.append)
    assert len(announced) == 1
    assert Path(config.keys_file).read_bytes() == before


def test_api_key_needs_no_file(tmp_path: Path) -> None:
    """With --api-key and no keys file, no file is made and nothing is announced."""
    config = base_config(tmp_path, api_key="olpk_given")
    announced: list[str] = []
    build_service(config, daemon_reactor(MemoryReactorClock()), announced.append)
    assert announced == []
    assert not os.path.exists(config.keys_file)
    assert os.listdir(tmp_path) == []


def test_existing_keys_file_is_used(tmp_path: Path) -> None:
    """A keys file that already holds keys is left alone and nothing is announced."""
    config = base_config(tmp_path)
    write_keys_file(config.keys_file, [ApiKey("alice", digest("olpk_alice"))])
    before = Path(config.keys_file).read_bytes()
    announced: list[str] = []
    build_service(config, daemon_reactor(MemoryReactorClock()), announced.append)
    assert announced == []
    assert Path(config.keys_file).read_bytes() == before


@pytest.mark.parametrize(
    "text",
    ["not json", '{"keys": [{"name": "a", "hash": "md5:00"}]}', '{"nokeys": []}'],
)
def test_corrupt_keys_file(tmp_path: Path, text: str) -> None:
    """A corrupt keys file stops startup with a usage error naming the file, and is kept."""
    config = base_config(tmp_path)
    os.makedirs(os.path.dirname(config.keys_file))
    Path(config.keys_file).write_text(text)
    announced: list[str] = []
    with pytest.raises(usage.UsageError, match=re.escape(config.keys_file)):
        build_service(config, daemon_reactor(MemoryReactorClock()), announced.append)
    assert announced == []
    assert Path(config.keys_file).read_text() == text


@pytest.mark.parametrize(
    ("names", "api_key"),
    [(["alice", "alice"], None), (["api-key"], "olpk_given")],
    ids=["twice-in-file", "file-and-api-key"],
)
def test_duplicate_key_names(tmp_path: Path, names: list[str], api_key: str | None) -> None:
    """Two keys with one name (in the file, or the file's and --api-key's) is a usage error."""
    config = base_config(tmp_path, api_key=api_key)
    entries = [
        {"name": name, "hash": "sha256:" + digest(f"key-{i}").hex()}
        for i, name in enumerate(names)
    ]
    os.makedirs(os.path.dirname(config.keys_file))
    Path(config.keys_file).write_text(json.dumps({"keys": entries}))
    with pytest.raises(usage.UsageError):
        build_service(config, daemon_reactor(MemoryReactorClock()), lambda text: None)


KEYS_FILES = {
    "list": "[]",
    "dict": '{"keys": {}}',
    "nohash": '{"keys": [{"name": "alice"}]}',
}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--listen", "5000"], "--listen: '5000' is not an endpoint string"),
        (["--listen", "tcp:5000:interfase=127.0.0.1"], "unknown parameter 'interfase'"),
        (["--listen", "tcp:abc"], "'tcp:abc': the port must be a number"),
        (["--listen", "ssl:5443"], "needs privateKey=KEY.pem and certKey=CERT.pem"),
        (["--listen", "nope:5000"], "--listen: cannot listen on 'nope:5000'"),
        (["--metrics-listen", "tcp:x"], "--metrics-listen: cannot listen on 'tcp:x'"),
        (["--log-dir", "{tmp}/file/logs"], "--log-dir: cannot write log files in"),
        (["--log-dir", "{tmp}/file"], "--log-dir: cannot write log files in"),
        (["--usage-file", "{tmp}"], "--usage-file: {tmp} is a directory"),
        (["--usage-file", "{tmp}/file"], "is not an SQLite database"),
        (["--usage-file", "{tmp}/file/usage.db"], "is not a directory"),
        (["--keys-file", "{tmp}/list.json"], 'it must be an object whose "keys" is a list'),
        (["--keys-file", "{tmp}/dict.json"], 'it must be an object whose "keys" is a list'),
        (["--keys-file", "{tmp}/nohash.json"], "key 'alice' has no \"hash\""),
        (["--api-key", "short"], "--api-key: a key must be at least 16 characters"),
        (["--idle-timeout", "soon"], "--idle-timeout: 'soon' is not a number"),
        (["--fair-share", "gpu"],
         "--fair-share: 'gpu' is not one of gpu-time, tokens, requests"),
        (["--database", "mysql://me:pw@db/x"],
         "--database: 'mysql://me:***@db/x' is not a PostgreSQL URL"),
        (["--no-such-option"], "option --no-such-option not recognized"),
    ],
)
def test_every_mistake_is_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    """
    Each configuration mistake stops the start with one line naming what is
    wrong, as twistd and the .tac file show it (a SystemExit with a message:
    exit status 1, no help screen, no traceback).
    """
    (tmp_path / "file").write_text("not an SQLite database, and not a directory " * 10)
    for name, text in KEYS_FILES.items():
        (tmp_path / f"{name}.json").write_text(text)
    defaults = {"--keys-file": str(tmp_path / "keys.json"),
                "--usage-file": str(tmp_path / "usage.db"),
                "--listen": LOCAL}
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    for option, value in defaults.items():
        if option not in args:
            args += [option, value]
    if "--api-key" not in args:
        args += ["--api-key", "0123456789abcdef-test"]
    with pytest.raises(SystemExit) as e:
        options = Options(environ={"HOME": str(tmp_path)})
        options.parseOptions(args)
        tap.makeService(options)
    message = e.value.code
    assert isinstance(message, str)
    assert message.startswith("ollamaproxy: ") and "\n" not in message, message
    assert fragment.replace("{tmp}", str(tmp_path)) in message
    assert "0123456789abcdef-test" not in message


def test_plugin_is_discoverable() -> None:
    """twistd finds a plugin named ollamaproxy whose options and makeService are tap's."""
    makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "ollamaproxy"]
    assert makers, "no ollamaproxy plugin found"
    for maker in makers:
        assert isinstance(maker.options(), Options)
        assert maker.makeService is tap.makeService


@pytest.mark.parametrize(("policy", "required"), [("local", False), ("closed", True)])
def test_redis_wiring(tmp_path: Path, policy: str, required: bool) -> None:
    """
    With --redis, the link to Redis is a service stopped after the requests
    in flight (after DrainService), followed by the fair queue shared
    through it (stopped before it), /-/ready reports a C{redis} check (not
    yet connected here) that makes the proxy unready under the closed
    policy and only degraded under the local one, and the metrics show
    C{ollamaproxy_redis_up}; without it, none of these (test_service_structure).
    """
    config = base_config(tmp_path, api_key="k", redis=parse_redis_url("redis://cache:6379/0"),
                         redis_failure=policy)
    service = build_service(config, daemon_reactor(MemoryReactorClock()), lambda text: None)
    kinds = [type(child) for child in children(service)]
    assert kinds == [PoolService, BackendPool, UsageStore, Recorder, QuotaSeed, RedisLink,
                     RedisQueue, KeysReloader, DrainService, Sampler, Listeners, UpstreamProbe,
                     DrainDelay]
    stub: Any = StubTreq(endpoint_services(service)[0].factory.resource)
    response = stub.get("http://127.0.0.1/-/ready")
    stub.flush()
    answer = _RESULTS.successResultOf(response)
    document = json.loads(_RESULTS.successResultOf(stub.content(answer)))
    # Not ready in any case here: the token quotas are read on a thread,
    # which this reactor never runs.
    assert answer.code == 503
    assert document["checks"]["redis"] is False
    assert ("redis" in document["error"]) is required
    assert ("redis" in document.get("degraded", [])) is not required
    metrics = stub.get("http://127.0.0.1/metrics", headers={"Authorization": "Bearer k"})
    stub.flush()
    text = _RESULTS.successResultOf(stub.content(_RESULTS.successResultOf(metrics)))
    assert b"ollamaproxy_redis_up 0.0" in text


_RESULTS = SynchronousTestCase()

HOLD = json.dumps({"model": "hold", "messages": [{"role": "user", "content": "hi"}]}).encode()


class _Stops(Service):
    """
    Stands for the listeners: notes when it is told to stop.
    """

    def __init__(self, chain: Chain) -> None:
        self._chain = chain
        self.stopped_at: float | None = None

    def stopService(self) -> None:
        super().stopService()
        self.stopped_at = self._chain.clock.seconds()


def _stopping(chain: Chain, delay: float) -> tuple[StopInOrder, _Stops]:
    """
    The stop order of L{build_service} around C{chain}: the drain delay
    first, then the listeners, then the drain of the requests in flight.
    """
    listeners = _Stops(chain)
    service = StopInOrder()
    for child in [DrainService(chain.in_flight, 30.0), listeners,
                  DrainDelay(chain.in_flight, delay, 30.0, chain.clock)]:
        child.setServiceParent(service)
    service.startService()
    return service, listeners


def _lines(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == "ollamaproxy.tap"]


def test_drain_delay_serves_while_not_ready() -> None:
    """
    With C{--drain-delay 10}, a stop turns C{/-/ready} to 503 at once, still
    serves a request arriving during the 10 seconds, and only then stops
    the listeners and drains, saying so in a line at each step: how many
    requests are in flight, the delay and the grace period.
    """
    chain = Chain()
    service, listeners = _stopping(chain, 10.0)
    held = chain.request("POST", "/api/chat", data=HOLD)
    with capturedLogs() as events:
        stopped = service.stopService()
    assert chain.respond("GET", "/-/ready", key=None).code == 503
    chain.clock.advance(9.5)
    tags = chain.respond("GET", "/api/tags")
    assert tags.code == 200
    assert chain.pending(stopped) and listeners.stopped_at is None
    with capturedLogs() as later:
        chain.clock.advance(0.5)
    assert listeners.stopped_at == 10.0
    assert chain.pending(stopped)  # the chat is still in flight
    assert chain.respond("GET", "/api/tags").code == 503
    chain.fake.held[-1].finish()
    chain.flush()
    chain.body(chain.result(held))
    assert chain.result(stopped) is None
    assert _lines(list(events)) + _lines(list(later)) == [
        "Stopping with 1 request(s) in flight: /-/ready answers 503 while requests are still "
        "served for 10 s (--drain-delay), then the ports close and the requests in flight get "
        "up to 30 s to finish (--grace-period)",
        "Drain delay over: the ports close; 1 request(s) in flight get up to 30 s to finish "
        "(--grace-period)",
    ]


def test_no_drain_delay_closes_the_ports_at_once() -> None:
    """
    With the default C{--drain-delay 0}, a stop closes the listeners at
    once, as before the option, after one line saying what drains and for
    how long.
    """
    chain = Chain()
    service, listeners = _stopping(chain, 0.0)
    with capturedLogs() as events:
        stopped = service.stopService()
    assert listeners.stopped_at == 0.0
    assert chain.result(stopped) is None
    assert _lines(list(events)) == [
        "Stopping: the ports close; 0 request(s) in flight get up to 30 s to finish "
        "(--grace-period)"
    ]


def test_drain_delay_option() -> None:
    """C{--drain-delay} is read in seconds; it is 0 by default, and never negative."""
    assert parse([]).config.drain_delay == 0.0
    assert parse(["--drain-delay", "15"]).config.drain_delay == 15.0
    with pytest.raises(usage.UsageError, match="--drain-delay"):
        parse(["--drain-delay", "-1"])


def test_start_says_where_usage_is_kept(tmp_path: Path) -> None:
    """
    The start-up check of the files says in one line which SQLite file
    keeps usage and whether it opened (or is new); with C{--database}, that
    it is the spill file, and never the database's password.
    """
    config = base_config(tmp_path, api_key="k")
    path = config.usage_file
    with capturedLogs() as events:
        tap.check_files(config)
    assert _lines(list(events)) == [
        f"Usage is kept in the SQLite file {path}: new, it is made at start"
    ]
    Path(path).parent.mkdir(parents=True)
    sqlite3.connect(path).close()
    with capturedLogs() as events:
        tap.check_files(config)
    assert _lines(list(events)) == [f"Usage is kept in the SQLite file {path}: it opens"]
    shared = replace(config, database="postgresql://me:hunter2@db.example/proxy")
    with capturedLogs() as events:
        tap.check_files(shared)
    assert _lines(list(events)) == [
        f"The SQLite file {path} keeps usage while PostgreSQL does not answer: it opens"
    ]
    assert all("hunter2" not in formatEvent(e) for e in events)


def test_kubernetes_example_gives_time_to_drain() -> None:
    """
    The Kubernetes example in docs/deployment.md runs options the proxy
    accepts, probes its readiness path, and gives the pod more time to stop
    than the drain delay and the grace period it sets add up to.
    """
    text = (Path(__file__).parent.parent / "docs" / "deployment.md").read_text()
    example = text.split("**Kubernetes.**", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    args = re.search(r"args: (\[.*?\])", example, re.DOTALL)
    budget = re.search(r"terminationGracePeriodSeconds: (\d+)", example)
    assert args is not None and budget is not None, example
    argv = json.loads(args.group(1))
    config = parse(argv[argv.index("ollamaproxy") + 1:]).config
    assert config.drain_delay > 0
    assert int(budget.group(1)) > config.drain_delay + config.grace_period
    assert "path: /-/ready" in example


@pytest.mark.parametrize(("changes", "cost"), [
    ({}, 20 * FALLBACK_PROMPT_SECONDS + 5 * FALLBACK_OUTPUT_SECONDS),
    ({"fair_share": "tokens"}, 20 + 2 * 5),
    ({"fair_share": "tokens", "output_token_weight": 3.0}, 20 + 3 * 5),
    ({"fair_share": "requests"}, 1),
])
def test_the_fair_queue_options_reach_the_router(
    tmp_path: Path, changes: dict[str, Any], cost: float
) -> None:
    """
    --fair-share and --output-token-weight decide what the router's fair
    queue charges a request of 20 prompt tokens that may generate 5: by
    default GPU seconds, at the fallback rates of a model not measured.
    """
    clock = MemoryReactorClock()
    upstream = Upstream(cast(IAgent, None), b"http://a", clock, 600, 600)
    router = tap._router(base_config(tmp_path, **changes), clock,
                         BackendPool([Backend(upstream, 1)]))
    meter = Meter()
    meter.expect(20, "llama3.2")
    router.acquire("k", resolve("llama3.2"), runs=True, meter=meter, expected_output=5)
    assert router.queue.finish("k") == cost


@pytest.mark.parametrize(("hold", "collates"), [("3", True), ("0", False)])
def test_switch_hold_reaches_the_router(tmp_path: Path, hold: str, collates: bool) -> None:
    """
    --switch-hold collates the router's requests by model; 0 does not.
    """
    clock = MemoryReactorClock()
    upstream = Upstream(cast(IAgent, None), b"http://a", clock, 600, 600)
    config = parse(["--switch-hold", hold]).config
    router = tap._router(config, clock, BackendPool([Backend(upstream, 1)]))
    assert (router.collator is not None) is collates


@pytest.mark.parametrize("keep", [True, False])
def test_the_context_rule_reads_the_router_unless_off(tmp_path: Path, keep: bool) -> None:
    """
    --keep-loaded-context (on by default) gives the caps the router's
    loaded contexts, beside --max-num-ctx; off, none.
    """
    clock = MemoryReactorClock()
    upstream = Upstream(cast(IAgent, None), b"http://a", clock, 600, 600)
    config = base_config(tmp_path, keep_loaded_context=keep, max_num_ctx=8192)
    router = tap._router(config, clock, BackendPool([Backend(upstream, 1)]))
    caps = tap._caps(config, router)
    assert caps.num_ctx == 8192
    assert (caps.loaded_context == router.loaded_context) is keep


@pytest.mark.parametrize(("slack", "remembers"), [(3, True), (None, False)])
def test_the_affinity_slack_reaches_the_router(
    tmp_path: Path, slack: int | None, remembers: bool
) -> None:
    """
    --affinity-slack gives the router of several backends its slack; off,
    the router remembers no conversation.
    """
    clock = MemoryReactorClock()
    backends = [Backend(Upstream(cast(IAgent, None), url, clock, 600, 600), 1)
                for url in (b"http://a", b"http://b")]
    router = tap._router(base_config(tmp_path, affinity_slack=slack), clock,
                         BackendPool(backends))
    assert (router.affinity is not None) is remembers
    if router.affinity is not None:
        assert router.affinity.slack == slack
