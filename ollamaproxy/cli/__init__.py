# -*- test-case-name: tests.cli.test_main,tests.cli.test_keys,tests.cli.test_usage -*-
"""
The C{ollamaproxy} command: managing the keys in the keys file, and showing
how much each key used.

    ollamaproxy keys add NAME [--admin] [--cloud] [--models GLOB[,GLOB...]]...
                              [--rpm N] [--max-streams N] [--expires DATE]
                              [--max-keep-alive DURATION] [--max-num-ctx N]
                              [--tokens-per-day N] [--tokens-per-month N]
                              [--weight N]
    ollamaproxy keys update NAME [the options of add; --no-admin, --no-cloud;
                                  none (never, all) to remove a limit]
    ollamaproxy --version
    ollamaproxy keys list [--json]
    ollamaproxy keys show NAME [--json]
    ollamaproxy keys revoke NAME
    ollamaproxy keys rotate NAME
    ollamaproxy usage [--since DATE] [--until DATE] [--by key|model] [--json]

Each command is a module: L{ollamaproxy.cli.keys}, L{ollamaproxy.cli.usage}.
Every C{keys} subcommand takes C{--keys-file PATH}, and C{usage}, C{keys
list} and C{keys show} take C{--usage-file PATH}; without them the file is
found exactly as the daemon finds it (C{$OLLAMAPROXY_KEYS_FILE}, then the
default).  With C{--database
URL} (or C{$OLLAMAPROXY_DATABASE}) the keys subcommands work on the keys in
PostgreSQL instead, and C{usage} sums the usage of every proxy that writes
there (L{ollamaproxy.admission.key_storage}).  These three options come from
the daemon's table of options (L{ollamaproxy.config}).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TextIO

from ollamaproxy.admission.key_storage import KeyStorageError
from ollamaproxy.admission.keys import KeysFileError
from ollamaproxy.cli.common import (
    PROG,
    CommandFailed,
    HelpShown,
    Parser,
    UsageError,
    Version,
)
from ollamaproxy.cli.keys import add_keys_parser, run_keys
from ollamaproxy.cli.usage import add_usage_parser, run_usage
from ollamaproxy.record.usage_db import UsageFileError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser(stdout: TextIO) -> Parser:
    """
    The command line of C{ollamaproxy}.
    """
    parser = Parser(prog=PROG, description="Manage an ollamaproxy.", stdout=stdout)
    parser.add_argument("--version", action=Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_keys_parser(commands, stdout)
    add_usage_parser(commands, stdout)
    return parser


def run(
    argv: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    environ: Mapping[str, str],
    now: datetime,
) -> None:
    """
    Carry out one command.

    @raise UsageError: If the command line is wrong.
    @raise CommandFailed: If the command cannot be carried out.
    @raise KeysFileError: If the keys file cannot be read.
    @raise UsageFileError: If the usage database cannot be read.
    @raise OSError: If the keys file cannot be written.
    @raise HelpShown: After printing help.
    """
    parser = _parser(stdout)
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "action", None) in ("add", "update"):
        raise UsageError(
            f"unrecognized arguments: {' '.join(extra)} (--models takes one pattern or a "
            "comma-separated list, and may be repeated: --models 'llama3*,qwen2.5:7b')"
        )
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "usage":
        run_usage(args, environ, stdout)
    else:
        run_keys(args, environ, stdout, stderr, now)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    now: Callable[[], datetime] | None = None,
) -> int:
    """
    Run the C{ollamaproxy} command.  As the console script, its result
    becomes the exit status.

    @param argv: The arguments, without the program name; C{sys.argv[1:]}
        by default.
    @param stdout: Where results go; C{sys.stdout} by default.
    @param stderr: Where errors and warnings go; C{sys.stderr} by default.
    @param environ: The environment; C{os.environ} by default.
    @param now: The clock, returning a timezone-aware time; the system
        clock by default.
    @return: 0 on success, 1 if the command failed, 2 for a wrong command
        line.  Errors are one line on C{stderr}, starting with
        C{ollamaproxy: }.
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr

    def fail(code: int, message: str) -> int:
        err.write(f"{PROG}: {' '.join(message.splitlines())}\n")
        return code

    try:
        run(
            sys.argv[1:] if argv is None else argv,
            out,
            err,
            os.environ if environ is None else environ,
            (now or _utcnow)(),
        )
    except HelpShown as e:
        return e.code
    except UsageError as e:
        return fail(EXIT_USAGE, str(e))
    except (CommandFailed, KeysFileError, KeyStorageError, UsageFileError) as e:
        return fail(EXIT_FAILURE, str(e))
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return fail(EXIT_FAILURE, f"{e.strerror or e}{where}")
    except KeyboardInterrupt:
        return fail(130, "interrupted")
    return EXIT_OK


def _utcnow() -> datetime:
    """
    The current time, in UTC.
    """
    return datetime.now(UTC)
