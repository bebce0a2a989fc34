# -*- test-case-name: tests.record.test_logs -*-
"""
The record of one request: what it asked, where it went, and how it ended.

The app fills an L{Exchange} in as a request goes and hands it, at the end,
to the access log (L{ollamaproxy.record.logs}), the metrics and the usage store.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, Literal, get_args

from ollamaproxy.model_names import ModelName

#: Where a turn of a conversation went, against its conversation's last: to
#: the same backend, to another, or the conversation was new (or forgotten).
TurnPlacement = Literal["home", "moved", "new"]
#: The turns that found no cache of their own conversation.
COLD_TURNS: Final = frozenset({"moved", "new"})

#: How a request ended:
#:  - C{completed}: answered, by Ollama or the proxy, as it should be;
#:  - C{client_disconnected}: the client left first;
#:  - C{upstream_error}, C{timeout}: Ollama failed, or was silent too long;
#:  - C{rejected}: refused by the proxy (key, scope, limits, a loop);
#:  - C{queue_full}, C{queue_timeout}: refused for a busy model (503);
#:  - C{bad_request}: refused by the web server (malformed, a head too large);
#:  - C{client_timeout}: a body that came too slowly;
#:  - C{shutdown}: cut at the end of the grace period, or refused while stopping;
#:  - C{internal_error}: a bug.
Outcome = Literal[
    "completed",
    "client_disconnected",
    "upstream_error",
    "timeout",
    "rejected",
    "queue_full",
    "queue_timeout",
    "bad_request",
    "client_timeout",
    "shutdown",
    "internal_error",
]
OUTCOMES: frozenset[str] = frozenset(get_args(Outcome))

#: The user of a request of a key that names its users
#: (L{ollamaproxy.admission.users}) when the request names none: the key's
#: anonymous user.
ANONYMOUS = ""

#: The methods of HTTP that clients send; any other is a token of the
#: client's choosing (a key, even), shown only redacted.
HTTP_METHODS: frozenset[str] = frozenset(
    ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]
)


@dataclass(frozen=True)
class StreamSummary:
    """
    What a generation amounted to, from Ollama's final object (or the
    usage chunk on C{/v1}).

    @ivar model: The model that answered.
    @ivar done_reason: Why it stopped (C{stop}, C{length}, ...), if said.
    @ivar prompt_tokens: Tokens of the prompt.
    @ivar completion_tokens: Tokens generated.
    @ivar tokens_per_second: Generation speed, when Ollama reports the
        time it took (C{eval_duration}).
    @ivar load_seconds: Time spent loading the model, when reported.
    @ivar prompt_seconds: Time spent evaluating the prompt, when reported
        (C{prompt_eval_duration}): the part of it not in a slot's cache
        (L{ollamaproxy.record.metrics}'s cache reuse).
    @ivar eval_seconds: Time spent generating, when reported
        (C{eval_duration}): with C{prompt_seconds}, what the request cost
        the GPU (the fair queue's C{--fair-share gpu-time},
        L{ollamaproxy.backends.gpu_time}).
    @ivar counted: Whether C{completion_tokens} were counted by the proxy,
        one per NDJSON line or SSE event relayed, because Ollama reported
        none: a C{/v1} stream without C{stream_options.include_usage}, or
        a stream cut before its final object.
    @ivar prompt_estimated: Whether C{prompt_tokens} are the proxy's
        estimate from the request (L{ollamaproxy.admission.estimate})
        because Ollama's count never came.
    """

    model: str
    done_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_per_second: float | None = None
    load_seconds: float | None = None
    prompt_seconds: float | None = None
    eval_seconds: float | None = None
    counted: bool = False
    prompt_estimated: bool = False

    @property
    def tokens(self) -> int:
        """
        Prompt and completion tokens together: what a quota is charged.
        """
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Meter:
    """
    The one count of the tokens a request used, which every consumer reads
    (the quotas, the usage store, the metrics, the log).

    The app tells it what a request that runs a model is expected to cost
    (L{expect}) once it is planned; the relay counts the
    answer's pieces as they stream (C{output}) and sets Ollama's own
    figures (C{final}) when its final object has come.  Nothing is called
    per chunk: the relay adds to C{output}.  Since the meter is written as
    the answer goes, what it holds is there however the request ends: a
    client that hangs up, or a body that breaks off, leaves the tokens
    generated so far.

    @ivar metered: Whether the request runs a model, so that its answer's
        pieces are tokens (a model pull's progress lines are not).
    @ivar prompt_estimate: The prompt's tokens, estimated from the request.
    @ivar model: The model the request named, for a summary that Ollama's
        answer gives none for.
    @ivar generating: Whether a successful answer's body was relayed (so
        that Ollama read the prompt): a request refused, or never sent,
        costs nothing.
    @ivar output: NDJSON lines or SSE events relayed: about one generated
        token each.
    @ivar final: Ollama's own figures, from the answer's final object, if it
        came.
    """

    metered: bool = False
    prompt_estimate: int = 0
    model: str = ""
    generating: bool = False
    output: int = 0
    final: StreamSummary | None = None

    def expect(self, prompt_estimate: int, model: str) -> None:
        """
        The request runs C{model}, its prompt estimated at
        C{prompt_estimate} tokens: meter its answer.
        """
        self.metered = True
        self.prompt_estimate = prompt_estimate
        self.model = model

    def reading(self) -> StreamSummary | None:
        """
        What the request used, as well as it is known: Ollama's figures when
        they came whole; else the pieces counted and the prompt estimated,
        each marked as such; L{None} for a request that used no tokens.
        """
        final = self.final
        if final is not None and not final.counted:
            if final.model or not self.model:
                return final
            return replace(final, model=self.model)  # /api/embeddings names none
        if not (self.generating and self.metered):
            return final
        if final is not None:
            return replace(final, prompt_tokens=self.prompt_estimate, prompt_estimated=True)
        if not (self.output or self.prompt_estimate):
            return None
        return StreamSummary(
            model=self.model,
            prompt_tokens=self.prompt_estimate,
            completion_tokens=self.output,
            counted=self.output > 0,
            prompt_estimated=True,
        )

    @property
    def tokens(self) -> int:
        """
        The tokens to charge for the request so far (L{reading}'s).
        """
        reading = self.reading()
        return 0 if reading is None else reading.prompt_tokens + reading.completion_tokens


@dataclass
class Exchange:
    """
    What happened to one request, filled in as it goes and logged at its end.

    @ivar route: The route's label: its pattern in the catalogue
        (L{ollamaproxy.routes}), or C{other}.
    @ivar backend: The Ollama server the request went to, if any.
    @ivar queued: Seconds it waited in the fair queue for a slot.
    @ivar notes: What the proxy changed in the request (a clamped
        C{keep_alive}), for the access line.
    @ivar model: The model the request names, once read (for the
        console's view of requests in flight).
    @ivar outcome: How it ended (L{Outcome}).
    @ivar user: Who it was for behind its key, for a key that names its
        users (L{ANONYMOUS} if it named none); L{None} for a key that
        does not.
    @ivar placement: For a turn of a conversation the router sends home,
        where it went against its conversation's last turn: C{home} (the
        same backend), C{moved} (another) or C{new} (none remembered);
        empty for other requests.
    """

    method: str
    path: str
    client: str
    started: float
    route: str = "other"
    backend: str = ""
    queued: float = 0.0
    notes: str = ""
    model: ModelName | None = None
    key: str = "-"
    user: str | None = None
    status: int | None = None
    first_byte: float | None = None
    outcome: Outcome = "completed"
    detail: str = ""
    summary: StreamSummary | None = None
    request_sample: bytes = b""
    response_sample: bytes = b""
    placement: str = ""

    def responded(self, now: float, status: int) -> None:
        """
        Ollama's response head arrived.
        """
        self.first_byte = now - self.started
        self.status = status

    def failed(self, outcome: Outcome, detail: str) -> None:
        """
        The request did not end normally.
        """
        self.outcome = outcome
        self.detail = detail
