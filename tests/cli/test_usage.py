"""
Tests for L{ollamaproxy.cli.usage}: the C{ollamaproxy usage} command, run
in-process (L{tests.fakes.cli}).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ollamaproxy.record.usage_db import write_rows
from tests.fakes.cli import NOW, assert_one_line_error, run

DAY = 24 * 3600.0


@pytest.fixture
def usage_file(tmp_path: Path) -> Path:
    """
    A usage database: alice a day ago, bob and ci.bot now; bob's listing
    served, and one request of his refused.
    """
    path = tmp_path / "state" / "usage.sqlite3"
    now = NOW.timestamp()
    write_rows(str(path), [
        (now - DAY, "alice", "llama3:70b", 1, 1200, 3400, 0),
        (now - DAY + 5, "alice", "llama3:70b", 1, 800, 600, 0),
        (now, "bob", "qwen2", 1, 10, 20, 0),
        (now + 30, "bob", "", 1, 0, 0, 0),
        (now + 40, "bob", "", 0, 0, 0, 1),
        (now + 60, "ci.bot", "qwen2", 1, 5, 5, 0),
    ])
    return path


def test_usage_by_key(usage_file: Path) -> None:
    """
    usage prints one row per key, most tokens first, numbers aligned right,
    the requests refused apart from those served.
    """
    result = run("usage", "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert result.out == (
        "KEY     REQUESTS  REFUSED  PROMPT TOKENS  COMPLETION TOKENS  TOTAL\n"
        "alice          2        0           2000               4000   6000\n"
        "bob            2        1             10                 20     30\n"
        "ci.bot         1        0              5                  5     10\n"
    )


def test_usage_by_model_since(usage_file: Path) -> None:
    """usage --by model --since DATE sums per model from midnight UTC; no model shows as '-'."""
    result = run("usage", "--by", "model", "--since", "2026-11-27", "--usage-file",
                 str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert result.out == (
        "MODEL  REQUESTS  REFUSED  PROMPT TOKENS  COMPLETION TOKENS  TOTAL\n"
        "qwen2         2        0             15                 25     40\n"
        "-             1        1              0                  0      0\n"
    )


@pytest.mark.parametrize(
    ("since", "until", "keys"),
    [
        (None, "2026-11-27", ["alice"]),
        (None, "2026-11-27T07:01", ["alice", "bob"]),
        ("2026-11-26", "2026-11-28", ["alice", "bob", "ci.bot"]),
        # The minute holding --until is left out whole.
        ("2026-11-27", "2026-11-27T07:01:30Z", ["bob"]),
    ],
)
def test_usage_until(usage_file: Path, since: str | None, until: str, keys: list[str]) -> None:
    """usage --until counts up to the minute holding that time, with --since or alone."""
    argv = [] if since is None else ["--since", since]
    result = run("usage", *argv, "--until", until, "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert [line.split()[0] for line in result.out.splitlines()[1:]] == keys


def test_usage_until_not_after_since(usage_file: Path) -> None:
    """An --until that is not after --since, or not a time, is a usage error."""
    assert_one_line_error(
        run("usage", "--since", "2026-11-27", "--until", "2026-11-27",
            "--usage-file", str(usage_file)),
        2, "--until 2026-11-27T00:00:00Z is not after --since 2026-11-27T00:00:00Z")
    assert_one_line_error(run("usage", "--until", "soon", "--usage-file", str(usage_file)),
                          2, "--until: 'soon' is not a date")


def test_usage_none_until(usage_file: Path) -> None:
    """usage says so when nothing was recorded in the times given."""
    result = run("usage", "--until", "2026-01-01", "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert result.out == f"No usage recorded in {usage_file} until 2026-01-01T00:00:00Z.\n"


def test_usage_json(usage_file: Path) -> None:
    """
    usage --json prints one JSON document: what was asked, and a row per
    key with its requests served and refused and its tokens.
    """
    result = run("usage", "--json", "--since", "2026-11-27", "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert json.loads(result.out) == {
        "by": "key",
        "since": "2026-11-27T00:00:00Z",
        "until": None,
        "rows": [
            {"key": "bob", "requests": 2, "refused": 1, "prompt_tokens": 10,
             "completion_tokens": 20, "total_tokens": 30},
            {"key": "ci.bot", "requests": 1, "refused": 0, "prompt_tokens": 5,
             "completion_tokens": 5, "total_tokens": 10},
        ],
    }


def test_usage_json_by_model_and_empty(usage_file: Path, tmp_path: Path) -> None:
    """
    usage --json --by model names each row's model ("" for none); with
    nothing recorded, the document has no rows rather than a sentence.
    """
    result = run("usage", "--json", "--by", "model", "--until", "2026-11-27T07:01",
                 "--usage-file", str(usage_file))
    document = json.loads(result.out)
    assert (document["by"], document["until"]) == ("model", "2026-11-27T07:01:00Z")
    assert [(row["model"], row["requests"], row["refused"]) for row in document["rows"]] == [
        ("llama3:70b", 2, 0), ("qwen2", 1, 0), ("", 1, 1)]
    empty = run("usage", "--json", "--usage-file", str(tmp_path / "none.sqlite3"))
    assert (empty.code, json.loads(empty.out)["rows"]) == (0, [])


@pytest.mark.parametrize(
    ("since", "keys"),
    [
        ("2026-11-26", ["alice", "bob", "ci.bot"]),
        ("2026-11-27T07:01", ["ci.bot"]),
        ("2026-11-27 07:01:00", ["ci.bot"]),
        ("2026-11-27T08:00:00+01:00", ["bob", "ci.bot"]),
        # Usage is kept per minute: the minute holding --since counts whole.
        ("2026-11-27T07:00:59Z", ["bob", "ci.bot"]),
    ],
)
def test_usage_since_forms(usage_file: Path, since: str, keys: list[str]) -> None:
    """--since takes the dates and times --expires takes, UTC unless an offset is given."""
    result = run("usage", "--since", since, "--usage-file", str(usage_file))
    assert result.code == 0
    assert [line.split()[0] for line in result.out.splitlines()[1:]] == keys


def test_usage_none_since(usage_file: Path) -> None:
    """usage says so when nothing was recorded since the time given."""
    result = run("usage", "--since", "2026-12-01", "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert result.out == f"No usage recorded in {usage_file} since 2026-12-01T00:00:00Z.\n"


def test_usage_without_database(tmp_path: Path) -> None:
    """usage on a missing database says no usage was recorded, exits 0, and creates nothing."""
    path = tmp_path / "state" / "usage.sqlite3"
    result = run("usage", "--usage-file", str(path))
    assert (result.code, result.out, result.err) == (0, f"No usage recorded in {path}.\n", "")
    assert not path.parent.exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"SQLite format 3\x00" + b"\xff" * 100, "cannot read usage file"),
        (b"{not a database at all}" * 50, "file is not a database"),
    ],
)
def test_usage_corrupt_database(tmp_path: Path, content: bytes, fragment: str) -> None:
    """A file that is not a usage database gives one line on stderr naming it, and exit code 1."""
    path = tmp_path / "usage.sqlite3"
    path.write_bytes(content)
    result = run("usage", "--usage-file", str(path))
    assert_one_line_error(result, 1, fragment)
    assert str(path) in result.err
    assert path.read_bytes() == content


def test_usage_database_is_a_directory(tmp_path: Path) -> None:
    """A usage file path that is a directory gives one line on stderr and exit code 1."""
    assert_one_line_error(run("usage", "--usage-file", str(tmp_path)), 1, "is a directory")


def test_usage_escapes_unprintable_names(tmp_path: Path) -> None:
    """usage does not pass terminal control characters from the database to the terminal."""
    path = tmp_path / "usage.sqlite3"
    write_rows(str(path), [(NOW.timestamp(), "evil\x1b[2J", "a\nb", 1, 1, 1, 0, "u\x1b[2J")])
    for by in ("key", "model", "user"):
        result = run("usage", "--by", by, "--usage-file", str(path))
        assert result.code == 0
        assert "\x1b" not in result.out
        assert len(result.out.splitlines()) == 2


@pytest.mark.parametrize(
    ("option", "variable", "chosen"),
    [
        ("option", "env", "option"),
        (None, "env", "env"),
        (None, None, "default"),
        (None, "", "default"),
    ],
)
def test_usage_file_precedence(
    tmp_path: Path, option: str | None, variable: str | None, chosen: str
) -> None:
    """The usage file is --usage-file, then $OLLAMAPROXY_USAGE_FILE, then the XDG state file."""
    files = {
        "option": tmp_path / "option.sqlite3",
        "env": tmp_path / "env.sqlite3",
        "default": tmp_path / "xdg" / "ollamaproxy" / "usage.sqlite3",
    }
    for name, path in files.items():
        write_rows(str(path), [(NOW.timestamp(), name, "m", 1, 1, 1, 0)])
    environ = {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    if variable is not None:
        environ["OLLAMAPROXY_USAGE_FILE"] = variable and str(files[variable])
    argv = [] if option is None else ["--usage-file", str(files[option])]
    result = run("usage", *argv, environ=environ)
    assert (result.code, result.err) == (0, "")
    assert result.out.splitlines()[1].split()[0] == chosen


def test_usage_help() -> None:
    """usage --help prints its usage on standard output and exits 0."""
    result = run("usage", "--help")
    assert (result.code, result.err) == (0, "")
    assert result.out.startswith("usage: ollamaproxy usage")
    assert "--usage-file" in result.out and "--since" in result.out


def test_usage_by_user(tmp_path: Path) -> None:
    """
    usage --by user prints one row per user behind each key, most tokens
    first, the key and the user on the left; a key's anonymous user (and
    every key naming no users) shows as '-'.  With --json, each row has
    its key and its user, "" for the anonymous one.
    """
    path = tmp_path / "usage.sqlite3"
    now = NOW.timestamp()
    write_rows(str(path), [
        (now, "webui", "qwen2", 1, 100, 200, 0, "3f2b6c1e-8a4d"),
        (now, "webui", "qwen2", 1, 10, 20, 0, "alice@example.com"),
        (now, "webui", "qwen2", 1, 1, 2, 0),
        (now, "webui", "", 0, 0, 0, 1, "alice@example.com"),
        (now, "laptop", "qwen2", 1, 5, 5, 0),
    ])
    result = run("usage", "--by", "user", "--usage-file", str(path))
    assert (result.code, result.err) == (0, "")
    assert result.out == (
        "KEY     USER               REQUESTS  REFUSED  PROMPT TOKENS  COMPLETION TOKENS  TOTAL\n"
        "webui   3f2b6c1e-8a4d             1        0            100                200    300\n"
        "webui   alice@example.com         1        1             10                 20     30\n"
        "laptop  -                         1        0              5                  5     10\n"
        "webui   -                         1        0              1                  2      3\n"
    )
    document = json.loads(run("usage", "--by", "user", "--json", "--usage-file", str(path)).out)
    assert document["by"] == "user"
    assert document["rows"][1] == {
        "key": "webui", "user": "alice@example.com", "requests": 1, "refused": 1,
        "prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
    }
    assert [(row["key"], row["user"]) for row in document["rows"]] == [
        ("webui", "3f2b6c1e-8a4d"), ("webui", "alice@example.com"), ("laptop", ""),
        ("webui", ""),
    ]
