"""
The README's development steps: an editable install (C{pip install -e .})
gives a working C{twistd ollamaproxy}, without C{PYTHONPATH}.

Twisted finds plugins by scanning C{sys.path} for C{twisted/plugins}
directories; an editable install must therefore put the project's root on
C{sys.path}, not only an import hook for its packages.  The install is made
into a fresh virtual environment that borrows this interpreter's packages
(Twisted, Klein, setuptools, wheel), with no build isolation, no index and
no dependencies, so it needs no network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ollamaproxy import __version__
from tests.fakes.twistd import REPO

TIMEOUT = 300
# twistd, run by the new environment's Python (it has no scripts of its own
# but the ones the editable install makes).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
WHERE = (
    "import os, ollamaproxy, twisted.plugins; "
    "print(os.path.realpath(os.path.dirname(ollamaproxy.__file__))); "
    "print(*[os.path.realpath(p) for p in twisted.plugins.__path__], sep='\\n')"
)

# The files the operator console serves, as the installed package has them.
CONSOLE_FILES = (
    "from ollamaproxy.console.web import static_files; print(*sorted(static_files()))"
)


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "regular"])
def test_install_gives_a_working_twistd_plugin(tmp_path: Path, editable: bool) -> None:
    """
    After C{pip install -e REPO} (or C{pip install REPO}, the README's quick
    start) into a fresh environment, C{twistd ollamaproxy --version} and
    C{ollamaproxy --version} work there without C{PYTHONPATH}, run outside
    the project: the plugin is on Twisted's plugin path, and C{ollamaproxy}
    is imported from the project (editable) or from the environment, with
    every one of its packages.
    """
    venv = tmp_path / "venv"
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    found = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                 cwd=tmp_path)
    site_packages = Path(found.stdout.strip())
    (site_packages / "_borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    installed = _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                     "--no-deps", "--no-build-isolation", "--no-index",
                     *(["-e"] if editable else []), REPO, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    where = _run(python, "-c", WHERE, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    package, *plugin_path = where.stdout.splitlines()
    if editable:
        assert package == os.path.realpath(REPO / "ollamaproxy")
        assert os.path.realpath(REPO / "twisted" / "plugins") in plugin_path
    else:
        assert package == os.path.realpath(site_packages / "ollamaproxy")
        assert os.path.realpath(site_packages / "twisted" / "plugins") in plugin_path

    twistd = _run(python, "-c", TWISTD, "ollamaproxy", "--version", cwd=tmp_path)
    assert (twistd.returncode, twistd.stdout) == (0, f"ollamaproxy {__version__}\n"), (
        twistd.stderr
    )
    command = _run(venv / "bin" / "ollamaproxy", "--version", cwd=tmp_path)
    assert (command.returncode, command.stdout) == (0, f"ollamaproxy {__version__}\n")

    # The console's page ships inside the package (package_data).
    console = _run(python, "-c", CONSOLE_FILES, cwd=tmp_path)
    shipped = ["console.css", "console.js", "favicon.svg", "index.html"]
    assert console.stdout.split() == shipped, console.stderr
