# -*- test-case-name: tests.cli.test_keys,tests.integration.test_cli_processes -*-
"""
Where the C{ollamaproxy keys} commands keep keys: the keys file
(L{FileKeys}), or, with C{--database}, PostgreSQL
(L{ollamaproxy.postgres.key_storage.DatabaseKeys}).  The
command calls one L{KeyStorage} and needs not know which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ollamaproxy.admission.keys import ApiKey, KeysFileError, load_keys_file, update_keys_file


class KeyStorageError(Exception):
    """
    The keys cannot be read or written: the message (one line) says where
    and why.
    """


class KeyStorage(Protocol):
    """
    Keys kept somewhere, changed one whole change at a time.
    """

    @property
    def where(self) -> str:
        """
        Where, in words: the file's path, or C{database <URL>}.
        """

    @property
    def picked_up(self) -> str:
        """
        When running proxies see a change, in a sentence.
        """

    def load(self) -> list[ApiKey]:
        """
        The keys.

        @raise KeyStorageError: If they cannot be read.
        """

    def update(self, change: Callable[[list[ApiKey]], list[ApiKey]]) -> list[ApiKey]:
        """
        Replace the keys with what C{change} makes of them, safely against
        other writers.  An exception C{change} raises changes nothing and is
        passed on.

        @return: The keys written.
        @raise KeyStorageError: If they cannot be read or written, or the
            result would hold two keys of one name.
        """


class FileKeys:
    """
    The keys file (L{ollamaproxy.admission.keys}).
    """

    picked_up = "A running proxy picks up the change within seconds (at once on SIGHUP)."

    def __init__(self, path: str) -> None:
        self.where = path

    def load(self) -> list[ApiKey]:
        try:
            return load_keys_file(self.where)
        except KeysFileError as e:
            raise KeyStorageError(str(e)) from None

    def update(self, change: Callable[[list[ApiKey]], list[ApiKey]]) -> list[ApiKey]:
        try:
            return update_keys_file(self.where, change)
        except KeysFileError as e:
            raise KeyStorageError(str(e)) from None
        except ValueError as e:
            raise KeyStorageError(f"keys file {self.where} is not valid: {e}") from None
        except OSError as e:
            raise KeyStorageError(
                f"cannot update keys file {self.where}: {e.strerror or e}"
            ) from None
