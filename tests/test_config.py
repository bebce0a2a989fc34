"""
Tests for L{ollamaproxy.config}: defaults, precedence of options over
environment variables, and the parsers for each kind of setting.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ollamaproxy.config import (
    Config,
    ConfigError,
    Route,
    UpstreamSetting,
    default_keys_file,
    default_usage_file,
    parse_ollama_host,
    parse_routes,
    parse_size,
    show_size,
)

DEFAULT_ROUTES = frozenset(
    {
        Route(b"GET", b"/"),
        Route(b"HEAD", b"/"),
        Route(b"GET", b"/api/version"),
        Route(b"HEAD", b"/api/version"),
    }
)

TIMEOUTS = ["connect-timeout", "header-timeout", "idle-timeout"]


def env_name(option: str) -> str:
    """
    The environment variable that stands in for an option.
    """
    return "OLLAMAPROXY_" + option.upper().replace("-", "_")


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no options and an empty environment, every setting has its documented default."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Config.from_sources({}, {}) == Config(
        listen=("tcp:5000",),
        upstreams=(UpstreamSetting("http://127.0.0.1:11434"),),
        api_key=None,
        keys_file=f"{tmp_path}/.config/ollamaproxy/keys.json",
        log_dir=None,
        open_routes=DEFAULT_ROUTES,
        connect_timeout=10.0,
        header_timeout=600.0,
        idle_timeout=600.0,
        usage_file=f"{tmp_path}/.local/state/ollamaproxy/usage.sqlite3",
    )


def test_unset_options_are_not_given() -> None:
    """Options left at None and an empty listen list (as usage.Options leaves them) are unset."""
    unset: dict[str, object] = {
        "upstream": None,
        "api-key": None,
        "keys-file": None,
        "log-dir": None,
        "open-routes": None,
        "connect-timeout": None,
        "header-timeout": None,
        "idle-timeout": None,
        "listen": [],
    }
    environ = {"HOME": "/home/alice"}
    assert Config.from_sources(unset, environ) == Config.from_sources({}, environ)


ENVIRON = {
    "OLLAMAPROXY_LISTEN": "tcp:7000",
    "OLLAMAPROXY_UPSTREAM": "env-host",
    "OLLAMAPROXY_API_KEY": "env-key-0123456789",
    "OLLAMAPROXY_KEYS_FILE": "/env/keys.json",
    "OLLAMAPROXY_LOG_DIR": "/env/logs",
    "OLLAMAPROXY_OPEN_ROUTES": "GET /env",
    "OLLAMAPROXY_CONNECT_TIMEOUT": "1",
    "OLLAMAPROXY_HEADER_TIMEOUT": "2",
    "OLLAMAPROXY_IDLE_TIMEOUT": "3",
    "OLLAMA_HOST": "ollama-host",
    "XDG_CONFIG_HOME": "/xdg",
}


def test_environment_used_without_options() -> None:
    """Each OLLAMAPROXY_* variable sets its option when the option is not given."""
    assert Config.from_sources({}, ENVIRON) == Config(
        listen=("tcp:7000",),
        upstreams=(UpstreamSetting("http://env-host:11434"),),
        api_key="env-key-0123456789",
        keys_file="/env/keys.json",
        log_dir="/env/logs",
        open_routes=frozenset({Route(b"GET", b"/env")}),
        connect_timeout=1.0,
        header_timeout=2.0,
        idle_timeout=3.0,
        usage_file=default_usage_file(ENVIRON),
    )


def test_options_win_over_environment() -> None:
    """An option given on the command line beats its environment variable."""
    options: dict[str, object] = {
        "listen": ["tcp:8000"],
        "upstream": "https://opt-host",
        "api-key": "opt-key-0123456789",
        "keys-file": "/opt/keys.json",
        "log-dir": "/opt/logs",
        "open-routes": "POST /opt",
        "connect-timeout": "4",
        "header-timeout": "5.5",
        "idle-timeout": "6",
    }
    assert Config.from_sources(options, ENVIRON) == Config(
        listen=("tcp:8000",),
        upstreams=(UpstreamSetting("https://opt-host:443"),),
        api_key="opt-key-0123456789",
        keys_file="/opt/keys.json",
        log_dir="/opt/logs",
        open_routes=frozenset({Route(b"POST", b"/opt")}),
        connect_timeout=4.0,
        header_timeout=5.5,
        idle_timeout=6.0,
        usage_file=default_usage_file(ENVIRON),
    )


@pytest.mark.parametrize(
    ("options", "environ", "upstream"),
    [
        ({}, {"OLLAMA_HOST": "gpu-box"}, "http://gpu-box:11434"),
        ({}, {"OLLAMA_HOST": "0.0.0.0:11434"}, "http://0.0.0.0:11434"),
        (
            {},
            {"OLLAMA_HOST": "gpu-box", "OLLAMAPROXY_UPSTREAM": "other:1"},
            "http://other:1",
        ),
        ({"upstream": "opt:2"}, {"OLLAMA_HOST": "gpu-box"}, "http://opt:2"),
        ({}, {}, "http://127.0.0.1:11434"),
    ],
    ids=["ollama-host", "ollama-host-everywhere", "env-wins", "option-wins", "default"],
)
def test_ollama_host_fallback(
    options: dict[str, object], environ: dict[str, str], upstream: str
) -> None:
    """OLLAMA_HOST sets the upstream only when neither --upstream nor OLLAMAPROXY_UPSTREAM does."""
    assert Config.from_sources(options, environ).upstreams[0].url == upstream


def test_listen_from_options_keeps_order() -> None:
    """Repeated --listen options become the listen tuple, in the order given."""
    options: dict[str, object] = {"listen": ["tcp:1:interface=127.0.0.1", "unix:/tmp/p.sock"]}
    config = Config.from_sources(options, {})
    assert config.listen == ("tcp:1:interface=127.0.0.1", "unix:/tmp/p.sock")


def test_listen_option_is_not_resplit() -> None:
    """An endpoint from --listen is used verbatim, even when a path in it holds a space."""
    endpoint = "ssl:5443:privateKey=/Users/me/Application Support/key.pem"
    assert Config.from_sources({"listen": [endpoint]}, {}).listen == (endpoint,)


@pytest.mark.parametrize(
    "value",
    ["tcp:1,tcp:2,tcp:3", "tcp:1 tcp:2 tcp:3", " tcp:1 , tcp:2,\ttcp:3\n", "tcp:1,,tcp:2, ,tcp:3"],
    ids=["commas", "spaces", "mixed", "empty-items"],
)
def test_listen_from_environment(value: str) -> None:
    """OLLAMAPROXY_LISTEN is a comma- or whitespace-separated list."""
    config = Config.from_sources({}, {"OLLAMAPROXY_LISTEN": value})
    assert config.listen == ("tcp:1", "tcp:2", "tcp:3")


def test_listen_of_only_separators_is_an_error() -> None:
    """A listen list with no endpoint in it is refused, naming --listen."""
    with pytest.raises(ConfigError, match="--listen"):
        Config.from_sources({}, {"OLLAMAPROXY_LISTEN": " , "})


@pytest.mark.parametrize(
    ("options", "environ"),
    [
        ({"api-key": "short"}, {}),
        ({}, {"OLLAMAPROXY_API_KEY": "fifteen-chars-x"}),
    ],
    ids=["option", "environment"],
)
def test_short_api_key_is_refused(options: dict[str, object], environ: dict[str, str]) -> None:
    """
    An operator's key under 16 characters could be guessed: the start is
    refused with a message that names the option and never the key.
    """
    with pytest.raises(ConfigError, match=r"^--api-key: .*at least 16 characters") as e:
        Config.from_sources(options, environ)
    given = str(options.get("api-key") or environ.get("OLLAMAPROXY_API_KEY"))
    assert given not in str(e.value)


def test_api_key_of_16_characters_is_accepted() -> None:
    """A key of exactly 16 characters is long enough."""
    assert Config.from_sources({"api-key": "0123456789abcdef"}, {}).api_key == "0123456789abcdef"


@pytest.mark.parametrize("name", TIMEOUTS)
@pytest.mark.parametrize("value", ["soon", "0", "-1", "-0.5", "nan"])
def test_bad_timeout_option(name: str, value: str) -> None:
    """A timeout option that is not a positive number raises ConfigError naming the option."""
    with pytest.raises(ConfigError, match=f"^--{name}:"):
        Config.from_sources({name: value}, {})


@pytest.mark.parametrize("name", TIMEOUTS)
def test_bad_timeout_environment(name: str) -> None:
    """A bad timeout from the environment is refused too, naming the option."""
    with pytest.raises(ConfigError, match=f"^--{name}:"):
        Config.from_sources({}, {env_name(name): "0"})


@pytest.mark.parametrize("name", TIMEOUTS)
def test_fractional_timeout(name: str) -> None:
    """Timeouts are seconds as floats, fractions allowed."""
    config = Config.from_sources({name: "0.25"}, {})
    assert getattr(config, name.replace("-", "_")) == 0.25


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "http://127.0.0.1:11434"),
        ("   ", "http://127.0.0.1:11434"),
        ("gpu-box", "http://gpu-box:11434"),
        ("1.2.3.4", "http://1.2.3.4:11434"),
        (" 1.2.3.4 ", "http://1.2.3.4:11434"),
        ("gpu-box:1234", "http://gpu-box:1234"),
        (":1234", "http://127.0.0.1:1234"),
        ("0.0.0.0", "http://0.0.0.0:11434"),
        ("0.0.0.0:11434", "http://0.0.0.0:11434"),
        ("http://gpu-box", "http://gpu-box:80"),
        ("https://gpu-box", "https://gpu-box:443"),
        ("http://gpu-box:11434", "http://gpu-box:11434"),
        ("https://gpu-box:8443", "https://gpu-box:8443"),
        ("gpu-box/", "http://gpu-box:11434"),
        ("gpu-box:1234/ollama/", "http://gpu-box:1234/ollama"),
        ("https://example.com/ollama", "https://example.com:443/ollama"),
        ("https://example.com/a/b/", "https://example.com:443/a/b"),
        ("[::1]", "http://[::1]:11434"),
        ("[::]", "http://[::]:11434"),
        ("[::1]:11434", "http://[::1]:11434"),
        ("http://[::1]", "http://[::1]:80"),
        ("[2001:db8::1]:56789/path/", "http://[2001:db8::1]:56789/path"),
        ("::1", "http://[::1]:11434"),
    ],
)
def test_parse_ollama_host(value: str, expected: str) -> None:
    """OLLAMA_HOST-style addresses become scheme://host:port[/prefix], as Ollama reads them."""
    assert parse_ollama_host(value) == expected


@pytest.mark.parametrize("value", ['"1.2.3.4"', "'1.2.3.4'", ' " 1.2.3.4 " '])
def test_parse_ollama_host_strips_quotes(value: str) -> None:
    """Quotes around OLLAMA_HOST are dropped, as Ollama's envconfig.Var drops them."""
    assert parse_ollama_host(value) == "http://1.2.3.4:11434"


@pytest.mark.parametrize(
    "value",
    ["ftp://gpu-box", "unix:///run/ollama.sock", "gpu-box:99999", "gpu-box:port"],
)
def test_parse_ollama_host_rejects(value: str) -> None:
    """Unsupported schemes and bad ports raise ConfigError naming --upstream."""
    with pytest.raises(ConfigError, match=r"^--upstream:"):
        parse_ollama_host(value)


def test_parse_routes_default() -> None:
    """The default open-routes string gives GET and HEAD of / and /api/version."""
    assert parse_routes("GET /,HEAD /,GET /api/version,HEAD /api/version") == DEFAULT_ROUTES


@pytest.mark.parametrize("value", ["", " ", ",", " , ,"])
def test_parse_routes_empty(value: str) -> None:
    """An empty (or separators-only) string means no open routes at all."""
    assert parse_routes(value) == frozenset()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("get /api/tags", {Route(b"GET", b"/api/tags")}),
        ("Head /", {Route(b"HEAD", b"/")}),
        (
            "  GET   /a , post /b  ",
            {Route(b"GET", b"/a"), Route(b"POST", b"/b")},
        ),
        ("GET /a,GET /a", {Route(b"GET", b"/a")}),
    ],
)
def test_parse_routes(value: str, expected: set[Route]) -> None:
    """Methods are upper-cased, spaces around items ignored, paths kept exactly."""
    assert parse_routes(value) == frozenset(expected)


@pytest.mark.parametrize(
    "value",
    ["GET", "/api/tags", "GET api/tags", "G3T /x", "GET /,oops", "GET /caf\u00e9"],
)
def test_parse_routes_rejects(value: str) -> None:
    """An item that is not 'METHOD /path' (in ASCII) raises ConfigError naming --open-routes."""
    with pytest.raises(ConfigError, match=r"^--open-routes:"):
        parse_routes(value)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"XDG_CONFIG_HOME": "/xdg"}, "/xdg/ollamaproxy/keys.json"),
        (
            {"XDG_CONFIG_HOME": "/xdg", "HOME": "/home/alice"},
            "/xdg/ollamaproxy/keys.json",
        ),
        ({"HOME": "/home/alice"}, "/home/alice/.config/ollamaproxy/keys.json"),
        (
            {"XDG_CONFIG_HOME": "", "HOME": "/home/alice"},
            "/home/alice/.config/ollamaproxy/keys.json",
        ),
    ],
    ids=["xdg", "xdg-beats-home", "home", "empty-xdg"],
)
def test_default_keys_file(environ: dict[str, str], expected: str) -> None:
    """The keys file lives under $XDG_CONFIG_HOME, else under $HOME/.config."""
    assert default_keys_file(environ) == expected


def test_default_keys_file_without_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With neither variable in the given mapping, the user's home directory is used."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_keys_file({}) == f"{tmp_path}/.config/ollamaproxy/keys.json"


def test_keys_file_default_follows_environ() -> None:
    """Config.from_sources takes the default keys file from the environ it is given."""
    config = Config.from_sources({}, {"XDG_CONFIG_HOME": "/xdg"})
    assert config.keys_file == "/xdg/ollamaproxy/keys.json"


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("1048576", 1048576), ("512K", 512 * 1024), ("20G", 20 * 1024**3),
     ("20g", 20 * 1024**3), ("1TiB", 1024**4), ("3MB", 3 * 1024**2)],
)
def test_parse_size(text: str, size: int) -> None:
    """Sizes are bytes, or K/M/G/T in powers of 1024."""
    assert parse_size("max-body-size", text) == size


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "G", "12X", "lots"])
def test_parse_size_rejects(text: str) -> None:
    """Anything else is a ConfigError naming the option."""
    with pytest.raises(ConfigError, match="--max-body-size"):
        parse_size("max-body-size", text)


def test_min_body_rate_option() -> None:
    """C{--min-body-rate} takes a size a second, 1K by default, 0 for none."""
    assert Config.from_sources({}, {}).min_body_rate == 1024
    assert Config.from_sources({"min-body-rate": "10K"}, {}).min_body_rate == 10240
    assert Config.from_sources({}, {"OLLAMAPROXY_MIN_BODY_RATE": "0"}).min_body_rate == 0
    with pytest.raises(ConfigError, match="--min-body-rate"):
        Config.from_sources({"min-body-rate": "fast"}, {})


@pytest.mark.parametrize(
    ("size", "shown"),
    [(10 * 1024**2, "10 MiB"), (1024, "1 KiB"), (1000, "1000 bytes"), (3 * 1024**4, "3 TiB"),
     (1536 * 1024, "1536 KiB")],
)
def test_show_size(size: int, shown: str) -> None:
    """Sizes in messages read as the operator wrote them: whole units of 1024, else bytes."""
    assert show_size(size) == shown


def test_several_upstreams_with_their_parallelism() -> None:
    """
    --upstream repeated (or OLLAMAPROXY_UPSTREAM comma-separated) gives
    several backends, each with --parallel unless its URL says
    #parallel=N.
    """
    options: dict[str, object] = {
        "upstream": ["gpu1", "http://gpu2:11434#parallel=2"], "parallel": "8",
    }
    config = Config.from_sources(options, {})
    assert config.upstreams == (
        UpstreamSetting("http://gpu1:11434", 8), UpstreamSetting("http://gpu2:11434", 2)
    )
    environ = {"OLLAMAPROXY_UPSTREAM": "gpu1,gpu2#parallel=1"}
    assert [u.parallel for u in Config.from_sources({}, environ).upstreams] == [4, 1]


def test_queue_and_caps_options() -> None:
    """
    --max-queue, --queue-timeout, --max-keep-alive and --max-num-ctx are
    read; without them, Ollama's defaults and no caps.
    """
    config = Config.from_sources({"max-queue": "10", "queue-timeout": "5",
                                  "max-keep-alive": "1h", "max-num-ctx": "8192"}, {})
    assert (config.max_queue, config.queue_timeout) == (10, 5.0)
    assert (config.max_keep_alive, config.max_num_ctx) == (3600.0, 8192)
    default = Config.from_sources({}, {})
    assert (default.max_queue, default.queue_timeout, default.max_keep_alive,
            default.max_num_ctx) == (512, 300.0, None, None)


def test_affinity_slack() -> None:
    """
    --affinity-slack is a number of requests, 2 unless given, and C{off}
    (in any case) turns affinity off.
    """
    assert Config.from_sources({}, {}).affinity_slack == 2
    assert Config.from_sources({"affinity-slack": "0"}, {}).affinity_slack == 0
    assert Config.from_sources({}, {"OLLAMAPROXY_AFFINITY_SLACK": "Off"}).affinity_slack is None


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"upstream": ["gpu1#parallel=0"]}, "must be 1 or more"),
        ({"upstream": ["gpu1#weight=2"]}, "only parallel=N"),
        ({"parallel": "0"}, "must be 1 or more"),
        ({"parallel": "many"}, "not a whole number"),
        ({"max-queue": "-1"}, "not a whole number"),
        ({"queue-timeout": "soon"}, "queue-timeout"),
        ({"max-keep-alive": "-1"}, "max-keep-alive"),
        ({"max-keep-alive": "forever"}, "max-keep-alive"),
        ({"max-num-ctx": "0"}, "must be 1 or more"),
        ({"affinity-slack": "-1"}, "not a whole number"),
        ({"affinity-slack": "never"}, "not a whole number"),
    ],
)
def test_bad_backend_settings_are_one_clear_error(
    options: dict[str, object], fragment: str
) -> None:
    """
    Each bad setting of the backends, the queue or the caps is a
    ConfigError that names it.
    """
    with pytest.raises(ConfigError, match=fragment):
        Config.from_sources(options, {})
