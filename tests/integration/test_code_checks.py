"""
The checks of the code, run by the suite so that the one test command (and
CI) runs them: mypy --strict, ruff, and the import-linter contract that
keeps the rooms importing one way (pyproject.toml, docs/architecture.md).
Each runs as its own command, in a process of its own, on the checkout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["mypy"],
        ["ruff", "check", "."],
        ["lint-imports"],
    ],
    ids=["mypy", "ruff", "lint-imports"],
)
def test_code_check_passes(command: list[str]) -> None:
    """
    The check finds nothing: a type error, a lint error or an import that
    runs up a layer fails the suite, with the check's own report.
    """
    tool = BIN / command[0]
    assert tool.exists(), f"{command[0]} is not installed: pip install '.[test]'"
    done = subprocess.run(
        [str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
