# -*- test-case-name: tests.admission.test_users -*-
"""
The people behind a shared key: who a request is for, as the front-end in
front of the proxy says.

A chat front-end (Open WebUI, LibreChat) sends every one of its users
through one key.  A key may name a header (C{keys add NAME --user-header
X-OpenWebUI-User-Id}) in which its front-end says which of its users a
request is for; the fair queue then divides the key's share among them
(L{ollamaproxy.backends.queue}), and the logs, the usage and the console
name the user beside the key.

The header is trusted only for a key that names it: a client of any other
key cannot choose a user, so the header is not read for it at all (and a
key with no user header costs nothing more per request).  It is a claim of
the front-end's, which holds the key: whoever holds the key may say any
user, as they may make any request.  A request of such a key without the
header is the key's anonymous user (C{""}).

Its value is bounded, since it goes into logs, the usage database and the
console: at most L{MAX_USER_LENGTH} characters, each an ASCII letter or
digit or one of C{-._@+:} (a UUID, as Open WebUI sends, an e-mail address,
a user name).  Anything else is refused with a 400, before the body is
read, rather than cut or cleaned: a user named differently on each request
would get a share of its own each time.  So is a value that looks like a
credential (one of the proxy's keys, or a token of a known shape: the
L{ollamaproxy.record.redact.Redactor}'s rule): a front-end configured to
send a key there would have it logged, stored and forwarded to Ollama.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from twisted.web.http_headers import Headers

from ollamaproxy.admission.keys import refuse_credential
from ollamaproxy.errors import ProxyError
from ollamaproxy.exchange import ANONYMOUS

#: The longest user a request may name.
MAX_USER_LENGTH: Final = 128

_USER: Final = re.compile(rf"[A-Za-z0-9._@+:-]{{1,{MAX_USER_LENGTH}}}")

def user_of(header: bytes, headers: Headers, redact: Callable[[str], str]) -> str:
    """
    The user a request names in its key's user header C{header}, or
    L{ANONYMOUS} if it names none.

    @param redact: Blanks credentials in a text: a value it changes is a
        credential, not a user.
    @raise ProxyError: 400 for a value that is not a user (see the
        module's docstring), or for several.
    """
    values = headers.getRawHeaders(header)
    if values is None:
        return ANONYMOUS
    # The header's name is decoded for a refusal only, not for every user
    # read (a key's header name is a token: ASCII).
    if len(values) != 1:
        raise ProxyError(400, f"send one {header.decode()} header, not {len(values)}")
    value = values[0].decode("latin-1")
    if not _USER.fullmatch(value):
        raise ProxyError(
            400, f"the {header.decode()} header must be 1 to {MAX_USER_LENGTH} ASCII "
            "letters, digits or -._@+:"
        )
    refuse_credential(header, value, "a user", redact)
    return value
