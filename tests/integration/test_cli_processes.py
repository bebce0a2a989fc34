"""
Tests of L{ollamaproxy.cli} in real processes: the keys file's lock, taken
by two commands at once, and the installed C{ollamaproxy} console script.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from ollamaproxy.admission.keys import KeyStore, load_keys_file, looks_generated
from tests.fakes.cli import Result, add, assert_one_line_error

REPO = Path(__file__).resolve().parents[2]


def python(*argv: str) -> list[str]:
    """
    A command line running this checkout's code in a fresh interpreter.
    """
    return [sys.executable, *argv]


def child_environment() -> dict[str, str]:
    """
    The environment for child processes: this checkout first on the path.
    """
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [environ.get("PYTHONPATH")])]
    )
    return environ


ADDER = """
import os, sys, time
from ollamaproxy import __version__
from ollamaproxy.cli import main
go, path, prefix, count = sys.argv[1:]
while not os.path.exists(go):
    time.sleep(0.001)
with open(os.devnull, "w") as null:
    for i in range(int(count)):
        code = main(["keys", "add", f"{prefix}{i}", "--keys-file", path], stdout=null)
        if code:
            sys.exit(code)
"""


def test_concurrent_adds_all_survive(tmp_path: Path) -> None:
    """Two processes adding keys at the same moment lose none of each other's keys."""
    keys_file = tmp_path / "config" / "keys.json"
    go = tmp_path / "go"
    count = 25
    children = [
        subprocess.Popen(
            python("-c", ADDER, str(go), str(keys_file), prefix, str(count)),
            env=child_environment(),
            cwd=tmp_path,
        )
        for prefix in ["left", "right"]
    ]
    time.sleep(0.5)
    go.touch()
    assert [child.wait(timeout=60) for child in children] == [0, 0]
    names = sorted(key.name for key in load_keys_file(str(keys_file)))
    assert names == sorted(f"{p}{i}" for p in ["left", "right"] for i in range(count))


def test_add_waits_for_the_lock(tmp_path: Path) -> None:
    """add does not touch the keys file while another process holds its lock."""
    keys_file = tmp_path / "config" / "keys.json"
    add(keys_file, "alice")
    before = keys_file.read_bytes()
    with open(f"{keys_file}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        child = subprocess.Popen(
            python("-m", "ollamaproxy.cli", "keys", "add", "bob", "--keys-file", str(keys_file)),
            env=child_environment(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1)
            assert child.poll() is None
            assert keys_file.read_bytes() == before
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    found = KeyStore(load_keys_file(str(keys_file))).find(out.splitlines()[-1])
    assert found is not None and found.name == "bob"


def installed_script() -> str | None:
    """
    The installed C{ollamaproxy} console script: on C{PATH}, or beside this
    interpreter (a virtualenv that is not activated).
    """
    return shutil.which("ollamaproxy") or shutil.which(
        "ollamaproxy", path=os.path.dirname(sys.executable)
    )


def script_run(script: str, argv: Sequence[str], environ: Mapping[str, str]) -> Result:
    """
    Run the console script and collect what it did.
    """
    done = subprocess.run(
        [script, *argv], env=dict(environ), capture_output=True, text=True, timeout=60
    )
    return Result(done.returncode, done.stdout, done.stderr)


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """
    The installed ollamaproxy script adds, lists and rotates keys and exits
    2 on bad input; without the script installed, the test fails, saying
    how to install it.
    """
    script = installed_script()
    if script is None:
        pytest.fail(
            "the ollamaproxy console script is not installed, on PATH or beside "
            f"{sys.executable}: run pip install . (or pip install -e .) first"
        )
    environ = {**os.environ, "OLLAMAPROXY_KEYS_FILE": str(tmp_path / "keys.json")}
    added = script_run(script, ["keys", "add", "bob", "--rpm", "5"], environ)
    assert (added.code, added.err) == (0, "")
    key = added.last_line
    assert looks_generated(key)
    listed = script_run(script, ["keys", "list"], environ)
    assert listed.code == 0 and "bob" in listed.out and key not in listed.out
    rotated = script_run(script, ["keys", "rotate", "bob"], environ)
    assert rotated.code == 0
    store = KeyStore(load_keys_file(str(tmp_path / "keys.json")))
    assert store.find(key) is None
    assert store.find(rotated.last_line) is not None
    assert_one_line_error(script_run(script, ["keys", "add", "bob", "--rpm", "x"], environ), 2,
                          "--rpm")
    assert_one_line_error(script_run(script, ["keys", "revoke", "nobody"], environ), 1,
                          "no key named 'nobody'")
