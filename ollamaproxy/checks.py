# -*- test-case-name: tests.test_checks -*-
"""
Checks made once at start, before the reactor runs, so that a setting the
proxy cannot work with stops it with one clear line instead of a traceback
in the log once it runs (or, worse, a proxy that runs without its log files
or its usage database).

They look and create nothing: twistd builds the service before it sheds
root's privileges (C{--uid}), and files made then would belong to root.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from urllib.parse import quote

from ollamaproxy.errors import ConfigError

# The files LogFilesService writes.
_LOG_FILES = ("ollamaproxy.log", "ollamaproxy.json")

Access = Callable[[str, int], bool]


def check_log_dir(directory: str, access: Access = os.access) -> None:
    """
    See that the log files can be written in C{directory}, or that it can
    be made.

    @param access: Tells whether this process may use a path, as
        L{os.access} does.
    @raise ConfigError: If not, saying why.
    """
    problem = _cannot_make_in(directory, access)
    for name in _LOG_FILES:
        path = os.path.join(directory, name)
        if problem is None and os.path.isdir(path):
            problem = f"{path} is a directory"
        elif problem is None and os.path.exists(path) and not access(path, os.W_OK):
            problem = f"{path}: permission denied"
    if problem is not None:
        raise ConfigError(
            f"--log-dir: cannot write log files in {directory}: {problem} (create the "
            "directory and make it writable by the user the proxy runs as)"
        )


def check_usage_file(path: str, access: Access = os.access) -> None:
    """
    See that the usage database can be written: an SQLite database the
    proxy may write, or a file it may create.

    @param access: Tells whether this process may use a path, as
        L{os.access} does.
    @raise ConfigError: If not, saying why.
    """
    if os.path.isdir(path):
        raise ConfigError(f"--usage-file: {path} is a directory; give the path of a file")
    if not os.path.exists(path):
        problem = _cannot_make_in(os.path.dirname(os.path.abspath(path)), access)
        if problem is not None:
            raise ConfigError(f"--usage-file: cannot create {path}: {problem}")
        return
    if not access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"--usage-file: cannot write {path}: permission denied")
    try:
        uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True)) as connection:
            connection.execute("PRAGMA schema_version")
    except sqlite3.OperationalError:
        pass  # locked, say: not a reason to refuse the start
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"--usage-file: {path} is not an SQLite database ({e})") from None


def _cannot_make_in(directory: str, access: Access) -> str | None:
    """
    Why files cannot be written in C{directory}, creating it and its
    parents as needed, or L{None} if they can.
    """
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    if not access(path, os.W_OK | os.X_OK):
        return f"{path}: permission denied"
    return None
