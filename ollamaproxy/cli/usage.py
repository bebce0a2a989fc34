# -*- test-case-name: tests.cli.test_usage -*-
"""
C{ollamaproxy usage}: the requests served, the requests refused and the
tokens recorded per key or per model, as a table or (C{--json}) as one JSON
document.

It finds the usage database as the daemon does: C{--usage-file PATH}, then
C{$OLLAMAPROXY_USAGE_FILE}, then the default; with C{--database URL} (or
C{$OLLAMAPROXY_DATABASE}) it sums the usage of every proxy that writes
there.  It never changes either.

A request is served when it reached Ollama, whatever Ollama answered, and
refused when the proxy turned it away itself (L{ollamaproxy.record.usage_db}).

The JSON document, whose shape stays as it is (fields may be added, never
renamed or removed)::

    {"by": "key", "since": "2026-11-01T00:00:00Z", "until": null,
     "rows": [{"key": "alice", "requests": 12, "refused": 1,
               "prompt_tokens": 900, "completion_tokens": 2100,
               "total_tokens": 3000}]}

C{since} and C{until} are as given (UTC), or C{null}; with C{--by model} the
rows have C{model} instead of C{key}, C{""} for requests that named none;
with C{--by user} they have C{key} and C{user}, one row per user behind
each key, C{""} for the key's anonymous user (and for every request of a
key that names no users, L{ollamaproxy.admission.users}).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from ollamaproxy.cli.common import (
    UsageError,
    add_usage_options,
    parse_time,
    read_usage,
    show,
    show_time,
    where,
    write_json,
)
from ollamaproxy.record.usage_db import Row


def add_usage_parser(commands: Any, stdout: TextIO) -> None:
    """
    Add C{usage} to the commands of C{ollamaproxy}.

    @param commands: The top parser's subparsers.
    """
    usage = commands.add_parser(
        "usage",
        help="show requests and tokens per key, model or user",
        description="Show the requests the proxy has recorded, served and refused, and their "
        "tokens, per key, per model or per user behind a key, most tokens first.",
        stdout=stdout,
    )
    usage.add_argument("--since", metavar="DATE",
                       help="count from this ISO date or time, UTC unless given, e.g. "
                       "2026-11-01 or 2026-11-01T12:00:00Z (default: everything)")
    usage.add_argument("--until", metavar="DATE",
                       help="count up to (not including) this date or time, given as for "
                       "--since (default: now)")
    usage.add_argument("--by", choices=("key", "model", "user"), default="key",
                       help="one row per key, per model, or per user behind each key "
                       "(keys add --user-header; '-' is a key's anonymous user) "
                       "(default: key)")
    usage.add_argument("--json", action="store_true",
                       help="print one JSON document instead of a table")
    add_usage_options(usage, database=True)


def run_usage(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> None:
    """
    Carry out C{usage}: print the table (or say that nothing is recorded),
    or the JSON document.

    @raise UsageError: If the command line is wrong.
    @raise CommandFailed: If the database cannot be read.
    @raise UsageFileError: If the usage file cannot be read.
    """
    since = None if args.since is None else parse_time(args.since, "--since")
    until = None if args.until is None else parse_time(args.until, "--until")
    if since is not None and until is not None and until <= since:
        raise UsageError(f"--until {show_time(until)} is not after --since {show_time(since)}")
    start = None if since is None else since.timestamp()
    end = None if until is None else until.timestamp()
    path, rows = read_usage(
        args, environ, lambda usage: (where(usage), usage.summarise(start, args.by, end))
    )
    if args.json:
        write_json(out, _document(rows, args.by, since, until))
    elif not rows:
        when = "" if since is None else f" since {show_time(since)}"
        when += "" if until is None else f" until {show_time(until)}"
        out.write(f"No usage recorded in {path}{when}.\n")
    else:
        out.writelines(line + "\n" for line in _usage_table(rows, args.by))


def _document(
    rows: Sequence[Row], by: str, since: datetime | None, until: datetime | None
) -> dict[str, Any]:
    """
    C{usage --json}'s document, as the module says.
    """
    return {
        "by": by,
        "since": None if since is None else show_time(since),
        "until": None if until is None else show_time(until),
        "rows": [
            {**({"key": row.name, "user": row.user} if by == "user" else {by: row.name}),
             "requests": row.requests, "refused": row.refused,
             "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
             "total_tokens": row.total_tokens}
            for row in rows
        ],
    }


def _usage_table(rows: Sequence[Row], by: str) -> list[str]:
    """
    The lines of C{usage}'s table: names on the left, numbers on the right.
    """
    names = ["KEY", "USER"] if by == "user" else [by.upper()]
    header = [*names, "REQUESTS", "REFUSED", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL"]
    cells = [
        [show(row.name) or "-", *([show(row.user or "") or "-"] if by == "user" else []),
         str(row.requests), str(row.refused), str(row.prompt_tokens),
         str(row.completion_tokens), str(row.total_tokens)]
        for row in rows
    ]
    left = len(names)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return [
        "  ".join(
            [cell.ljust(width) for cell, width in zip(line[:left], widths[:left], strict=True)]
            + [cell.rjust(width)
               for cell, width in zip(line[left:], widths[left:], strict=True)]
        ).rstrip()
        for line in [header, *cells]
    ]
