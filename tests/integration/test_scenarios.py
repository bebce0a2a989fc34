"""
bench/scenarios.py run as a command: one tiny scenario end to end against
Ollama alone (the simulator) and the proxy (a real twistd), in processes of
its own on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.bench import BENCH, load_bench

RUN_TIMEOUT = 240.0
scenarios = load_bench("scenarios")


def test_a_tiny_flood_runs_against_two_targets(tmp_path: Path) -> None:
    """
    The flood scenario at a tenth of its size, against the simulator
    directly and through the proxy, writes a result whose figures are
    there and sane for both: interactive requests answered, none failed,
    percentiles in order, the flood lasting at least one long request's
    service time, the prompt tokens seen by the simulator; the Markdown has
    a row per target and the goal, and the plot exists.
    """
    with subprocess.Popen(
        [sys.executable, str(BENCH / "scenarios.py"), "--only", "flood",
         "--targets", "ollama,proxy", "--scale", "0.1", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            # The runner and whatever it started: its own session, by id.
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    assert process.returncode == 0, output.decode(errors="replace")
    [result] = tmp_path.glob("scenarios-*.json")
    flood = json.loads(result.read_text())["scenarios"]["flood"]["targets"]
    assert sorted(flood) == ["ollama", "proxy"]
    for figures in flood.values():
        ttft = figures["ttft"]
        assert ttft["n"] >= 4 and figures["failed"] == 0
        assert 0 < figures["idle_ttft"] < 1.0
        assert 0 < ttft["p50"] <= ttft["p99"] <= ttft["max"]
        assert figures["batch_done"] >= figures["long_service"] > 1.0
        assert figures["sim"]["prompt_tokens"] > 0 and figures["sim"]["loads"] == 0
    md = result.with_suffix(".md").read_text()
    assert "| ollama |" in md and "| proxy |" in md and "- goal, proxy:" in md
    assert len(list(tmp_path.glob("scenarios-*-flood.svg"))) == 1


def test_a_process_started_without_a_reactor_is_stopped_however_it_went(
    tmp_path: Path,
) -> None:
    """
    C{started} (what first_token.py and callgrind_ratio.py run their
    processes with) fails for a process that exits before its port
    listens, saying what it wrote, and stops one that listens when its
    block ends: nothing is left running either way.
    """
    port = scenarios.free_port()
    quits = [sys.executable, "-c", "print('no port for me')"]
    with pytest.raises(RuntimeError, match="no port for me"), \
            scenarios.started("quits", quits, tmp_path, port):
        pass
    serves = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    with scenarios.started("serves", serves, tmp_path, port) as process:
        assert process.popen.poll() is None
    assert process.popen.poll() is not None
