"""
Tests for L{ollamaproxy.admission.keys}: making keys, looking them up, and the keys
file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import NoReturn

import pytest

from ollamaproxy.admission.caps import Caps
from ollamaproxy.admission.keys import (
    ApiKey,
    KeysFileError,
    KeyStore,
    digest,
    generate_key,
    header_name,
    load_keys_file,
    looks_generated,
    write_keys_file,
)

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
WHEN = datetime(2026, 11, 27, 7, 0, 0, tzinfo=UTC)


def named_key(name: str) -> tuple[str, ApiKey]:
    """
    A fresh secret and the ApiKey that stands for it.
    """
    secret = generate_key()
    return secret, ApiKey(name=name, digest=digest(secret))


def mode_of(path: Path) -> int:
    """
    The permission bits of a file.
    """
    return stat.S_IMODE(os.stat(path).st_mode)


def test_generated_key_shape() -> None:
    """A generated key is olpk_, 32 base62 characters and a 6-character checksum."""
    key = generate_key()
    assert key.startswith("olpk_")
    assert len(key) == len("olpk_") + 32 + 6
    assert set(key[len("olpk_"):]) <= set(BASE62)
    assert looks_generated(key)


def test_generated_keys_are_distinct() -> None:
    """A hundred generated keys are all different."""
    assert len({generate_key() for _ in range(100)}) == 100


def test_every_one_character_change_fails() -> None:
    """Changing any single character of a key makes it no longer look generated."""
    key = generate_key()
    for index, char in enumerate(key):
        other = BASE62[(BASE62.index(char) + 1) % len(BASE62)] if char in BASE62 else "x"
        changed = key[:index] + other + key[index + 1:]
        assert changed != key
        assert not looks_generated(changed), f"change at {index} not detected"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1],
        lambda k: k + "0",
        lambda k: k[1:],
        lambda k: "OLPK_" + k[5:],
        lambda k: k[:10] + "-" + k[11:],
        lambda k: "",
    ],
    ids=["short", "long", "no-prefix", "upper-prefix", "non-base62", "empty"],
)
def test_looks_generated_rejects_malformed(mangle: Callable[[str], str]) -> None:
    """Strings of the wrong length, prefix or alphabet do not look generated."""
    assert not looks_generated(mangle(generate_key()))


def test_digest_is_sha256() -> None:
    """A key's digest is the SHA-256 of its UTF-8 bytes."""
    assert digest("olpk_x") == hashlib.sha256(b"olpk_x").digest()


def test_find() -> None:
    """KeyStore.find returns the ApiKey for its secret only."""
    alice_secret, alice = named_key("alice")
    bob_secret, bob = named_key("bob")
    store = KeyStore([alice, bob])
    assert len(store) == 2
    assert store.find(alice_secret) is alice
    assert store.find(bob_secret) is bob
    assert store.find(generate_key()) is None
    assert store.find(alice_secret[:-1]) is None
    assert store.find("") is None


def test_find_does_not_accept_the_digest() -> None:
    """Presenting the stored digest (hex or raw) instead of the key finds nothing."""
    _, key = named_key("alice")
    store = KeyStore([key])
    assert store.find(key.digest.hex()) is None
    assert store.find("sha256:" + key.digest.hex()) is None
    assert store.find(key.digest.decode("latin-1")) is None


def test_duplicate_names_raise() -> None:
    """Two keys with the same name are refused."""
    _, first = named_key("alice")
    _, second = named_key("alice")
    with pytest.raises(ValueError, match="alice"):
        KeyStore([first, second])


def test_replace_takes_effect() -> None:
    """After replace, only the new keys are accepted."""
    old_secret, old = named_key("old")
    new_secret, new = named_key("new")
    store = KeyStore([old])
    store.replace([new])
    assert store.find(old_secret) is None
    assert store.find(new_secret) is new
    assert len(store) == 1


def test_failed_replace_keeps_old_keys() -> None:
    """A replace refused for duplicate names leaves the store as it was."""
    old_secret, old = named_key("old")
    _, dup1 = named_key("dup")
    _, dup2 = named_key("dup")
    store = KeyStore([old])
    with pytest.raises(ValueError):
        store.replace([dup1, dup2])
    assert store.find(old_secret) is old
    assert len(store) == 1


def test_round_trip(tmp_path: Path) -> None:
    """Keys written to a file load back with the same names, digests and times."""
    path = str(tmp_path / "keys.json")
    keys = [
        ApiKey("alice", digest(generate_key()), WHEN),
        ApiKey("bob", digest(generate_key())),
        ApiKey("carol", digest(generate_key()),
               datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))),
    ]
    write_keys_file(path, keys)
    loaded = load_keys_file(path)
    assert loaded == keys
    assert loaded[2].created == datetime(2026, 1, 2, 1, 4, 5, tzinfo=UTC)


def test_file_format(tmp_path: Path) -> None:
    """The file is the documented JSON: name, sha256:<hex> hash and a UTC created time."""
    path = tmp_path / "keys.json"
    key = ApiKey("default", digest("secret"), WHEN)
    write_keys_file(str(path), [key])
    assert json.loads(path.read_text()) == {
        "keys": [
            {
                "name": "default",
                "scopes": ["inference"],
                "hash": "sha256:" + hashlib.sha256(b"secret").hexdigest(),
                "created": "2026-11-27T07:00:00Z",
            }
        ]
    }


def test_file_never_holds_the_key(tmp_path: Path) -> None:
    """The written file contains the key's digest but never the key itself."""
    path = tmp_path / "keys.json"
    secret, key = named_key("default")
    write_keys_file(str(path), [key])
    text = path.read_text()
    assert key.digest.hex() in text
    assert secret not in text
    assert secret[len("olpk_"):] not in text


def test_file_mode(tmp_path: Path) -> None:
    """The keys file is readable by its owner only, even when it replaces a wider one."""
    path = tmp_path / "keys.json"
    path.write_text("{}")
    path.chmod(0o644)
    write_keys_file(str(path), [named_key("a")[1]])
    assert mode_of(path) == 0o600


def test_write_creates_directories(tmp_path: Path) -> None:
    """Missing parent directories are made, private to the owner."""
    path = tmp_path / "config" / "ollamaproxy" / "keys.json"
    _, key = named_key("a")
    write_keys_file(str(path), [key])
    assert load_keys_file(str(path)) == [key]
    assert mode_of(path.parent) == 0o700


def test_missing_file_is_empty(tmp_path: Path) -> None:
    """A keys file that does not exist loads as no keys."""
    assert load_keys_file(str(tmp_path / "absent.json")) == []


GOOD_HASH = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text", ["", "not json", '{"keys": [', "[]", "{}"])
def test_unparsable_file(tmp_path: Path, text: str) -> None:
    """A file that is not a JSON object with keys raises KeysFileError naming the file."""
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(KeysFileError, match=re.escape(str(path))):
        load_keys_file(str(path))


@pytest.mark.parametrize(
    "document",
    [
        {"keys": None},
        {"keys": "abc"},
        {"keys": [None]},
        {"keys": [{"name": "a"}]},
        {"keys": [{"hash": GOOD_HASH}]},
        {"keys": [{"name": "a", "hash": "md5:" + "ab" * 16}]},
        {"keys": [{"name": "a", "hash": "sha1:" + "ab" * 32}]},
        {"keys": [{"name": "a", "hash": "ab" * 32}]},
        {"keys": [{"name": "a", "hash": "sha256:abcd"}]},
        {"keys": [{"name": "a", "hash": "sha256:" + "zz" * 32}]},
        {"keys": [{"name": "a", "hash": GOOD_HASH, "created": "yesterday"}]},
        {"keys": [{"name": "a", "hash": GOOD_HASH, "created": 5}]},
        {"keys": [{"name": "a", "hash": 123}]},
        {"keys": [{"name": "a", "hash": ["sha256", "ab" * 32]}]},
    ],
    ids=[
        "keys-null",
        "keys-string",
        "entry-null",
        "no-hash",
        "no-name",
        "md5",
        "sha1",
        "no-algorithm",
        "short-digest",
        "non-hex",
        "bad-created",
        "numeric-created",
        "numeric-hash",
        "list-hash",
    ],
)
def test_invalid_file(tmp_path: Path, document: object) -> None:
    """Valid JSON that is not a valid keys file raises KeysFileError naming the file."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    with pytest.raises(KeysFileError, match=re.escape(str(path))):
        load_keys_file(str(path))


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ([], 'it must be an object whose "keys" is a list: {"keys": [...]}'),
        ({"keys": {}}, 'it must be an object whose "keys" is a list: {"keys": [...]}'),
        ({"nokeys": []}, 'it must be an object whose "keys" is a list: {"keys": [...]}'),
        ({"keys": ["alice"]}, "key number 1 is not an object"),
        ({"keys": [{"name": "alice"}]}, "key 'alice' has no \"hash\""),
        ({"keys": [{"hash": "sha256:" + "0" * 64}]}, "key number 1 has no \"name\""),
        ({"keys": [{"name": "a", "hash": "sha256:" + "0" * 64, "user_header": 5}]},
         "key 'a': user_header must be a string"),
        ({"keys": [{"name": "a", "hash": "sha256:" + "0" * 64, "user_header": "X-API-Key"}]},
         "key 'a': user_header 'X-API-Key' carries credentials or describes the "
         "connection, not a user"),
    ],
)
def test_invalid_file_says_what_is_wrong(tmp_path: Path, document: object, reason: str) -> None:
    """
    A keys file of the wrong shape (a list, keys as an object, an entry
    without its hash) is refused with a reason in words, not a Python
    exception's repr; C{{"keys": {}}} is not taken for an empty file.
    """
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    with pytest.raises(KeysFileError) as e:
        load_keys_file(str(path))
    assert str(e.value) == f"keys file {path} is not valid: {reason}"


def test_undecodable_file(tmp_path: Path) -> None:
    """A file that is not UTF-8 raises KeysFileError."""
    path = tmp_path / "keys.json"
    path.write_bytes(b'{"keys": [\xff]}')
    with pytest.raises(KeysFileError, match=re.escape(str(path))):
        load_keys_file(str(path))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory where the file should be raises KeysFileError."""
    with pytest.raises(KeysFileError, match=re.escape(str(tmp_path))):
        load_keys_file(str(tmp_path))


class DumpFailed(Exception):
    """
    Raised by the sabotaged json.dump.
    """


def fail_dump(*args: object, **kwargs: object) -> NoReturn:
    """
    Stand-in for json.dump that fails half-way, after writing some bytes.
    """
    fp = args[1]
    assert hasattr(fp, "write")
    fp.write('{"keys": [')
    raise DumpFailed()


def test_failed_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way leaves the previous file intact and no temporary file."""
    path = tmp_path / "keys.json"
    _, old = named_key("old")
    write_keys_file(str(path), [old])
    before = path.read_bytes()
    monkeypatch.setattr(json, "dump", fail_dump)
    with pytest.raises(DumpFailed):
        write_keys_file(str(path), [named_key("new")[1]])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keys.json"]
    monkeypatch.undo()
    assert load_keys_file(str(path)) == [old]


def test_failed_first_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first write that fails leaves neither a keys file nor a temporary file."""
    monkeypatch.setattr(json, "dump", fail_dump)
    with pytest.raises(DumpFailed):
        write_keys_file(str(tmp_path / "keys.json"), [named_key("a")[1]])
    assert os.listdir(tmp_path) == []


def test_full_key_round_trips(tmp_path: Path) -> None:
    """
    Every field of a key (expiry, scopes, models, limits, quotas, weight,
    user header, its chat id header) survives the file.
    """
    path = str(tmp_path / "keys.json")
    key = ApiKey(
        "alice", digest(generate_key()), WHEN,
        expires=datetime(2027, 1, 1, tzinfo=UTC),
        scopes=frozenset({"inference", "admin"}),
        models=("llama3*", "mistral:7b"),
        rpm=60,
        max_streams=2,
        tokens_per_day=200_000,
        tokens_per_month=3_000_000,
        weight=3,
        user_header="X-OpenWebUI-User-Id",
        chat_header="X-OpenWebUI-Chat-Id",
    )
    write_keys_file(path, [key])
    assert load_keys_file(path) == [key]


def test_expiry() -> None:
    """A key works until its expiry time and not from then on."""
    key = ApiKey("k", b"", expires=datetime(2027, 1, 1, tzinfo=UTC))
    assert not key.expired(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert key.expired(datetime(2027, 1, 1, tzinfo=UTC))


def test_caps_round_trip(tmp_path: Path) -> None:
    """A key's max_keep_alive and max_num_ctx survive the file."""
    path = str(tmp_path / "keys.json")
    key = ApiKey("alice", digest(generate_key()), WHEN, caps=Caps(keep_alive=90.0, num_ctx=4096))
    write_keys_file(path, [key])
    assert load_keys_file(path) == [key]


@pytest.mark.parametrize("value", ['"-1m"', "-1", '"soon"', "true"])
def test_a_cap_that_is_no_duration_is_refused(tmp_path: Path, value: str) -> None:
    """A max_keep_alive that is no duration, or for ever, makes the file invalid."""
    path = tmp_path / "keys.json"
    path.write_text('{"keys": [{"name": "a", "hash": "sha256:' + "0" * 64
                    + '", "max_keep_alive": ' + value + "}]}")
    with pytest.raises(KeysFileError):
        load_keys_file(str(path))


@pytest.mark.parametrize("value", ['"Authorization"', '"x-api-key"', '"Cookie"', '"a b"', '""',
                                   "7"])
def test_a_chat_header_that_is_no_header_or_a_credential_is_refused(
    tmp_path: Path, value: str
) -> None:
    """
    A chat id header must be a header's name, and none that carries a
    credential: no conversation's digest is ever made of a key.
    """
    path = tmp_path / "keys.json"
    path.write_text('{"keys": [{"name": "a", "hash": "sha256:' + "0" * 64
                    + '", "chat_header": ' + value + "}]}")
    with pytest.raises(KeysFileError):
        load_keys_file(str(path))


@pytest.mark.parametrize("name", ["X-OpenWebUI-User-Id", "x-user", "User", "X_User.1~"])
def test_header_names(name: str) -> None:
    """A field name of RFC 9110 is accepted as it is written."""
    assert header_name(name, "a user") == name


@pytest.mark.parametrize(
    "name", ["", "X User", "X:User", "X-Üser", "X(User)", "Authorization", "x-api-key",
             "Cookie", "Connection", "Host"]
)
def test_not_header_names(name: str) -> None:
    """
    A name that is not a field name, or that names a header holding the
    key or describing the connection, is refused.
    """
    with pytest.raises(ValueError):
        header_name(name, "a user")
