# -*- test-case-name: tests.cli.test_main,tests.cli.test_keys,tests.cli.test_usage -*-
"""
What every command of C{ollamaproxy} shares: its errors, an argument parser
that raises instead of exiting, times as the commands read and show them,
the options that mean what the daemon's do, and reading the usage the
daemon recorded (L{read_usage}).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

from ollamaproxy import __version__
from ollamaproxy.config import ConfigError, option_named
from ollamaproxy.record.usage import UsageDatabase
from ollamaproxy.record.usage_db import DatabaseDown, SqliteUsage

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

PROG = "ollamaproxy"

_T = TypeVar("_T")


class UsageError(Exception):
    """
    The command line is wrong: the message says how.
    """


class CommandFailed(Exception):
    """
    The command could not be carried out: the message says why.
    """


class HelpShown(Exception):
    """
    argparse finished early (after C{--help}) with this exit code.
    """

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Parser(argparse.ArgumentParser):
    """
    An argument parser that raises instead of exiting, and prints help to a
    given stream instead of C{sys.stdout}.
    """

    def __init__(self, *args: Any, stdout: TextIO, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stdout = stdout

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_help(self._stdout if file is None else file)

    def print_usage(self, file: SupportsWrite[str] | None = None) -> None:
        super().print_usage(self._stdout if file is None else file)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise UsageError(message.strip())
        raise HelpShown(status)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


class Version(argparse.Action):
    """
    C{--version}: print ollamaproxy's version on the parser's standard
    output and exit.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                         nargs=0, help="show the version of ollamaproxy and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        assert isinstance(parser, Parser)
        parser._stdout.write(f"{PROG} {__version__}\n")
        parser.exit()


def parse_time(text: str, option: str) -> datetime:
    """
    Parse a time given as C{option}: an ISO 8601 date (midnight UTC at its
    start) or date and time (UTC unless it has an offset).

    @return: The time, in UTC.
    @raise UsageError: If C{text} is not such a time.
    """
    try:
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise UsageError(
            f"{option}: {text!r} is not a date or time such as 2027-01-01 or "
            "2027-01-01T12:00:00Z"
        ) from None


def show_time(when: datetime | None) -> str:
    """
    A time as the keys file writes it, or C{-} for none.
    """
    return "-" if when is None else when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def show(text: str) -> str:
    """
    Text from the keys file, made safe to print on a terminal.
    """
    return text if text.isprintable() else repr(text)


def add_daemon_option(parser: argparse.ArgumentParser, name: str, meaning: str) -> None:
    """
    Add an option that means what the daemon's option of the same name
    means (C{--keys-file}, C{--usage-file}, C{--database}): its name, value
    and default come from the table of options (L{ollamaproxy.config}).

    @param meaning: What it does in this command.
    """
    spec = option_named(name)
    default = f"else {spec.shown}" if spec.default or spec.default_from else "if set"
    parser.add_argument(
        f"--{name}",
        metavar=spec.metavar,
        help=f"{meaning} (default: ${spec.variable}, {default})",
    )


def daemon_setting(name: str, args: argparse.Namespace, environ: Mapping[str, str]) -> Any:
    """
    The value of an option added by L{add_daemon_option}, read as the
    daemon reads it: given, else its variable, else its default.

    @raise UsageError: If it is unusable.
    """
    try:
        return option_named(name).read({name: getattr(args, name.replace("-", "_"))}, environ)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def write_json(out: TextIO, document: object) -> None:
    """
    Print C{document} as the one JSON document of a command's C{--json}:
    indented, keys in the order given, non-ASCII escaped (so that no
    name from a hand-edited file can send control characters to a
    terminal), ending with a newline.
    """
    out.write(json.dumps(document, indent=2, ensure_ascii=True) + "\n")


def add_usage_options(parser: argparse.ArgumentParser, database: bool) -> None:
    """
    Add the options that say where usage is read: C{--usage-file}, and
    C{--database} unless the parser has it already.
    """
    add_daemon_option(parser, "usage-file", "the usage database")
    if database:
        add_daemon_option(parser, "database",
                          "sum the usage of every proxy in PostgreSQL at this postgresql:// "
                          "URL instead of the usage file")


def read_usage(
    args: argparse.Namespace, environ: Mapping[str, str], read: Callable[[UsageDatabase], _T]
) -> _T:
    """
    Read the usage where the daemon writes it, as the daemon finds it: in
    PostgreSQL with C{--database} (or C{$OLLAMAPROXY_DATABASE}), else in the
    usage file.  A usage file that does not exist yet holds no usage.

    @param read: Given the usage, returns what the command needs of it.
    @raise CommandFailed: If psycopg is missing or the database is down.
    @raise ollamaproxy.record.usage_db.UsageFileError: If the usage file
        cannot be read.
    """
    url = daemon_setting("database", args, environ)
    reader: UsageDatabase
    if url is None:
        reader = SqliteUsage(daemon_setting("usage-file", args, environ))
    else:
        try:
            from ollamaproxy.postgres.database import Database
            from ollamaproxy.postgres.usage import PostgresUsage
        except ImportError:
            raise CommandFailed(
                "--database needs psycopg: pip install 'ollamaproxy[postgresql]'"
            ) from None
        reader = PostgresUsage(Database(url))
    try:
        return read(reader)
    except DatabaseDown as e:
        raise CommandFailed(f"{where(reader)}: {e}") from None
    finally:
        reader.close()


def where(reader: UsageDatabase) -> str:
    """
    What messages call the usage: the file, or C{database} and its URL.
    """
    return reader.name if isinstance(reader, SqliteUsage) else f"database {reader.name}"
