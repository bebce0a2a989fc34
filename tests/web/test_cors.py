"""
Tests for L{ollamaproxy.web.cors}: which origins may call the proxy, and the
headers that say so.
"""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from ollamaproxy.config import ConfigError
from ollamaproxy.web.cors import DEFAULT_ORIGINS, Cors, parse_origins

ALLOW_HEADERS = (
    b"Authorization,X-API-Key,Content-Type,User-Agent,Accept,X-Requested-With,OpenAI-Beta,"
    b"X-Stainless-Arch,X-Stainless-Async,X-Stainless-Custom-Poll-Interval,"
    b"X-Stainless-Helper-Method,X-Stainless-Lang,X-Stainless-OS,"
    b"X-Stainless-Package-Version,X-Stainless-Poll-Helper,X-Stainless-Retry-Count,"
    b"X-Stainless-Runtime,X-Stainless-Runtime-Version,X-Stainless-Timeout"
)

DEFAULT_ALLOWED = [
    b"chrome-extension://abcdef",
    b"moz-extension://x",
    b"safari-web-extension://x",
    b"http://localhost",
    b"https://localhost",
    b"http://localhost:3000",
    b"https://localhost:8443",
    b"http://127.0.0.1:8080",
    b"https://127.0.0.1",
    b"http://[::1]:5173",
    b"app://obsidian.md",
    b"file://",
    b"tauri://localhost",
    b"vscode-webview://abc",
    b"vscode-file://vscode-app",
    b"HTTP://LOCALHOST:3000",
]

DEFAULT_DENIED = [
    b"https://evil.example",
    b"http://localhost.evil.example",
    b"http://127.0.0.1.evil.example",
    b"http://evil.localhost",
    b"http://0.0.0.0:3000",
    b"null",
    b"",
    b"chrome-extension:/x",
    "http://l\u00f6calhost".encode(),
]


def request(
    origin: bytes | None = None, host: bytes | None = b"gpu-box:5000", **extra: bytes
) -> Headers:
    """
    Request headers with an optional Origin and Host, plus C{extra} headers
    named with underscores for dashes.
    """
    headers = Headers({name.replace("_", "-").encode(): [value] for name, value in extra.items()})
    if origin is not None:
        headers.setRawHeaders(b"origin", [origin])
    if host is not None:
        headers.setRawHeaders(b"host", [host])
    return headers


def preflight(origin: bytes, **extra: bytes) -> Headers:
    """
    The headers of a browser's preflight for a POST from C{origin}.
    """
    return request(origin, access_control_request_method=b"POST", **extra)


def test_default_origins() -> None:
    """The default list is extensions, localhost pages and Ollama's own app schemes."""
    assert DEFAULT_ORIGINS == (
        "chrome-extension://*",
        "moz-extension://*",
        "safari-web-extension://*",
        "http://localhost",
        "http://localhost:*",
        "https://localhost",
        "https://localhost:*",
        "http://127.0.0.1",
        "http://127.0.0.1:*",
        "https://127.0.0.1",
        "https://127.0.0.1:*",
        "http://[::1]",
        "http://[::1]:*",
        "https://[::1]",
        "https://[::1]:*",
        "app://*",
        "file://*",
        "tauri://*",
        "vscode-webview://*",
        "vscode-file://*",
    )
    assert Cors().origins == DEFAULT_ORIGINS


@pytest.mark.parametrize("origin", DEFAULT_ALLOWED)
def test_default_allows(origin: bytes) -> None:
    """Browser extensions, localhost pages and desktop apps are allowed by default."""
    assert Cors().allows(origin, b"gpu-box:5000")


@pytest.mark.parametrize("origin", DEFAULT_DENIED)
def test_default_denies(origin: bytes) -> None:
    """Other sites, look-alike hosts, opaque and malformed origins are refused."""
    assert not Cors().allows(origin, b"gpu-box:5000")


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (b"http://gpu-box", b"gpu-box:5000", True),
        (b"https://gpu-box", b"gpu-box:5443", True),
        (b"http://gpu-box:8080", b"gpu-box:5000", True),
        (b"http://gpu-box", b"gpu-box", True),
        (b"http://GPU-Box", b"gpu-box:5000", True),
        (b"http://gpu-box", b"GPU-BOX:5000", True),
        (b"http://[fd00::1]", b"[fd00::1]:5000", True),
        (b"http://10.0.0.7", b"10.0.0.7:5000", True),
        (b"http://gpu-box.evil", b"gpu-box:5000", False),
        (b"http://gpu-box", b"gpu-box.lan:5000", False),
        (b"http://evil.gpu-box", b"gpu-box:5000", False),
        (b"http://user@gpu-box", b"gpu-box:5000", False),
        (b"http://gpu-box/", b"gpu-box:5000", False),
        (b"chrome-extension://gpu-box", b"gpu-box:5000", False),
        (b"http://gpu-box", None, False),
        (b"http://gpu-box", b"", False),
        (b"http://", b":5000", False),
        (b"http://[fd00::1", b"[fd00::1", False),
    ],
)
def test_same_site(origin: bytes, host: bytes | None, allowed: bool) -> None:
    """An http(s) origin naming the Host header's host is allowed, whatever the ports."""
    assert Cors(()).allows(origin, host) is allowed


@pytest.mark.parametrize("origin", [o for o in DEFAULT_ALLOWED + DEFAULT_DENIED if o])
def test_star_allows_all(origin: bytes) -> None:
    """With C{*} every non-empty origin, even C{null}, is allowed and answered with C{*}."""
    cors = Cors(("*",))
    assert cors.allows(origin, None)
    assert cors.response_headers(request(origin)) == [
        (b"Access-Control-Allow-Origin", b"*"),
        (b"Vary", b"Origin"),
    ]
    headers = cors.preflight(preflight(origin))
    assert headers is not None
    assert headers[0] == (b"Access-Control-Allow-Origin", b"*")


@pytest.mark.parametrize("origin", [b"chrome-extension://abcdef", b"http://localhost:3000"])
def test_empty_allows_only_same_site(origin: bytes) -> None:
    """With no patterns, only same-site origins are allowed."""
    cors = Cors(parse_origins(""))
    assert not cors.allows(origin, b"gpu-box:5000")
    assert cors.allows(b"http://gpu-box", b"gpu-box:5000")


@pytest.mark.parametrize(
    ("patterns", "origin", "allowed"),
    [
        (("https://chat.example.com",), b"https://chat.example.com", True),
        (("https://chat.example.com",), b"https://chat.example.com:444", False),
        (("https://*.example.com",), b"https://chat.example.com", True),
        (("https://*.example.com",), b"https://example.com", False),
        (("https://*.example.com",), b"https://evil.com/.example.com", True),
        (("http://host:*",), b"http://host:", True),
        (("http://host:*",), b"http://host", False),
        (("https://chat.example.com",), b"HTTPS://Chat.Example.com", True),
    ],
)
def test_wildcard(patterns: tuple[str, ...], origin: bytes, allowed: bool) -> None:
    """A pattern matches exactly, or around its one C{*} as prefix and suffix."""
    assert Cors(patterns).allows(origin, None) is allowed


def test_preflight_headers() -> None:
    """A preflight from an allowed origin is answered with exactly these headers."""
    assert Cors().preflight(preflight(b"chrome-extension://abcdef")) == [
        (b"Access-Control-Allow-Origin", b"chrome-extension://abcdef"),
        (b"Access-Control-Allow-Methods", b"GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"),
        (b"Access-Control-Allow-Headers", ALLOW_HEADERS),
        (b"Access-Control-Max-Age", b"43200"),
        (b"Vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
    ]


@pytest.mark.parametrize(
    ("requested", "added"),
    [
        (b"authorization,content-type", b""),
        (b"x-api-key, x-stainless-os, openai-beta", b""),
        (b"x-custom", b",x-custom"),
        (b" x-custom , , X-Custom,x-other ", b",x-custom,x-other"),
        (b"*, bad name, bad\x7fname, x-ok", b",x-ok"),
    ],
)
def test_preflight_requested_headers(requested: bytes, added: bytes) -> None:
    """Requested header names outside the fixed list are allowed too, once, if well-formed."""
    headers = Cors().preflight(
        preflight(b"http://localhost:3000", access_control_request_headers=requested)
    )
    assert headers is not None
    assert dict(headers)[b"Access-Control-Allow-Headers"] == ALLOW_HEADERS + added


@pytest.mark.parametrize(
    "origin", [b"https://evil.example", b"null", b"http://gpu-box.evil", b""]
)
def test_preflight_denied(origin: bytes) -> None:
    """A preflight from an origin that is not allowed gets no CORS headers."""
    assert Cors().preflight(preflight(origin)) is None


def test_preflight_same_site() -> None:
    """Page Assist's port-less Origin passes a preflight and is echoed as sent."""
    headers = Cors(()).preflight(preflight(b"http://gpu-box"))
    assert headers is not None
    assert headers[0] == (b"Access-Control-Allow-Origin", b"http://gpu-box")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            request(b"http://localhost:3000"),
            [(b"Access-Control-Allow-Origin", b"http://localhost:3000"), (b"Vary", b"Origin")],
        ),
        (
            request(b"http://gpu-box"),
            [(b"Access-Control-Allow-Origin", b"http://gpu-box"), (b"Vary", b"Origin")],
        ),
        (request(None), []),
        (request(b"https://evil.example"), []),
        (request(b"null"), []),
        (
            Headers({b"origin": [b"http://localhost:3000", b"http://localhost:3000"]}),
            [],
        ),
    ],
)
def test_response_headers(headers: Headers, expected: list[tuple[bytes, bytes]]) -> None:
    """An allowed origin is echoed with Vary; no, several or a refused Origin adds nothing."""
    assert Cors().response_headers(headers) == expected


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        (b"OPTIONS", preflight(b"http://localhost:3000"), True),
        (b"OPTIONS", preflight(b"https://evil.example"), True),
        (b"OPTIONS", request(b"http://localhost:3000"), False),
        (b"OPTIONS", request(None, access_control_request_method=b"POST"), False),
        (b"POST", preflight(b"http://localhost:3000"), False),
        (b"options", preflight(b"http://localhost:3000"), False),
    ],
)
def test_is_preflight(method: bytes, headers: Headers, expected: bool) -> None:
    """Only OPTIONS with Origin and Access-Control-Request-Method is a preflight."""
    assert Cors().is_preflight(method, headers) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ()),
        (" , ", ()),
        ("*", ("*",)),
        ("https://a.example, *", ("*",)),
        ("https://a.example,https://a.example", ("https://a.example",)),
        (" HTTPS://Chat.Example.com , chrome-extension://* ",
         ("https://chat.example.com", "chrome-extension://*")),
        ("http://localhost:*,file://*", ("http://localhost:*", "file://*")),
        ("https://*.example.com", ("https://*.example.com",)),
        ("http://[::1]:8080", ("http://[::1]:8080",)),
    ],
)
def test_parse_origins(value: str, expected: tuple[str, ...]) -> None:
    """Items are trimmed, lower-cased and de-duplicated; C{*} anywhere means all."""
    assert parse_origins(value) == expected


@pytest.mark.parametrize(
    "item",
    [
        "chat.example.com",
        "null",
        "http://",
        "https://chat.example.com/",
        "https://chat.example.com/app",
        "https://*.*.example.com",
        "*.example.com",
        "http://a b",
        "1http://x",
    ],
)
def test_parse_origins_errors(item: str) -> None:
    """An item that is not C{*} or C{scheme://host[:port]} is a configuration error."""
    with pytest.raises(ConfigError, match=r"^--cors-origins: .* is not '\*' or an origin"):
        parse_origins(f"http://localhost,{item}")
    with pytest.raises(ConfigError, match=r"^--origins: "):
        parse_origins(item, option="origins")
