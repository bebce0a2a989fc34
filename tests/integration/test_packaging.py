"""
What a release is: an sdist and a wheel built by C{python -m build}, that
C{twine check} passes, and that each install, with their dependencies, into
a fresh virtual environment where C{twistd ollamaproxy} and C{ollamaproxy}
run.

The build runs on a copy of the project (so that it leaves no C{build/} or
C{.egg-info} behind in it) without build isolation, with this
interpreter's setuptools and wheel.  The installs take their dependencies
from the package index pip is configured with (PyPI, or its cache), as an
operator's install does: only that shows that C{install_requires} is
complete.  Compare C{test_editable.py}, which borrows this interpreter's
packages instead and needs no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ollamaproxy import __version__
from tests.fakes.twistd import REPO

TIMEOUT = 600
#: Not part of what is built: version control, environments, caches.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "_trial_temp"
)
INSTALL = "pip install '.[test]' (it brings build and twine)"


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """
    Run C{command} without this process's C{PYTHONPATH}, so that nothing
    is imported from the project's checkout by accident.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def _require(module: str) -> None:
    """
    Fail, saying what to install, when a build tool is missing.
    """
    found = _run(sys.executable, "-c", f"import {module}", cwd=REPO)
    assert found.returncode == 0, f"the packaging test needs {module}: {INSTALL}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    The sdist and the wheel, built once for the module's tests.
    """
    _require("build")
    source = tmp_path_factory.mktemp("source") / "ollamaproxy"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES, symlinks=True)
    out = tmp_path_factory.mktemp("dist")
    built = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source,
                 cwd=source)
    assert built.returncode == 0, built.stdout + built.stderr
    return out


def test_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    """
    C{python -m build} makes one sdist and one wheel, of this version, and
    C{twine check --strict} finds nothing wrong with them (their metadata,
    the README as their long description).
    """
    _require("twine")
    assert sorted(p.name for p in dist.iterdir()) == [
        f"ollamaproxy-{__version__}-py3-none-any.whl",
        f"ollamaproxy-{__version__}.tar.gz",
    ]
    checked = _run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()),
                   cwd=dist)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("kind", ["whl", "tar.gz"], ids=["wheel", "sdist"])
def test_installs_into_a_fresh_environment_and_runs(
    dist: Path, kind: str, tmp_path: Path
) -> None:
    """
    The wheel, and the sdist, install with their dependencies into a new
    virtual environment; there, run outside the project, C{twistd
    ollamaproxy --help} shows the plugin's options and C{ollamaproxy
    --version} the version: the plugin, the console script and every
    package of C{ollamaproxy} are in it.
    """
    [package] = dist.glob(f"*.{kind}")
    venv = tmp_path / "venv"
    made = _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    installed = _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet",
                     "--disable-pip-version-check", package, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    where = _run(venv / "bin" / "python", "-c",
                 "import ollamaproxy.tap, os; print(os.path.realpath(ollamaproxy.__file__))",
                 cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv.resolve())

    helped = _run(venv / "bin" / "twistd", "ollamaproxy", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "Usage: twistd [options] ollamaproxy" in helped.stdout
    assert "--trusted-proxies" in helped.stdout
    version = _run(venv / "bin" / "ollamaproxy", "--version", cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"ollamaproxy {__version__}\n"), (
        version.stderr
    )
