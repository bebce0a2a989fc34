"""
bench/plot.py run as a command, in a process of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fakes.bench import PLOT, full, load_plot, parse

plot = load_plot()


def test_cli(tmp_path: Path) -> None:
    """
    The script run as a command writes the same SVG render gives, to -o.
    """
    source, out = tmp_path / "results.json", tmp_path / "chart.svg"
    source.write_text(json.dumps(full()), encoding="utf-8")
    subprocess.run([sys.executable, str(PLOT), str(source), "-o", str(out)], check=True,
                   capture_output=True, timeout=60)
    svg = out.read_text(encoding="utf-8")
    assert svg == plot.render([plot.load(str(source))], [str(source)])
    parse(svg)
    assert str(tmp_path) not in svg
