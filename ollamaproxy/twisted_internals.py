# -*- test-case-name: tests.test_twisted_internals -*-
"""
Every name of Twisted's that the proxy uses beyond Twisted's public API, in
one place, so that an upgrade of Twisted that moves one fails a test
(C{tests/test_twisted_internals.py}, C{tests/test_site.py}) instead of
changing the proxy's behaviour in silence.

Nothing else in the package imports a private name of Twisted's.
"""

from __future__ import annotations

from twisted.web._newclient import RequestNotSent
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

__all__ = [
    "HTTP_CHANNEL_INTERNALS",
    "HTTP11ClientFactory",
    "RequestNotSent",
    "use_client_factory",
]

#: What L{ollamaproxy.web.site.ProxyChannel} overrides or reads of
#: twisted.web's C{HTTPChannel} (Twisted 26.10): the one method every
#: refusal of a malformed request goes through, the automatic
#: C{100 Continue} (sent later, by the same method), the request line as
#: parsed, and the head's size and header count so far.
HTTP_CHANNEL_INTERNALS = (
    "_respondToBadRequestAndDisconnect",
    "_send100Continue",
    "_command",
    "_path",
    "_version",
    "_receivedHeaderSize",
    "_receivedHeaderCount",
)

#: The factory of an L{HTTPConnectionPool}'s connections (twisted.web.client
#: does not export it).
HTTP11ClientFactory = _HTTP11ClientFactory


def use_client_factory(pool: HTTPConnectionPool, factory: type[_HTTP11ClientFactory]) -> None:
    """
    Make C{pool}'s new connections with C{factory}.

    The pool reads its factory from a private attribute; setting one Twisted
    no longer reads would be ignored without a word, so this fails instead.

    @raise RuntimeError: If the pool has no such attribute.
    """
    if not isinstance(getattr(pool, "_factory", None), type):
        raise RuntimeError("twisted.web.client.HTTPConnectionPool no longer has _factory")
    pool._factory = factory
