# -*- test-case-name: tests.test_bench_plot,tests.test_gpu_sim,tests.test_scenarios -*-
"""
bench/'s scripts, loaded for the tests, and synthetic bench results to draw.
"""

from __future__ import annotations

import importlib.util
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"
PLOT = BENCH / "plot.py"


def load_plot() -> ModuleType:
    """
    bench/plot.py as a module.
    """
    return load_bench("plot")


def load_bench(name: str) -> ModuleType:
    """
    bench/NAME.py as a module: bench/ is not a package, so the script is
    loaded from its path.
    """
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered as an import would be: dataclasses look their module up.
    sys.modules[spec.name] = module
    # No bench/__pycache__: the tests write nowhere but their tmp_path.
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


def entry(streams: int, p50: float, p99: float, errors: int = 0,
          cpu_s: float | None = None) -> dict[str, Any]:
    """A per-target concurrency scenario as bench/run writes it (the fields plotted)."""
    chunks = streams * 100
    out: dict[str, Any] = {
        "mode": "stream", "streams": streams, "chunks": chunks, "error_count": errors,
        "latency_ms": {"n": chunks, "p50": p50, "p90": p99 / 2, "p99": p99, "max": p99 * 2},
    }
    if cpu_s is not None:
        out["proxy_cpu_s"] = cpu_s
    return out


def result(targets: dict[str, dict[str, dict[str, Any]]],
           date: str = "2026-01-01 00:00:00") -> dict[str, Any]:
    """A results file: meta, scenario definitions, and per-target scenarios."""
    return {
        "meta": {"date": date, "pinning": "target CPU 0", "logs": "/abs/logs/dir"},
        "scenarios": {f"c{c}": {"kind": "stream", "c": c} for c in (10, 100, 1000, 5000)},
        "targets": {name: {"note": "", "scenarios": s} for name, s in targets.items()},
    }


def full() -> dict[str, Any]:
    """Three targets at 10, 100 and 1,000 streams; direct has no proxy CPU."""
    return result({
        "direct": {f"c{c}": entry(c, 0.1 * c, 1.0 * c) for c in (10, 100, 1000)},
        "nginx": {f"c{c}": entry(c, 0.2 * c, 2.0 * c, cpu_s=c / 1000) for c in (10, 100, 1000)},
        "ollamaproxy": {
            f"c{c}": entry(c, 0.5 * c, 5.0 * c, cpu_s=c / 100) for c in (10, 100, 1000)
        },
        # Not a concurrency scenario: ignored.
        "other": {"a_latency": entry(1, 0.5, 1.0)},
    })


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.encode("utf-8"))
