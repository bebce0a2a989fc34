"""
Tests for L{ollamaproxy.checks}: the files the proxy writes are checked at
start, and a mistake is one clear line.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ollamaproxy.checks import check_log_dir, check_usage_file
from ollamaproxy.errors import ConfigError


def test_log_dir_is_made_with_its_files(tmp_path: Path) -> None:
    """A missing log directory is made, and the log files are created private to the group."""
    directory = tmp_path / "logs" / "ollamaproxy"
    check_log_dir(str(directory))
    assert sorted(p.name for p in directory.iterdir()) == ["ollamaproxy.json", "ollamaproxy.log"]
    assert stat.S_IMODE((directory / "ollamaproxy.log").stat().st_mode) & 0o007 == 0


def test_log_dir_keeps_existing_files(tmp_path: Path) -> None:
    """Checking an existing log directory leaves the log files' contents alone."""
    (tmp_path / "ollamaproxy.log").write_text("earlier line\n")
    check_log_dir(str(tmp_path))
    assert (tmp_path / "ollamaproxy.log").read_text() == "earlier line\n"


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_log_dir_that_cannot_be_written(tmp_path: Path, where: str) -> None:
    """
    A log directory that cannot be made or written (here: a file in the
    way) is a ConfigError naming --log-dir and the directory.
    """
    (tmp_path / "file").write_text("")
    directory = tmp_path / "file" if where == "file" else tmp_path / "file" / "logs"
    with pytest.raises(ConfigError, match=r"^--log-dir: cannot write log files in ") as e:
        check_log_dir(str(directory))
    assert str(directory) in str(e.value) and "\n" not in str(e.value)


def test_usage_file_is_made(tmp_path: Path) -> None:
    """A missing usage database is created, with its directory."""
    path = tmp_path / "state" / "usage.sqlite3"
    check_usage_file(str(path))
    assert path.exists()


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"not an sqlite file " * 20), "is not a usable SQLite database"),
        (lambda p: p.parent.joinpath("in-the-way").write_text(""), "is not a directory"),
    ],
    ids=["directory", "not-sqlite", "parent-is-a-file"],
)
def test_usage_file_that_cannot_be_used(tmp_path: Path, make: object, fragment: str) -> None:
    """A usage file the proxy cannot write is a ConfigError naming --usage-file, in one line."""
    path = tmp_path / "usage.sqlite3"
    assert callable(make)
    make(path)
    if fragment == "is not a directory":
        path = tmp_path / "in-the-way" / "usage.sqlite3"
    with pytest.raises(ConfigError, match=r"^--usage-file: ") as e:
        check_usage_file(str(path))
    assert fragment in str(e.value) and "\n" not in str(e.value)
