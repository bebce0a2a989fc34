# -*- test-case-name: tests.test_checks -*-
"""
Checks made once at start, before the reactor runs, so that a setting the
proxy cannot work with stops it with one clear line instead of a traceback
in the log once it runs (or, worse, a proxy that runs without its log files
or its usage database).
"""

from __future__ import annotations

import os
import sqlite3

from ollamaproxy.errors import ConfigError
from ollamaproxy.usage import open_database

# The files LogFilesService writes, with its mode.
_LOG_FILES = ("ollamaproxy.log", "ollamaproxy.json")
_LOG_FILE_MODE = 0o640


def check_log_dir(directory: str) -> None:
    """
    Make sure the log files can be written in C{directory}: create it if
    missing, and open (creating if missing) each log file for appending.

    @raise ConfigError: If that cannot be done, saying why.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        for name in _LOG_FILES:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            os.close(os.open(os.path.join(directory, name), flags, _LOG_FILE_MODE))
    except OSError as e:
        raise ConfigError(
            f"--log-dir: cannot write log files in {directory}: {_why(e)} (create the "
            "directory and make it writable by the user the proxy runs as)"
        ) from None


def check_usage_file(path: str) -> None:
    """
    Make sure the usage database can be opened for writing: create it (and
    its directory) if missing, and see that an existing file is an SQLite
    database.

    @raise ConfigError: If it cannot be used, saying why.
    """
    try:
        open_database(path).close()
    except IsADirectoryError:
        raise ConfigError(
            f"--usage-file: {path} is a directory; give the path of a file"
        ) from None
    except OSError as e:
        raise ConfigError(f"--usage-file: cannot create {path}: {_why(e)}") from None
    except sqlite3.DatabaseError as e:
        raise ConfigError(
            f"--usage-file: {path} is not a usable SQLite database ({e})"
        ) from None
    except sqlite3.Error as e:
        raise ConfigError(f"--usage-file: cannot open {path}: {e}") from None


def _why(error: OSError) -> str:
    """
    An L{OSError}'s reason, with the file it concerns if that is not the
    one the message names already.
    """
    if isinstance(error, FileExistsError):
        # From makedirs: a file stands where a directory must go.
        return f"{error.filename} exists and is not a directory"
    reason = error.strerror or str(error)
    return f"{reason}: {error.filename}" if error.filename else reason
