# -*- test-case-name: tests.web.test_cors -*-
"""
Cross-origin resource sharing: which browser pages may call the proxy, and
the headers that tell the browser so.

The proxy strips C{Origin} before forwarding (Ollama would refuse origins it
does not know with a 403) and answers CORS itself, much as Ollama does with
gin-contrib/cors: an allow-list of origin patterns, each with at most one
C{*} wildcard, where C{*} alone allows every origin and is answered with
C{Access-Control-Allow-Origin: *}.

Two differences from Ollama:

  - Browser extensions and localhost pages are allowed by default
    (L{DEFAULT_ORIGINS}), so Page Assist and friends work without settings.
  - An http(s) origin whose host name is the host name in the request's
    C{Host} header, whatever either port, is allowed too.  Page Assist
    rewrites C{Origin} to C{<protocol>//<hostname>} of the Ollama URL,
    dropping the port, so its requests to C{http://gpu-box:5000} arrive with
    C{Origin: http://gpu-box}.

Keys travel in headers, never in cookies, so no response carries
C{Access-Control-Allow-Credentials}: a page the user visits cannot borrow the
user's key.  For the same reason a preflight allows every header name the
request asks for (see L{Cors.preflight}), on top of a fixed list that always
includes the proxy's own C{Authorization} and C{X-API-Key}.

This module does no I/O; the app calls it with a request's method and
headers and adds what it returns to the response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.web.http_headers import Headers

from ollamaproxy.origins import DEFAULT_ORIGINS as DEFAULT_ORIGINS
from ollamaproxy.origins import parse_origins as parse_origins

ALLOW_METHODS = b"GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"

# Ollama's list (ollama-api.md section 1.3) plus the proxy's X-API-Key.
ALLOW_HEADERS: tuple[bytes, ...] = (
    b"Authorization",
    b"X-API-Key",
    b"Content-Type",
    b"User-Agent",
    b"Accept",
    b"X-Requested-With",
    b"OpenAI-Beta",
    *(
        b"X-Stainless-" + name
        for name in (
            b"Arch",
            b"Async",
            b"Custom-Poll-Interval",
            b"Helper-Method",
            b"Lang",
            b"OS",
            b"Package-Version",
            b"Poll-Helper",
            b"Retry-Count",
            b"Runtime",
            b"Runtime-Version",
            b"Timeout",
        )
    ),
)

MAX_AGE = b"43200"

PREFLIGHT_VARY = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"

# An HTTP field name (RFC 9110 section 5.1): a token.
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _matches(pattern: str, origin: str) -> bool:
    """
    Whether C{origin} matches C{pattern} the way gin-contrib/cors matches:
    exactly, or with the text around a single C{*} as prefix and suffix.
    """
    pattern = pattern.lower()
    prefix, star, suffix = pattern.partition("*")
    if not star:
        return origin == pattern
    return (
        len(origin) >= len(prefix) + len(suffix)
        and origin.startswith(prefix)
        and origin.endswith(suffix)
    )


def _hostname(authority: str) -> str | None:
    """
    The lower-cased host name in C{host[:port]}, without IPv6 brackets, or
    L{None} if C{authority} is anything more (user info, a path) or malformed.
    """
    try:
        parts = urlsplit("//" + authority)
    except ValueError:  # unbalanced IPv6 brackets
        return None
    if parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname or None


def _same_site(origin: str, host: bytes | None) -> bool:
    """
    Whether an http(s) C{origin} names the same host as the C{Host} header,
    ignoring both ports.
    """
    scheme, sep, authority = origin.partition("://")
    if not (sep and host and scheme in ("http", "https") and host.isascii()):
        return False
    origin_host = _hostname(authority)
    return origin_host is not None and origin_host == _hostname(host.decode("ascii"))


def _single(headers: Headers, name: bytes) -> bytes | None:
    """
    The value of a header sent exactly once and not empty, else L{None}.
    """
    values = headers.getRawHeaders(name, [])
    if len(values) != 1 or not values[0].strip():
        return None
    return values[0].strip()


@dataclass(frozen=True)
class Cors:
    """
    The proxy's CORS policy.

    @ivar origins: Allowed origin patterns, lower-case, each C{*} alone or
        with at most one C{*} wildcard; see L{parse_origins}.
    """

    origins: tuple[str, ...] = DEFAULT_ORIGINS

    @property
    def _allow_all(self) -> bool:
        return "*" in self.origins

    def allows(self, origin: bytes, host: bytes | None) -> bool:
        """
        Whether a page from C{origin} may call the proxy.

        @param origin: The request's C{Origin} header.
        @param host: The request's C{Host} header, if any.
        @return: L{True} if C{origin} matches one of L{origins}, or is an
            http(s) origin with the same host name as C{host} (ports
            ignored; this is what Page Assist sends).
        """
        if self._allow_all:
            return True
        if not origin.isascii():
            return False
        text = origin.decode("ascii").lower()
        return any(_matches(p, text) for p in self.origins) or _same_site(text, host)

    def _allowed_origin(self, headers: Headers) -> bytes | None:
        """
        The C{Access-Control-Allow-Origin} value for a request, or L{None}
        if it has no single C{Origin} or one that is not allowed.
        """
        origin = _single(headers, b"origin")
        if origin is None or not self.allows(origin, _single(headers, b"host")):
            return None
        return b"*" if self._allow_all else origin

    def is_preflight(self, method: bytes, headers: Headers) -> bool:
        """
        Whether a request is a CORS preflight: C{OPTIONS} with C{Origin} and
        C{Access-Control-Request-Method}.  A preflight carries no key and is
        answered by the proxy, never forwarded.
        """
        return (
            method == b"OPTIONS"
            and headers.hasHeader(b"origin")
            and headers.hasHeader(b"access-control-request-method")
        )

    def preflight(self, headers: Headers) -> list[tuple[bytes, bytes]] | None:
        """
        The headers of a 204 answer to a preflight.

        Like Ollama, the requested method is not checked against the list.
        The allowed headers are L{ALLOW_HEADERS} followed by any other names
        the request lists in C{Access-Control-Request-Headers}: the key is
        needed anyway and travels in a header, not in a cookie, so letting a
        page send more headers gives it nothing a script outside the browser
        lacks, while refusing them would break clients with custom headers
        (Page Assist's "Custom Headers" setting) with a puzzling browser
        error.

        @return: L{None} if the origin is not allowed (answer 403), else the
            headers in order.
        """
        allow_origin = self._allowed_origin(headers)
        if allow_origin is None:
            return None
        allow_headers = list(ALLOW_HEADERS)
        known = {name.lower() for name in allow_headers}
        for value in headers.getRawHeaders(b"access-control-request-headers", []):
            for name in value.split(b","):
                name = name.strip()
                if _TOKEN.match(name) and name != b"*" and name.lower() not in known:
                    known.add(name.lower())
                    allow_headers.append(name)
        return [
            (b"Access-Control-Allow-Origin", allow_origin),
            (b"Access-Control-Allow-Methods", ALLOW_METHODS),
            (b"Access-Control-Allow-Headers", b",".join(allow_headers)),
            (b"Access-Control-Max-Age", MAX_AGE),
            (b"Vary", PREFLIGHT_VARY),
        ]

    def response_headers(self, headers: Headers) -> list[tuple[bytes, bytes]]:
        """
        The CORS headers to add to the response to any other request.

        @return: C{Access-Control-Allow-Origin} and C{Vary: Origin} for an
            allowed C{Origin}; nothing for a request without one or with one
            that is not allowed (the browser then withholds the response).
        """
        allow_origin = self._allowed_origin(headers)
        if allow_origin is None:
            return []
        return [(b"Access-Control-Allow-Origin", allow_origin), (b"Vary", b"Origin")]
