"""
Tests for L{ollamaproxy.cli.usage}: the C{ollamaproxy usage} command, run
in-process (L{tests.fakes.cli}).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ollamaproxy.record.usage_db import write_rows
from tests.fakes.cli import NOW, assert_one_line_error, run

DAY = 24 * 3600.0


@pytest.fixture
def usage_file(tmp_path: Path) -> Path:
    """
    A usage database: alice a day ago, bob and ci.bot now.
    """
    path = tmp_path / "state" / "usage.sqlite3"
    now = NOW.timestamp()
    write_rows(str(path), [
        (now - DAY, "alice", "llama3:70b", 1, 1200, 3400, 0),
        (now - DAY + 5, "alice", "llama3:70b", 1, 800, 600, 0),
        (now, "bob", "qwen2", 1, 10, 20, 0),
        (now + 30, "bob", "", 1, 0, 0, 0),
        (now + 60, "ci.bot", "qwen2", 1, 5, 5, 0),
    ])
    return path


def test_usage_by_key(usage_file: Path) -> None:
    """usage prints one row per key, most tokens first, numbers aligned right."""
    result = run("usage", "--usage-file", str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert result.out == (
        "KEY     REQUESTS  PROMPT TOKENS  COMPLETION TOKENS  TOTAL\n"
        "alice          2           2000               4000   6000\n"
        "bob            2             10                 20     30\n"
        "ci.bot         1              5                  5     10\n"
    )


def test_usage_by_model_since(usage_file: Path) -> None:
    """usage --by model --since DATE sums per model from midnight UTC; no model shows as '-'."""
    result = run("usage", "--by", "model", "--since", "2026-11-27", "--usage-file",
                 str(usage_file))
    assert (result.code, result.err) == (0, "")
    assert result.out == (
        "MODEL  REQUESTS  PROMPT TOKENS  COMPLETION TOKENS  TOTAL\n"
        "qwen2         2             15                 25     40\n"
        "-             1              0                  0      0\n"
    )


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
    write_rows(str(path), [(NOW.timestamp(), "evil\x1b[2J", "a\nb", 1, 1, 1, 0)])
    for by in ("key", "model"):
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
