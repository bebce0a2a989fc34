# -*- test-case-name: tests.cli.test_keys -*-
"""
C{ollamaproxy keys}: add, list, show, update, revoke and rotate the keys in
the keys file, or with C{--database} in PostgreSQL.

C{add} and C{rotate} print the new key alone on the last line of standard
output, so C{KEY=$(ollamaproxy keys add bob | tail -n1)} works; the key is
shown only then, since only its hash is stored.

C{list} and C{show} give each key's settings and what it used: the tokens
of this UTC day and month, read from the usage the daemon recorded (the
figure its token quotas start from, L{ollamaproxy.admission.quotas}), and
when it was last used.  With C{--json} they print one JSON document, the
console's view of a key (L{ollamaproxy.console.views.keys_view}), whose
shape stays as it is (fields may be added, never renamed or removed)::

    {"name": "bob", "scopes": ["inference"], "models": ["llama3*"],
     "rpm": 60, "max_streams": 2, "max_keep_alive": "10m",
     "max_num_ctx": 8192, "weight": 1, "user_header": null, "chat_header": null,
     "tokens_per_day": 200000, "tokens_per_month": null,
     "used_today": 1234, "used_this_month": 56789,
     "created": "2026-11-27T07:00:00Z", "expires": null, "expired": false,
     "last_used": 1795762800.0}

C{list} prints C{{"keys": [...]}}, by name; C{show} the one key.  A limit
not set is C{null}; C{last_used} is the start of the last minute with usage,
in seconds since the epoch, or C{null}.  Neither ever shows a key or its
hash.

Every change goes through L{ollamaproxy.admission.key_storage.KeyStorage.update}:
under the keys file's lock (L{ollamaproxy.admission.keys.update_keys_file}) or in
one database transaction, so two commands run at once cannot lose each other's
change, and a crash leaves the old keys whole.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TextIO

from ollamaproxy.admission.caps import Caps, show_duration
from ollamaproxy.admission.key_storage import FileKeys, KeyStorage
from ollamaproxy.admission.keys import (
    ADMIN,
    CLOUD,
    INFERENCE,
    ApiKey,
    digest,
    generate_key,
    header_name,
)
from ollamaproxy.admission.quota_periods import window
from ollamaproxy.cli.common import (
    PROG,
    CommandFailed,
    Parser,
    UsageError,
    add_daemon_option,
    add_usage_options,
    daemon_setting,
    parse_time,
    read_usage,
    show,
    show_time,
    write_json,
)
from ollamaproxy.console.views import keys_view
from ollamaproxy.durations import keep_alive_cap
from ollamaproxy.postgres.key_storage import DatabaseKeys
from ollamaproxy.record.usage import UsageDatabase

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The daemon gives this name to the key from --api-key; a second key of that
# name in the file would stop it from starting.
_RESERVED_NAMES = frozenset({"api-key"})


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


def _header(names: str) -> Callable[[str], str]:
    """
    Accept the name of a header a key reads C{names} from (L{header_name}).
    """
    def parse(text: str) -> str:
        try:
            return header_name(text, names)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _globs(text: str) -> list[str]:
    """
    Accept one model glob pattern or several, comma-separated; none may be
    empty.
    """
    patterns = [pattern.strip() for pattern in text.split(",")]
    if not all(patterns):
        raise argparse.ArgumentTypeError("a model pattern cannot be empty")
    return patterns


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


def parse_expiry(text: str, now: datetime) -> datetime:
    """
    Parse an expiry time: a time as L{parse_time} takes it, after C{now}.

    @raise UsageError: If C{text} is not such a time, or is not in the future.
    """
    when = parse_time(text, "--expires")
    if when <= now:
        raise UsageError(f"--expires: {show_time(when)} is not in the future")
    return when


def _views(
    keys: list[ApiKey], args: argparse.Namespace, environ: Mapping[str, str], now: datetime
) -> list[dict[str, Any]]:
    """
    What C{keys list} and C{keys show} tell of C{keys}: the console's view
    of each, by name, with its use read from the usage the daemon
    recorded.  Never the key, nor its hash.

    @raise CommandFailed: If the usage database is down.
    @raise ollamaproxy.record.usage_db.UsageFileError: If the usage file
        cannot be read.
    """
    seconds = now.timestamp()

    def used(usage: UsageDatabase) -> list[dict[str, Any]]:
        return keys_view(
            keys, seconds, usage.last_used(),
            usage.tokens_by_key(window("day", seconds).start),
            usage.tokens_by_key(window("month", seconds).start),
        )

    return read_usage(args, environ, used)


def _of(used: int, quota: int | None) -> str:
    """
    Tokens used, and of how many if there is a quota.
    """
    return str(used) if quota is None else f"{used}/{quota}"


def _unset(value: object, word: str = "-") -> str:
    return word if value is None else show(str(value))


def _row(view: dict[str, Any]) -> dict[str, str]:
    """
    A key's line in C{keys list}: made safe for a terminal.
    """
    expires = _unset(view["expires"])
    if view["expired"]:
        expires += " (expired)"
    return {
        "NAME": show(view["name"]),
        "SCOPES": ",".join(view["scopes"]),
        "MODELS": ",".join(show(m) for m in view["models"]) or "all",
        "RPM": _unset(view["rpm"]),
        "MAX STREAMS": _unset(view["max_streams"]),
        "MAX KEEP_ALIVE": _unset(view["max_keep_alive"]),
        "MAX NUM_CTX": _unset(view["max_num_ctx"]),
        "WEIGHT": str(view["weight"]),
        "TOKENS TODAY": _of(view["used_today"], view["tokens_per_day"]),
        "TOKENS THIS MONTH": _of(view["used_this_month"], view["tokens_per_month"]),
        "USER HEADER": _unset(view["user_header"]),
        "CREATED": _unset(view["created"]),
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
        + (f"user header {key.user_header}; " if key.user_header is not None else "")
        + (f"chat header {key.chat_header}; " if key.chat_header is not None else "")
        + f"expires {'never' if key.expires is None else show_time(key.expires)}"
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


def add_keys_parser(commands: Any, stdout: TextIO) -> None:
    """
    Add C{keys} and its actions to the commands of C{ollamaproxy}.

    @param commands: The top parser's subparsers.
    """
    common = Parser(add_help=False, stdout=stdout)
    add_daemon_option(common, "keys-file", "the keys file")
    add_daemon_option(common, "database",
                      "keep the keys in PostgreSQL at this postgresql:// URL instead of the "
                      "keys file")
    keys = commands.add_parser(
        "keys", help="add, list, show, update, revoke and rotate API keys", stdout=stdout
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
    for action, text in [("list", "show the keys, their settings and use (never the keys "
                                  "themselves)"),
                         ("show", "show one key's settings and use (never the key itself)")]:
        sub = actions.add_parser(action, parents=[common], help=text, description=text,
                                 stdout=stdout)
        if action == "show":
            sub.add_argument("name", metavar="NAME")
        sub.add_argument("--json", action="store_true",
                         help="print one JSON document instead of text")
        add_usage_options(sub, database=False)
    for action, text in [("revoke", "delete a key"),
                         ("rotate", "give a key a new secret, keeping its settings")]:
        sub = actions.add_parser(action, parents=[common], help=text, stdout=stdout)
        sub.add_argument("name", metavar="NAME")


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
    _header_options(parser, limit, update)


def _header_options(
    parser: argparse.ArgumentParser, limit: Callable[[Callable[[str], Any], str], Any],
    update: bool,
) -> None:
    """
    Add the options naming the headers a key's front-end says things in.
    """
    clear = "('' for none; default: unchanged)"
    parser.add_argument("--user-header", metavar="HEADER", type=limit(_header("a user"), ""),
                        help="the header in which the key's front-end names the user a "
                        "request is for, e.g. X-OpenWebUI-User-Id: the key's share of the "
                        "fair queue is divided among its users "
                        + (clear if update else "(default: none, the key is one user)"))
    parser.add_argument("--chat-header", metavar="HEADER",
                        type=limit(_header("a conversation"), ""),
                        help="a header whose value names the conversation a request "
                        "continues, e.g. X-OpenWebUI-Chat-Id: its turns go to the backend "
                        "of its last "
                        + (clear if update
                           else "(default: none, conversations known by their messages)"))


def _storage(args: argparse.Namespace, environ: Mapping[str, str]) -> KeyStorage:
    """
    Where the keys are: the database if one is given, else the keys file.

    @raise UsageError: If the database URL is not a PostgreSQL one.
    """
    url = daemon_setting("database", args, environ)
    if url is not None:
        return DatabaseKeys(url)
    return FileKeys(daemon_setting("keys-file", args, environ))


def run_keys(
    args: argparse.Namespace, environ: Mapping[str, str], out: TextIO, err: TextIO,
    now: datetime,
) -> None:
    """
    Carry out C{keys ACTION}.

    @raise UsageError: If the command line is wrong.
    @raise CommandFailed: If the command cannot be carried out.
    """
    storage = _storage(args, environ)
    if args.action == "add":
        _add(args, storage, out, now)
    elif args.action == "list":
        _list(storage, args, environ, out, now)
    elif args.action == "show":
        _show(args.name, storage, args, environ, out, now)
    elif args.action == "revoke":
        _revoke(args.name, storage, out, err)
    elif args.action == "update":
        _update_key(args, storage, out, now)
    else:
        _rotate(args.name, storage, out, err, now)


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
        user_header=args.user_header,
        chat_header=args.chat_header,
    )

    def add(keys: list[ApiKey]) -> list[ApiKey]:
        if any(k.name == key.name for k in keys):
            raise CommandFailed(f"a key named {key.name!r} already exists in {storage.where}")
        return [*keys, key]

    storage.update(add)
    _announce(out, f"Added key {key.name!r} to {storage.where}:", key, secret,
              storage.picked_up)


def _list(storage: KeyStorage, args: argparse.Namespace, environ: Mapping[str, str],
          out: TextIO, now: datetime) -> None:
    keys = storage.load()
    views = _views(keys, args, environ, now) if keys else []
    if args.json:
        write_json(out, {"keys": views})
        return
    if not keys:
        out.write(f"No keys in {storage.where}.\n")
        return
    rows = [_row(view) for view in views]
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
    for row in [{c: c for c in columns}, *rows]:
        out.write("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip() + "\n")


def _show(name: str, storage: KeyStorage, args: argparse.Namespace,
          environ: Mapping[str, str], out: TextIO, now: datetime) -> None:
    found = [key for key in storage.load() if key.name == name]
    if not found:
        raise CommandFailed(f"no key named {name!r} in {storage.where}")
    [view] = _views(found, args, environ, now)
    if args.json:
        write_json(out, view)
        return
    last_used = view["last_used"]
    lines = {
        **{label.lower(): value for label, value in _row(view).items()},
        "tokens today": _of(view["used_today"], view["tokens_per_day"]) + " (UTC day)",
        "tokens this month": _of(view["used_this_month"], view["tokens_per_month"])
        + " (UTC month)",
        "last used": "-" if last_used is None
        else show_time(datetime.fromtimestamp(last_used, UTC)),
    }
    width = max(len(label) for label in lines) + 1
    out.writelines(f"{(label + ':').ljust(width)}  {value}\n" for label, value in lines.items())


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
            f"{PROG}: warning: key {name!r} expired at {show_time(key.expires)}, and the "
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
                "max_num_ctx", "expires", "tokens_per_day", "tokens_per_month", "weight",
                "user_header", "chat_header")
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
        user_header=given(args.user_header, key.user_header),
        chat_header=given(args.chat_header, key.chat_header),
    )

