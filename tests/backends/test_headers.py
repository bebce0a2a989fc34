"""
Tests for L{ollamaproxy.backends.headers}: which headers cross the proxy, in each
direction.
"""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from ollamaproxy.backends.headers import copy_response_headers, upstream_request_headers

# RFC 9110 section 7.6.1, plus the obsolete ones proxies still see.
HOP_BY_HOP = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Authenticate",
    b"Proxy-Authorization",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
]

CLIENT_ONLY = [
    b"Authorization",
    b"X-API-Key",
    b"Cookie",
    b"Origin",
    b"Referer",
    b"Host",
    b"Content-Length",
    b"Expect",
]

CLIENT_KEPT = {
    b"content-type": [b"application/json"],
    b"accept": [b"application/x-ndjson"],
    b"user-agent": [b"ollama-python/0.4.7"],
    b"x-stainless-os": [b"Linux"],
    b"x-custom": [b"one", b"two"],
}

UPSTREAM_KEPT = {
    b"content-type": [b"application/x-ndjson"],
    b"content-length": [b"1234"],
    b"date": [b"Thu, 27 Nov 2026 07:00:00 GMT"],
    b"set-cookie": [b"a=1", b"b=2"],
    b"x-custom": [b"one", b"two"],
}


def as_dict(headers: Headers) -> dict[bytes, list[bytes]]:
    """
    All of a Headers' values by lower-cased name.
    """
    return {name.lower(): list(values) for name, values in headers.getAllRawHeaders()}


@pytest.mark.parametrize("name", HOP_BY_HOP + CLIENT_ONLY)
def test_request_drops(name: bytes) -> None:
    """Hop-by-hop headers and the client's credentials, cookies, origin and framing stay behind."""
    client = Headers({name: [b"value"], **CLIENT_KEPT})
    assert as_dict(upstream_request_headers(client)) == CLIENT_KEPT


@pytest.mark.parametrize(
    "connection",
    [
        [b"X-Hop"],
        [b"keep-alive, X-Hop"],
        [b"close,x-hop"],
        [b"close", b"X-HOP"],
        [b" , X-Hop , "],
    ],
)
def test_request_drops_connection_named(connection: list[bytes]) -> None:
    """A header named in Connection is not forwarded, whatever its case or position."""
    client = Headers({b"connection": connection, b"x-hop": [b"1"], **CLIENT_KEPT})
    assert as_dict(upstream_request_headers(client)) == CLIENT_KEPT


def test_request_keeps_others() -> None:
    """Other headers are forwarded with all their values, in order."""
    client = Headers(dict(CLIENT_KEPT))
    assert as_dict(upstream_request_headers(client)) == CLIENT_KEPT


def test_request_leaves_client_headers_alone() -> None:
    """Building the upstream headers does not change the client's headers."""
    client = Headers({b"authorization": [b"Bearer k"], b"x-custom": [b"a", b"b"]})
    upstream_request_headers(client)
    assert as_dict(client) == {b"authorization": [b"Bearer k"], b"x-custom": [b"a", b"b"]}


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_response_drops_hop_by_hop(name: bytes) -> None:
    """Hop-by-hop headers from Ollama do not reach the client."""
    upstream = Headers({name: [b"value"], **UPSTREAM_KEPT})
    response = Headers()
    copy_response_headers(upstream, response)
    assert as_dict(response) == UPSTREAM_KEPT


@pytest.mark.parametrize("connection", [[b"X-Hop"], [b"keep-alive, x-hop"], [b"close", b"X-HOP"]])
def test_response_drops_connection_named(connection: list[bytes]) -> None:
    """A header Ollama names in Connection does not reach the client."""
    upstream = Headers({b"connection": connection, b"x-hop": [b"1"], **UPSTREAM_KEPT})
    response = Headers()
    copy_response_headers(upstream, response)
    assert as_dict(response) == UPSTREAM_KEPT


def test_response_keeps_end_to_end() -> None:
    """Content-Type, Content-Length, Date and multi-valued headers are copied whole."""
    response = Headers()
    copy_response_headers(Headers(dict(UPSTREAM_KEPT)), response)
    assert as_dict(response) == UPSTREAM_KEPT


def test_response_replaces_existing_values() -> None:
    """Ollama's value for a header replaces one already on the response; others stay."""
    response = Headers({b"content-type": [b"text/html"], b"server": [b"TwistedWeb"]})
    copy_response_headers(Headers({b"content-type": [b"application/json"]}), response)
    assert as_dict(response) == {
        b"content-type": [b"application/json"],
        b"server": [b"TwistedWeb"],
    }
