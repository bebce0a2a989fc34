#!/usr/bin/env python3
"""
What reading a request body for its model costs: time on the reactor thread
and peak memory, for honest and crafted bodies, the proxy's bounded check
(L{ollamaproxy.admission.policy.json_models}) against decoding the whole document as
the proxy did before (C{json.loads} building every object).

    python3 bench/body_check.py

Each figure is the best of a few runs on this machine; compare the two
columns within one run, not across machines.
"""

from __future__ import annotations

import base64
import json
import time
import tracemalloc
from collections.abc import Callable

from ollamaproxy.admission.policy import MAX_CHECKED_BODY, json_models
from ollamaproxy.errors import ProxyError

FIELDS = ("model", "name")
MiB = 1024 * 1024


def whole_document(body: bytes) -> object:
    """
    The former check: decode the whole body, building every object.
    """
    return json.loads(body, object_pairs_hook=dict)


def bounded(body: bytes) -> object:
    try:
        return json_models(body, FIELDS)
    except ProxyError as e:
        return e.code


def bodies() -> dict[str, bytes]:
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi " * 300}]}
    image = base64.b64encode(bytes(range(256)) * (12 * MiB // 256)).decode()
    return {
        "chat 1 KB": json.dumps(chat).encode(),
        "chat + image 16 MB": json.dumps({"model": "llava", "images": [image]}).encode()[
            : MAX_CHECKED_BODY - 1024
        ] + b'"]}',
        "6 MB of [{},...]": b'{"model":"x","messages":[' + b"{}," * (2 * MiB) + b"{}]}",
        "6 MB of [[],...]": b'{"model":"x","messages":[' + b"[]," * (2 * MiB) + b"[]]}",
        "16 MB of [0,...]": b'{"model":"x","input":[' + b"0," * (8 * MiB) + b"0]}",
        "5000 deep": b'{"model":"x","a":' + b"[" * 5000 + b"]" * 5000 + b"}",
        # The most a body may hold and still be decoded.
        "at the limits": b'{"model":"x","a":[' + b"[1,2,3,4,5,6,7,8]," * 99_990 + b"0]}",
    }


def measure(check: Callable[[bytes], object], body: bytes, runs: int = 3) -> tuple[float, float]:
    """
    Best time in milliseconds, and peak memory in MB, of checking C{body}.
    """
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        try:
            check(body)
        except (RecursionError, ValueError):
            pass
        best = min(best, time.perf_counter() - started)
    tracemalloc.start()
    try:
        check(body)
    except (RecursionError, ValueError):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best * 1000, peak / 1e6


def main() -> None:
    print(f"{'body':22} {'whole ms':>9} {'whole MB':>9} {'bounded ms':>11} {'bounded MB':>11}"
          f"  bounded answer")
    for name, body in bodies().items():
        whole_ms, whole_mb = measure(whole_document, body)
        bounded_ms, bounded_mb = measure(bounded, body)
        answer = bounded(body)
        print(f"{name:22} {whole_ms:9.1f} {whole_mb:9.1f} {bounded_ms:11.1f} {bounded_mb:11.1f}"
              f"  {answer}")


if __name__ == "__main__":
    main()
