"""
The proxy's per-request cost against the twisted.web + Agent floor
(C{bench/twisted_floor.py http}), counted in machine instructions rather
than timed: each target runs under C{valgrind --tool=callgrind}, is warmed up,
and then serves a fixed number of requests while callgrind counts what its
process executes.  The counts do not move with the machine's load (a timed
run on a shared machine does), so a change of a few percent in either
ratio is the code's, not the neighbours'.

    python3 bench/callgrind_ratio.py [--requests N] [--warmup N]

Needs valgrind, node (the harness's fake Ollama, C{../shared/bench}) and the
proxy importable by the Python that runs this.  Prints, for C{GET /api/tags}
and a non-streamed C{POST /api/chat}, one request at a time on one
keep-alive connection, the instructions per request of each target and the
proxy's over the floor's.  The proxy runs as C{bench/per_request} runs it
(a key file, logging to twistd's console, here a file).
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# bench/ is not a package: its modules import each other from their folder.
from scenarios import free_port, started, twistd  # type: ignore[import-not-found]  # noqa: E402

# As bench/common.sh finds the harness: $BENCH_HARNESS, or beside the project.
HARNESS = os.path.dirname(
    os.environ.get("BENCH_HARNESS", os.path.join(PROJECT, "..", "shared", "bench", "run.py"))
)
KEY = "bench-key-0123456789abcdef"
CHAT = json.dumps(
    {"model": "bench:latest", "messages": [{"role": "user", "content": "hi"}],
     "stream": False, "bench_tokens": 10}
).encode()
ROUTES: dict[str, tuple[str, str, bytes | None]] = {
    "GET /api/tags": ("GET", "/api/tags", None),
    "POST /api/chat (not streamed)": ("POST", "/api/chat", CHAT),
}


def requests(port: int, method: str, path: str, body: bytes | None, count: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"X-API-Key": KEY}
    if body is not None:
        headers["Content-Type"] = "application/json"
    for _ in range(count):
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status}")
    connection.close()


def total(dump: str) -> int:
    with open(dump) as lines:
        for line in lines:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no total in {dump}")


def measure(name: str, command: list[str], tmp: str, port: int,
            args: argparse.Namespace) -> dict[str, float]:
    """
    Instructions per request of one target, for each of L{ROUTES}.
    """
    out = os.path.join(tmp, f"{name}.callgrind")
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}.%p"]
    result: dict[str, float] = {}
    with started(name, valgrind + command, Path(tmp), port, seconds=300) as process:

        def control(*flags: str) -> None:
            subprocess.run(["callgrind_control", *flags, str(process.popen.pid)], check=True,
                           capture_output=True)

        for route, (method, path, body) in ROUTES.items():
            requests(port, method, path, body, args.warmup)
            control("-i", "on")
            control("-z")
            requests(port, method, path, body, args.requests)
            for old in glob.glob(f"{out}.*"):
                os.remove(old)
            control("-d")
            control("-i", "off")
            [dump] = glob.glob(f"{out}.*")
            result[route] = total(dump) / args.requests
            shutil.move(dump, os.path.join(tmp, f"{name}-{method}.callgrind"))
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--keep", help="keep the callgrind files in this folder")
    parser.add_argument("--only", choices=["ollamaproxy", "twisted-web-floor"],
                        help="measure one target, not both")
    args = parser.parse_args(argv)
    tmp = args.keep or tempfile.mkdtemp(prefix="callgrind-ratio-")
    os.makedirs(tmp, exist_ok=True)
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    targets: dict[str, Callable[[int], list[str]]] = {
        "ollamaproxy": lambda port: [
            twistd(), "-n", "--pidfile=",
            "ollamaproxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--upstream", upstream, "--api-key", KEY,
            "--keys-file", os.path.join(tmp, "keys.json")],
        "twisted-web-floor": lambda port: [
            sys.executable, os.path.join(HERE, "twisted_floor.py"), "http", str(port), upstream],
    }
    results: dict[str, dict[str, float]] = {}
    with started("upstream", ["node", os.path.join(HARNESS, "fake_ollama.js"),
                              str(upstream_port)], Path(tmp), upstream_port):
        for name, command in targets.items():
            if args.only not in (None, name):
                continue
            port = free_port()
            results[name] = measure(name, command(port), tmp, port, args)
    print(f"instructions per request, {args.requests} requests after {args.warmup} "
          f"(callgrind files: {tmp})")
    if args.only:
        for route, count in results[args.only].items():
            print(f"{args.only}: {route}: {count:,.0f}")
    else:
        print("| request | ollamaproxy | twisted-web-floor | ratio |")
        print("|---|---|---|---|")
        for route in ROUTES:
            proxy, floor = results["ollamaproxy"][route], results["twisted-web-floor"][route]
            print(f"| {route} | {proxy:,.0f} | {floor:,.0f} | {proxy / floor:.2f}x |")
    if not args.keep:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main(sys.argv[1:])
