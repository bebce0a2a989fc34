"""
A real C{twistd} told something it cannot work with: one line on the
terminal and a non-zero exit, never the help screen, never a traceback.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ollamaproxy import __version__
from tests.fakes.twistd import REPO, TWISTD

GOOD_KEY = "0123456789abcdef-integration"


def twistd(tmp_path: Path, *args: str, environ: dict[str, str] | None = None,
           tac: bool = False) -> subprocess.CompletedProcess[str]:
    """
    Run C{twistd -n ollamaproxy ARGS} (or the C{.tac} file, configured by
    C{environ}) in C{tmp_path}, bounded in time.
    """
    command = (
        [TWISTD, "-n", "--pidfile=", "-y", str(REPO / "ollamaproxy.tac")]
        if tac
        else [TWISTD, "-n", "--pidfile=", "ollamaproxy", *args]
    )
    env = {"PYTHONPATH": str(REPO), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    env.update(environ or {})
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--listen", "5000"], "--listen: '5000' is not an endpoint string"),
        (["--listen", "tcp:5000:interfase=127.0.0.1"], "unknown parameter 'interfase'"),
        (["--log-dir", "{tmp}/file/logs"], "--log-dir: cannot write log files in"),
        (["--keys-file", "{tmp}/file"], "is not valid"),
        (["--redis", "http://u:hunter2pass@cache:6379"],
         "--redis: 'http://u:[redacted]@cache:6379' is not a Redis URL"),
        (["--redis-failure", "open"], "--redis-failure: 'open' is not one of local, closed"),
    ],
)
def test_a_mistake_is_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    """
    C{twistd ollamaproxy} with a configuration mistake prints one line
    naming it, exits with a non-zero status, and shows neither its help
    screen nor a traceback.
    """
    (tmp_path / "file").write_text("[]")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    if "--listen" not in args:
        args += ["--listen", "tcp:0:interface=127.0.0.1"]
    done = twistd(tmp_path, *args, "--api-key", GOOD_KEY,
                  "--usage-file", str(tmp_path / "usage.db"))
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("\n") == 1 and output.startswith("ollamaproxy: "), output
    assert fragment in output
    assert "Traceback" not in output and GOOD_KEY not in output
    assert "hunter2pass" not in output


def test_the_tac_file_says_it_in_one_line_too(tmp_path: Path) -> None:
    """The C{.tac} file, configured by the environment, stops on a mistake with one line."""
    done = twistd(tmp_path, tac=True, environ={
        "OLLAMAPROXY_LISTEN": "tcp:0:interface=127.0.0.1",
        "OLLAMAPROXY_API_KEY": GOOD_KEY,
        "OLLAMAPROXY_USAGE_FILE": str(tmp_path),
    })
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output == (
        f"ollamaproxy: --usage-file: {tmp_path} is a directory; give the path of a file\n"
    )


def test_version(tmp_path: Path) -> None:
    """C{twistd ollamaproxy --version} prints ollamaproxy's version and exits 0."""
    done = twistd(tmp_path, "--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ollamaproxy {__version__}\n", "")
