# -*- test-case-name: tests.test_gpu_sim,tests.integration.test_gpu_sim -*-
"""
A simulated GPU behind Ollama's API: an Ollama in one process whose timing
follows the cost model in C{bench/gpu_sim.md}, so that the proxy's queue can
be measured against "Ollama alone" without a GPU.

    python bench/gpu_sim.py PORT [--num-parallel 4] [--model llama3.1:8b] ...

It listens on 127.0.0.1 only.  Every figure of the model is an option (see
C{--help}); each default's source is in C{bench/gpu_sim.md}.

What it models, after Ollama's own code (C{server/sched.go},
C{llm/llama_server.go}, C{runner/ollamarunner/cache.go}):

  - a loaded model (a I{runner}) has C{num_parallel} slots; a request for a
    loaded model with the same C{num_ctx} takes the runner at once (the fast
    path of C{Scheduler.GetRunner}, since v0.11.5: it passes any waiting
    model switch) and then waits first come, first served for a slot (the
    runner's semaphore);
  - any other request joins one first-come queue of at most C{max_queue}
    (else 503), processed one at a time: it loads its model (C{load_seconds})
    when fewer than C{max_loaded} models are loaded, else waits until a
    model to evict (an idle one first) has no request left, then unloads it;
    a different C{num_ctx} reloads the model the same way;
  - each slot keeps the tokens it last evaluated; a request takes the free
    slot with the longest common prefix and evaluates only the rest of its
    prompt (at least one token), at C{prefill_tps};
  - each output token takes C{(1 + slot_slowdown * (busy - 1)) / decode_tps}
    seconds, C{busy} being the runner's busy slots when the token starts;
  - an idle model stays loaded C{keep_alive} seconds.

Tokens are whitespace-separated words (a chat's messages rendered as
C{<role>} and the words of their content, then C{<assistant>}); the answer is
the words C{t0 t1 ...}, so that a conversation sent back gives the same
prefix and hits the slot's cache as a real one does.

Time comes from the C{IReactorTime} given, so the tests run it on a
C{Clock}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

VERSION = "0.11.5"
QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"
EMBEDDING_SIZE = 8


@dataclass(frozen=True)
class CostModel:
    """
    The figures the simulator's timing follows; C{bench/gpu_sim.md} gives
    each one's source.
    """

    num_parallel: int = 1
    max_loaded: int = 1
    max_queue: int = 512
    keep_alive: float = 300.0
    load_seconds: float = 5.0
    prefill_tps: float = 3865.39
    decode_tps: float = 111.74
    slot_slowdown: float = 0.41
    default_output: int = 128
    num_ctx: int = 4096
    model_bytes: int = 4_580_000_000
    slots_run: int = 0
    """Slots a runner really runs, if fewer than C{num_parallel} (0: all):
    Ollama drops to fewer when VRAM is short and says so in no API."""

    def slots(self) -> int:
        """
        How many slots a runner has: C{slots_run} when it is set below
        C{num_parallel}, silently, as Ollama does (ollama#17556).
        """
        return min(self.slots_run or self.num_parallel, self.num_parallel)

    def step(self, busy: int) -> float:
        """
        Seconds for one output token while C{busy} slots of its model work:
        batched decoding makes each step slower, though the tokens per
        second of all slots together rise.
        """
        return (1 + self.slot_slowdown * max(busy - 1, 0)) / self.decode_tps


@dataclass(frozen=True)
class Hang:
    """
    When a model's generations hang: accepted, and never a first byte,
    while the listings answer (ollama#17408).

    @ivar model: The model whose generations hang; empty for none.
    @ivar after: Generation requests (of any model) answered first.
    @ivar at: Simulated seconds after the start before it hangs.
    """

    model: str = ""
    after: int = 0
    at: float = 0.0


@implementer(IReactorTime)
class ScaledClock:
    """
    Simulated time running C{speed} times faster than C{real}'s: every
    duration the simulator waits is divided by C{speed}, and every figure it
    reports (C{load_duration}, ...) stays in simulated seconds.  Its epoch
    is C{real}'s time when made, so time stamps stay near the real ones.
    """

    def __init__(self, real: IReactorTime, speed: float) -> None:
        if speed <= 0:
            raise ValueError("speed must be above 0")
        self.real = real
        self.speed = speed
        self.origin = real.seconds()

    def seconds(self) -> float:
        """
        Simulated seconds.
        """
        return self.origin + (self.real.seconds() - self.origin) * self.speed

    def callLater(self, delay: float, callable: Callable[..., Any],
                  *args: object, **kw: object) -> IDelayedCall:
        """
        Call after C{delay} simulated seconds.
        """
        return self.real.callLater(delay / self.speed, callable, *args, **kw)

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        """
        The real clock's pending calls (their times are real).
        """
        return self.real.getDelayedCalls()


@dataclass
class Slot:
    """
    One of a runner's parallel slots, with the tokens its cache holds.
    """

    cache: list[str] = field(default_factory=list)
    job: Job | None = None


@dataclass
class Runner:
    """
    A loaded (or loading) model.

    @ivar refs: Requests that hold this runner (waiting for a slot or in
        one): it cannot be unloaded before they end, as in Ollama's
        C{runnerRef.refCount}.
    """

    model: str
    num_ctx: int
    slots: list[Slot]
    ready: bool = False
    refs: int = 0
    expires_at: float = 0.0
    waiting: deque[Job] = field(default_factory=deque)

    def busy(self) -> int:
        """
        How many slots are working.
        """
        return sum(1 for slot in self.slots if slot.job is not None)


@dataclass
class Stats:
    """
    The figures of a finished request, as Ollama reports them (seconds
    here; nanoseconds on the wire).
    """

    load_duration: float
    prompt_eval_count: int
    prompt_eval_duration: float
    eval_count: int
    eval_duration: float
    total_duration: float
    done_reason: str


@dataclass(eq=False)
class Job:
    """
    One request on the simulated GPU.

    @ivar output: How many tokens to generate (0 for an embedding).
    @ivar limited: Whether C{output} came from the request (C{num_predict},
        C{max_tokens}): reaching it ends with C{done_reason} C{length}.
    @ivar emit: Called with each generated token's text.
    @ivar done: Called once with the figures when the last token is out.
    """

    model: str
    num_ctx: int
    prompt: list[str]
    output: int
    limited: bool
    emit: Callable[[str], None]
    done: Callable[[Stats], None]
    arrived: float = 0.0
    runner: Runner | None = None
    slot: Slot | None = None
    call: IDelayedCall | None = None
    load_duration: float = 0.0
    prompt_eval_duration: float = 0.0
    eval_duration: float = 0.0
    generated: int = 0


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """
    How many leading tokens C{a} and C{b} share.
    """
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


class GPU:
    """
    The scheduler and the slots: where each request waits, and how long its
    work takes.  See the module docstring for the rules.
    """

    def __init__(self, clock: IReactorTime, cost: CostModel) -> None:
        self.clock = clock
        self.cost = cost
        self.runners: dict[str, Runner] = {}
        self.pending: deque[Job] = deque()
        self.evicting: Runner | None = None
        """The runner the queue's head waits to see unloaded, if any."""
        self.loads = 0
        self.prompt_tokens = 0
        """Prompt tokens of the requests given a slot, cached or not."""
        self.evaluated_tokens = 0
        """Of those, the tokens evaluated (not found in the slot's cache)."""
        self.most_busy: dict[str, int] = {}
        """The most slots each model has had busy at once."""

    def submit(self, job: Job) -> bool:
        """
        Take a request; C{False} if Ollama's queue is full (a 503).
        """
        job.arrived = self.clock.seconds()
        self.expire()
        runner = self.runners.get(job.model)
        if runner is not None and runner.num_ctx == job.num_ctx:
            self._attach(job, runner)
            return True
        if len(self.pending) >= self.cost.max_queue:
            return False
        self.pending.append(job)
        self._schedule()
        return True

    def cancel(self, job: Job) -> None:
        """
        The client went away: stop its work and free what it held.
        """
        if job in self.pending:
            if job is self.pending[0]:
                self.evicting = None  # the next head chooses again
            self.pending.remove(job)
            self._schedule()
            return
        runner = job.runner
        if runner is None:
            return
        if job in runner.waiting:
            runner.waiting.remove(job)
        if job.call is not None and job.call.active():
            job.call.cancel()
        self._release(job)

    def expire(self) -> None:
        """
        Unload the idle models whose keep-alive has run out.
        """
        now = self.clock.seconds()
        for runner in list(self.runners.values()):
            if runner.ready and runner.refs == 0 and runner.expires_at <= now:
                del self.runners[runner.model]

    # -- the scheduler --------------------------------------------------------

    def _schedule(self) -> None:
        """
        Ollama's C{processPending}: the head of the queue blocks the rest
        until its model is loaded for it.
        """
        while self.pending:
            if any(not runner.ready for runner in self.runners.values()):
                return
            job = self.pending[0]
            runner = self.runners.get(job.model)
            if runner is not None and runner.num_ctx == job.num_ctx:
                self.pending.popleft()
                self._attach(job, runner)
                continue
            if runner is None and len(self.runners) < self.cost.max_loaded:
                self.pending.popleft()
                self._load(job)
                continue
            # Chosen once, then waited for (Ollama's runnerToExpire); a
            # request for it meanwhile still takes it (the fast path).
            if self.evicting is None:
                self.evicting = runner if runner is not None else self._victim()
            if self.evicting.refs:
                return
            del self.runners[self.evicting.model]
            self.evicting = None

    def _victim(self) -> Runner:
        """
        The model to unload, as C{findRunnerToUnload}: runners sorted by
        keep-alive and name (all keep-alives are equal here, so by name),
        the first idle one, else the first.
        """
        ordered = sorted(self.runners.values(), key=lambda r: r.model)
        return next((r for r in ordered if r.refs == 0), ordered[0])

    def _load(self, job: Job) -> None:
        runner = Runner(job.model, job.num_ctx, [Slot() for _ in range(self.cost.slots())])
        self.runners[job.model] = runner
        self.loads += 1
        self._attach(job, runner)
        self.clock.callLater(self.cost.load_seconds, self._loaded, runner)

    def _loaded(self, runner: Runner) -> None:
        runner.ready = True
        now = self.clock.seconds()
        runner.expires_at = now + self.cost.keep_alive
        for job in runner.waiting:
            job.load_duration = now - job.arrived
        self._start(runner)
        self._schedule()

    def _attach(self, job: Job, runner: Runner) -> None:
        """
        C{useLoadedRunner}: the request holds the runner, then waits for a
        slot in arrival order.
        """
        runner.refs += 1
        job.runner = runner
        if runner.ready:
            job.load_duration = self.clock.seconds() - job.arrived
        runner.waiting.append(job)
        self._start(runner)

    # -- the slots ------------------------------------------------------------

    def _start(self, runner: Runner) -> None:
        while runner.ready and runner.waiting:
            free = [slot for slot in runner.slots if slot.job is None]
            if not free:
                return
            job = runner.waiting.popleft()
            # findLongestCacheSlot: the longest common prefix, ties to the
            # first slot.
            kept, slot = max(((common_prefix(s.cache, job.prompt), s) for s in free),
                             key=lambda shared: shared[0])
            if kept == len(job.prompt):
                kept -= 1  # one input is always evaluated, to sample from
            kept = max(kept, 0)
            del slot.cache[kept:]
            slot.job = job
            self.prompt_tokens += len(job.prompt)
            self.evaluated_tokens += len(job.prompt) - kept
            self.most_busy[runner.model] = max(self.most_busy.get(runner.model, 0),
                                               runner.busy())
            job.slot = slot
            job.prompt_eval_duration = (len(job.prompt) - kept) / self.cost.prefill_tps
            job.call = self.clock.callLater(job.prompt_eval_duration, self._prefilled, job)

    def _prefilled(self, job: Job) -> None:
        assert job.slot is not None
        job.slot.cache[:] = job.prompt
        self._next_token(job)

    def _next_token(self, job: Job) -> None:
        if job.generated >= job.output:
            self._finish(job)
            return
        assert job.runner is not None
        step = self.cost.step(job.runner.busy())
        job.call = self.clock.callLater(step, self._token, job, step)

    def _token(self, job: Job, step: float) -> None:
        assert job.slot is not None
        text = f"t{job.generated}"
        job.slot.cache.append(text)
        job.generated += 1
        job.eval_duration += step
        job.emit(text if job.generated == 1 else " " + text)
        self._next_token(job)

    def _finish(self, job: Job) -> None:
        self._release(job)
        job.done(Stats(
            load_duration=job.load_duration,
            prompt_eval_count=len(job.prompt),
            prompt_eval_duration=job.prompt_eval_duration,
            eval_count=job.generated,
            eval_duration=job.eval_duration,
            total_duration=self.clock.seconds() - job.arrived,
            done_reason="length" if job.limited and job.output > 0 else "stop",
        ))

    def _release(self, job: Job) -> None:
        runner = job.runner
        assert runner is not None
        job.runner = None
        if job.slot is not None:
            job.slot.job = None
            job.slot = None
        runner.refs -= 1
        if runner.refs == 0:
            runner.expires_at = self.clock.seconds() + self.cost.keep_alive
            if runner is self.evicting:
                self._schedule()
                return
        self._start(runner)


# -- the HTTP side --------------------------------------------------------------


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _canonical(name: str) -> str:
    return name if ":" in name else name + ":latest"


def _chat_tokens(messages: Any) -> list[str]:
    """
    A chat's prompt as tokens: each message's role and words, then the
    assistant's turn (as chat templates end).
    """
    tokens: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            tokens.append(f"<{message.get('role', 'user')}>")
            tokens += str(message.get("content") or "").split()
    tokens.append("<assistant>")
    return tokens


class _Failed(Exception):
    """
    A request Ollama would refuse, with its status and message.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Simulator(Resource):
    """
    The simulated Ollama's HTTP resource.  See the module docstring.

    @ivar gpu: The simulated GPU, for the tests to look at.
    """

    isLeaf = True

    def __init__(self, clock: IReactorTime, cost: CostModel,
                 models: Sequence[str] = ("llama3.1:8b",), hang: Hang = Hang()) -> None:
        self.children = {}  # what Resource.__init__ (unannotated) does
        self.clock = clock
        self.cost = cost
        self.models = [_canonical(m) for m in models]
        self.gpu = GPU(clock, cost)
        self.hang = replace(hang, model=_canonical(hang.model)) if hang.model else hang
        self.started = clock.seconds()
        self.generations = 0
        """Generation requests received, hung ones included."""
        self.hang_since: float | None = None
        self.hung: list[list[float | int | None]] = []
        """When each hung request came (simulated seconds after the start),
        the tokens it asked (a proxy's one-token check asks one), and when
        its client went away (L{None} while it waits): the first a proxy
        gave up on is when it knew of the hang."""
        self.in_flight: dict[str, int] = {}
        self.most_in_flight: dict[str, int] = {}
        """The most requests of each model taken and not yet answered at once."""
        self._ids = 0
        self._routes: dict[tuple[bytes, bytes], Callable[[Request], bytes | int]] = {
            (b"GET", b"/"): self._root,
            (b"GET", b"/api/version"): lambda r: self._json(r, {"version": VERSION}),
            (b"GET", b"/api/tags"): self._tags,
            (b"GET", b"/api/ps"): self._ps,
            (b"POST", b"/api/chat"): self._infer("chat"),
            (b"POST", b"/api/generate"): self._infer("generate"),
            (b"POST", b"/api/embed"): self._infer("embed"),
            (b"POST", b"/v1/chat/completions"): self._infer("v1"),
            (b"GET", b"/sim/stats"): self._stats,
        }
        """The handler of each method and path, made once."""

    def render(self, request: Request) -> bytes | int:
        """
        Route by method and path, answering errors as Ollama does
        (C{{"error": ...}}).
        """
        method = b"GET" if request.method == b"HEAD" else request.method
        handler = self._routes.get((method, request.path))
        if handler is None:
            request.setResponseCode(404)
            return b"404 page not found"
        try:
            return handler(request)
        except _Failed as failed:
            request.setResponseCode(failed.code)
            return self._json(request, {"error": failed.message})

    def _json(self, request: Request, value: object) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json.dumps(value, separators=(",", ":")).encode()

    def _root(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    def _describe(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "size": self.cost.model_bytes,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B",
                        "quantization_level": "Q4_K_M"},
        }

    def _tags(self, request: Request) -> bytes:
        return self._json(request, {"models": [
            {**self._describe(name), "modified_at": _stamp(0)} for name in self.models
        ]})

    def _ps(self, request: Request) -> bytes:
        self.gpu.expire()
        return self._json(request, {"models": [
            {**self._describe(runner.model), "expires_at": _stamp(runner.expires_at),
             "size_vram": self.cost.model_bytes, "context_length": runner.num_ctx}
            for runner in self.gpu.runners.values()
        ]})

    def _stats(self, request: Request) -> bytes:
        """
        What the simulator knows and Ollama tells no one, for the scenario
        runner (C{bench/scenarios.py}): loads, the prompt tokens given a slot
        and how many of them were evaluated, the most slots busy per model,
        and the hang's start and the requests it swallowed (when, in simulated
        seconds after the simulator's start, and how many tokens each asked).
        """
        gpu = self.gpu
        since = None if self.hang_since is None else self.hang_since - self.started
        return self._json(request, {
            "loads": gpu.loads, "generations": self.generations,
            "prompt_tokens": gpu.prompt_tokens, "evaluated_tokens": gpu.evaluated_tokens,
            "most_busy": gpu.most_busy, "most_in_flight": self.most_in_flight,
            "hang_since": since, "hung": self.hung, "now": self.clock.seconds() - self.started})

    def _left(self, entry: list[float | int | None]) -> None:
        """
        A hung request's client went away: when, for the stats.
        """
        entry[2] = self.clock.seconds() - self.started

    def track(self, model: str, change: int) -> None:
        """
        A request of C{model} taken (+1) or ended (-1): the most at once
        is kept for the stats.
        """
        now = self.in_flight[model] = self.in_flight.get(model, 0) + change
        self.most_in_flight[model] = max(self.most_in_flight.get(model, 0), now)

    def _hangs(self, model: str) -> bool:
        """
        Whether a generation of C{model} arriving now hangs (L{Hang}); the
        hang, once begun, lasts.
        """
        hang = self.hang
        now = self.clock.seconds()
        if self.hang_since is None and hang.model and self.generations >= hang.after \
                and now - self.started >= hang.at:
            self.hang_since = now
        return self.hang_since is not None and model == hang.model

    def _infer(self, kind: str) -> Callable[[Request], int]:
        return lambda request: self._inference(kind, request)

    def _inference(self, kind: str, request: Request) -> int:
        try:
            doc = json.loads(request.content.read() if request.content else b"")
        except ValueError:
            raise _Failed(400, "invalid JSON") from None
        if not isinstance(doc, dict):
            raise _Failed(400, "invalid JSON")
        model = _canonical(str(doc.get("model") or ""))
        if model not in self.models:
            raise _Failed(404, f"model '{doc.get('model')}' not found")
        options = doc.get("options") if isinstance(doc.get("options"), dict) else {}
        assert isinstance(options, dict)
        if kind == "chat" or kind == "v1":
            prompt = _chat_tokens(doc.get("messages"))
        elif kind == "generate":
            prompt = (str(doc.get("system") or "").split() + str(doc.get("prompt") or "").split()
                      + ["<assistant>"])
        else:
            given = doc.get("input")
            inputs = given if isinstance(given, list) else [given]
            prompt = [word for text in inputs for word in str(text or "").split()] or ["<empty>"]
        asked = doc.get("max_tokens", doc.get("max_completion_tokens")) if kind == "v1" \
            else options.get("num_predict")
        limited = isinstance(asked, int) and asked >= 0
        output = 0 if kind == "embed" else int(asked or 0) if limited else self.cost.default_output
        if kind != "embed":
            hangs = self._hangs(model)
            self.generations += 1
            if hangs:
                # No head, no byte: the client or the proxy gives up.
                entry: list[float | int | None] = [self.clock.seconds() - self.started, output,
                                                   None]
                self.hung.append(entry)
                request.notifyFinish().addErrback(lambda _: self._left(entry))
                return NOT_DONE_YET
        num_ctx = options.get("num_ctx")
        stream = bool(doc.get("stream", kind != "v1")) and kind != "embed"
        self._ids += 1
        exchange = _Exchange(self, kind, request, model, stream, self._ids,
                             bool((doc.get("stream_options") or {}).get("include_usage")))
        job = Job(model, num_ctx if isinstance(num_ctx, int) else self.cost.num_ctx, prompt,
                  output, limited, exchange.token, exchange.done)
        if not self.gpu.submit(job):
            raise _Failed(503, QUEUE_FULL)
        self.track(model, +1)
        request.notifyFinish().addErrback(lambda _: exchange.lost(job))
        return NOT_DONE_YET


class _Exchange:
    """
    One inference request's answer, written as its tokens come.
    """

    def __init__(self, simulator: Simulator, kind: str, request: Request, model: str,
                 stream: bool, number: int, usage: bool) -> None:
        self.simulator = simulator
        self.kind = kind
        self.request = request
        self.model = model
        self.stream = stream
        self.usage = usage
        self.id = f"chatcmpl-{number}"
        self.text: list[str] = []
        self.gone = False
        self.started = False

    def _head(self) -> None:
        if self.started:
            return
        self.started = True
        kind = b"text/event-stream" if self.kind == "v1" and self.stream else (
            b"application/x-ndjson" if self.stream else b"application/json; charset=utf-8")
        self.request.setHeader(b"content-type", kind)

    def _now(self) -> str:
        return _stamp(self.simulator.clock.seconds())

    def _line(self, value: object) -> None:
        data = json.dumps(value, separators=(",", ":")).encode()
        self.request.write(b"data: " + data + b"\n\n" if self.kind == "v1" else data + b"\n")

    def _piece(self, text: str) -> dict[str, Any]:
        if self.kind == "v1":
            return {"id": self.id, "object": "chat.completion.chunk",
                    "created": int(self.simulator.clock.seconds()), "model": self.model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                 "finish_reason": None}]}
        body: dict[str, Any] = {"model": self.model, "created_at": self._now()}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        return {**body, "done": False}

    def token(self, text: str) -> None:
        """
        A generated token: written at once when streaming, kept otherwise.
        """
        self.text.append(text)
        if self.stream and not self.gone:
            self._head()
            self._line(self._piece(text))

    def done(self, stats: Stats) -> None:
        """
        The last token is out: the final object with Ollama's figures.
        """
        if self.gone:
            return
        self.simulator.track(self.model, -1)
        self._head()
        text = "".join(self.text)
        usage = {"prompt_tokens": stats.prompt_eval_count,
                 "completion_tokens": stats.eval_count,
                 "total_tokens": stats.prompt_eval_count + stats.eval_count}
        figures = {"total_duration": _ns(stats.total_duration),
                   "load_duration": _ns(stats.load_duration),
                   "prompt_eval_count": stats.prompt_eval_count}
        if self.kind == "embed":
            vectors = [[0.0] * EMBEDDING_SIZE]
            self.request.write(json.dumps({"model": self.model, "embeddings": vectors,
                                           **figures}).encode())
        elif self.kind == "v1":
            finish = "length" if stats.done_reason == "length" else "stop"
            if self.stream:
                last = self._piece("")
                last["choices"][0].update(delta={"role": "assistant", "content": ""},
                                          finish_reason=finish)
                self._line(last)
                if self.usage:
                    self._line({**self._piece(""), "choices": [], "usage": usage})
                self.request.write(b"data: [DONE]\n\n")
            else:
                self.request.write(json.dumps({
                    "id": self.id, "object": "chat.completion",
                    "created": int(self.simulator.clock.seconds()), "model": self.model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}],
                    "usage": usage}).encode())
        else:
            final = self._piece("" if self.stream else text)
            final.update(done=True, done_reason=stats.done_reason, **figures,
                         prompt_eval_duration=_ns(stats.prompt_eval_duration),
                         eval_count=stats.eval_count,
                         eval_duration=_ns(stats.eval_duration))
            self.request.write(json.dumps(final, separators=(",", ":")).encode()
                               + (b"\n" if self.stream else b""))
        self.request.finish()

    def lost(self, job: Job) -> None:
        """
        The client disconnected: its generation stops and its slot frees.
        """
        if not self.gone:
            self.simulator.track(self.model, -1)
        self.gone = True
        self.simulator.gpu.cancel(job)


@dataclass(frozen=True)
class Setup:
    """
    The command line's meaning.

    @ivar speed: How many times faster than real time the simulation runs
        (L{ScaledClock}).
    """

    port: int
    cost: CostModel
    models: list[str]
    speed: float = 1.0
    hang: Hang = Hang()


def parse(argv: Sequence[str]) -> Setup:
    """
    The command line: the port, the cost model (each field an option whose
    default is L{CostModel}'s), the installed models, the time scale and
    the hang.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("port", type=int)
    parser.add_argument("--model", action="append", dest="models",
                        help="an installed model (repeat; default llama3.1:8b)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="run X times faster than real time; figures stay in simulated "
                             "seconds (default 1)")
    parser.add_argument("--hang", default="", metavar="MODEL",
                        help="generations of MODEL never send a byte (default: none)")
    parser.add_argument("--hang-after", type=int, default=0, metavar="N",
                        help="with --hang: only after N generation requests (default 0)")
    parser.add_argument("--hang-at", type=float, default=0.0, metavar="S",
                        help="with --hang: only S simulated seconds after the start (default 0)")
    defaults = CostModel()
    for item in fields(CostModel):
        value = getattr(defaults, item.name)
        parser.add_argument("--" + item.name.replace("_", "-"), type=type(value),
                            default=value, help=f"default {value}")
    args = parser.parse_args(argv)
    cost = replace(defaults, **{item.name: getattr(args, item.name)
                                for item in fields(CostModel)})
    if args.speed <= 0:
        parser.error("--speed must be above 0")
    return Setup(args.port, cost, args.models or ["llama3.1:8b"], args.speed,
                 Hang(args.hang, args.hang_after, args.hang_at))


def main(argv: Sequence[str]) -> None:
    """
    Listen on 127.0.0.1:PORT and run until stopped.
    """
    from twisted.internet import reactor as installed

    # The global reactor's module is typed as a module, not as what it is.
    reactor: Any = installed
    setup = parse(argv)
    clock = ScaledClock(reactor, setup.speed)
    site = Site(Simulator(clock, setup.cost, setup.models, setup.hang))
    site.noisy = False
    listening = reactor.listenTCP(setup.port, site, interface="127.0.0.1")
    print(f"gpu_sim listening on 127.0.0.1:{listening.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
