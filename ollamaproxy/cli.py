# -*- test-case-name: tests.test_cli -*-
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
    ollamaproxy keys list
    ollamaproxy keys revoke NAME
    ollamaproxy keys rotate NAME
    ollamaproxy usage [--since DATE] [--by key|model] [--database URL]

Every C{keys} subcommand takes C{--keys-file PATH}; without it the file is
C{$OLLAMAPROXY_KEYS_FILE}, then the proxy's default, exactly as for the
daemon.  With C{--database URL} (or C{$OLLAMAPROXY_DATABASE}) the keys
subcommands work on the keys in PostgreSQL instead, and C{usage} sums the
usage of every proxy that writes there (L{ollamaproxy.admission.key_storage}).

C{add} and C{rotate} print the new key alone on the last line of standard
output, so C{KEY=$(ollamaproxy keys add bob | tail -n1)} works; the key is
shown only then, since only its hash is stored.

C{usage} finds the usage database the same way: C{--usage-file PATH}, then
C{$OLLAMAPROXY_USAGE_FILE}, then L{default_usage_file}; it never changes it.

Every change goes through L{ollamaproxy.admission.key_storage.KeyStorage.update}:
under the keys file's lock (L{ollamaproxy.admission.keys.update_keys_file}) or in
one database transaction, so two commands run at once cannot lose each other's
change, and a crash leaves the old keys whole.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from ollamaproxy import __version__
from ollamaproxy.admission.caps import Caps, keep_alive_cap, show_duration
from ollamaproxy.admission.key_storage import FileKeys, KeyStorage, KeyStorageError
from ollamaproxy.admission.keys import (
    ADMIN,
    CLOUD,
    INFERENCE,
    ApiKey,
    KeysFileError,
    digest,
    generate_key,
)
from ollamaproxy.config import (
    ConfigError,
    env_variable,
    keys_file_path,
    parse_database_url,
    show_database_url,
    usage_file_path,
)
from ollamaproxy.postgres.key_storage import DatabaseKeys
from ollamaproxy.record.usage_db import DatabaseDown, Row, UsageFileError, summarise

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

PROG = "ollamaproxy"
KEYS_FILE_VARIABLE = env_variable("keys-file")
USAGE_FILE_VARIABLE = env_variable("usage-file")
DATABASE_VARIABLE = env_variable("database")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The daemon gives this name to the key from --api-key; a second key of that
# name in the file would stop it from starting.
_RESERVED_NAMES = frozenset({"api-key"})

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """
    The command line is wrong: the message says how.
    """


class CommandFailed(Exception):
    """
    The command could not be carried out: the message says why.
    """


class _Exit(Exception):
    """
    argparse finished early (after C{--help}) with this exit code.
    """

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
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
        raise _Exit(status)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _whole_number(text: str) -> int:
    """
    Parse a limit: a whole number from 1.
    """
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1")
    return int(text)


class _Clear:
    """
    What C{keys update} is given for a limit to remove: C{none} (C{never}
    for C{--expires}, C{all} for C{--models}).
    """


CLEAR = _Clear()


def _or_clear(parse: Callable[[str], Any], word: str = "none") -> Callable[[str], Any]:
    """
    A parser of C{keys update}'s options: C{word} removes the setting,
    anything else is read by C{parse}.
    """

    def parse_or_clear(text: str) -> Any:
        return CLEAR if text == word else parse(text)

    parse_or_clear.__name__ = getattr(parse, "__name__", "value")
    return parse_or_clear


def _models_or_all(text: str) -> list[Any]:
    """
    C{keys update}'s C{--models}: patterns as L{_globs} reads them, or
    C{all} (L{CLEAR}) for every model.
    """
    return [CLEAR] if text == "all" else _globs(text)


def _keep_alive(text: str) -> float:
    try:
        return keep_alive_cap(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _globs(text: str) -> list[str]:
    """
    Accept one model glob pattern or several, comma-separated; none may be
    empty.
    """
    patterns = [pattern.strip() for pattern in text.split(",")]
    if not all(patterns):
        raise argparse.ArgumentTypeError("a model pattern cannot be empty")
    return patterns


class _Version(argparse.Action):
    """
    C{--version}: print ollamaproxy's version on the parser's standard
    output and exit.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                         nargs=0, help="show the version of ollamaproxy and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        assert isinstance(parser, _Parser)
        parser._stdout.write(f"{PROG} {__version__}\n")
        parser.exit()


def _name(text: str) -> str:
    """
    Accept the name of a new key.
    """
    if not _NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a key name: use 1 to 64 letters, digits, '.', '_' or '-'"
        )
    if text in _RESERVED_NAMES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is reserved for the key given with --api-key"
        )
    return text


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


def parse_expiry(text: str, now: datetime) -> datetime:
    """
    Parse an expiry time: a time as L{parse_time} takes it, after C{now}.

    @raise UsageError: If C{text} is not such a time, or is not in the future.
    """
    when = parse_time(text, "--expires")
    if when <= now:
        raise UsageError(f"--expires: {_show_time(when)} is not in the future")
    return when


def _show_time(when: datetime | None) -> str:
    """
    A time as the keys file writes it, or C{-} for none.
    """
    return "-" if when is None else when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _show(text: str) -> str:
    """
    Text from the keys file, made safe to print on a terminal.
    """
    return text if text.isprintable() else repr(text)


def _describe(key: ApiKey, now: datetime) -> dict[str, str]:
    """
    What C{keys list} shows of a key: never the key, nor its hash.
    """
    expires = _show_time(key.expires)
    if key.expired(now):
        expires += " (expired)"
    return {
        "NAME": _show(key.name),
        "SCOPES": ",".join(sorted(key.scopes)),
        "MODELS": ",".join(_show(m) for m in key.models) or "all",
        "RPM": "-" if key.rpm is None else str(key.rpm),
        "MAX STREAMS": "-" if key.max_streams is None else str(key.max_streams),
        "TOKENS/DAY": "-" if key.tokens_per_day is None else str(key.tokens_per_day),
        "TOKENS/MONTH": "-" if key.tokens_per_month is None else str(key.tokens_per_month),
        "CREATED": _show_time(key.created),
        "EXPIRES": expires,
    }


def _summary(key: ApiKey) -> str:
    """
    A key's settings on one line.
    """
    return (
        f"scopes {','.join(sorted(key.scopes))}; "
        f"models {','.join(key.models) or 'all'}; "
        f"rpm {key.rpm or 'unlimited'}; "
        f"max streams {key.max_streams or 'unlimited'}; "
        + (f"max keep_alive {show_duration(key.caps.keep_alive)}; "
           if key.caps.keep_alive is not None else "")
        + (f"max num_ctx {key.caps.num_ctx}; " if key.caps.num_ctx is not None else "")
        + (f"tokens per day {key.tokens_per_day}; " if key.tokens_per_day is not None else "")
        + (f"tokens per month {key.tokens_per_month}; "
           if key.tokens_per_month is not None else "")
        + (f"weight {key.weight}; " if key.weight != 1 else "")
        + f"expires {'never' if key.expires is None else _show_time(key.expires)}"
    )


def _announce(out: TextIO, what: str, key: ApiKey, secret: str, picked_up: str) -> None:
    """
    Print what was done, then the new key alone on the last line.
    """
    out.write(
        f"{what}\n"
        f"  {_summary(key)}\n"
        "Only its hash is stored, so this is the only time the key is shown.\n"
        "Clients send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.\n"
        f"{picked_up}\n"
        f"{secret}\n"
    )


def _parser(stdout: TextIO) -> _Parser:
    """
    The command line of C{ollamaproxy}.
    """
    common = _Parser(add_help=False, stdout=stdout)
    common.add_argument(
        "--keys-file",
        metavar="PATH",
        help=f"the keys file (default: ${KEYS_FILE_VARIABLE}, else "
        "$XDG_CONFIG_HOME/ollamaproxy/keys.json)",
    )
    common.add_argument(
        "--database",
        metavar="URL",
        help=f"keep the keys in PostgreSQL at this postgresql:// URL instead of the keys "
        f"file (default: ${DATABASE_VARIABLE}, if set)",
    )

    parser = _Parser(prog=PROG, description="Manage an ollamaproxy.", stdout=stdout)
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    keys = commands.add_parser(
        "keys", help="add, list, update, revoke and rotate API keys", stdout=stdout
    )
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add",
        parents=[common],
        help="make a key and print it",
        description="Make a key, store its hash, and print the key alone on the last line.",
        stdout=stdout,
    )
    add.add_argument("name", metavar="NAME", type=_name,
                     help="1 to 64 letters, digits, '.', '_' or '-'")
    _key_options(add, update=False)
    update = actions.add_parser(
        "update",
        parents=[common],
        help="change a key's settings, keeping its secret",
        description="Change the settings of a key in place; its secret stays the same.  "
        "Settings not given stay as they are; 'none' removes a limit or a cap "
        "(--rpm none), '--expires never' makes it last, '--models all' lets it use every "
        "model, --no-admin and --no-cloud take a scope away.",
        stdout=stdout,
    )
    update.add_argument("name", metavar="NAME")
    _key_options(update, update=True)

    actions.add_parser("list", parents=[common], help="show the keys (never the keys themselves)",
                       stdout=stdout)
    for action, text in [("revoke", "delete a key"),
                         ("rotate", "give a key a new secret, keeping its settings")]:
        sub = actions.add_parser(action, parents=[common], help=text, stdout=stdout)
        sub.add_argument("name", metavar="NAME")

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
    usage.add_argument(
        "--usage-file",
        metavar="PATH",
        help=f"the usage database (default: ${USAGE_FILE_VARIABLE}, else "
        "$XDG_STATE_HOME/ollamaproxy/usage.sqlite3)",
    )
    usage.add_argument(
        "--database",
        metavar="URL",
        help="sum the usage of every proxy in PostgreSQL at this postgresql:// URL "
        f"instead of the usage file (default: ${DATABASE_VARIABLE}, if set)",
    )
    return parser


def _key_options(parser: argparse.ArgumentParser, update: bool) -> None:
    """
    The settings of a key, for C{keys add} and C{keys update}.  For
    C{update}, every one defaults to "unchanged" (L{None}), a limit or a cap
    may be C{none} (L{CLEAR}), and C{--no-admin}, C{--no-cloud} take a scope
    away.
    """
    def limit(parse: Callable[[str], Any], word: str = "none") -> Callable[[str], Any]:
        return _or_clear(parse, word) if update else parse

    unset = "unchanged" if update else None
    proxys = "the proxy's"
    scope = argparse.BooleanOptionalAction if update else "store_true"
    default = None if update else False
    parser.add_argument("--admin", action=scope, default=default,
                        help="also allow model management and account routes (and cloud models)")
    parser.add_argument("--cloud", action=scope, default=default,
                        help="also allow cloud models (':cloud', '-cloud'), which run on "
                        "ollama.com on the server owner's account")
    parser.add_argument("--models", metavar="GLOB[,GLOB...]", action="extend",
                        type=_models_or_all if update else _globs,
                        default=None if update else [],
                        help="models the key may use, e.g. 'llama3*,qwen2.5:7b'; repeatable "
                        + ("('all' for every model; default: unchanged)" if update
                           else "(default: all)"))
    parser.add_argument("--rpm", metavar="N", type=limit(_whole_number),
                        help=f"requests a minute (default: {unset or 'no limit'})")
    parser.add_argument("--max-streams", metavar="N", type=limit(_whole_number),
                        help=f"requests in flight at once (default: {unset or 'no limit'})")
    parser.add_argument("--max-keep-alive", metavar="DURATION", type=limit(_keep_alive),
                        help="longest keep_alive the key's requests may ask for, e.g. 10m; "
                        "one over it (or -1, for ever) is clamped to it "
                        f"(default: {unset or proxys})")
    parser.add_argument("--max-num-ctx", metavar="N", type=limit(_whole_number),
                        help="largest options.num_ctx the key's requests may ask for; larger "
                        f"is clamped to it (default: {unset or proxys})")
    parser.add_argument("--expires", metavar="DATE", type=limit(str, "never"),
                        help="ISO date or time, UTC unless given, e.g. 2027-01-01 or "
                        f"2027-01-01T12:00:00Z (default: {unset or 'never'})")
    parser.add_argument("--tokens-per-day", metavar="N", type=limit(_whole_number),
                        help="prompt and completion tokens the key may use in a UTC day; "
                        f"over it, 429 until the next day (default: {unset or 'no quota'})")
    parser.add_argument("--tokens-per-month", metavar="N", type=limit(_whole_number),
                        help="the same in a UTC month, until the first of the next "
                        f"(default: {unset or 'no quota'})")
    parser.add_argument("--weight", metavar="N", type=limit(_whole_number),
                        help="share of turns when requests wait for a busy model: weight 3 "
                        "is served three times for every once of weight 1 "
                        f"(default: {unset or 1})")


def _database_url(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """
    The PostgreSQL URL given as C{--database} or C{$OLLAMAPROXY_DATABASE},
    if any.

    @raise UsageError: If it is not a PostgreSQL URL.
    """
    try:
        return parse_database_url(args.database or environ.get(DATABASE_VARIABLE))
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _storage(args: argparse.Namespace, environ: Mapping[str, str]) -> KeyStorage:
    """
    Where the keys are: the database if one is given, else the keys file.

    @raise UsageError: If the database URL is not a PostgreSQL one.
    """
    url = _database_url(args, environ)
    if url is not None:
        return DatabaseKeys(url)
    return FileKeys(keys_file_path(args.keys_file, environ))


def _add(args: argparse.Namespace, storage: KeyStorage, out: TextIO, now: datetime) -> None:
    expires = None if args.expires is None else parse_expiry(args.expires, now)
    secret = generate_key()
    key = ApiKey(
        name=args.name,
        digest=digest(secret),
        created=now,
        expires=expires,
        scopes=frozenset(
            {INFERENCE} | ({ADMIN} if args.admin else set()) | ({CLOUD} if args.cloud else set())
        ),
        models=tuple(args.models),
        rpm=args.rpm,
        max_streams=args.max_streams,
        caps=Caps(args.max_keep_alive, args.max_num_ctx),
        tokens_per_day=args.tokens_per_day,
        tokens_per_month=args.tokens_per_month,
        weight=args.weight or 1,
    )

    def add(keys: list[ApiKey]) -> list[ApiKey]:
        if any(k.name == key.name for k in keys):
            raise CommandFailed(f"a key named {key.name!r} already exists in {storage.where}")
        return [*keys, key]

    storage.update(add)
    _announce(out, f"Added key {key.name!r} to {storage.where}:", key, secret,
              storage.picked_up)


def _list(storage: KeyStorage, out: TextIO, now: datetime) -> None:
    keys = storage.load()
    if not keys:
        out.write(f"No keys in {storage.where}.\n")
        return
    rows = [_describe(key, now) for key in keys]
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    for row in [{c: c for c in columns}, *rows]:
        out.write("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip() + "\n")


def _revoke(name: str, storage: KeyStorage, out: TextIO, err: TextIO) -> None:
    def revoke(keys: list[ApiKey]) -> list[ApiKey]:
        kept = [k for k in keys if k.name != name]
        if len(kept) == len(keys):
            raise CommandFailed(f"no key named {name!r} in {storage.where}")
        return kept

    left = storage.update(revoke)
    out.write(
        f"Revoked key {name!r} in {storage.where}.\n"
        f"{storage.picked_up}\n"
    )
    if not left and isinstance(storage, FileKeys):
        path = storage.where
        err.write(
            f"{PROG}: warning: no keys are left in {path}; unless it is given --api-key, "
            "the proxy will make a new key when it next starts\n"
        )


def _rotate(name: str, storage: KeyStorage, out: TextIO, err: TextIO, now: datetime) -> None:
    secret = generate_key()
    rotated: list[ApiKey] = []

    def rotate(keys: list[ApiKey]) -> list[ApiKey]:
        for index, old in enumerate(keys):
            if old.name == name:
                rotated.append(replace(old, digest=digest(secret), created=now))
                return [*keys[:index], rotated[0], *keys[index + 1:]]
        raise CommandFailed(f"no key named {name!r} in {storage.where}")

    storage.update(rotate)
    key = rotated[0]
    if key.expired(now):
        err.write(
            f"{PROG}: warning: key {name!r} expired at {_show_time(key.expires)}, and the "
            "new key keeps that expiry: revoke it and add a new one to extend it\n"
        )
    _announce(out, f"Rotated key {name!r} in {storage.where}:", key, secret, storage.picked_up)


def _update_key(args: argparse.Namespace, storage: KeyStorage, out: TextIO,
                now: datetime) -> None:
    name: str = args.name
    updated: list[ApiKey] = []

    def update(keys: list[ApiKey]) -> list[ApiKey]:
        for index, old in enumerate(keys):
            if old.name == name:
                updated.append(_changed(old, args, now))
                return [*keys[:index], updated[0], *keys[index + 1:]]
        raise CommandFailed(f"no key named {name!r} in {storage.where}")

    storage.update(update)
    out.write(
        f"Updated key {name!r} in {storage.where}; its secret is unchanged:\n"
        f"  {_summary(updated[0])}\n"
        f"{storage.picked_up}\n"
    )


def _changed(key: ApiKey, args: argparse.Namespace, now: datetime) -> ApiKey:
    """
    C{key} with the settings C{keys update} was given: L{None} leaves one as
    it is, L{CLEAR} removes it.

    @raise UsageError: If no setting is given, or C{--expires} is not a
        time in the future.
    """
    def given(value: Any, current: Any) -> Any:
        if value is None:
            return current
        return None if value is CLEAR else value

    settings = ("admin", "cloud", "models", "rpm", "max_streams", "max_keep_alive",
                "max_num_ctx", "expires", "tokens_per_day", "tokens_per_month", "weight")
    if all(getattr(args, setting) is None for setting in settings):
        raise UsageError(
            f"keys update: give a setting to change (see '{PROG} keys update --help')"
        )
    scopes = set(key.scopes)
    for scope, wanted in ((ADMIN, args.admin), (CLOUD, args.cloud)):
        if wanted is not None:
            (scopes.add if wanted else scopes.discard)(scope)
    models = key.models
    if args.models is not None:
        models = () if CLEAR in args.models else tuple(args.models)
    expires = key.expires
    if args.expires is not None:
        expires = None if args.expires is CLEAR else parse_expiry(args.expires, now)
    return replace(
        key,
        scopes=frozenset(scopes),
        models=models,
        expires=expires,
        rpm=given(args.rpm, key.rpm),
        max_streams=given(args.max_streams, key.max_streams),
        caps=Caps(given(args.max_keep_alive, key.caps.keep_alive),
                  given(args.max_num_ctx, key.caps.num_ctx)),
        tokens_per_day=given(args.tokens_per_day, key.tokens_per_day),
        tokens_per_month=given(args.tokens_per_month, key.tokens_per_month),
        weight=given(args.weight, key.weight) or 1,
    )


def _usage_table(rows: Sequence[Row], by: str) -> list[str]:
    """
    The lines of C{usage}'s table: names on the left, numbers on the right.
    """
    header = [by.upper(), "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL"]
    cells = [
        [_show(row.name) or "-", str(row.requests), str(row.prompt_tokens),
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


def _usage(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> None:
    since = None if args.since is None else parse_time(args.since, "--since")
    start = None if since is None else since.timestamp()
    url = _database_url(args, environ)
    if url is not None:
        try:
            from ollamaproxy.postgres.usage import summarise_database
        except ImportError:
            raise CommandFailed(
                "--database needs psycopg: pip install 'ollamaproxy[postgresql]'"
            ) from None
        path = f"database {show_database_url(url)}"
        try:
            rows = summarise_database(url, start, args.by)
        except DatabaseDown as e:
            raise CommandFailed(f"{path}: {e}") from None
    else:
        path = usage_file_path(args.usage_file, environ)
        try:
            rows = summarise(path, start, args.by)
        except FileNotFoundError:
            rows = []
    if not rows:
        when = "" if since is None else f" since {_show_time(since)}"
        out.write(f"No usage recorded in {path}{when}.\n")
        return
    out.writelines(line + "\n" for line in _usage_table(rows, args.by))


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
    @raise _Exit: After printing help.
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
        _usage(args, environ, stdout)
        return
    storage = _storage(args, environ)
    if args.action == "add":
        _add(args, storage, stdout, now)
    elif args.action == "list":
        _list(storage, stdout, now)
    elif args.action == "revoke":
        _revoke(args.name, storage, stdout, stderr)
    elif args.action == "update":
        _update_key(args, storage, stdout, now)
    else:
        _rotate(args.name, storage, stdout, stderr, now)


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
    except _Exit as e:
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


if __name__ == "__main__":
    raise SystemExit(main())
