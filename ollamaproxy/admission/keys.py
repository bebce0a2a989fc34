# -*- test-case-name: tests.admission.test_keys -*-
"""
API keys: making them, hashing them, and the keys file that stores them.

A key is C{olpk_} followed by 32 random base62 characters (190 bits) and a
6-character base62 checksum, so secret scanners can recognise a leaked one and
tell it from random text.  Only a SHA-256 digest of each key is ever stored.
A fast hash is the right one here: the keys are long random strings, not
passwords, so there is nothing to brute-force.

The keys file is JSON (only C{name} and C{hash} are required)::

    {"keys": [{"name": "alice", "hash": "sha256:<hex>",
               "created": "2026-11-27T07:00:00Z", "expires": "2027-01-01T00:00:00Z",
               "scopes": ["inference"], "models": ["llama3*"],
               "rpm": 60, "max_streams": 2,
               "tokens_per_day": 200000, "tokens_per_month": 3000000,
               "weight": 2, "user_header": "X-OpenWebUI-User-Id",
               "chat_header": "X-OpenWebUI-Chat-Id"}]}

and is always replaced atomically (write a temporary file, then rename).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ollamaproxy.admission.caps import Caps, keep_alive_cap, show_duration
from ollamaproxy.backends.headers import NEVER_UPSTREAM
from ollamaproxy.errors import ProxyError
from ollamaproxy.record.redact import KEY_PREFIX

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_CHARS = 32
_CHECKSUM_CHARS = 6


class KeysFileError(ValueError):
    """
    The keys file cannot be read: the message says which file and why.
    """


INFERENCE = "inference"
ADMIN = "admin"
CLOUD = "cloud"
SCOPES = frozenset({INFERENCE, ADMIN, CLOUD})


@dataclass(frozen=True)
class ApiKey:
    """
    One named key, as the proxy knows it: never the key itself.

    @ivar name: Who or what the key is for; appears in logs instead of the key.
    @ivar digest: SHA-256 of the key.
    @ivar created: When the key was made, if known.
    @ivar expires: When the key stops working, or L{None} for never.
    @ivar scopes: C{inference} (chat, generate, embed, model lists, C{/v1})
        for every key; C{admin} adds model management and account routes;
        C{cloud} adds cloud models (C{:cloud}, C{-cloud}), which run on
        ollama.com on the server owner's account.
    @ivar models: Glob patterns (C{llama3*}) of the models the key may use;
        empty for all.
    @ivar rpm: Requests a minute the key may make, or L{None} for no limit.
    @ivar max_streams: Requests the key may have in flight at once, or
        L{None} for no limit.
    @ivar caps: The key's own caps on C{keep_alive} and C{num_ctx}
        (L{ollamaproxy.admission.caps}); the proxy's, if tighter, win.
    @ivar tokens_per_day: Prompt and completion tokens the key may use in a
        UTC day, or L{None} for no quota.
    @ivar tokens_per_month: The same in a UTC month.
    @ivar weight: The key's share of turns in the fair queue for a busy
        model: a key of weight 3 is served three times for every once of
        a key of weight 1.
    @ivar user_header: The header in which the key's front-end names the
        user a request is for, whose share of the key's the fair queue
        gives it (L{ollamaproxy.admission.users}), or L{None}: the key is
        one user.
    @ivar chat_header: The header whose value names the
        conversation a request of the key continues (Open WebUI's
        C{X-OpenWebUI-Chat-Id}), so that its turns go home
        (L{ollamaproxy.admission.conversation}); L{None} to know
        conversations by their messages.
    """

    name: str
    digest: bytes
    created: datetime | None = None
    expires: datetime | None = None
    scopes: frozenset[str] = frozenset({INFERENCE})
    models: tuple[str, ...] = ()
    rpm: int | None = None
    max_streams: int | None = None
    caps: Caps = field(default_factory=Caps)
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    weight: int = 1
    user_header: str | None = None
    chat_header: str | None = None

    @property
    def admin(self) -> bool:
        return ADMIN in self.scopes

    @property
    def cloud(self) -> bool:
        """
        Whether the key may use cloud models: admin keys may.
        """
        return CLOUD in self.scopes or ADMIN in self.scopes

    def expired(self, now: datetime) -> bool:
        """
        Whether the key has stopped working at C{now}.
        """
        return self.expires is not None and now >= self.expires


def digest(key: str) -> bytes:
    """
    The SHA-256 digest under which a key is stored and looked up.
    """
    return hashlib.sha256(key.encode("utf-8")).digest()


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, index = divmod(number, len(_ALPHABET))
        chars.append(_ALPHABET[index])
    return "".join(reversed(chars))


def generate_key() -> str:
    """
    Make a new random key: C{olpk_}, 32 random characters, 6 checksum
    characters.
    """
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_CHARS))
    return KEY_PREFIX + body + _base62(zlib.crc32(body.encode()), _CHECKSUM_CHARS)


def looks_generated(key: str) -> bool:
    """
    Whether a string has the shape and checksum of a key from
    L{generate_key}.
    """
    body = key[len(KEY_PREFIX):-_CHECKSUM_CHARS]
    return (
        key.startswith(KEY_PREFIX)
        and len(body) == _RANDOM_CHARS
        and all(c in _ALPHABET for c in body)
        and key[-_CHECKSUM_CHARS:] == _base62(zlib.crc32(body.encode()), _CHECKSUM_CHARS)
    )


class KeyStore:
    """
    The keys the proxy accepts, looked up by digest.

    Looking up the digest of the presented key in a dictionary takes the same
    time whatever the key is: the only thing timing could reveal is a prefix
    of a SHA-256 digest, which says nothing about any key.
    """

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_digest: Mapping[bytes, ApiKey] = {}
        self.replace(keys)

    def replace(self, keys: Iterable[ApiKey]) -> None:
        """
        Accept exactly C{keys} from now on.

        @raise ValueError: If two keys have the same name.
        """
        by_digest = {}
        names = set()
        for key in keys:
            if key.name in names:
                raise ValueError(f"two keys are named {key.name!r}")
            names.add(key.name)
            by_digest[key.digest] = key
        self._by_digest = by_digest

    def find(self, presented: str) -> ApiKey | None:
        """
        The key matching a presented secret, or L{None}.
        """
        return self._by_digest.get(digest(presented))

    def find_digest(self, presented_digest: bytes) -> ApiKey | None:
        """
        The key with this digest, or L{None}.
        """
        return self._by_digest.get(presented_digest)

    def is_key(self, word: str) -> bool:
        """
        Whether C{word} is one of the keys (for blanking keys in logs).
        """
        return self.find(word) is not None

    def __iter__(self) -> Iterator[ApiKey]:
        """
        The keys, for listing (the console's Keys view).
        """
        return iter(list(self._by_digest.values()))

    def __len__(self) -> int:
        return len(self._by_digest)


def _format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_keys_file(path: str) -> list[ApiKey]:
    """
    Read a keys file.

    @return: The keys in the file, or an empty list if the file does not
        exist.
    @raise KeysFileError: If the file exists but is not a valid keys file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise KeysFileError(f"cannot read keys file {path}: {e}") from e
    try:
        return [_key_from_json(entry) for entry in _entries(document)]
    except (KeyError, TypeError, ValueError) as e:
        raise KeysFileError(f"keys file {path} is not valid: {_why(e)}") from e


def _entries(document: object) -> list[Mapping[str, Any]]:
    """
    The key entries of a keys file's document, each an object with a
    C{name} and a C{hash}.

    @raise ValueError: If the document does not have that shape, saying
        where.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('it must be an object whose "keys" is a list: {"keys": [...]}')
    entries: list[Mapping[str, Any]] = document["keys"]
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ValueError(f"key number {number} is not an object")
        for required in ("name", "hash"):
            if required not in entry:
                name = entry.get("name")
                which = f"key {name!r}" if isinstance(name, str) else f"key number {number}"
                raise ValueError(f'{which} has no "{required}"')
    return entries


def _why(error: Exception) -> str:
    """
    The reason in an error, in words: a missing field's name rather than
    C{KeyError('created')}.
    """
    if isinstance(error, KeyError):
        return f'missing "{error.args[0]}"'
    return str(error)


def key_from_json(entry: Mapping[str, Any]) -> ApiKey:
    """
    A key from its entry in the keys file (or a row of the database, which
    stores the same entry), as L{key_to_json} writes it.

    @raise KeyError: If the entry has no C{name} or no C{hash}.
    @raise ValueError: If a field is not valid, saying which.
    """
    return _key_from_json(entry)


def _key_from_json(entry: Mapping[str, Any]) -> ApiKey:
    name = entry["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"key name must be a non-empty string, not {name!r}")
    if not isinstance(entry["hash"], str):
        raise ValueError(f"key {name!r}: hash must be a string")
    algorithm, _, hexdigest = entry["hash"].partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64:
        raise ValueError(f"key {name!r}: hash must be sha256:<64 hex digits>")
    scopes = frozenset(entry.get("scopes", [INFERENCE])) | {INFERENCE}
    if not scopes <= SCOPES:
        raise ValueError(f"key {name!r}: unknown scopes {sorted(scopes - SCOPES)}")
    models = entry.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ValueError(f"key {name!r}: models must be a list of glob patterns")
    return ApiKey(
        name=name,
        digest=bytes.fromhex(hexdigest),
        created=_time(entry, "created"),
        expires=_time(entry, "expires"),
        scopes=scopes,
        models=tuple(models),
        rpm=_limit(entry, "rpm"),
        max_streams=_limit(entry, "max_streams"),
        caps=Caps(_keep_alive(entry), _limit(entry, "max_num_ctx")),
        tokens_per_day=_limit(entry, "tokens_per_day"),
        tokens_per_month=_limit(entry, "tokens_per_month"),
        weight=_limit(entry, "weight") or 1,
        user_header=_header(entry, "user_header", "a user"),
        chat_header=_header(entry, "chat_header", "a conversation"),
    )


# A field name is a token (RFC 9110 section 5.1, 5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")


def refuse_credential(
    header: bytes, value: str, names: str, redact: Callable[[str], str]
) -> None:
    """
    Refuse the value of a header a key reads something from (L{header_name})
    when it is a credential: a front-end set up to send its key there would
    have it logged, made into a digest, and forwarded to Ollama.

    @param names: What the header names, for the error ("a user").
    @param redact: Blanks credentials in a text (the proxy's keys, and
        their shape): a value it changes is one.
    @raise ProxyError: 400, not repeating the value.
    """
    if redact(value) != value:
        raise ProxyError(400, f"the {header.decode()} header holds a credential: it names "
                         f"{names}, never a key")


def header_name(name: str, names: str) -> str:
    """
    Accept the name of a header a key reads something from (its users',
    its conversations'): a field name (a token of RFC 9110), and none the
    proxy reads for itself or never sends on (the key's own headers,
    cookies, hop-by-hop ones): a user or a conversation read from
    C{X-API-Key} would be the key itself, written into every log or made
    into a digest.

    @param names: What the header names, for the error ("a user").
    @return: C{name}, as given.
    @raise ValueError: If it is not one, saying why.
    """
    if not _TOKEN.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a header name: use 1 to 128 letters, digits or "
            "!#$%&'*+-.^_`|~ (RFC 9110)"
        )
    if name.lower().encode("ascii") in NEVER_UPSTREAM:
        raise ValueError(
            f"{name!r} carries credentials or describes the connection, not {names}"
        )
    return name


def _header(entry: Mapping[str, Any], setting: str, names: str) -> str | None:
    value = entry.get(setting)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"key {entry['name']!r}: {setting} must be a string")
    try:
        return header_name(value, names)
    except ValueError as e:
        raise ValueError(f"key {entry['name']!r}: {setting} {e}") from None


def _keep_alive(entry: Mapping[str, Any]) -> float | None:
    value = entry.get("max_keep_alive")
    if value is None:
        return None
    try:
        return keep_alive_cap(value)
    except ValueError as e:
        raise ValueError(f"key {entry['name']!r}: max_keep_alive {e}") from None


def _time(entry: Mapping[str, Any], field: str) -> datetime | None:
    value = entry.get(field)
    if value is None:
        return None
    when = datetime.fromisoformat(value)
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _limit(entry: Mapping[str, Any], field: str) -> int | None:
    value = entry.get(field)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"key {entry['name']!r}: {field} must be a whole number from 1")
    return value


def key_to_json(key: ApiKey) -> dict[str, Any]:
    """
    A key as it is written in the keys file (its hash, never the key).
    """
    entry: dict[str, Any] = {"name": key.name, "hash": "sha256:" + key.digest.hex()}
    if key.created is not None:
        entry["created"] = _format_time(key.created)
    if key.expires is not None:
        entry["expires"] = _format_time(key.expires)
    entry["scopes"] = sorted(key.scopes)
    if key.models:
        entry["models"] = list(key.models)
    if key.rpm is not None:
        entry["rpm"] = key.rpm
    if key.max_streams is not None:
        entry["max_streams"] = key.max_streams
    if key.caps.keep_alive is not None:
        entry["max_keep_alive"] = show_duration(key.caps.keep_alive)
    if key.caps.num_ctx is not None:
        entry["max_num_ctx"] = key.caps.num_ctx
    if key.tokens_per_day is not None:
        entry["tokens_per_day"] = key.tokens_per_day
    if key.tokens_per_month is not None:
        entry["tokens_per_month"] = key.tokens_per_month
    if key.weight != 1:
        entry["weight"] = key.weight
    if key.user_header is not None:
        entry["user_header"] = key.user_header
    if key.chat_header is not None:
        entry["chat_header"] = key.chat_header
    return entry


def write_keys_file(path: str, keys: Iterable[ApiKey]) -> None:
    """
    Replace the keys file atomically with one holding C{keys}, readable only
    by its owner.  A crash leaves either the old file or the new one, never a
    mixture.
    """
    entries = [key_to_json(key) for key in keys]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".keys-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"keys": entries}, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def update_keys_file(
    path: str, change: Callable[[list[ApiKey]], list[ApiKey]]
) -> list[ApiKey]:
    """
    Change the keys file safely against other writers: read it, apply
    C{change}, and write the result atomically, all under an exclusive
    C{flock} on C{<path>.lock}.

    Two programs updating the same file one after the other each see the
    other's change; neither overwrites it with a stale copy.  The lock file
    is made (readable only by its owner) beside the keys file and left there:
    deleting it would let a waiting writer lock a file nobody else sees.

    @param path: The keys file; it need not exist yet.
    @param change: Given the keys in the file, returns the keys to write.
        Any exception it raises leaves the file untouched and is passed on.
    @return: The keys written.
    @raise KeysFileError: If the file exists but is not a valid keys file.
    @raise ValueError: If C{change} returns two keys with the same name
        (which the proxy would refuse to start with).
    @raise OSError: If the lock file or the keys file cannot be written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        keys = change(load_keys_file(path))
        KeyStore(keys)
        write_keys_file(path, keys)
        return keys
    finally:
        # Closing the only descriptor releases the lock.
        os.close(lock)
