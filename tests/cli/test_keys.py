"""
Tests for L{ollamaproxy.cli.keys}: the C{ollamaproxy keys} command, and
L{ollamaproxy.admission.keys.update_keys_file} under it.

The command runs in-process through L{main}, with its streams, environment
and clock injected (L{tests.fakes.cli}); the tests of locking, which use
real processes, are in C{tests/integration/test_cli_processes.py}.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

import pytest

from ollamaproxy.admission.caps import Caps
from ollamaproxy.admission.keys import (
    ADMIN,
    CLOUD,
    INFERENCE,
    ApiKey,
    KeysFileError,
    KeyStore,
    digest,
    generate_key,
    load_keys_file,
    looks_generated,
    update_keys_file,
    write_keys_file,
)
from ollamaproxy.admission.quota_periods import window
from ollamaproxy.config import Config
from ollamaproxy.record.usage_db import tokens_by_key, write_rows
from tests.fakes.cli import NOW, add, assert_one_line_error, run

LATER = NOW + timedelta(days=30)


def test_add_prints_only_the_key_on_the_last_line(keys_file: Path) -> None:
    """add prints a generated key alone on its last line, and stores its digest, not the key."""
    result = run("keys", "add", "bob", "--keys-file", str(keys_file))
    assert (result.code, result.err) == (0, "")
    key = result.last_line
    assert looks_generated(key)
    assert key not in "\n".join(result.out.splitlines()[:-1])
    assert "bob" in result.out
    text = keys_file.read_text()
    assert digest(key).hex() in text
    assert key not in text
    assert load_keys_file(str(keys_file)) == [
        ApiKey(name="bob", digest=digest(key), created=NOW)
    ]


def test_add_with_every_option_round_trips(keys_file: Path) -> None:
    """Every option of add comes back from load_keys_file as given."""
    key = add(
        keys_file, "ci.bot_2-x", "--admin", "--models", "llama3*,qwen2:*",
        "--models", "mistral", "--rpm", "60", "--max-streams", "2",
        "--expires", "2027-01-01T12:00:00+02:00",
    )
    assert load_keys_file(str(keys_file)) == [
        ApiKey(
            name="ci.bot_2-x",
            digest=digest(key),
            created=NOW,
            expires=datetime(2027, 1, 1, 10, 0, tzinfo=UTC),
            scopes=frozenset({INFERENCE, ADMIN}),
            models=("llama3*", "qwen2:*", "mistral"),
            rpm=60,
            max_streams=2,
        )
    ]


@pytest.mark.parametrize(
    ("given", "expires"),
    [
        ("2027-01-01", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01T12:00:00Z", datetime(2027, 1, 1, 12, tzinfo=UTC)),
        ("2027-01-01T12:00", datetime(2027, 1, 1, 12, tzinfo=UTC)),
        ("2027-01-01 12:00:30", datetime(2027, 1, 1, 12, 0, 30, tzinfo=UTC)),
        ("2027-01-01T12:00:00-05:00", datetime(2027, 1, 1, 17, tzinfo=UTC)),
    ],
)
def test_expires_forms(keys_file: Path, given: str, expires: datetime) -> None:
    """--expires takes a date (midnight UTC) or a date and time, UTC unless an offset is given."""
    add(keys_file, "bob", "--expires", given)
    [key] = load_keys_file(str(keys_file))
    assert key.expires == expires


def test_files_are_private(keys_file: Path) -> None:
    """add makes the keys file and its lock file readable by their owner only."""
    add(keys_file, "bob")
    for path in [keys_file, Path(f"{keys_file}.lock")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_list_never_shows_keys_or_hashes(keys_file: Path) -> None:
    """list shows every setting of every key, and neither the keys nor their digests."""
    secrets = [
        add(keys_file, "alice"),
        add(keys_file, "bob", "--admin", "--models", "llama3*,qwen", "--rpm", "60",
            "--max-streams", "2", "--expires", "2027-01-01", "--user-header", "X-User"),
    ]
    result = run("keys", "list", "--keys-file", str(keys_file))
    assert (result.code, result.err) == (0, "")
    for secret in secrets:
        assert secret not in result.out
        assert digest(secret).hex() not in result.out
        assert digest(secret).hex()[:16] not in result.out
    assert "sha256" not in result.out and "olpk_" not in result.out
    header, alice, bob = result.out.splitlines()
    assert re.split(r"\s{2,}", header) == [
        "NAME", "SCOPES", "MODELS", "RPM", "MAX STREAMS", "MAX KEEP_ALIVE", "MAX NUM_CTX",
        "WEIGHT", "TOKENS TODAY", "TOKENS THIS MONTH", "USER HEADER", "CREATED", "EXPIRES",
    ]
    assert alice.split() == [
        "alice", "inference", "all", "-", "-", "-", "-", "1", "0", "0", "-",
        "2026-11-27T07:00:00Z", "-",
    ]
    assert bob.split() == [
        "bob", "admin,inference", "llama3*,qwen", "60", "2", "-", "-", "1", "0", "0", "X-User",
        "2026-11-27T07:00:00Z", "2027-01-01T00:00:00Z",
    ]


def test_list_marks_expired_keys(keys_file: Path) -> None:
    """list marks a key whose expiry has passed as expired, and only that one; keys by name."""
    add(keys_file, "soon", "--expires", "2026-12-01")
    add(keys_file, "late", "--expires", "2028-01-01")
    result = run("keys", "list", "--keys-file", str(keys_file),
                 now=datetime(2027, 1, 1, tzinfo=UTC))
    _, late, soon = result.out.splitlines()
    assert soon.endswith("2026-12-01T00:00:00Z (expired)")
    assert "expired" not in late


def test_list_without_keys(keys_file: Path) -> None:
    """list on a missing keys file says there are no keys, and creates nothing."""
    result = run("keys", "list", "--keys-file", str(keys_file))
    assert (result.code, result.out, result.err) == (0, f"No keys in {keys_file}.\n", "")
    assert not keys_file.parent.exists()


def test_list_escapes_unprintable_names(keys_file: Path) -> None:
    """list does not pass terminal control characters from a hand-edited file to the terminal."""
    write_keys_file(str(keys_file), [ApiKey(name="evil\x1b[2J", digest=digest("x"),
                                            models=("a\nb",))])
    result = run("keys", "list", "--keys-file", str(keys_file))
    assert result.code == 0
    assert "\x1b" not in result.out
    assert len(result.out.splitlines()) == 2


def test_revoke_removes_only_that_key(keys_file: Path) -> None:
    """revoke deletes the named key and leaves the others as they were."""
    alice = add(keys_file, "alice")
    bob = add(keys_file, "bob", "--rpm", "5")
    before = load_keys_file(str(keys_file))
    result = run("keys", "revoke", "alice", "--keys-file", str(keys_file))
    assert (result.code, result.err) == (0, "")
    assert "Revoked key 'alice'" in result.out
    assert alice not in result.out and bob not in result.out
    after = load_keys_file(str(keys_file))
    assert after == before[1:]
    assert KeyStore(after).find(alice) is None


def test_revoking_the_last_key_warns(keys_file: Path) -> None:
    """Revoking the last key warns that the proxy will make a new one at its next start."""
    add(keys_file, "bob")
    result = run("keys", "revoke", "bob", "--keys-file", str(keys_file))
    assert result.code == 0
    assert result.err.startswith("ollamaproxy: warning: no keys are left")
    assert load_keys_file(str(keys_file)) == []


def test_rotate_changes_the_secret_and_keeps_the_rest(keys_file: Path) -> None:
    """rotate renews a key's secret and creation time, keeping its settings and its place."""
    add(keys_file, "alice")
    old = add(keys_file, "bob", "--admin", "--models", "llama3*", "--rpm", "60",
              "--max-streams", "2", "--expires", "2027-06-01")
    add(keys_file, "carol")
    before = load_keys_file(str(keys_file))
    result = run("keys", "rotate", "bob", "--keys-file", str(keys_file), now=LATER)
    assert (result.code, result.err) == (0, "")
    new = result.last_line
    assert looks_generated(new) and new != old
    assert old not in result.out
    after = load_keys_file(str(keys_file))
    assert after == [before[0], replace(before[1], digest=digest(new), created=LATER), before[2]]
    store = KeyStore(after)
    assert store.find(old) is None
    found = store.find(new)
    assert found is not None and found.name == "bob"


def test_rotating_an_expired_key_warns(keys_file: Path) -> None:
    """Rotating an expired key works but warns that the new key is expired too."""
    add(keys_file, "bob", "--expires", "2026-12-01")
    result = run("keys", "rotate", "bob", "--keys-file", str(keys_file), now=LATER)
    assert result.code == 0
    assert looks_generated(result.last_line)
    assert result.err.startswith("ollamaproxy: warning: key 'bob' expired")


@pytest.mark.parametrize(
    "argv",
    [
        ["bob", "--models", "llama3*"],
        ["--models", "llama3*", "bob"],
        ["--models", "llama3*", "bob", "--rpm", "5"],
        ["--rpm", "5", "--models", "llama3*", "bob"],
    ],
    ids=["name-first", "name-last", "name-between", "name-after-two-options"],
)
def test_add_options_before_or_after_the_name(keys_file: Path, argv: list[str]) -> None:
    """
    C{keys add} takes its options before or after the key's name:
    C{--models} takes one value, so the name is never read as a model.
    """
    key = add(keys_file, *argv)
    [stored] = load_keys_file(str(keys_file))
    assert (stored.name, stored.models, stored.digest) == ("bob", ("llama3*",), digest(key))


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["keys", "add", "bob"], "a key named 'bob' already exists in"),
        (["keys", "revoke", "nobody"], "no key named 'nobody' in"),
        (["keys", "rotate", "nobody"], "no key named 'nobody' in"),
    ],
)
def test_command_errors(keys_file: Path, argv: list[str], fragment: str) -> None:
    """A duplicate name, or an unknown one, gives one line on stderr, exit code 1, and no change."""
    add(keys_file, "bob")
    before = keys_file.read_bytes()
    result = run(*argv, "--keys-file", str(keys_file))
    assert_one_line_error(result, 1, fragment)
    assert str(keys_file) in result.err
    assert keys_file.read_bytes() == before


@pytest.mark.parametrize(
    "action", [["list"], ["add", "carol"], ["revoke", "bob"], ["rotate", "bob"]]
)
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "cannot read keys file"),
        ('{"keys": [{"name": "bob"}]}', "is not valid"),
        ('{"keys": [{"name": "bob", "hash": "md5:00"}]}', "is not valid"),
        ('{"keys": [{"name": "bob", "hash": "sha256:' + "0" * 64 + '", "rpm": true}]}',
         "is not valid"),
        ('{"keys": [{"name": "bob", "hash": "sha256:' + "0" * 64 + '", "expires": 5}]}',
         "is not valid"),
        ("\xff", "cannot read keys file"),
    ],
)
def test_invalid_keys_file(
    keys_file: Path, action: list[str], content: str, fragment: str
) -> None:
    """An invalid keys file gives one line on stderr naming it, exit code 1, and stays as it was."""
    keys_file.parent.mkdir()
    keys_file.write_bytes(content.encode("latin-1"))
    result = run("keys", *action, "--keys-file", str(keys_file))
    assert_one_line_error(result, 1, fragment)
    assert str(keys_file) in result.err
    assert keys_file.read_bytes() == content.encode("latin-1")


def test_duplicate_names_in_file_are_not_written(keys_file: Path) -> None:
    """Changing a file with two keys of one name fails rather than write what the proxy refuses."""
    write_keys_file(str(keys_file), [ApiKey("bob", digest("a")), ApiKey("bob", digest("b"))])
    before = keys_file.read_bytes()
    result = run("keys", "add", "carol", "--keys-file", str(keys_file))
    assert_one_line_error(result, 1, "two keys are named 'bob'")
    assert keys_file.read_bytes() == before


def test_keys_file_is_a_directory(keys_file: Path) -> None:
    """A keys file path that is a directory gives one line on stderr and exit code 1."""
    keys_file.mkdir(parents=True)
    assert_one_line_error(run("keys", "list", "--keys-file", str(keys_file)), 1,
                          "cannot read keys file")
    assert_one_line_error(run("keys", "add", "bob", "--keys-file", str(keys_file)), 1,
                          "cannot read keys file")


def test_unwritable_keys_file(tmp_path: Path) -> None:
    """A keys file that cannot be created gives one line on stderr and exit code 1."""
    (tmp_path / "file").write_text("")
    result = run("keys", "add", "bob", "--keys-file", str(tmp_path / "file" / "keys.json"))
    assert_one_line_error(result, 1, "cannot update keys file")


@pytest.mark.parametrize(
    ("option", "variable", "chosen"),
    [
        ("option.json", "env.json", "option.json"),
        (None, "env.json", "env.json"),
        (None, None, "xdg/ollamaproxy/keys.json"),
        (None, "", "xdg/ollamaproxy/keys.json"),
    ],
)
def test_keys_file_precedence(
    tmp_path: Path, option: str | None, variable: str | None, chosen: str
) -> None:
    """The keys file is --keys-file, then $OLLAMAPROXY_KEYS_FILE, then the default, like twistd."""
    environ = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    if variable is not None:
        environ["OLLAMAPROXY_KEYS_FILE"] = variable and str(tmp_path / variable)
    argv = [] if option is None else ["--keys-file", str(tmp_path / option)]
    result = run("keys", "add", "bob", *argv, environ=environ)
    assert result.code == 0
    written = sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.json")
    )
    assert written == [chosen]
    daemon = Config.from_sources(
        {"keys-file": None if option is None else str(tmp_path / option)}, environ
    )
    assert daemon.keys_file == str(tmp_path / chosen)


def test_update_keys_file_returns_and_writes(keys_file: Path) -> None:
    """update_keys_file passes the current keys to the change and writes what it returns."""
    first = ApiKey("a", digest("a"))
    second = ApiKey("b", digest("b"))
    assert update_keys_file(str(keys_file), lambda keys: [*keys, first]) == [first]
    seen: list[list[ApiKey]] = []

    def change(keys: list[ApiKey]) -> list[ApiKey]:
        seen.append(keys)
        return [*keys, second]

    assert update_keys_file(str(keys_file), change) == [first, second]
    assert seen == [[first]]
    assert load_keys_file(str(keys_file)) == [first, second]


def test_failing_change_writes_nothing(keys_file: Path) -> None:
    """An exception from the change passes through update_keys_file and leaves the file alone."""
    write_keys_file(str(keys_file), [ApiKey("a", digest("a"))])
    before = keys_file.read_bytes()

    def change(keys: list[ApiKey]) -> NoReturn:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        update_keys_file(str(keys_file), change)
    assert keys_file.read_bytes() == before


def test_update_keys_file_refuses_invalid_file(keys_file: Path) -> None:
    """update_keys_file does not call the change on an invalid keys file."""
    keys_file.parent.mkdir()
    keys_file.write_text("[]")
    with pytest.raises(KeysFileError):
        update_keys_file(str(keys_file), lambda keys: pytest.fail("called"))
    assert keys_file.read_text() == "[]"


def test_crash_while_replacing_keeps_old_file(
    keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the atomic rename fails, the old keys file is intact and no temporary file is left."""
    add(keys_file, "bob")
    before = keys_file.read_bytes()

    def crash(source: str, destination: str) -> NoReturn:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    result = run("keys", "add", "carol", "--keys-file", str(keys_file))
    assert_one_line_error(result, 1, f"cannot update keys file {keys_file}: Input/output error")
    result = run("keys", "rotate", "bob", "--keys-file", str(keys_file))
    assert_one_line_error(result, 1, "cannot update keys file")
    monkeypatch.undo()
    assert keys_file.read_bytes() == before
    assert sorted(p.name for p in keys_file.parent.iterdir()) == ["keys.json", "keys.json.lock"]


def test_generated_keys_differ_per_add(keys_file: Path) -> None:
    """Two adds print two different keys, each matching only its own entry."""
    first = add(keys_file, "a")
    second = add(keys_file, "b")
    assert first != second
    store = KeyStore(load_keys_file(str(keys_file)))
    found = [store.find(key) for key in (first, second, generate_key())]
    assert [None if key is None else key.name for key in found] == ["a", "b", None]


def test_add_caps_round_trip(keys_file: Path) -> None:
    """
    C{--max-keep-alive} and C{--max-num-ctx} are stored with the key and
    read back as its caps; the summary names them.
    """
    result = run("keys", "add", "bob", "--max-keep-alive", "10m", "--max-num-ctx", "8192",
                 "--keys-file", str(keys_file))
    assert result.code == 0
    assert "max keep_alive 10m; max num_ctx 8192" in result.out
    [stored] = load_keys_file(str(keys_file))
    assert stored.caps == Caps(keep_alive=600.0, num_ctx=8192)


@pytest.mark.parametrize("value", ["forever", "-1", "-1m", "10x"])
def test_add_refuses_a_keep_alive_cap_that_is_none(keys_file: Path, value: str) -> None:
    """
    A cap that is no duration, or for ever, is one line and exit 2.
    """
    result = run("keys", "add", "bob", "--max-keep-alive", value, "--keys-file", str(keys_file))
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1


def test_add_token_quotas_round_trip_and_show(keys_file: Path) -> None:
    """
    C{--tokens-per-day} and C{--tokens-per-month} are stored with the key,
    named in the summary, and shown by C{keys list}.
    """
    result = run("keys", "add", "bob", "--tokens-per-day", "20000", "--tokens-per-month",
                 "300000", "--keys-file", str(keys_file))
    assert (result.code, result.err) == (0, "")
    assert "tokens per day 20000; tokens per month 300000" in result.out
    [stored] = load_keys_file(str(keys_file))
    assert (stored.tokens_per_day, stored.tokens_per_month) == (20000, 300000)
    _, line = run("keys", "list", "--keys-file", str(keys_file)).out.splitlines()
    assert line.split()[8:10] == ["0/20000", "0/300000"]


def test_update_changes_settings_and_keeps_the_secret(keys_file: Path) -> None:
    """
    C{keys update} changes the settings it is given, leaves the others and
    the key's secret, creation time and place in the file as they were.
    """
    add(keys_file, "alice")
    secret = add(keys_file, "bob", "--models", "llama3*", "--rpm", "60", "--max-streams", "2",
                 "--max-num-ctx", "8192")
    add(keys_file, "carol")
    before = load_keys_file(str(keys_file))
    result = run("keys", "update", "bob", "--tokens-per-day", "1000", "--tokens-per-month",
                 "20000", "--rpm", "30", "--cloud", "--max-keep-alive", "5m",
                 "--expires", "2027-06-01", "--keys-file", str(keys_file), now=LATER)
    assert (result.code, result.err) == (0, "")
    assert result.out.startswith(f"Updated key 'bob' in {keys_file}; its secret is unchanged")
    assert "olpk_" not in result.out and "sha256" not in result.out
    assert "rpm 30" in result.out and "tokens per day 1000" in result.out
    after = load_keys_file(str(keys_file))
    assert after == [
        before[0],
        replace(before[1], rpm=30, scopes=frozenset({INFERENCE, CLOUD}),
                caps=Caps(keep_alive=300.0, num_ctx=8192),
                expires=datetime(2027, 6, 1, tzinfo=UTC),
                tokens_per_day=1000, tokens_per_month=20000),
        before[2],
    ]
    found = KeyStore(after).find(secret)
    assert found is not None and found.name == "bob" and found.created == NOW


def test_update_clears_limits(keys_file: Path) -> None:
    """
    C{none} removes a limit or a cap, C{--expires never} the expiry,
    C{--models all} the model patterns, C{--no-admin} and C{--no-cloud}
    the scopes: the key is then as if added with no options.
    """
    secret = add(keys_file, "bob", "--admin", "--cloud", "--models", "llama3*", "--rpm", "60",
                 "--max-streams", "2", "--max-keep-alive", "10m", "--max-num-ctx", "8192",
                 "--expires", "2027-01-01", "--tokens-per-day", "5", "--tokens-per-month", "9",
                 "--weight", "3", "--chat-header", "X-OpenWebUI-Chat-Id")
    assert load_keys_file(str(keys_file))[0].weight == 3
    assert load_keys_file(str(keys_file))[0].chat_header == "X-OpenWebUI-Chat-Id"
    result = run("keys", "update", "bob", "--no-admin", "--no-cloud", "--models", "all",
                 "--rpm", "none", "--max-streams", "none", "--max-keep-alive", "none",
                 "--max-num-ctx", "none", "--expires", "never", "--tokens-per-day", "none",
                 "--tokens-per-month", "none", "--weight", "none", "--chat-header", "",
                 "--keys-file", str(keys_file))
    assert (result.code, result.err) == (0, "")
    assert load_keys_file(str(keys_file)) == [ApiKey("bob", digest(secret), created=NOW)]


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["nobody", "--rpm", "5"], 1, "no key named 'nobody' in"),
        (["bob"], 2, "keys update: give a setting to change"),
        (["bob", "--rpm", "0"], 2, "--rpm: '0' is not a whole number from 1"),
        (["bob", "--tokens-per-day", "lots"], 2, "--tokens-per-day: 'lots' is not a whole"),
        (["bob", "--tokens-per-month", "-5"], 2, "--tokens-per-month"),
        (["bob", "--expires", "2026-01-01"], 2, "is not in the future"),
        (["bob", "--expires", "none"], 2, "--expires: 'none' is not a date"),
        (["bob", "--models", "a", "b"], 2, "unrecognized arguments: b"),
        (["bob", "--admin", "--no-admin", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["bob", "--chat-header", "Authorization"], 2, "carries credentials"),
        (["bob", "--chat-header", "a:b"], 2, "is not a header name"),
    ],
)
def test_update_errors(keys_file: Path, argv: list[str], code: int, fragment: str) -> None:
    """
    An unknown key is one line and exit 1; a wrong or empty command line
    one line and exit 2; the file stays as it was either way.
    """
    add(keys_file, "bob", "--rpm", "60")
    before = keys_file.read_bytes()
    result = run("keys", "update", *argv, "--keys-file", str(keys_file))
    assert_one_line_error(result, code, fragment)
    assert keys_file.read_bytes() == before


def test_user_header_is_stored_changed_and_cleared(keys_file: Path) -> None:
    """
    C{--user-header} is stored with the key as given (C{add} and
    C{update}), and C{update --user-header ''} removes it; the rest of the
    key stays as it was.
    """
    secret = add(keys_file, "webui", "--user-header", "X-OpenWebUI-User-Id", "--rpm", "60")
    expected = ApiKey("webui", digest(secret), created=NOW, rpm=60,
                      user_header="X-OpenWebUI-User-Id")
    assert load_keys_file(str(keys_file)) == [expected]
    assert '"user_header": "X-OpenWebUI-User-Id"' in keys_file.read_text()
    result = run("keys", "update", "webui", "--user-header", "X-User",
                 "--keys-file", str(keys_file))
    assert (result.code, result.err) == (0, "")
    assert "user header X-User" in result.out
    assert load_keys_file(str(keys_file)) == [replace(expected, user_header="X-User")]
    result = run("keys", "update", "webui", "--user-header", "", "--keys-file", str(keys_file))
    assert (result.code, result.err) == (0, "")
    assert load_keys_file(str(keys_file)) == [replace(expected, user_header=None)]


@pytest.mark.parametrize(
    ("action", "header", "fragment"),
    [
        ("add", "X User", "'X User' is not a header name"),
        ("add", "", "'' is not a header name"),
        ("add", "X-Üser", "is not a header name"),
        ("add", "X:User", "is not a header name"),
        ("add", "X-API-Key", "carries credentials"),
        ("update", "Authorization", "carries credentials"),
        ("update", "cookie", "carries credentials"),
        ("update", "X(User)", "is not a header name"),
    ],
)
def test_user_header_must_be_a_header_name(
    keys_file: Path, action: str, header: str, fragment: str
) -> None:
    """
    A C{--user-header} that is not a field name of RFC 9110, or that names
    a header holding the key or describing the connection, is one line
    and exit 2, and the keys file is left as it was.
    """
    add(keys_file, "bob")
    before = keys_file.read_bytes()
    name = "carol" if action == "add" else "bob"
    result = run("keys", action, name, "--user-header", header, "--keys-file", str(keys_file))
    assert_one_line_error(result, 2, fragment)
    assert keys_file.read_bytes() == before


def test_add_refuses_none_for_a_limit(keys_file: Path) -> None:
    """
    C{none} clears a limit on C{update} only: C{add} takes whole numbers.
    """
    result = run("keys", "add", "bob", "--tokens-per-day", "none", "--keys-file", str(keys_file))
    assert_one_line_error(result, 2, "--tokens-per-day: 'none' is not a whole number")


def at(text: str) -> float:
    """
    A UTC time as the usage database keeps it.
    """
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture
def usage_file(tmp_path: Path) -> Path:
    """
    Usage as the daemon records it, around L{NOW} (2026-11-27T07:00Z): bob
    last month, yesterday and today; alice only refused, today.
    """
    path = tmp_path / "state" / "usage.sqlite3"
    write_rows(str(path), [
        (at("2026-10-31T23:59:30"), "bob", "llama3", 1, 500, 500, 0),
        (at("2026-11-26T23:59:30"), "bob", "llama3", 1, 30, 20, 0),
        (at("2026-11-27T06:59:10"), "bob", "qwen", 1, 3, 4, 0),
        (at("2026-11-27T06:59:50"), "alice", "", 0, 0, 0, 1),
    ])
    return path


def test_list_shows_the_quotas_use(keys_file: Path, usage_file: Path) -> None:
    """
    list shows the tokens each key used this UTC day and month, as the
    token quotas count them (the usage recorded from the day's and the
    month's start), out of its quota if it has one.
    """
    add(keys_file, "alice")
    add(keys_file, "bob", "--tokens-per-day", "100", "--tokens-per-month", "1000")
    result = run("keys", "list", "--keys-file", str(keys_file), "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    _, alice, bob = result.out.splitlines()
    assert alice.split()[7:10] == ["1", "0", "0"]
    assert bob.split()[7:10] == ["1", "7/100", "57/1000"]
    today = tokens_by_key(str(usage_file), window("day", NOW.timestamp()).start)
    month = tokens_by_key(str(usage_file), window("month", NOW.timestamp()).start)
    assert (today["bob"], month["bob"]) == (7, 57)


def test_list_finds_usage_as_the_daemon_does(keys_file: Path, usage_file: Path) -> None:
    """list reads the usage file named by $OLLAMAPROXY_USAGE_FILE, as the daemon writes it."""
    add(keys_file, "bob", "--tokens-per-day", "100")
    result = run("keys", "list", "--keys-file", str(keys_file),
                 environ={"HOME": "/nonexistent", "OLLAMAPROXY_USAGE_FILE": str(usage_file)})
    assert result.out.splitlines()[1].split()[8] == "7/100"


def test_show_prints_one_key(keys_file: Path, usage_file: Path) -> None:
    """show prints every setting of one key and its use, one per line, never the key."""
    add(keys_file, "alice")
    secret = add(keys_file, "bob", "--models", "llama3*", "--rpm", "60", "--max-streams", "2",
                 "--max-keep-alive", "10m", "--max-num-ctx", "8192", "--weight", "3",
                 "--tokens-per-day", "100", "--expires", "2027-01-01",
                 "--user-header", "X-OpenWebUI-User-Id")
    result = run("keys", "show", "bob", "--keys-file", str(keys_file),
                 "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert secret not in result.out and digest(secret).hex()[:16] not in result.out
    assert result.out == (
        "name:               bob\n"
        "scopes:             inference\n"
        "models:             llama3*\n"
        "rpm:                60\n"
        "max streams:        2\n"
        "max keep_alive:     10m\n"
        "max num_ctx:        8192\n"
        "weight:             3\n"
        "tokens today:       7/100 (UTC day)\n"
        "tokens this month:  57 (UTC month)\n"
        "user header:        X-OpenWebUI-User-Id\n"
        "created:            2026-11-27T07:00:00Z\n"
        "expires:            2027-01-01T00:00:00Z\n"
        "last used:          2026-11-27T06:59:00Z\n"
    )


def test_show_unknown_key(keys_file: Path) -> None:
    """show of a key that does not exist fails with one line naming it, and exit code 1."""
    add(keys_file, "alice")
    for argv in (["show", "bob"], ["show", "bob", "--json"]):
        result = run("keys", *argv, "--keys-file", str(keys_file))
        assert_one_line_error(result, 1, "no key named 'bob'")


def test_show_json(keys_file: Path, usage_file: Path) -> None:
    """
    show --json prints the key as one JSON document, every setting and its
    use, in the documented shape; neither the key nor its hash.
    """
    secret = add(keys_file, "bob", "--models", "llama3*", "--max-keep-alive", "10m",
                 "--tokens-per-month", "1000", "--chat-header", "X-OpenWebUI-Chat-Id")
    result = run("keys", "show", "bob", "--json", "--keys-file", str(keys_file),
                 "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert secret not in result.out and digest(secret).hex() not in result.out
    assert json.loads(result.out) == {
        "name": "bob",
        "scopes": ["inference"],
        "models": ["llama3*"],
        "rpm": None,
        "max_streams": None,
        "max_keep_alive": "10m",
        "max_num_ctx": None,
        "weight": 1,
        "user_header": None,
        "chat_header": "X-OpenWebUI-Chat-Id",
        "tokens_per_day": None,
        "tokens_per_month": 1000,
        "used_today": 7,
        "used_this_month": 57,
        "created": "2026-11-27T07:00:00Z",
        "expires": None,
        "expired": False,
        "last_used": at("2026-11-27T06:59:00"),
    }


def test_list_json(keys_file: Path, usage_file: Path) -> None:
    """
    list --json prints one document, C{{"keys": [...]}}, each key by name as
    show --json prints it, none of the keys or hashes; with no keys, an
    empty list rather than a sentence.
    """
    assert json.loads(run("keys", "list", "--json", "--keys-file", str(keys_file)).out) == {
        "keys": []}
    secrets = [add(keys_file, "carol"), add(keys_file, "alice", "--admin")]
    result = run("keys", "list", "--json", "--keys-file", str(keys_file),
                 "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    for secret in secrets:
        assert secret not in result.out and digest(secret).hex()[:16] not in result.out
    assert "sha256" not in result.out
    document = json.loads(result.out)
    assert [key["name"] for key in document["keys"]] == ["alice", "carol"]
    shown = run("keys", "show", "alice", "--json", "--keys-file", str(keys_file),
                "--usage-file", str(usage_file))
    assert document["keys"][0] == json.loads(shown.out)
    assert document["keys"][0]["last_used"] == at("2026-11-27T06:59:00")


def test_json_escapes_unprintable_names(keys_file: Path) -> None:
    """--json escapes what is not printable ASCII, so no name reaches a terminal raw."""
    write_keys_file(str(keys_file), [ApiKey(name="evil\x1b[2J", digest=digest("x"),
                                            models=("a\nb",))])
    result = run("keys", "list", "--json", "--keys-file", str(keys_file))
    assert result.code == 0
    assert result.out.isascii() and "\x1b" not in result.out
    assert json.loads(result.out)["keys"][0]["name"] == "evil\x1b[2J"


def test_list_with_an_unreadable_usage_file(keys_file: Path, tmp_path: Path) -> None:
    """
    A usage file that cannot be read fails list and show with one line
    naming it, rather than showing a use of 0 that is not true.
    """
    add(keys_file, "bob")
    bad = tmp_path / "usage.sqlite3"
    bad.write_bytes(b"{not a database at all}" * 50)
    for argv in (["list"], ["show", "bob"]):
        result = run("keys", *argv, "--keys-file", str(keys_file), "--usage-file", str(bad))
        assert_one_line_error(result, 1, str(bad))
