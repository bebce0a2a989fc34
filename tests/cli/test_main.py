"""
Tests for L{ollamaproxy.cli.main}: C{ollamaproxy --version}, C{--help},
and the one-line error every command gives for a wrong command line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ollamaproxy import __version__
from tests.fakes.cli import assert_one_line_error, run


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "required: COMMAND"),
        (["frob"], "invalid choice: 'frob'"),
        (["keys"], "required: ACTION"),
        (["keys", "frob"], "invalid choice: 'frob'"),
        (["keys", "add"], "required: NAME"),
        (["keys", "revoke"], "required: NAME"),
        (["keys", "add", "bob", "--bogus"], "unrecognized arguments: --bogus"),
        (["keys", "add", "bob", "extra"], "unrecognized arguments: extra"),
        (["keys", "add", "bob", "--rpm", "0"], "--rpm: '0' is not a whole number from 1"),
        (["keys", "add", "bob", "--rpm", "-1"], "--rpm"),
        (["keys", "add", "bob", "--rpm", "ten"], "'ten' is not a whole number"),
        (["keys", "add", "bob", "--rpm"], "--rpm: expected one argument"),
        (["keys", "add", "bob", "--max-streams", "1.5"], "--max-streams: '1.5' is not"),
        (["keys", "add", "bob", "--max-streams", "\u0663"], "--max-streams"),
        (["keys", "add", "bob", "--models"], "--models: expected one argument"),
        (["keys", "add", "bob", "--models", ""], "a model pattern cannot be empty"),
        (["keys", "add", "bob", "--models", "a,,b"], "a model pattern cannot be empty"),
        (["keys", "add", "bob", "--models", "a", "b"],
         "unrecognized arguments: b (--models takes one pattern or a comma-separated list"),
        (["keys", "add", "--models", "a"], "the following arguments are required: NAME"),
        (["keys", "add", "bob", "--expires", "soon"], "--expires: 'soon' is not a date"),
        (["keys", "add", "bob", "--expires", "2027-02-30"], "'2027-02-30' is not a date"),
        (["keys", "add", "bob", "--expires", "9999-12-31T23:00:00-05:00"], "is not a date"),
        (["keys", "add", "bob", "--expires", "2026-01-01"],
         "2026-01-01T00:00:00Z is not in the future"),
        (["keys", "add", "bob", "--expires", "2026-11-27T07:00:00Z"], "is not in the future"),
        (["keys", "add", ""], "'' is not a key name"),
        (["keys", "add", "x" * 65], "is not a key name"),
        (["keys", "add", "bad name"], "'bad name' is not a key name"),
        (["keys", "add", "b\u00f6b"], "is not a key name"),
        (["keys", "add", "bob\n"], "is not a key name"),
        (["keys", "add", "a/b"], "is not a key name"),
        (["keys", "add", "api-key"], "reserved for the key given with --api-key"),
        (["usage", "--since", "soon"], "--since: 'soon' is not a date or time such as"),
        (["usage", "--since", "2026-02-30"], "--since: '2026-02-30' is not a date"),
        (["usage", "--since"], "--since: expected one argument"),
        (["usage", "--by", "ts"], "--by: invalid choice: 'ts'"),
        (["usage", "extra"], "unrecognized arguments: extra"),
        (["usage", "--keys-file", "x"], "unrecognized arguments: --keys-file"),
    ],
)
def test_usage_errors(keys_file: Path, argv: list[str], fragment: str) -> None:
    """A wrong command line gives one line on stderr, exit code 2, and no keys file change."""
    result = run(*argv, environ={"OLLAMAPROXY_KEYS_FILE": str(keys_file)})
    assert_one_line_error(result, 2, fragment)
    assert not keys_file.parent.exists()


def test_version() -> None:
    """C{ollamaproxy --version} prints ollamaproxy's version on stdout and exits 0."""
    result = run("--version")
    assert (result.code, result.out, result.err) == (0, f"ollamaproxy {__version__}\n", "")


def test_help_goes_to_stdout() -> None:
    """--help prints usage on the given standard output and exits 0."""
    result = run("keys", "add", "--help")
    assert (result.code, result.err) == (0, "")
    assert result.out.startswith("usage: ollamaproxy keys add")
    assert "--max-streams" in result.out
