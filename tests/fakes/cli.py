# -*- test-case-name: tests.cli.test_keys,tests.cli.test_usage,tests.cli.test_main -*-
"""
The C{ollamaproxy} command run in-process, for the tests of
L{ollamaproxy.cli}: L{run} calls L{main} with its streams, environment and
clock injected, and gives back a L{Result}.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ollamaproxy.cli import main

# The clock of every in-process run, unless a test gives another.
NOW = datetime(2026, 11, 27, 7, 0, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Result:
    """
    What one run of the command did.

    @ivar code: The exit code.
    @ivar out: Everything written to standard output.
    @ivar err: Everything written to standard error.
    """

    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        """
        The last line of standard output.
        """
        return self.out.splitlines()[-1]


def run(
    *argv: str, environ: Mapping[str, str] | None = None, now: datetime = NOW
) -> Result:
    """
    Run C{ollamaproxy ARGV...} in-process.  The environment is empty unless
    given, so no test can touch the real default keys file.
    """
    out, err = io.StringIO(), io.StringIO()
    code = main(
        list(argv),
        stdout=out,
        stderr=err,
        environ={"HOME": "/nonexistent"} if environ is None else environ,
        now=lambda: now,
    )
    return Result(code, out.getvalue(), err.getvalue())


def add(path: Path, name: str, *options: str, now: datetime = NOW) -> str:
    """
    Add a key, checking that it worked, and return the key.
    """
    result = run("keys", "add", name, *options, "--keys-file", str(path), now=now)
    assert (result.code, result.err) == (0, "")
    return result.last_line


def assert_one_line_error(result: Result, code: int, fragment: str) -> None:
    """
    The command failed with C{code}, printing nothing on standard output and
    one line on standard error: C{ollamaproxy: } and a message holding
    C{fragment}.
    """
    assert result.code == code, result
    assert result.out == ""
    assert result.err.startswith("ollamaproxy: ")
    assert result.err.endswith("\n") and result.err.count("\n") == 1, result.err
    assert "Traceback" not in result.err
    assert fragment in result.err
