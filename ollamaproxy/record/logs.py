# -*- test-case-name: tests.record.test_logs -*-
"""
What the proxy writes down, and where.

Every request ends with one access event (L{log_exchange}) on the
C{ollamaproxy.access} logger.  With C{--log-dir}, L{LogFilesService} sends
every event to two files that rotate by size with a bounded number of old
files: C{ollamaproxy.log} (text, for people) and C{ollamaproxy.json} (one JSON
object a line, for C{jq}, in a documented schema: L{json_file_observer}).
twistd's own observer is left alone, so C{twistd -n} still shows everything
on the console.

Keys never appear in any event: events name a key by its name, and the text
clients choose (paths, model names, error details, body samples) is redacted
(L{ollamaproxy.record.redact}) before it goes into an event, so every observer
(twistd's console, which is the journal under systemd, as much as the files)
receives clean fields and a clean line.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import IO, cast

from twisted.application.service import Service
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.logfile import LogFile
from twisted.python.reflect import safe_str

from ollamaproxy.exchange import Exchange, StreamSummary
from ollamaproxy.record.redact import KEY_PREFIX, REDACTED, blank_credentials

access = Logger(namespace="ollamaproxy.access")
streams = Logger(namespace="ollamaproxy.stream")
bodies = Logger(namespace="ollamaproxy.bodies")

DEFAULT_ROTATE_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 10


def log_exchange(
    exchange: Exchange,
    sent_bytes: int,
    now: float,
    redact: Callable[[str], str] = blank_credentials,
    name_backend: bool = False,
) -> None:
    """
    Emit the events for a finished request: its access event, the summary
    of what it generated, and its body samples if they were kept.

    Each event carries its own fields (what the JSON log writes) and its
    text line, built here from the same values, so that every field of the
    text line is a field of the event and no piece of text made only for
    the line (a suffix, a placeholder) is.

    @param redact: Blanks credentials and the proxy's own keys
        (L{ollamaproxy.record.redact.Redactor}) in the text clients choose: the
        path, the error detail (which may repeat the path or a model name)
        and the bodies, before they go into any event.  (The summary's
        model is the one Ollama answered with: an installed model.)
    @param name_backend: Whether the text line names the backend the
        request went to: with several, which one matters; with one, it
        would repeat the same address on every line.
    """
    # A path that is one of Ollama's fixed routes (the route's pattern
    # itself) holds nothing of the client's choosing: no need to look.
    path = exchange.path if exchange.path == exchange.route else redact(exchange.path)
    detail = redact(exchange.detail) if exchange.detail else ""
    status, upstream, queued, notes = (
        exchange.status, exchange.backend, exchange.queued, exchange.notes
    )
    duration = now - exchange.started
    # A request that ended before any status (its client left first) has
    # none: "-", as for any other missing field of the line.
    line = (
        f"{exchange.client} {exchange.key} {exchange.method} {path} "
        f"{'-' if status is None else status} {exchange.outcome} {sent_bytes}B "
        f"{duration:.3f}s"
    )
    user = exchange.user
    if user:
        # Who it was for behind a key that names its users; a front-end's
        # other headers about them (name, e-mail) are never logged.
        line += f" user {user}"
    if name_backend and upstream:
        line += f" backend {upstream}"
    # A request given its slot at once has waited the microseconds the
    # router took: "queued 0.000s" would only be noise.
    if queued >= _SHOWN_WAIT:
        line += f" queued {queued:.3f}s"
    if detail:
        line += f" ({detail})"
    if notes:
        line += f" [{notes}]"
    _emit(
        access,
        now,
        line,
        client=exchange.client,
        key=exchange.key,
        user=user,
        method=exchange.method,
        path=path,
        status=status,
        outcome=exchange.outcome,
        detail=detail,
        sent_bytes=sent_bytes,
        upstream=upstream,
        queued=queued,
        notes=notes,
        first_byte=exchange.first_byte,
        duration=duration,
    )
    summary = exchange.summary
    if summary is not None:
        _log_summary(exchange.key, path, summary, now)
    if exchange.request_sample or exchange.response_sample:
        _log_bodies(exchange, path, redact, now)


def _log_summary(key: str, path: str, summary: StreamSummary, now: float) -> None:
    """
    Emit the summary event of a generation.
    """
    speed = summary.tokens_per_second
    _emit(
        streams,
        now,
        (
            f"{key} {summary.model}: {summary.prompt_tokens} prompt + "
            f"{summary.completion_tokens} completion tokens"
            f"{_COUNTED if summary.counted else ''}"
            f"{_ESTIMATED if summary.prompt_estimated else ''}"
            f"{'' if speed is None else f' at {speed:.1f} tokens/s'}, "
            f"{summary.done_reason}"
        ),
        key=key,
        path=path,
        model=summary.model,
        done_reason=summary.done_reason,
        prompt_tokens=summary.prompt_tokens,
        completion_tokens=summary.completion_tokens,
        tokens_per_second=speed,
        load_seconds=summary.load_seconds,
        prompt_seconds=summary.prompt_seconds,
        eval_seconds=summary.eval_seconds,
        tokens_counted=summary.counted,
        prompt_estimated=summary.prompt_estimated,
    )


def _log_bodies(
    exchange: Exchange, path: str, redact: Callable[[str], str], now: float
) -> None:
    """
    Emit the event of a request's body samples, redacted.
    """
    request_body = _sample_text(exchange.request_sample, redact)
    response_body = _sample_text(exchange.response_sample, redact)
    _emit(
        bodies,
        now,
        f"{exchange.method} {path} request body: {request_body!r} "
        f"response body: {response_body!r}",
        method=exchange.method,
        path=path,
        key=exchange.key,
        request_body=request_body,
        response_body=response_body,
    )


# The start of a generated key at the very end of a text.
_CUT_KEY = re.compile(KEY_PREFIX + r"[0-9A-Za-z]*\Z")


def _sample_text(sample: bytes, redact: Callable[[str], str]) -> str:
    """
    A body sample as it is logged, redacted; a generated key that the
    sample's end cut in two (half a key matches no pattern) is blanked too.
    """
    return redact(_CUT_KEY.sub(REDACTED, sample.decode("utf-8", "replace")))


_COUNTED = " (counted from the stream: Ollama reported no usage)"
_ESTIMATED = " (prompt estimated from the request)"
#: The shortest wait in the queue the text line shows: what rounds to a
#: millisecond.
_SHOWN_WAIT = 0.0005


def _emit(logger: Logger, now: float, line: str, **fields: object) -> None:
    """
    Emit an event with its fields and its text, formatted here, once.

    Twisted formats an event's C{log_format} again for each text observer,
    with a formatter that allows calls in fields: about 40 microseconds for
    the access line, against 2 for C{str.format}.  So each observer is given
    the finished line as the format itself, its braces doubled (a format
    with no field costs Twisted's formatter a single parse), and the JSON
    file takes it as it is from the event's C{line}; the fields stay in the
    event for the JSON file.

    The event is made here and handed to the logger's observer, as
    L{Logger.emit} would make it, rather than through C{emit}, which checks
    the level by sorting every level, on each call: a third of the cost of an
    access line in the daemon, for a level known here.  Its time is C{now},
    when the request was written down, on the proxy's clock.
    """
    # Item by item: update() would be one more call per event.
    fields["line"] = line
    fields["log_logger"] = logger
    fields["log_level"] = LogLevel.info
    fields["log_namespace"] = logger.namespace
    fields["log_source"] = None
    fields["log_format"] = (
        line.replace("{", "{{").replace("}", "}}") if "{" in line or "}" in line else line
    )
    fields["log_time"] = now
    logger.observer(fields)


class _Redacting:
    """
    A log file that blanks anything looking like a credential before it is
    written: a second line of defence behind the events' own redaction, for
    text the proxy did not make (Twisted's messages, tracebacks).  It checks
    shapes and the keys known in clear, not the keys file's digests, which
    would cost a hash per word of every line.
    """

    def __init__(self, logfile: LogFile, redact: Callable[[str], str]) -> None:
        self._logfile = logfile
        self._redact = redact

    def write(self, text: str) -> None:
        self._logfile.write(self._redact(text))

    def flush(self) -> None:
        self._logfile.flush()


def text_file_observer(out: IO[str]) -> FileLogObserver:
    """
    Twisted's text log format (as L{twisted.logger.textFileLogObserver}
    writes it), with each second's time stamp worked out once rather than
    for every event: most of the cost of writing an access line, once the
    line itself is formatted.
    """
    stamps = _SecondStamps()
    return FileLogObserver(out, lambda event: formatEventAsClassicLogText(event, stamps))


class _SecondStamps:
    """
    Time stamps to the second, as Twisted writes them, remembered for the
    second they are in.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(when)
        return self._stamp


#: The names the JSON log gives the proxy's own events; any other event is
#: named by its logger's namespace (the module that logged it).
EVENT_NAMES = {
    access.namespace: "access",
    streams.namespace: "stream",
    bodies.namespace: "bodies",
}
#: Keys of an event that are Twisted's, not the event's own, besides its
#: C{log_*} ones: its observers for the old C{twisted.python.log} API add
#: them to the event itself, whichever observer runs first.  And C{line},
#: the proxy's events' text, which the record holds as C{text}.
_NOT_FIELDS = frozenset(
    {"message", "time", "system", "format", "isError", "failure", "why", "line"}
)


def json_file_observer(out: IO[str]) -> FileLogObserver:
    """
    The JSON log's format: one object a line, with the event's time
    (ISO 8601, UTC, to the millisecond), level, name and text, then its own
    fields; the traceback of an event that logs a failure.  None of
    Twisted's own keys: they are most of what Twisted's
    L{twisted.logger.jsonFileLogObserver} writes (the logger, the level's
    class, the flattened format fields), which no reader wants.  The
    schema is documented in C{docs/logging-and-metrics.md}.
    """
    stamps = _IsoStamps()
    encode = json.JSONEncoder(default=safe_str).encode

    def line(event: LogEvent) -> str:
        namespace = event.get("log_namespace", "-")
        record: dict[str, object] = {
            "time": stamps(event.get("log_time")),
            "level": event.get("log_level", LogLevel.info).name,
            "event": EVENT_NAMES.get(namespace, namespace),
            "text": (event["line"] if namespace in EVENT_NAMES and "line" in event
                     else formatEvent(event)),
        }
        for name, value in event.items():
            if not name.startswith("log_") and name not in _NOT_FIELDS:
                record[name] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        return encode(record) + "\n"

    return FileLogObserver(out, line)


class _IsoStamps:
    """
    ISO 8601 time stamps in UTC to the millisecond, each second's part
    worked out once for the second it is in.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = ""

    def __call__(self, when: float | None) -> str | None:
        if when is None:
            return None
        milliseconds = int(when * 1000)
        second, millisecond = divmod(milliseconds, 1000)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{millisecond:03d}Z"


class LogFilesService(Service):
    """
    While running, writes every log event at C{info} level or above to
    rotating text and JSON-lines files in a directory.

    @param directory: Where the files go; created if missing.
    @param publisher: The log publisher to observe (twisted's global one in
        the daemon).
    @param rotate_bytes: Size at which a file is rotated.
    @param backups: How many rotated files of each kind are kept.
    @param redact: Applied to every line written, as a last guard
        (L{blank_credentials}, or a L{ollamaproxy.record.redact.Redactor} with the
        keys known in clear).
    """

    def __init__(
        self,
        directory: str,
        publisher: LogPublisher,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        backups: int = DEFAULT_BACKUPS,
        redact: Callable[[str], str] = blank_credentials,
    ) -> None:
        self._redact = redact
        self._directory = directory
        self._publisher = publisher
        self._rotate_bytes = rotate_bytes
        self._backups = backups
        self._files: list[LogFile] = []
        self._observers: list[ILogObserver] = []

    def _open(self, name: str) -> LogFile:
        logfile = LogFile(
            name,
            self._directory,
            rotateLength=self._rotate_bytes,
            maxRotatedFiles=self._backups,
            defaultMode=0o640,
        )
        self._files.append(logfile)
        return logfile

    def startService(self) -> None:
        os.makedirs(self._directory, exist_ok=True)
        text = _Redacting(self._open("ollamaproxy.log"), self._redact)
        lines = _Redacting(self._open("ollamaproxy.json"), self._redact)
        self._observers = [
            FilteringLogObserver(
                observer,
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
            )
            for observer in (
                text_file_observer(cast(IO[str], text)),
                json_file_observer(cast(IO[str], lines)),
            )
        ]
        for observer in self._observers:
            self._publisher.addObserver(observer)
        Service.startService(self)

    def stopService(self) -> None:
        Service.stopService(self)
        for observer in self._observers:
            self._publisher.removeObserver(observer)
        for logfile in self._files:
            logfile.close()
        self._observers = []
        self._files = []
