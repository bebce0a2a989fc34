"""
Fixtures shared by the tests of L{ollamaproxy.cli}.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    """
    A keys file in a directory that does not exist yet.
    """
    return tmp_path / "config" / "keys.json"
