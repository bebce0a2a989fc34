# -*- test-case-name: tests.test_tap -*-
"""
The keys a starting proxy accepts, and the key it makes when there are none.

The proxy never runs open: with no C{--api-key} and no key in the keys file,
the first start makes a key, stores its hash in the keys file (under the
file's lock, so a key added meanwhile by C{ollamaproxy keys add} wins), and
shows the key itself once, to the person starting the proxy.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from twisted.python import usage

from ollamaproxy.admission.keys import (
    SCOPES,
    ApiKey,
    KeysFileError,
    KeyStore,
    digest,
    generate_key,
    load_keys_file,
    update_keys_file,
)


def operator_keys(api_key: str | None) -> list[ApiKey]:
    """
    The keys given outside the keys file: C{--api-key}'s, if any.  The
    operator's own keys (this one, and the one made on first start) may do
    everything.
    """
    if not api_key:
        return []
    return [ApiKey(name="api-key", digest=digest(api_key), scopes=SCOPES)]


def keys_to_accept(
    api_key: str | None, keys_file: str, now: datetime, announce: Callable[[str], None]
) -> KeyStore:
    """
    The keys to accept: the one from C{--api-key}, if any, and those in the
    keys file.  With none at all, make one (the proxy never runs open).

    @param now: When the proxy starts, the made key's creation time.
    @param announce: Shows text to the person starting the proxy.
    @raise usage.UsageError: If the keys file is unusable.
    """
    try:
        keys = operator_keys(api_key) + load_keys_file(keys_file)
        if keys:
            return KeyStore(keys)
    except KeysFileError as e:
        raise usage.UsageError(str(e)) from None
    except ValueError as e:
        raise usage.UsageError(f"{keys_file}: {e}") from None
    key = generate_key()
    first = ApiKey(name="default", digest=digest(key), created=now, scopes=SCOPES)
    # Under the keys file's lock: keys added meanwhile by 'ollamaproxy keys
    # add' are kept, and then no key needs making.
    written = update_keys_file(keys_file, lambda keys: keys or [first])
    if written != [first]:
        return KeyStore(written)
    announce(
        "\nollamaproxy: no API key was configured, so one was made.  Its hash is\n"
        f"stored in {keys_file}; the key itself is shown only this once:\n\n"
        f"    {key}\n\n"
        "Clients send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>',\n"
        "for example:\n\n"
        f"    curl -H 'Authorization: Bearer {key}' http://HOST:PORT/api/tags\n\n"
    )
    return KeyStore([first])
