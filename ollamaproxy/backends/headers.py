# -*- test-case-name: tests.backends.test_headers -*-
"""
Which headers cross the proxy, in each direction.

Hop-by-hop headers (RFC 9110 section 7.6.1), and any header a C{Connection}
header names, describe one connection and never cross.  Towards Ollama the
proxy also drops the client's credentials (its key is for the proxy, not for
Ollama), its cookies, and C{Origin} and C{Referer}: Ollama refuses browser
origins it does not know with a 403.  The Agent sets C{Host} from the
upstream URL, which keeps Ollama's DNS-rebinding guard happy, and
C{Content-Length} or C{Transfer-Encoding} from the body it sends.  The
headers in which a key's front-end names its user (C{keys add --user-header},
L{ollamaproxy.admission.users}) and its chat (C{--chat-header},
L{ollamaproxy.admission.conversation}) cross like any other: they name a
person or a conversation, hold no credential (a credential header cannot be
one), and Ollama ignores them; forwarding them keeps the proxy transparent.

Every request the proxy forwards carries its mark in C{Via}
(C{1.1 ollamaproxy-<instance>}, the instance a random token made when the
process starts), added to whatever C{Via} entries the request came with.  A
request that arrives with the proxy's own mark has gone round in a circle:
the upstream points back at the proxy.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

NEVER_UPSTREAM = HOP_BY_HOP | {
    b"authorization",
    b"x-api-key",
    b"cookie",
    b"origin",
    b"referer",
    b"host",
    b"content-length",
    b"expect",
}


def _dropped(headers: Headers, always: frozenset[bytes]) -> frozenset[bytes]:
    """
    The header names not to pass on from C{headers}: C{always}, and those
    a C{Connection} header lists, lower-cased (most requests have none:
    then C{always} itself, with nothing built).
    """
    listed = headers.getRawHeaders(b"connection")
    if listed is None:
        return always
    return always | {
        token.strip().lower()
        for value in listed
        for token in value.split(b",")
        if token.strip()
    }


def via_mark(instance: str) -> bytes:
    """
    The C{Via} entry of the proxy process whose instance token is
    C{instance}: a pseudonym, not a host name, so it tells nothing about
    the machine.
    """
    return b"1.1 ollamaproxy-" + instance.encode("ascii")


def came_back(client: Headers, mark: bytes) -> bool:
    """
    Whether a request already passed through the proxy that marks requests
    with C{mark} (L{via_mark}): its C{Via} header holds that entry.
    """
    values = client.getRawHeaders(b"via")
    return values is not None and any(mark in value for value in values)


def upstream_request_headers(client: Headers, via: bytes = b"") -> Headers:
    """
    The headers to send to Ollama for a client's request.

    @param via: The proxy's own C{Via} entry (L{via_mark}), added after any
        the client sent; empty for none.
    """
    dropped = _dropped(client, NEVER_UPSTREAM)
    forwarded = Headers()
    for name, values in client.getAllRawHeaders():
        if name.lower() not in dropped:
            forwarded.setRawHeaders(name, values)
    if via:
        forwarded.addRawHeader(b"via", via)
    return forwarded


def copy_response_headers(upstream: Headers, response: Headers) -> None:
    """
    Put Ollama's response headers on the client's response.

    Twisted's HTTP client keeps a response's C{Connection} and
    C{Keep-Alive} headers to itself, so from its responses the headers a
    C{Connection} header names cannot be recognised (Ollama names none).
    """
    dropped = _dropped(upstream, HOP_BY_HOP)
    for name, values in upstream.getAllRawHeaders():
        if name.lower() not in dropped:
            response.setRawHeaders(name, values)
