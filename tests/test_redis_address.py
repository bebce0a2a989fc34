"""
Tests for L{ollamaproxy.redis_address} and the C{--redis} options of
L{ollamaproxy.config.Config}.
"""

from __future__ import annotations

import pytest

from ollamaproxy.config import Config, ConfigError
from ollamaproxy.redis_address import RedisAddress, parse_redis_url


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://cache", RedisAddress("cache")),
        ("redis://cache:6380/2", RedisAddress("cache", 6380, 2)),
        ("rediss://cache:6380/0", RedisAddress("cache", 6380, 0, tls=True)),
        ("redis://:s%40cret@10.0.0.5", RedisAddress("10.0.0.5", password="s@cret")),
        ("redis://proxy:pw@[::1]:7000/", RedisAddress("::1", 7000, username="proxy",
                                                      password="pw")),
    ],
)
def test_urls(url: str, address: RedisAddress) -> None:
    """Host, port (6379 by default), database, TLS, user and password are read."""
    assert parse_redis_url(url) == address


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://u:hunter2pass@cache", "redis:// or rediss://"),
        ("redis://u:hunter2pass@cache:port", "port must be a number"),
        ("redis://u:hunter2pass@cache:99999", "port must be a number"),
        ("redis://u:hunter2pass@cache/one", "database 'one'"),
        ("redis://u:hunter2pass@", "names no host"),
        ("redis://u:hunter2pass@cache/0?ssl=true", "query"),
        ("cache:6379", "redis:// or rediss://"),
    ],
)
def test_bad_urls(url: str, reason: str) -> None:
    """A bad URL is refused with a reason, and the message never shows its password."""
    with pytest.raises(ConfigError) as caught:
        parse_redis_url(url)
    message = str(caught.value)
    assert message.startswith("--redis: ")
    assert reason in message
    assert "hunter2pass" not in message


def test_shown_without_password() -> None:
    """What the logs show of the address has no user and no password."""
    address = parse_redis_url("rediss://proxy:hunter2pass@cache:6380/3")
    assert address.shown == "rediss://cache:6380/3"
    assert "hunter2pass" not in repr(address)


def test_config_defaults() -> None:
    """Without --redis, limits stay in the process: no Redis, policy local, 30 s leases."""
    config = Config.from_sources({}, {"HOME": "/nonexistent"})
    assert (config.redis, config.redis_failure, config.redis_lease) == (None, "local", 30.0)


def test_config_from_environment() -> None:
    """OLLAMAPROXY_REDIS (which keeps a password out of ps) and the policy are read."""
    config = Config.from_sources(
        {"redis-failure": "CLOSED"},
        {"HOME": "/nonexistent", "OLLAMAPROXY_REDIS": "redis://:pw@cache:6379/1",
         "OLLAMAPROXY_REDIS_LEASE": "10"},
    )
    assert config.redis == RedisAddress("cache", 6379, 1, password="pw")
    assert (config.redis_failure, config.redis_lease) == ("closed", 10.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"redis-failure": "open"}, "--redis-failure: 'open' is not one of local, closed"),
        ({"redis-lease": "0"}, "--redis-lease: must be more than 0 seconds"),
        ({"redis-lease": "2"}, "--redis-lease: must be at least 3 seconds, not 2"),
    ],
)
def test_config_bad_policy(options: dict[str, object], message: str) -> None:
    """An unknown policy or a lease too short to renew is refused, naming the option."""
    with pytest.raises(ConfigError, match=message):
        Config.from_sources(options, {"HOME": "/nonexistent"})
