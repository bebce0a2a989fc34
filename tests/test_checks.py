"""
Tests for L{ollamaproxy.checks}: the files the proxy writes are checked at
start, and a mistake is one clear line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ollamaproxy.checks import Access, check_log_dir, check_usage_file
from ollamaproxy.errors import ConfigError
from ollamaproxy.record.usage_db import write_rows


def test_a_log_dir_to_make_or_with_files_passes(tmp_path: Path) -> None:
    """
    A log directory that can be made, or exists with writable log files,
    passes; the check creates nothing (twistd may still shed root's
    privileges) and leaves the files alone.
    """
    check_log_dir(str(tmp_path / "logs" / "ollamaproxy"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "ollamaproxy.log").write_text("earlier line\n")
    check_log_dir(str(tmp_path))
    assert (tmp_path / "ollamaproxy.log").read_text() == "earlier line\n"


@pytest.mark.parametrize("where", ["file", "under-a-file", "log-file-is-a-directory"])
def test_log_dir_that_cannot_be_written(tmp_path: Path, where: str) -> None:
    """
    A log directory that cannot be made or written (here: a file in the
    way) is a ConfigError naming --log-dir and the directory.
    """
    (tmp_path / "file").write_text("")
    (tmp_path / "logs" / "ollamaproxy.json").mkdir(parents=True)
    directory = {"file": tmp_path / "file", "under-a-file": tmp_path / "file" / "logs",
                 "log-file-is-a-directory": tmp_path / "logs"}[where]
    with pytest.raises(ConfigError, match=r"^--log-dir: cannot write log files in ") as e:
        check_log_dir(str(directory))
    assert str(directory) in str(e.value) and "\n" not in str(e.value)


def test_usage_file_to_make_passes(tmp_path: Path) -> None:
    """A usage database that can be made passes, and the check makes nothing."""
    check_usage_file(str(tmp_path / "state" / "usage.sqlite3"))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_usage_database_passes(tmp_path: Path) -> None:
    """A usage database the proxy wrote before (WAL mode, rows) or an empty file passes."""
    path = tmp_path / "usage.sqlite3"
    write_rows(str(path), [(60.0, "alice", "llama3.2", 1, 2, 3, 0)])
    before = path.read_bytes()
    check_usage_file(str(path))
    assert path.read_bytes() == before
    (tmp_path / "empty.sqlite3").write_bytes(b"")  # SQLite's empty database
    check_usage_file(str(tmp_path / "empty.sqlite3"))


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"not an sqlite file " * 20), "is not an SQLite database"),
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


def _denied_under(root: Path) -> Access:
    """
    L{os.access} as a user who may not write anything under C{root} (the
    tests run as root, who may write everywhere).
    """
    return lambda path, mode: not (
        mode & os.W_OK and (Path(path) == root or root in Path(path).parents)
    )


@pytest.mark.parametrize("existing", [True, False], ids=["exists", "to-make"])
def test_log_dir_not_writable_by_the_proxys_user(tmp_path: Path, existing: bool) -> None:
    """
    The common systemd case: the log directory (or where it would be made)
    belongs to another user.  The start stops with one line saying so.
    """
    directory = tmp_path / "logs"
    if existing:
        directory.mkdir()
    with pytest.raises(ConfigError, match=r"^--log-dir: cannot write log files in ") as e:
        check_log_dir(str(directory), access=_denied_under(tmp_path))
    assert "permission denied" in str(e.value)


def test_log_file_not_writable_by_the_proxys_user(tmp_path: Path) -> None:
    """A log file left by another user (root, say) that the proxy cannot append to stops it."""
    (tmp_path / "ollamaproxy.log").write_text("")
    denied = _denied_under(tmp_path / "ollamaproxy.log")
    with pytest.raises(ConfigError, match=r"ollamaproxy\.log: permission denied"):
        check_log_dir(str(tmp_path), access=denied)


@pytest.mark.parametrize("existing", [True, False], ids=["exists", "to-make"])
def test_usage_file_not_writable_by_the_proxys_user(tmp_path: Path, existing: bool) -> None:
    """A usage database (or its directory) the proxy's user may not write stops the start."""
    path = tmp_path / "state" / "usage.sqlite3"
    if existing:
        write_rows(str(path), [])
    with pytest.raises(ConfigError, match=r"^--usage-file: cannot (write|create) .*permission"):
        check_usage_file(str(path), access=_denied_under(tmp_path))
