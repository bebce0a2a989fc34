# -*- test-case-name: tests.cli.test_usage -*-
"""
C{ollamaproxy usage}: the requests and tokens recorded per key or per model.

It finds the usage database as the daemon does: C{--usage-file PATH}, then
C{$OLLAMAPROXY_USAGE_FILE}, then the default; with C{--database URL} (or
C{$OLLAMAPROXY_DATABASE}) it sums the usage of every proxy that writes
there.  It never changes either.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TextIO

from ollamaproxy.cli.common import (
    CommandFailed,
    add_daemon_option,
    daemon_setting,
    parse_time,
    show,
    show_time,
)
from ollamaproxy.config import show_database_url
from ollamaproxy.record.usage_db import DatabaseDown, Row, summarise


def add_usage_parser(commands: Any, stdout: TextIO) -> None:
    """
    Add C{usage} to the commands of C{ollamaproxy}.

    @param commands: The top parser's subparsers.
    """
    usage = commands.add_parser(
        "usage",
        help="show requests and tokens per key or per model",
        description="Show the requests and tokens the proxy has recorded, per key or per "
        "model, most tokens first.",
        stdout=stdout,
    )
    usage.add_argument("--since", metavar="DATE",
                       help="count from this ISO date or time, UTC unless given, e.g. "
                       "2026-11-01 or 2026-11-01T12:00:00Z (default: everything)")
    usage.add_argument("--by", choices=("key", "model"), default="key",
                       help="one row per key or per model (default: key)")
    add_daemon_option(usage, "usage-file", "the usage database")
    add_daemon_option(usage, "database",
                      "sum the usage of every proxy in PostgreSQL at this postgresql:// URL "
                      "instead of the usage file")


def run_usage(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> None:
    """
    Carry out C{usage}: print the table, or say that nothing is recorded.

    @raise UsageError: If the command line is wrong.
    @raise CommandFailed: If the database cannot be read.
    @raise UsageFileError: If the usage file cannot be read.
    """
    since = None if args.since is None else parse_time(args.since, "--since")
    start = None if since is None else since.timestamp()
    url = daemon_setting("database", args, environ)
    if url is not None:
        path = f"database {show_database_url(url)}"
        rows = _from_database(url, path, start, args.by)
    else:
        path = daemon_setting("usage-file", args, environ)
        try:
            rows = summarise(path, start, args.by)
        except FileNotFoundError:
            rows = []
    if not rows:
        when = "" if since is None else f" since {show_time(since)}"
        out.write(f"No usage recorded in {path}{when}.\n")
        return
    out.writelines(line + "\n" for line in _usage_table(rows, args.by))


def _from_database(
    url: str, path: str, start: float | None, by: Literal["key", "model"]
) -> list[Row]:
    """
    The usage summed in PostgreSQL.

    @raise CommandFailed: If psycopg is missing or the database is down.
    """
    try:
        from ollamaproxy.postgres.usage import summarise_database
    except ImportError:
        raise CommandFailed(
            "--database needs psycopg: pip install 'ollamaproxy[postgresql]'"
        ) from None
    try:
        return summarise_database(url, start, by)
    except DatabaseDown as e:
        raise CommandFailed(f"{path}: {e}") from None


def _usage_table(rows: Sequence[Row], by: str) -> list[str]:
    """
    The lines of C{usage}'s table: names on the left, numbers on the right.
    """
    header = [by.upper(), "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL"]
    cells = [
        [show(row.name) or "-", str(row.requests), str(row.prompt_tokens),
         str(row.completion_tokens), str(row.total_tokens)]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return [
        "  ".join(
            [line[0].ljust(widths[0])]
            + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        ).rstrip()
        for line in [header, *cells]
    ]
