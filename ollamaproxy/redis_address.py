# -*- test-case-name: tests.test_redis_address -*-
"""
Reading C{--redis URL}: C{redis://[user:password@]host[:port][/db]}, and
C{rediss://} for TLS; and C{--redis-failure}.

In the base layer, so that the options (L{ollamaproxy.config}) read the
address into a plain value without importing the Redis room, which connects
to it (L{ollamaproxy.redis.link}).

The password is kept apart from what is shown: L{RedisAddress.shown} and
every error message have it blanked.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from ollamaproxy.errors import ConfigError

DEFAULT_PORT = 6379
FAILURE_POLICIES = ("local", "closed")


@dataclass(frozen=True)
class RedisAddress:
    """
    Where Redis is and how to log in.

    @ivar host: Its host name or address (IPv6 without brackets).
    @ivar port: Its port.
    @ivar db: The database number (C{SELECT}).
    @ivar tls: Whether to speak TLS (C{rediss://}); the server's
        certificate is checked against the system's trusted authorities and
        the host name.
    @ivar username: The ACL user, or L{None} for the default user.
    @ivar password: The password, or L{None}; never shown.
    """

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def shown(self) -> str:
        """
        The address for logs: the URL without the password.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(value: str) -> RedisAddress:
    """
    Read a Redis URL.

    @raise ConfigError: If it is not one, in a message without its password.
    """
    value = value.strip()
    try:
        split = urlsplit(value)
        port = split.port
    except ValueError:
        raise ConfigError(_bad(value, "the port must be a number from 1 to 65535")) from None
    if split.scheme not in ("redis", "rediss"):
        raise ConfigError(_bad(value, "it must start with redis:// or rediss:// (TLS)"))
    if not split.hostname:
        raise ConfigError(_bad(value, "it names no host"))
    if split.query or split.fragment:
        raise ConfigError(_bad(value, "it may not have a query (?...) or a fragment (#...)"))
    db_text = split.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(_bad(value, f"the database {db_text!r} is not a number"))
    host = split.hostname
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return RedisAddress(
        host=host,
        port=port or DEFAULT_PORT,
        db=int(db_text),
        tls=split.scheme == "rediss",
        username=unquote(split.username) if split.username else None,
        password=unquote(split.password) if split.password is not None else None,
    )


def parse_failure_policy(value: str) -> str:
    """
    Read C{--redis-failure}: C{local} or C{closed}.

    @raise ConfigError: For anything else.
    """
    policy = value.strip().lower()
    if policy not in FAILURE_POLICIES:
        raise ConfigError(
            f"--redis-failure: {value!r} is not one of {', '.join(FAILURE_POLICIES)}"
        )
    return policy


def _bad(value: str, reason: str) -> str:
    return (
        f"--redis: {_without_password(value)!r} is not a Redis URL such as "
        f"redis://host:6379/0 or rediss://user:password@host:6380/0: {reason}"
    )


def _without_password(value: str) -> str:
    """
    C{value} with whatever stands between C{:} and C{@} in its authority
    blanked, however malformed the rest is.
    """
    scheme, sep, rest = value.partition("://")
    if not sep:
        return "[redacted]" if "@" in value else value
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        credentials, _, host = authority.rpartition("@")
        user = credentials.partition(":")[0]
        authority = f"{user}:[redacted]@{host}" if ":" in credentials else f"[redacted]@{host}"
    return f"{scheme}://{authority}{slash}{path}"


