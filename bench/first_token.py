"""
What each hop in front of Ollama adds to the first token of a chat, one
request at a time: the simulated Ollama (C{bench/gpu_sim.py}) directly,
through nginx, through the smallest twisted.web + Agent proxy
(C{bench/twisted_floor.py http}) and through ollamaproxy.

Issue 21's multi-turn scenario compares first-token times at the 99th
percentile, where every target's slowest turns are the same full prefills:
there the difference between two targets is what each adds to a request
on its own.  This measures that directly: the same streamed chat (the
ten messages of one of the scenario's users, without the answers between
them: 660 words; after the first request its prefix is in the
simulator's cache, so each takes the same simulated time), sent to each
target in turn, one request at a time on a kept-alive connection,
C{--requests} times each.

    python3 bench/first_token.py [--requests N] [--out DIR]

The targets run on CPU 0, the simulator and this client on CPU 1 (as the
load harness places them), when C{taskset} is there.  Needs nginx; the
processes are started as C{scenarios.py} starts them (this checkout's
code first, each stopped at the end).  Prints a table and writes it to
C{DIR/first-token-<stamp>.md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# bench/ is not a package: its modules import each other from their folder.
from scenarios import (  # type: ignore[import-not-found]  # noqa: E402
    add_key,
    free_port,
    nginx,
    percentile,
    started,
    twistd,
    words,
)

TARGET_CPU, CLIENT_CPU = "0", "1"


def _pinned(cpu: str, argv: Sequence[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", cpu, *argv] if taskset else list(argv)


def _body() -> bytes:
    history = [{"role": "user", "content": words(f"u0t{turn}w", 300 if turn == 0 else 40)}
               for turn in range(10)]
    return json.dumps({"model": "llama3.1:8b", "messages": history, "stream": True,
                       "options": {"num_predict": 20}}).encode()


def _first_token(connection: http.client.HTTPConnection, body: bytes, key: str) -> float:
    """
    Seconds from sending the chat to reading its first line of answer.
    """
    sent = time.perf_counter()
    connection.request("POST", "/api/chat", body=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    response = connection.getresponse()
    first = response.read1(65536)
    took = time.perf_counter() - sent
    rest = response.read()
    if response.status != 200 or not (first + rest).rstrip().endswith(b"}"):
        raise SystemExit(f"a chat failed: {response.status} {(first + rest)[:200]!r}")
    return took


def measure(requests: int, tmp: Path) -> dict[str, list[float]]:
    """
    Each target's first-token times, in seconds, the targets taking turns.
    """
    key = add_key(tmp, "bench")
    sim, front, floor, proxy = (free_port() for _ in range(4))
    upstream = f"http://127.0.0.1:{sim}"
    ports = {"ollama": sim, "nginx": front, "twisted-web-floor": floor, "ollamaproxy": proxy}
    with ExitStack() as stack:
        for name, cpu, argv, port in [
            ("gpu_sim", CLIENT_CPU, [sys.executable, str(HERE / "gpu_sim.py"), str(sim),
                                     "--num-parallel", "4"], sim),
            ("nginx", TARGET_CPU, nginx(tmp, [upstream], front), front),
            ("floor", TARGET_CPU, [sys.executable, str(HERE / "twisted_floor.py"), "http",
                                   str(floor), upstream], floor),
            ("proxy", TARGET_CPU, [twistd(), "-n", "--pidfile=", "ollamaproxy", "--listen",
                                   f"tcp:{proxy}:interface=127.0.0.1", "--upstream", upstream,
                                   "--keys-file", str(tmp / "keys.json"), "--usage-file",
                                   str(tmp / "usage.sqlite3")], proxy),
        ]:
            stack.enter_context(started(name, _pinned(cpu, argv), tmp, port))
        connections = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                       for name, port in ports.items()}
        body = _body()
        for connection in connections.values():  # the prefix cached, connections open
            for _ in range(10):
                _first_token(connection, body, key)
        times: dict[str, list[float]] = {name: [] for name in connections}
        for _ in range(requests):
            for name, connection in connections.items():
                times[name].append(_first_token(connection, body, key))
        return times


def table(times: dict[str, list[float]]) -> str:
    direct = percentile(times["ollama"], 50) or 0.0
    lines = ["| target | first token p50 (ms) | p90 | p99 | p50 over Ollama's (ms) |",
             "|---|---|---|---|---|"]
    for name, values in times.items():
        p50, p90, p99 = (1000 * (percentile(values, q) or 0.0) for q in (50, 90, 99))
        lines.append(f"| {name} | {p50:.3f} | {p90:.3f} | {p99:.3f} | "
                     f"{p50 - 1000 * direct:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="first-token-") as scratch:
        times = measure(args.requests, Path(scratch))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = (f"# First token through each hop, {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
            f"`python3 bench/first_token.py --requests {args.requests}`: a 660-word "
            "chat whose prefix the simulator has cached, streamed, 20 tokens asked; the "
            "targets take turns, one request at a time.\n\n" + table(times) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"first-token-{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
