"""
Tests for L{ollamaproxy.admission.auth}: finding the key a request presents, and
deciding whether the request may go on.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from ollamaproxy.admission.auth import Authenticator, presented_key
from ollamaproxy.admission.keys import ApiKey, KeyStore, digest, generate_key
from ollamaproxy.config import DEFAULT_OPEN_ROUTES, parse_routes
from ollamaproxy.errors import ProxyError
from ollamaproxy.routes import Catalogue, decoded_path

SECRET = generate_key()
ALICE = ApiKey(name="alice", digest=digest(SECRET))


def authenticator() -> Authenticator:
    """
    An authenticator that knows one key, alice's, with the default open routes.
    """
    return Authenticator(KeyStore([ALICE]), parse_routes(DEFAULT_OPEN_ROUTES), Clock())


def check(
    method: bytes, path: bytes, headers: Headers, auth: Authenticator | None = None
) -> ApiKey | None:
    """
    Authenticate a request as the app does: on the decoded path, with its
    route from the catalogue.
    """
    decoded = decoded_path(path)
    return (auth or authenticator()).authenticate(
        method, decoded, Catalogue().find(decoded), headers
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({b"authorization": [b"Bearer K"]}, "K"),
        ({b"authorization": [b"bearer K"]}, "K"),
        ({b"authorization": [b"BEARER K"]}, "K"),
        ({b"authorization": [b"Bearer    K  "]}, "K"),
        ({b"authorization": [b"  Bearer K"]}, "K"),
        ({b"x-api-key": [b"K"]}, "K"),
        ({b"x-api-key": [b"  K "]}, "K"),
        ({b"authorization": [b"Bearer A"], b"x-api-key": [b"B"]}, "A"),
        ({b"authorization": [b"Basic dXNlcjpwYXNz"], b"x-api-key": [b"B"]}, "B"),
        ({b"authorization": [b"Bearer "], b"x-api-key": [b"B"]}, "B"),
        ({b"authorization": [b"Basic dXNlcjpwYXNz"]}, None),
        ({b"authorization": [b"Token K"]}, None),
        ({b"authorization": [b"K"], b"x-api-key": [b"B"]}, "B"),
        ({b"authorization": [b"Bearer"]}, None),
        ({b"authorization": [b"Bearer    "]}, None),
        ({b"authorization": [b""]}, None),
        ({b"x-api-key": [b""]}, None),
        ({b"x-api-key": [b"   "]}, None),
        ({b"content-type": [b"application/json"]}, None),
        ({}, None),
    ],
    ids=[
        "bearer",
        "bearer-lower",
        "bearer-upper",
        "bearer-spaces",
        "bearer-leading-space",
        "x-api-key",
        "x-api-key-spaces",
        "bearer-wins",
        "basic-ignored-x-api-key-used",
        "empty-bearer-x-api-key-used",
        "basic-only",
        "other-scheme",
        "bare-authorization-x-api-key-used",
        "bearer-no-token",
        "bearer-blank-token",
        "empty-authorization",
        "empty-x-api-key",
        "blank-x-api-key",
        "no-key-headers",
        "no-headers",
    ],
)
def test_presented_key(raw: dict[bytes, list[bytes]], expected: str | None) -> None:
    """The key comes from a Bearer token, else from X-API-Key; anything else is no key."""
    assert presented_key(Headers(raw)) == expected


@pytest.mark.parametrize("route", [b"/api/version", b"/api/chat"])
def test_key_without_bearer_is_told_so(route: bytes) -> None:
    """
    A key sent as C{Authorization: <key>}, without the Bearer scheme, gets a
    401 that says how to send it, on an open route too, and the message does
    not repeat the key.
    """
    headers = Headers({b"authorization": [SECRET.encode()]})
    with pytest.raises(ProxyError) as raised:
        check(b"GET" if route == b"/api/version" else b"POST", route, headers)
    assert raised.value.code == 401
    assert "Authorization: Bearer <key>" in raised.value.message
    assert SECRET not in raised.value.message


@pytest.mark.parametrize(
    ("method", "path"),
    [
        (b"GET", b"/"),
        (b"HEAD", b"/"),
        (b"GET", b"/api/version"),
        (b"HEAD", b"/api/version"),
        # Ollama's router decodes the path: this is /api/version to it.
        (b"GET", b"/api/%76ersion"),
    ],
)
def test_open_route_needs_no_key(method: bytes, path: bytes) -> None:
    """An open route is let through without a key, and yields no ApiKey."""
    assert check(method, path, Headers()) is None


@pytest.mark.parametrize(
    "raw",
    [{b"authorization": [b"Bearer wrong"]}, {b"x-api-key": [b"wrong"]}],
    ids=["bearer", "x-api-key"],
)
def test_open_route_checks_a_presented_key(raw: dict[bytes, list[bytes]]) -> None:
    """
    A wrong key on an open route is a 401: a chat UI's "verify connection"
    must not turn green with a wrong key.
    """
    with pytest.raises(ProxyError) as raised:
        check(b"GET", b"/api/version", Headers(raw))
    assert raised.value.code == 401


@pytest.mark.parametrize(
    ("method", "path"),
    [
        (b"GET", b"/api/version/"),
        (b"GET", b"/API/VERSION"),
        (b"GET", b"/api/Version"),
        (b"GET", b"/api/version%2F"),
        (b"GET", b"/api/version/../tags"),
        (b"GET", b"/api/./version"),
        (b"GET", b"//api/version"),
        (b"GET", b"/api/version;x"),
        (b"POST", b"/api/version"),
        (b"get", b"/api/version"),
        (b"DELETE", b"/"),
        (b"GET", b""),
        (b"GET", b"/api/tags"),
        (b"POST", b"/api/chat"),
    ],
)
def test_closed_route_needs_key(method: bytes, path: bytes) -> None:
    """Any route not exactly in the open set, however close its spelling, needs a key."""
    with pytest.raises(ProxyError) as raised:
        check(method, path, Headers())
    assert raised.value.code == 401
    assert raised.value.headers == {b"WWW-Authenticate": b"Bearer"}


def test_missing_key() -> None:
    """No key gives a 401 that says how to send one and asks for a Bearer token."""
    with pytest.raises(ProxyError) as raised:
        check(b"POST", b"/api/chat", Headers())
    assert raised.value.code == 401
    assert raised.value.headers == {b"WWW-Authenticate": b"Bearer"}
    assert "missing API key" in raised.value.message


@pytest.mark.parametrize(
    "raw",
    [
        {b"authorization": [b"Bearer " + generate_key().encode()]},
        {b"x-api-key": [generate_key().encode()]},
        {b"authorization": [b"Bearer " + SECRET[:-1].encode()]},
        {b"x-api-key": [ALICE.digest.hex().encode()]},
        {b"authorization": [b"Bearer wrong"], b"x-api-key": [SECRET.encode()]},
    ],
    ids=["bearer", "x-api-key", "truncated", "digest", "wrong-bearer-beats-right-x-api-key"],
)
def test_wrong_key(raw: dict[bytes, list[bytes]]) -> None:
    """A key the store does not know gives a 401 with WWW-Authenticate: Bearer."""
    with pytest.raises(ProxyError) as raised:
        check(b"POST", b"/api/chat", Headers(raw))
    assert raised.value.code == 401
    assert raised.value.headers == {b"WWW-Authenticate": b"Bearer"}
    assert "invalid API key" in raised.value.message


@pytest.mark.parametrize(
    "raw",
    [
        {b"authorization": [b"Bearer " + SECRET.encode()]},
        {b"x-api-key": [SECRET.encode()]},
        {b"authorization": [b"Basic dXNlcjpwYXNz"], b"x-api-key": [SECRET.encode()]},
    ],
    ids=["bearer", "x-api-key", "basic-and-x-api-key"],
)
def test_right_key(raw: dict[bytes, list[bytes]]) -> None:
    """The right key, in either header, yields its ApiKey."""
    assert check(b"POST", b"/api/chat", Headers(raw)) is ALICE


def test_right_key_on_open_route_is_checked() -> None:
    """On an open route the right key is checked and yields its ApiKey."""
    headers = Headers({b"authorization": [b"Bearer " + SECRET.encode()]})
    assert check(b"GET", b"/", headers) is ALICE
