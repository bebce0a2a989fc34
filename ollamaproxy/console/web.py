# -*- test-case-name: tests.console.test_web -*-
"""
The console's web side: the page, its static files, its JSON endpoints and
the live feed, all under C{/-/console/}.

Why there: C{/-/} can never be one of Ollama's routes (Ollama's router has
no such path, nor a parameter that could match it), so the console never
hides an Ollama route, on the proxy's own port, with no second endpoint to
configure or to secure.  (A C{/proxy/-/console/} path is not the console:
that prefix is another path to Ollama's API.)

Security model:

  - The page and its static files (HTML, CSS, JavaScript) hold no data and
    load without a key.  Every data endpoint and the feed need an admin key,
    sent as C{Authorization: Bearer} on each call, checked exactly as
    C{GET /metrics} is (wrong keys count towards the guess throttle); no
    key is 401, an inference key 403, both in C{{"error": ...}} shape.
  - The page asks for the key once and keeps it in C{sessionStorage}: for
    that tab only, gone when it closes.  There are no cookies at all, so a
    request another site makes the browser send carries no credential, and
    there is nothing for cross-site request forgery to ride.
  - Every response carries a Content-Security-Policy without inline script
    or style (the page's script and style are files of their own), denies
    framing (clickjacking), sends no referrer, forbids type sniffing, and
    is C{Cache-Control: no-store} (data must not stay in caches; the page is
    small).
  - No payload holds a key or a key's hash, nor a backend's credentials
    (L{ollamaproxy.console.views}).

The feed is one long C{GET} answered with NDJSON (one JSON object a line,
L{ollamaproxy.console.sampler}): the page reads it with C{fetch()}, which can
send the C{Authorization} header, where C{EventSource} cannot.  When the
page goes away, its connection closes, Klein cancels the handler, and the
subscriber is forgotten.  Its key is checked again at every sample: a key
revoked (or expired, or no longer admin) while the feed is open ends it
within a tick, and the page, reconnecting, is refused.

Console requests are the proxy's own, not Ollama's: what the console serves
is not written to the access log, as what C{/metrics} and C{/-/ready} serve
is not; what its data endpoints refuse is, with the auth-failure count
(L{ollamaproxy.web.gate}).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any, Final, Protocol

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ollamaproxy.admission.keys import KeyStore
from ollamaproxy.admission.quota_periods import window
from ollamaproxy.console.sampler import Sampler
from ollamaproxy.console.views import USAGE_COLUMNS, keys_view, usage_csv
from ollamaproxy.errors import ProxyError, reason_phrase
from ollamaproxy.record.usage_db import BUCKET_SECONDS, Bucket, SeriesRow
from ollamaproxy.routes import CONSOLE_ROUTE
from ollamaproxy.web.gate import Gate, keyed

log = Logger()

CONSOLE_PATH: Final = CONSOLE_ROUTE.pattern.encode("ascii")

CSP: Final = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS: Final[Mapping[bytes, bytes]] = {
    b"content-security-policy": CSP,
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"x-content-type-options": b"nosniff",
    b"cache-control": b"no-store",
    b"cross-origin-resource-policy": b"same-origin",
}

_TYPES: Final[Mapping[str, bytes]] = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
}
_JSON: Final = b"application/json; charset=utf-8"

#: The longest range of the usage view, by bucket: a year of days, a month
#: of hours.
MAX_RANGE_DAYS: Final[Mapping[str, int]] = {"day": 400, "hour": 31}


class UsageReader(Protocol):
    """
    What the console asks of the usage store, off the reactor thread.
    """

    def series(self, since: float, until: float, bucket: Bucket) -> Deferred[list[SeriesRow]]:
        """
        Requests and tokens per key and model, per hour or UTC day, from
        C{since} to C{until}.
        """

    def last_used(self) -> Deferred[dict[str, float]]:
        """
        When each key (by name) was last used, to the minute.
        """

    def tokens_by_key(self, since: float) -> Deferred[dict[str, int]]:
        """
        Tokens per key name since a time.
        """


def static_files() -> dict[str, tuple[bytes, bytes]]:
    """
    The page's files, shipped inside the package: name to content type and
    content.  Read once; only these names are served.
    """
    found: dict[str, tuple[bytes, bytes]] = {}
    folder = files("ollamaproxy.console") / "static"
    if not folder.is_dir():
        # Installed without its package data: the console answers 404.
        return found
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _TYPES:
            found[entry.name] = (_TYPES[suffix], entry.read_bytes())
    return found


class Console:
    """
    The operator console: a Klein app of its own, mounted by the proxy's
    app under C{/-/console/}.

    @param sampler: Feeds the Now and Backends views.
    @param keys: The keys, for the Keys view.
    @param usage: Reads usage for the Usage and Keys views, or L{None}
        without a usage store.
    @param gate: Checks a request's key for L{CONSOLE_ROUTE} (the proxy's
        own check, with its guess throttle): admin keys only, even if the
        route is opened.
    """

    app = Klein()

    def __init__(
        self,
        sampler: Sampler,
        keys: KeyStore,
        usage: UsageReader | None,
        clock: IReactorTime,
        gate: Gate,
    ) -> None:
        self.sampler = sampler
        self._keys = keys
        self._usage = usage
        self._clock = clock
        self.gate = gate
        self._static = static_files()

    def serve(self, request: IRequest) -> IResource:
        """
        The resource that answers a request under C{/-/console/}, with the
        console's security headers set.
        """
        request.responseHeaders.removeHeader(b"server")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        resource: IResource = self.app.resource()
        return resource

    def redirect(self, request: IRequest) -> bytes:
        """
        Answer C{/-/console} (no slash) with a redirect to the page, whose
        relative links need the slash.
        """
        self.serve(request)
        request.setResponseCode(301)
        request.setHeader(b"location", CONSOLE_PATH + b"/")
        return b""

    # The page: no data, no key.

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        return self._file(request, "index.html")

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        return self._file(request, name)

    def _file(self, request: IRequest, name: str) -> bytes:
        found = self._static.get(name)
        if found is None:
            raise ProxyError(404, "no such file")
        content_type, content = found
        request.setHeader(b"content-type", content_type)
        return content

    # The data: admin keys only.

    @app.route("/api/now", methods=["GET"])
    @keyed(CONSOLE_ROUTE, may_open=False)
    async def now(self, request: IRequest) -> bytes:
        """
        The Now and Backends views as of the last sample, with the totals'
        recent history.
        """
        return _json(request, {"now": self._clock.seconds(), **self.sampler.snapshot()})

    @app.route("/api/keys", methods=["GET"])
    @keyed(CONSOLE_ROUTE, may_open=False)
    async def keys(self, request: IRequest) -> bytes:
        """
        The Keys view.
        """
        now = self._clock.seconds()
        last_used: dict[str, float] = {}
        today: dict[str, int] = {}
        month: dict[str, int] = {}
        if self._usage is not None:
            last_used = await self._usage.last_used()
            today, month = await self._quota_use(now)
        return _json(request, {
            "now": now,
            "usage": self._usage is not None,
            "keys": keys_view(self._keys, now, last_used, today, month),
        })

    async def _quota_use(self, now: float) -> tuple[dict[str, int], dict[str, int]]:
        assert self._usage is not None
        today = await self._usage.tokens_by_key(window("day", now).start)
        month = await self._usage.tokens_by_key(window("month", now).start)
        return today, month

    @app.route("/api/usage", methods=["GET"])
    @keyed(CONSOLE_ROUTE, may_open=False)
    async def usage(self, request: IRequest) -> bytes:
        """
        The Usage view: per key and model, by hour or day, over a range
        (C{?from=YYYY-MM-DD&to=YYYY-MM-DD&bucket=day}, UTC, both days
        included), with each key's quota use.
        """
        since, until, bucket = _usage_range(request, self._clock.seconds())
        rows: list[SeriesRow] = []
        quotas: list[dict[str, Any]] = []
        if self._usage is not None:
            rows = await self._usage.series(since, until, bucket)
            today, month = await self._quota_use(self._clock.seconds())
            quotas = [
                {"name": key.name, "tokens_per_day": key.tokens_per_day,
                 "used_today": today.get(key.name, 0),
                 "tokens_per_month": key.tokens_per_month,
                 "used_this_month": month.get(key.name, 0)}
                for key in sorted(self._keys, key=lambda k: k.name)
                if key.tokens_per_day is not None or key.tokens_per_month is not None
            ]
        return _json(request, {
            "usage": self._usage is not None,
            "bucket": bucket, "from": since, "until": until,
            "columns": USAGE_COLUMNS,
            "rows": rows,
            "quotas": quotas,
        })

    @app.route("/api/usage.csv", methods=["GET"])
    @keyed(CONSOLE_ROUTE, may_open=False)
    async def usage_csv(self, request: IRequest) -> bytes:
        """
        The Usage view's rows as CSV, for a spreadsheet.
        """
        since, until, bucket = _usage_range(request, self._clock.seconds())
        rows = [] if self._usage is None else await self._usage.series(since, until, bucket)
        day = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d")
        request.setHeader(b"content-type", b"text/csv; charset=utf-8")
        request.setHeader(
            b"content-disposition",
            f'attachment; filename="ollamaproxy-usage-{day}-{bucket}.csv"'.encode("ascii"),
        )
        return usage_csv(rows)

    @app.route("/api/feed", methods=["GET"])
    @keyed(CONSOLE_ROUTE, may_open=False)
    async def feed(self, request: Request) -> None:
        """
        The live feed: NDJSON, one message a line, until the client goes
        away, the proxy stops, or the key no longer passes (revoked,
        expired, no longer admin), which the sampler asks at each tick.
        """
        request.setHeader(b"content-type", b"application/x-ndjson")
        # A buffering proxy in front (nginx) would hold the feed back.
        request.setHeader(b"x-accel-buffering", b"no")
        subscriber = self.sampler.subscribe(
            request.write, lambda: self.gate.holds(request, CONSOLE_ROUTE, may_open=False)
        )
        request.registerProducer(subscriber, True)
        try:
            await subscriber.ended
        finally:
            self.sampler.unsubscribe(subscriber)
            if getattr(request, "channel", None) is not None:
                request.unregisterProducer()

    # Errors: JSON, and no traceback.

    @app.handle_errors(ProxyError)
    def proxy_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ProxyError)
        for name, value in error.headers.items():
            request.setHeader(name, value)
        return _error(request, error.code, error.message)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _error(request, 404, "no such page in the console")

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        request.setHeader(b"allow", b"GET")
        return _error(request, 405, "the console answers GET only")

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        if failure.check(CancelledError):
            return b""
        log.failure("Unexpected error in the console", failure)
        return _error(request, 500, "internal error in the ollamaproxy console")


def _json(request: IRequest, document: Mapping[str, Any]) -> bytes:
    request.setHeader(b"content-type", _JSON)
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _error(request: IRequest, code: int, message: str) -> bytes:
    request.setResponseCode(code, reason_phrase(code))
    return _json(request, {"error": message})


def _arg(request: IRequest, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[-1].decode("utf-8", "replace") if values else None


def _usage_range(request: IRequest, now: float) -> tuple[float, float, Bucket]:
    """
    The range and bucket a usage request asks for: C{from} and C{to} are
    UTC days (C{YYYY-MM-DD}, both included; by default the last 7 days up
    to today), C{bucket} is C{hour} or C{day} (the default).

    @raise ProxyError: 400 for a value that is not one, a range that ends
        before it starts, or one longer than L{MAX_RANGE_DAYS}.
    """
    bucket_arg = _arg(request, b"bucket") or "day"
    if bucket_arg not in BUCKET_SECONDS:
        raise ProxyError(400, "bucket must be 'hour' or 'day'")
    bucket: Bucket = "hour" if bucket_arg == "hour" else "day"
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = _day(_arg(request, b"from"), today - timedelta(days=6), "from")
    last = _day(_arg(request, b"to"), today, "to")
    if last < first:
        raise ProxyError(400, "the range ends ('to') before it starts ('from')")
    days = (last - first).days + 1
    if days > MAX_RANGE_DAYS[bucket]:
        raise ProxyError(400, f"at most {MAX_RANGE_DAYS[bucket]} days by {bucket}")
    return first.timestamp(), (last + timedelta(days=1)).timestamp(), bucket


def _day(text: str | None, default: datetime, name: str) -> datetime:
    if text is None or text == "":
        return default
    try:
        day = datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise ProxyError(400, f"'{name}' must be a day, YYYY-MM-DD") from None
    return day.replace(tzinfo=UTC)
