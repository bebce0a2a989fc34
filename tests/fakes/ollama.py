# -*- test-case-name: tests.test_fake_ollama -*-
"""
A fake Ollama server for the proxy's tests, faithful to the wire formats in
the project's Ollama API notes (shared/ollama-api.md) (gin routing, the Host guard, NDJSON and SSE
streams, Ollama's error bodies).

L{FakeOllama} is a plain L{twisted.web.resource.Resource}, usable two ways:

  - B{In memory}::

        clock = Clock()
        fake = FakeOllama(clock)
        agent = RequestTraversalAgent(fake)   # from treq.testing
        client = HTTPClient(agent)            # or hand C{agent} to the proxy
        d = client.get("http://127.0.0.1:11434/api/tags")
        agent.flush()

    Call C{agent.flush()} after every step.  Time only passes when the test
    calls C{clock.advance(...)}: needed for C{fake_delay} and for streams
    longer than one batch (512 lines are written at once; the rest follow
    in C{callLater(0)} turns, so also call C{clock.advance(0)}).  treq's
    default body producer needs a running reactor: give C{HTTPClient} a
    C{data_to_body_producer} that writes synchronously (see
    C{tests/test_fake_ollama.py}).

  - B{Over real sockets}::

        fake = FakeOllama(reactor)
        port = reactor.listenTCP(0, Site(fake), interface="127.0.0.1")

    Large streams are written by a push producer that honours the
    transport's back-pressure and yields to the reactor between batches.

The request decides how the answer streams: C{options.num_predict} (or
C{max_tokens} on C{/v1}) is the number of tokens, default 5, named
C{"tok0 "}, C{"tok1 "}, ...; C{options.fake_delay} (or top-level
C{fake_delay}) is the number of seconds between lines (for C{"stream":
false}, the whole answer comes after C{tokens * fake_delay}).  Special model
names, valid on chat, generate and both C{/v1} completion routes:
C{"hold"} (head sent, then the test drives the body through a L{HeldStream}
in C{fake.held}), C{"slowhead"} (the same, but not even the head is sent),
C{"broken"} (2 tokens, then Ollama's mid-stream error line, then a clean
end of the response, as Ollama does).

Every request is recorded in C{fake.received}; C{fake.connections_lost}
counts responses whose connection the peer closed before they finished.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Literal, Protocol, cast

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from ollamaproxy.backends.upstream import BytesProducer

VERSION = "0.33.0"
DEFAULT_TOKENS = 5
#: The GPU seconds a final object reports (C{prompt_eval_duration},
#: C{eval_duration}), per prompt token and per token generated: in
#: proportion, as a real GPU's (prefill thousands a second, decode tens),
#: so that the fair queue's C{--fair-share gpu-time} has seconds to share.
PROMPT_EVAL_NS = 250_000
EVAL_NS = 20_000_000
#: The context Ollama loads a model with when a request names none.
DEFAULT_CONTEXT = 4096
MODEL_ERROR = "an error was encountered while running the model"
HOLD, SLOWHEAD, BROKEN = "hold", "slowhead", "broken"

_BATCH = 512
_JSON = b"application/json; charset=utf-8"
_V1_JSON = b"application/json"
_NDJSON = b"application/x-ndjson"
_SSE = b"text/event-stream"
_MODIFIED_AT = "2025-01-01T12:00:00.123456789Z"
_MODIFIED_UNIX = 1735732800
_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
_GO_ESCAPE = re.compile("[<>&\u2028\u2029]")
_PRIVATE = tuple(ipaddress.ip_network(n) for n in
                 ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))

_Api = Literal["chat", "generate", "v1chat", "v1completions"]


class WebRequest(Protocol):
    """
    The parts of L{twisted.web.server.Request} that the fake uses, typed
    (Twisted leaves most of them unannotated).
    """

    method: bytes
    uri: bytes
    path: bytes
    postpath: list[bytes]
    content: IO[bytes]
    requestHeaders: Headers
    responseHeaders: Headers
    channel: Any
    defaultContentType: bytes | None

    def getHeader(self, key: bytes) -> bytes | None: ...
    def setHeader(self, name: bytes, value: bytes) -> None: ...
    def setResponseCode(self, code: int) -> None: ...
    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def notifyFinish(self) -> Deferred[None]: ...


def _dumps(obj: object) -> bytes:
    """
    Encode like Go's C{json.Marshal}: compact, UTF-8, HTML characters escaped.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if _GO_ESCAPE.search(text):
        text = _GO_ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text.encode("utf-8")


def _ndjson(obj: object) -> bytes:
    """
    One NDJSON line.
    """
    return _dumps(obj) + b"\n"


def _sse(obj: object) -> bytes:
    """
    One server-sent event carrying C{obj}.
    """
    return b"data: " + _dumps(obj) + b"\n\n"


def _rfc3339nano(seconds: float, cache: list[tuple[int, str]] | None = None) -> str:
    """
    Format a POSIX time as Go's C{time.RFC3339Nano} in UTC.

    @param cache: A one-slot memo of the whole-second part, for speed.
    """
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    whole, nanos = whole + nanos // 1_000_000_000, nanos % 1_000_000_000
    if cache and cache[0][0] == whole:
        stamp = cache[0][1]
    else:
        stamp = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        if cache is not None:
            cache[:] = [(whole, stamp)]
    return stamp + f".{nanos:09d}".rstrip("0").rstrip(".") + "Z"


def _canonical(model: str) -> str:
    """
    Ollama's name normalisation: a missing tag means C{:latest}.
    """
    return model if ":" in model.rsplit("/", 1)[-1] else model + ":latest"


def _host_kind(host: bytes | None) -> str | None:
    """
    Ollama's C{allowedHostsMiddleware} verdict on a Host header.

    @return: C{"ip"} for an allowed IP literal, C{"name"} for an allowed name,
        L{None} if the request must be refused.  (Addresses of the machine's
        non-loopback interfaces are not recognised.)
    """
    text = (host or b"").decode("latin-1").strip().lower()
    match = re.fullmatch(r"\[([^\]]*)\]:\d*|([^:]*):\d*", text)
    name = (match.group(1) or match.group(2) or "") if match else text
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        if (name in ("", "localhost", socket.gethostname().lower())
                or name.endswith((".localhost", ".local", ".internal"))):
            return "name"
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_unspecified or any(
            address in net for net in _PRIVATE if net.version == address.version):
        return "ip"
    return None


class _Reply(Exception):
    """
    A complete, non-streamed response, raised by handlers to answer early.
    """

    def __init__(self, code: int, body: bytes = b"", content_type: bytes | None = None) -> None:
        super().__init__(code)
        self.code, self.body, self.content_type = code, body, content_type


def _error(code: int, message: str) -> _Reply:
    """
    Ollama's native error: C{{"error":"..."}} via gin's C{c.JSON}.
    """
    return _Reply(code, _dumps({"error": message}), _JSON)


def _v1_error(code: int, message: str, *, middleware: bool = False) -> _Reply:
    """
    The OpenAI-shaped error of C{/v1}: from a middleware it goes through
    C{AbortWithStatusJSON} (charset, no newline), from the writer through
    C{json.Encoder} (no charset, trailing newline).
    """
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(code, "api_error")
    obj = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    if middleware:
        return _Reply(code, _dumps(obj), _JSON)
    return _Reply(code, _ndjson(obj), _V1_JSON)


@dataclass(frozen=True)
class ReceivedRequest:
    """
    One request as the fake received it.

    @ivar uri: Raw path and query, exactly as received.
    @ivar headers: A copy of the request headers.
    @ivar body: The body; always C{b""} for C{/api/blobs/} uploads, which are
        only measured and hashed.
    @ivar body_length: Length of the body in bytes.
    @ivar body_sha256: Hex SHA-256 of the body.
    """

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    body_length: int
    body_sha256: str

    def json(self) -> Any:
        """
        @return: The body decoded as JSON.
        """
        return json.loads(self.body)


_Handler = Callable[[WebRequest, ReceivedRequest, str], "bytes | int"]


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """
    The request's C{options} object, or an empty one.
    """
    options = body.get("options")
    return options if isinstance(options, dict) else {}


def _fake_delay(body: dict[str, Any]) -> float:
    """
    Seconds between lines: C{options.fake_delay}, else top-level C{fake_delay}.
    """
    value = _options(body).get("fake_delay", body.get("fake_delay", 0))
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _error(400, f"invalid fake_delay {value!r}") from None


@dataclass(frozen=True)
class _Job:
    """
    What an inference request asked for.
    """

    api: _Api
    model: str
    tokens: int
    reason: str
    delay: float
    stream: bool
    usage: bool
    prompt_tokens: int


@implementer(IPushProducer)
class _LineStream:
    """
    Writes a lazily generated sequence of chunks to a request, one C{write}
    per chunk: one per turn (then C{delay} seconds) when C{delay} is set, else
    in batches separated by C{callLater(0)}, stopping while the transport
    asks it to pause.  Finishes the request after the last chunk.
    """

    def __init__(self, fake: FakeOllama, request: WebRequest, lines: Iterator[bytes],
                 delay: float, first_delay: float = 0.0) -> None:
        self._fake, self._request, self._lines = fake, request, lines
        self._delay, self._first_delay = delay, first_delay
        self._call: IDelayedCall | None = None
        self._pending: bytes | None = None
        self._paused = self._stopped = False

    def start(self, *, track: bool = True) -> None:
        """
        Register as the request's producer and write the first batch now.

        @param track: Count a lost connection in L{FakeOllama.connections_lost}
            (off when a L{HeldStream} already does).
        """
        if track:
            self._request.notifyFinish().addErrback(self._lost)
        self._request.registerProducer(self, True)
        self._pending = next(self._lines, None)
        if self._pending is None:
            self._end()
        elif self._first_delay > 0:
            self._schedule(self._first_delay)
        else:
            self._pump()

    def _schedule(self, seconds: float) -> None:
        self._call = self._fake.clock.callLater(seconds, self._pump)

    def _pump(self) -> None:
        self._call = None
        budget = 1 if self._delay > 0 else _BATCH
        while self._pending is not None and not (self._paused or self._stopped):
            self._request.write(self._pending)
            self._pending = next(self._lines, None)
            budget -= 1
            if self._pending is None:
                self._end()
            elif budget == 0:
                break
        if self._pending is not None and not (self._paused or self._stopped):
            self._schedule(self._delay)

    def _end(self) -> None:
        if self._stopped:
            return
        self.stopProducing()
        self._request.unregisterProducer()
        self._request.finish()

    def pauseProducing(self) -> None:
        """
        The transport's buffer is full: stop writing.
        """
        self._paused = True

    def resumeProducing(self) -> None:
        """
        The transport drained: carry on.
        """
        self._paused = False
        if self._call is None and not self._stopped:
            self._schedule(self._delay)

    def stopProducing(self) -> None:
        """
        Write nothing more.
        """
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _lost(self, reason: Failure) -> None:
        self.stopProducing()
        self._fake.connections_lost += 1


class HeldStream:
    """
    A response the test writes by hand (models C{"hold"} and C{"slowhead"}).

    @ivar request: The server-side request.
    @ivar head_sent: Whether the status line and headers went out.
    @ivar finished: Whether L{finish} completed the response.
    @ivar disconnected: Fires with L{None} if the peer (the proxy) closes the
        connection before the response finished; never fires otherwise, nor
        after L{abort}.
    """

    def __init__(self, fake: FakeOllama, request: WebRequest, job: _Job) -> None:
        self._fake, self.request, self._job = fake, request, job
        self._sse = job.api.startswith("v1")
        self._aborted = self._released = False
        self._stream: _LineStream | None = None
        self.head_sent = self.finished = False
        self.disconnected: Deferred[None] = Deferred()
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, reason: Failure) -> None:
        if self._stream is not None:
            self._stream.stopProducing()
        if not self._aborted:
            self._fake.connections_lost += 1
            self.disconnected.callback(None)

    @property
    def gone(self) -> bool:
        """
        Whether nothing more can be written by hand (finished, released,
        aborted or lost).
        """
        return self.finished or self._released or self._aborted or self.disconnected.called

    def send_head(self, code: int = 200, content_type: bytes | None = None) -> None:
        """
        Send the status line and headers now, without body bytes.

        @param content_type: Defaults to the stream's type (NDJSON on
            C{/api}, C{text/event-stream} on C{/v1}).
        """
        if self.head_sent:
            raise RuntimeError("head already sent")
        self.head_sent = True
        self.request.setResponseCode(code)
        self.request.setHeader(b"content-type", content_type or (_SSE if self._sse else _NDJSON))
        self.request.write(b"")

    def write_line(self, obj: dict[str, Any]) -> None:
        """
        Write one object framed like the route does: C{json + "\\n"} on
        C{/api}, C{"data: " + json + "\\n\\n"} on C{/v1}.
        """
        self.write_raw(_sse(obj) if self._sse else _ndjson(obj))

    def write_raw(self, data: bytes) -> None:
        """
        Write bytes as they are (sending the head first if needed).
        """
        if self.gone:
            return
        if not self.head_sent:
            self.send_head()
        self.request.write(data)

    def finish(self) -> None:
        """
        End the response properly (sending the head first if needed).
        """
        if self.gone:
            return
        if not self.head_sent:
            self.send_head()
        self.finished = True
        self.request.finish()

    def abort(self) -> None:
        """
        Drop the TCP connection abruptly, mid-body (also after L{release}).
        """
        if self._aborted or self.finished or self.disconnected.called:
            return
        self._aborted = True
        channel = self.request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def release(self) -> None:
        """
        Let the request continue as an ordinary streamed answer (its tokens,
        C{fake_delay} and final line), sending the head first if needed.
        """
        if self.gone:
            return
        if not self.head_sent:
            self.head_sent = True
            self.request.setHeader(b"content-type", _SSE if self._sse else _NDJSON)
        self._released = True
        self._stream = _LineStream(self._fake, self.request,
                                   self._fake._lines(self._job, False), self._job.delay)
        self._stream.start(track=False)


class FakeOllama(Resource):
    """
    An in-process Ollama.  See the module docstring.

    @ivar clock: Schedules delayed and batched writes.
    @ivar models: Installed model names (as in C{/api/tags}); pull, create,
        copy and delete change it.
    @ivar check_host: Whether the Host guard applies.
    @ivar version: What C{/api/version} reports.
    @ivar blobs: Digests (C{sha256:<hex>}) uploaded so far.
    @ivar received: Every request, in order.
    @ivar held: The L{HeldStream}s of C{"hold"}/C{"slowhead"} requests.
    @ivar connections_lost: How many requests lost their connection (closed
        by the peer) before their response finished.
    """

    isLeaf = True

    def __init__(self, clock: IReactorTime, *,
                 models: Sequence[str] = ("llama3.2:latest", "mistral:latest"),
                 check_host: bool = True) -> None:
        self.children = {}  # what Resource.__init__ (unannotated) does
        self.clock = clock
        self.models: list[str] = [_canonical(m) for m in models]
        self.check_host = check_host
        self.version = VERSION
        self.blobs: set[str] = set()
        self.received: list[ReceivedRequest] = []
        # The proxy's own requests (start-up probe, health and model
        # checks), told by their User-Agent, apart from the clients'.
        self.checks: list[ReceivedRequest] = []
        self.held: list[HeldStream] = []
        self.connections_lost = 0
        self._loaded: list[str] = []
        #: The context each loaded model's runner was loaded with.
        self.contexts: dict[str, int] = {}
        #: Each model load, with its context, in order: one for a model's
        #: first request and one for each change of C{num_ctx} (a reload,
        #: as Ollama's scheduler does).
        self.loads: list[tuple[str, int]] = []
        self._ids = itertools.count()
        self._stamps: list[tuple[int, str]] = []
        both = (b"GET", b"HEAD")
        table: list[tuple[bytes, tuple[bytes, ...], _Handler]] = [
            (b"/", both, self._root),
            (b"/api/version", both, self._version),
            (b"/api/tags", both, self._tags),
            (b"/api/ps", (b"GET",), self._ps),
            (b"/api/show", (b"POST",), self._show),
            (b"/api/chat", (b"POST",), self._inference("chat")),
            (b"/api/generate", (b"POST",), self._inference("generate")),
            (b"/api/embed", (b"POST",), self._embed),
            (b"/api/embeddings", (b"POST",), self._embed),
            (b"/api/pull", (b"POST",), self._progress),
            (b"/api/push", (b"POST",), self._progress),
            (b"/api/create", (b"POST",), self._progress),
            (b"/api/copy", (b"POST",), self._copy),
            (b"/api/delete", (b"DELETE",), self._delete),
            (b"/api/blobs/:digest", (b"HEAD",), self._blob_head),
            (b"/api/blobs/:digest", (b"POST",), self._blob_post),
            (b"/v1/models", (b"GET",), self._v1_models),
            (b"/v1/chat/completions", (b"POST",), self._inference("v1chat")),
            (b"/v1/completions", (b"POST",), self._inference("v1completions")),
        ]
        self._routes: dict[bytes, dict[bytes, _Handler]] = {}
        for path, methods, handler in table:
            for method in methods:
                self._routes.setdefault(path, {})[method] = handler

    # -- dispatch -----------------------------------------------------------

    def _route(self, path: bytes) -> tuple[dict[bytes, _Handler], str] | None:
        if path in self._routes:
            return self._routes[path], ""
        prefix, _, param = path.rpartition(b"/")
        if prefix == b"/api/blobs" and param:
            return self._routes[b"/api/blobs/:digest"], param.decode("utf-8", "replace")
        return None

    def render(self, request: object) -> bytes | int:
        """
        Record the request, then route it the way gin does: trailing-slash
        redirect, then the Host guard, then 404/405 or the handler.

        @param request: A L{twisted.web.server.Request}.
        """
        return self._render(cast(WebRequest, request))

    def _render(self, request: WebRequest) -> bytes | int:
        request.responseHeaders.removeHeader(b"server")
        path = b"/" + b"/".join(request.postpath)
        record = self._record(request, path.startswith(b"/api/blobs/"))
        agent = request.requestHeaders.getRawHeaders(b"user-agent", [b""])[0]
        (self.checks if agent.startswith(b"ollamaproxy/") else self.received).append(record)
        found = self._route(path)
        if found is None and path.endswith(b"/") and path != b"/":
            bare = self._route(path[:-1])
            if bare is not None and request.method in bare[0]:
                return self._redirect(request)
        if self.check_host:
            kind = _host_kind(request.getHeader(b"host"))
            if kind is None:
                return self._send(request, _Reply(403))
            if kind == "name" and request.method == b"OPTIONS":
                return self._send(request, _Reply(204))
        if found is None:
            return self._send(request, _Reply(404, b"404 page not found", b"text/plain"))
        handler = found[0].get(request.method)
        if handler is None:
            return self._send(request, _Reply(405, b"405 method not allowed", b"text/plain"))
        try:
            return handler(request, record, found[1])
        except _Reply as reply:
            return self._send(request, reply)

    def _record(self, request: WebRequest, blob: bool) -> ReceivedRequest:
        digest, length, chunks = hashlib.sha256(), 0, []
        content = request.content
        content.seek(0)
        while chunk := content.read(1 << 20):
            digest.update(chunk)
            length += len(chunk)
            if not blob:
                chunks.append(chunk)
        content.seek(0)
        return ReceivedRequest(request.method, request.uri, request.requestHeaders.copy(),
                               b"".join(chunks), length, digest.hexdigest())

    def _send(self, request: WebRequest, reply: _Reply) -> bytes:
        request.setResponseCode(reply.code)
        if reply.content_type is None:
            request.defaultContentType = None
        else:
            request.setHeader(b"content-type", reply.content_type)
        return reply.body

    def _redirect(self, request: WebRequest) -> bytes:
        """
        gin's C{RedirectTrailingSlash} through Go's C{http.Redirect}.
        """
        _, question, query = request.uri.partition(b"?")
        location = request.path[:-1] + question + query
        request.setHeader(b"location", location)
        if request.method != b"GET":
            return self._send(request, _Reply(307))
        html = b'<a href="%s">Moved Permanently</a>.\n\n' % (location.replace(b'"', b"&#34;"),)
        return self._send(request, _Reply(301, html, b"text/html; charset=utf-8"))

    # -- helpers ------------------------------------------------------------

    def _json(self, rec: ReceivedRequest, go_type: str, *, v1: bool = False) -> dict[str, Any]:
        """
        Decode a request body as gin's C{ShouldBindJSON} would, raising
        Ollama's 400 (approximating Go's decoder messages).
        """
        def fail(message: str) -> _Reply:
            return _v1_error(400, message, middleware=True) if v1 else _error(400, message)

        text = rec.body.decode("utf-8", "replace")
        if not text.strip():
            raise fail("EOF" if v1 else "missing request body")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            if e.pos >= len(text.rstrip()):
                raise fail("unexpected EOF") from None
            char = text[e.pos]
            raise fail(f"invalid character {char!r} looking for beginning of value") from None
        if not isinstance(value, dict):
            kind = {list: "array", str: "string", bool: "bool", type(None): "null"}.get(
                type(value), "number")
            raise fail(f"json: cannot unmarshal {kind} into Go value of type {go_type}")
        return value

    def _known(self, model: str) -> bool:
        name = _canonical(model)
        return name in self.models or name.split(":")[0] in (HOLD, SLOWHEAD, BROKEN)

    def _now(self) -> str:
        return _rfc3339nano(self.clock.seconds(), self._stamps)

    def _details(self, name: str) -> dict[str, Any]:
        family = re.sub(r"[^a-z].*", "", name.rsplit("/", 1)[-1]) or "llama"
        return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}

    def _describe(self, name: str, *, modified: bool = False) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode()).hexdigest()
        head = {"name": name, "model": name, **({"modified_at": _MODIFIED_AT} if modified else {})}
        return {**head, "size": 2_000_000_000 + int(digest[:6], 16), "digest": digest,
                "details": self._details(name)}

    # -- read-only routes ---------------------------------------------------

    def _root(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes:
        return self._send(request, _Reply(200, b"Ollama is running", b"text/plain; charset=utf-8"))

    def _version(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes:
        return self._send(request, _Reply(200, _dumps({"version": self.version}), _JSON))

    def _tags(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes:
        models = [self._describe(name, modified=True) for name in self.models]
        return self._send(request, _Reply(200, _dumps({"models": models}), _JSON))

    def _ps(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes:
        expires = _rfc3339nano(self.clock.seconds() + 300)
        models = [self._running(name, expires) for name in self._loaded]
        return self._send(request, _Reply(200, _dumps({"models": models}), _JSON))

    def _running(self, name: str, expires: str) -> dict[str, Any]:
        """
        C{name} as /api/ps lists a loaded model: all in VRAM, until C{expires}.
        """
        described = self._describe(name)
        return {**described, "expires_at": expires, "size_vram": described["size"],
                "context_length": self.contexts.get(name, DEFAULT_CONTEXT)}

    def _show(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes:
        body = self._json(rec, "api.ShowRequest")
        model = str(body.get("model") or body.get("name") or "")
        if not model:
            raise _error(400, "model is required")
        if not self._known(model):
            raise _error(404, f"model '{model}' not found")
        details = self._details(_canonical(model))
        show = {"license": "fake license", "modelfile": f"FROM {_canonical(model)}\n",
                "parameters": "stop \"<|eot_id|>\"", "template": "{{ .Prompt }}",
                "details": details,
                "model_info": {"general.architecture": details["family"],
                               "general.parameter_count": 3212749888},
                "capabilities": ["completion", "tools"], "modified_at": _MODIFIED_AT}
        return self._send(request, _Reply(200, _dumps(show), _JSON))

    def _v1_models(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes:
        data = [{"id": n, "object": "model", "created": _MODIFIED_UNIX,
                 "owned_by": n.split("/")[0] if "/" in n else "library"} for n in self.models]
        body = {"object": "list", "data": data or None}
        return self._send(request, _Reply(200, _ndjson(body), _V1_JSON))

    # -- inference ----------------------------------------------------------

    def _inference(self, api: _Api) -> _Handler:
        def handler(request: WebRequest, rec: ReceivedRequest, param: str) -> bytes | int:
            return self._infer(request, rec, api)
        return handler

    def _infer(self, request: WebRequest, rec: ReceivedRequest, api: _Api) -> bytes | int:
        v1 = api.startswith("v1")
        go_type = {"chat": "api.ChatRequest", "generate": "api.GenerateRequest",
                   "v1chat": "openai.ChatCompletionRequest",
                   "v1completions": "openai.CompletionRequest"}[api]
        body = self._json(rec, go_type, v1=v1)
        model = str(body.get("model") or "")
        options = _options(body)
        if api == "v1chat" and not body.get("messages"):
            raise _v1_error(400, "[] is too short - 'messages'", middleware=True)
        if api == "chat" and not model:
            raise _error(400, "model is required")
        if not self._known(model):
            message = f"model '{model}' not found"
            raise _v1_error(404, message) if v1 else _error(404, message)
        limit = body.get("max_tokens") if v1 else None
        if limit is None:
            limit = options.get("num_predict")
        try:
            tokens = int(limit) if limit is not None and int(limit) >= 0 else DEFAULT_TOKENS
        except (TypeError, ValueError):
            raise _error(400, f"invalid token limit {limit!r}") from None
        delay = _fake_delay(body)
        prompt = [body.get("prompt")] + [m.get("content") for m in body.get("messages") or []
                                         if isinstance(m, dict)]
        stream_options = body.get("stream_options")
        job = _Job(api, model, tokens, "stop" if limit is None else "length", delay,
                   not v1 if body.get("stream") is None else bool(body["stream"]),
                   isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
                   sum(len(p.split()) for p in prompt if isinstance(p, str)))
        name = _canonical(model)
        base = name.split(":")[0]
        if api in ("chat", "generate") and not (body.get("messages") or body.get("prompt")):
            return self._load(request, job, body.get("keep_alive"))
        sent = body.get("options")
        asked = sent.get("num_ctx") if isinstance(sent, dict) else None
        self.load(name, asked if isinstance(asked, int) else DEFAULT_CONTEXT)
        if base in (HOLD, SLOWHEAD):
            held = HeldStream(self, request, job)
            self.held.append(held)
            if base == HOLD:
                held.send_head()
            return NOT_DONE_YET
        if job.stream:
            request.setHeader(b"content-type", _SSE if v1 else _NDJSON)
            _LineStream(self, request, self._lines(job, base == BROKEN), delay).start()
            return NOT_DONE_YET
        if base == BROKEN:
            raise _v1_error(500, MODEL_ERROR) if v1 else _error(500, MODEL_ERROR)
        whole = _ndjson(self._whole(job)) if v1 else _dumps(self._whole(job))
        request.setHeader(b"content-type", _V1_JSON if v1 else _JSON)
        if delay <= 0:
            return whole
        request.setHeader(b"content-length", b"%d" % len(whole))
        _LineStream(self, request, iter([whole]), 0, first_delay=tokens * delay).start()
        return NOT_DONE_YET

    def load(self, model: str, context: int = 0) -> None:
        """
        Have C{model} loaded with C{context} (Ollama's default, 4096, if
        0), loading it again if it ran with another: the reload a change of
        C{num_ctx} costs.
        """
        name, context = _canonical(model), context or DEFAULT_CONTEXT
        if name in self._loaded and self.contexts.get(name) == context:
            return
        if name not in self._loaded:
            self._loaded.append(name)
        self.contexts[name] = context
        self.loads.append((name, context))

    def _load(self, request: WebRequest, job: _Job, keep_alive: Any) -> bytes:
        """
        An empty prompt or message list only loads (or unloads) the model.
        """
        name = _canonical(job.model)
        unload = keep_alive is not None and str(keep_alive) in ("0", "0s", "0m", "0.0")
        if unload and name in self._loaded:
            self._loaded.remove(name)
        elif not unload and name not in self._loaded:
            self._loaded.append(name)
        obj = self._api_chunk(job, "", done=True)
        obj["done_reason"] = "unload" if unload else "load"
        return self._send(request, _Reply(200, _dumps(obj), _JSON))

    def _api_chunk(self, job: _Job, text: str, *, done: bool) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": job.model, "created_at": self._now()}
        if job.api == "chat":
            obj["message"] = {"role": "assistant", "content": text}
        else:
            obj["response"] = text
        obj["done"] = done
        return obj

    def _final(self, job: _Job, text: str) -> dict[str, Any]:
        obj = {**self._api_chunk(job, text, done=True), "done_reason": job.reason}
        if job.api == "generate":
            obj["context"] = [1, 2, 3]
        return {**obj, "total_duration": 512345678, "load_duration": 12345678,
                "prompt_eval_count": job.prompt_tokens,
                "prompt_eval_duration": job.prompt_tokens * PROMPT_EVAL_NS,
                "eval_count": job.tokens, "eval_duration": job.tokens * EVAL_NS}

    def _usage(self, job: _Job) -> dict[str, int]:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.tokens,
                "total_tokens": job.prompt_tokens + job.tokens}

    def _v1_head(self, job: _Job) -> dict[str, Any]:
        prefix = "chatcmpl" if job.api == "v1chat" else "cmpl"
        return {"id": f"{prefix}-{next(self._ids) % 999}",
                "object": "chat.completion" if job.api == "v1chat" else "text_completion",
                "created": int(self.clock.seconds()), "model": job.model,
                "system_fingerprint": "fp_ollama"}

    def _whole(self, job: _Job) -> dict[str, Any]:
        """
        The single object of a C{"stream": false} answer.
        """
        text = "".join(f"tok{i} " for i in range(job.tokens))
        if not job.api.startswith("v1"):
            return self._final(job, text)
        if job.api == "v1chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": job.reason}
        else:
            choice = {"text": text, "index": 0, "finish_reason": job.reason}
        return {**self._v1_head(job), "choices": [choice], "usage": self._usage(job)}

    def _lines(self, job: _Job, broken: bool) -> Iterator[bytes]:
        """
        The chunks of a streamed answer, generated one at a time.
        """
        count = min(job.tokens, 2) if broken else job.tokens
        if not job.api.startswith("v1"):
            for i in range(count):
                yield _ndjson(self._api_chunk(job, f"tok{i} ", done=False))
            yield _ndjson({"error": MODEL_ERROR} if broken else self._final(job, ""))
            return
        head = self._v1_head(job)
        chat = job.api == "v1chat"
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta = {} if text is None else (
                    {"role": "assistant", "content": text} if first else {"content": text})
                return _sse({**head, "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish}]})
            obj = {"id": head["id"], "object": head["object"], "created": head["created"],
                   "choices": [{"text": text or "", "index": 0, "finish_reason": finish}],
                   "model": job.model, "system_fingerprint": "fp_ollama"}
            return _sse({**obj, "usage": zero} if job.usage else obj)

        for i in range(count):
            yield chunk(f"tok{i} ", None, first=i == 0)
        if broken:
            yield chunk("", None, first=count == 0)
            return
        yield chunk(None, job.reason)
        if job.usage:
            usage = {**head, "choices": [], "usage": self._usage(job)}
            if not chat:
                usage = {k: usage[k] for k in ("id", "object", "created", "choices", "model",
                                               "system_fingerprint", "usage")}
            yield _sse(usage)
        yield b"data: [DONE]\n\n"

    # -- embeddings ---------------------------------------------------------

    def _embed(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes:
        legacy = request.path.endswith(b"/embeddings")
        body = self._json(rec, "api.EmbeddingRequest" if legacy else "api.EmbedRequest")
        model = str(body.get("model") or "")
        if not self._known(model):
            raise _error(404, f'model "{model}" not found, try pulling it first')

        def vector(text: str) -> list[float]:
            raw = hashlib.sha256(text.encode()).digest()
            return [round(b / 127.5 - 1, 6) for b in raw[:4]]

        if legacy:
            prompt = str(body.get("prompt") or "")
            obj: dict[str, Any] = {"embedding": vector(prompt) if prompt else []}
        else:
            value = body.get("input")
            if value is not None and not isinstance(value, str | list):
                raise _error(400, "invalid input type")
            inputs = [value] if isinstance(value, str) else list(value or [])
            obj = {"model": model, "embeddings": [vector(str(t)) for t in inputs],
                   "total_duration": 14143917, "load_duration": 1019500,
                   "prompt_eval_count": sum(len(str(t).split()) for t in inputs)}
        return self._send(request, _Reply(200, _dumps(obj), _JSON))

    # -- model management ---------------------------------------------------

    def _progress(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes | int:
        """
        C{/api/pull}, C{/api/push} and C{/api/create}: NDJSON progress.
        """
        verb = request.path.rsplit(b"/", 1)[-1].decode()
        body = self._json(rec, f"api.{verb.capitalize()}Request")
        model = str(body.get("model") or body.get("name") or "")
        if not model:
            raise _error(400, "model is required" if verb != "create" else "invalid model name")
        digest = hashlib.sha256(model.encode()).hexdigest()
        total = 2_000_000_000 + int(digest[:6], 16)
        plans: dict[str, list[dict[str, Any]]] = {
            "pull": [{"status": "pulling manifest"},
                     {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                      "total": total, "completed": 0},
                     {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                      "total": total, "completed": total},
                     {"status": "verifying sha256 digest"}, {"status": "writing manifest"}],
            "push": [{"status": "retrieving manifest"}, {"status": "starting upload"},
                     {"status": f"pushing {digest[:12]}", "digest": f"sha256:{digest}",
                      "total": total, "completed": total},
                     {"status": "pushing manifest"}],
            "create": [{"status": f"using existing layer sha256:{digest}"},
                       {"status": "writing manifest"}],
        }
        steps = [*plans[verb], {"status": "success"}]
        if verb != "push" and _canonical(model) not in self.models:
            self.models.append(_canonical(model))
        if body.get("stream") is False:
            return self._send(request, _Reply(200, _dumps(steps[-1]), _JSON))
        request.setHeader(b"content-type", _NDJSON)
        _LineStream(self, request, (_ndjson(s) for s in steps), _fake_delay(body)).start()
        return NOT_DONE_YET

    def _copy(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes:
        body = self._json(rec, "api.CopyRequest")
        source, destination = str(body.get("source") or ""), str(body.get("destination") or "")
        if not source:
            raise _error(400, f'source "{source}" is invalid')
        if not destination:
            raise _error(400, f'destination "{destination}" is invalid')
        if _canonical(source) not in self.models:
            raise _error(404, f'model "{source}" not found')
        if _canonical(destination) not in self.models:
            self.models.append(_canonical(destination))
        return self._send(request, _Reply(200))

    def _delete(self, request: WebRequest, rec: ReceivedRequest, param: str) -> bytes:
        body = self._json(rec, "api.DeleteRequest")
        model = str(body.get("model") or body.get("name") or "")
        if not model:
            raise _error(400, 'name "" is invalid')
        if _canonical(model) not in self.models:
            raise _error(404, f"model '{model}' not found")
        self.models.remove(_canonical(model))
        return self._send(request, _Reply(200))

    def _blob_head(self, request: WebRequest, rec: ReceivedRequest, digest: str) -> bytes:
        if not _DIGEST.match(digest):
            raise _error(400, "invalid digest format")
        if "sha256:" + digest[7:].lower() not in self.blobs:
            raise _error(404, f'blob "{digest}" not found')
        return self._send(request, _Reply(200))

    def _blob_post(self, request: WebRequest, rec: ReceivedRequest, digest: str) -> bytes:
        if not _DIGEST.match(digest):
            raise _error(400, "invalid digest format")
        canonical = "sha256:" + digest[7:].lower()
        if canonical in self.blobs:
            return self._send(request, _Reply(200))
        got = "sha256:" + rec.body_sha256
        if got != canonical:
            raise _error(400, f'digest mismatch, expected "{digest}", got "{got}"')
        self.blobs.add(canonical)
        return self._send(request, _Reply(201))


def in_memory_client(fake: FakeOllama) -> tuple[RequestTraversalAgent, HTTPClient]:
    """
    A treq client talking to C{fake} in memory, and the agent to C{flush()}
    after each step.
    """
    agent = RequestTraversalAgent(fake)
    return agent, HTTPClient(agent, data_to_body_producer=BytesProducer)
