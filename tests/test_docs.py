"""
The README says what an operator must know, and its commands work as
written.
"""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

from ollamaproxy.admission.keys import digest, load_keys_file
from ollamaproxy.cli import main
from ollamaproxy.config import Config
from ollamaproxy.tap import build_service

README = Path(__file__).resolve().parents[1] / "README.md"


def code_block_commands(text: str, program: str) -> list[list[str]]:
    """
    The commands of C{program} in the README's shell code blocks, as
    argument lists (continued lines joined, comments dropped, a command
    inside C{$(...)} taken out).
    """
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found = re.search(rf"(?:^|\$\()\s*({program} [^|)#]*)", line)
            if found:
                commands.append(shlex.split(found.group(1))[1:])
    return commands


def test_ollama_must_not_be_reachable_is_said_near_the_top() -> None:
    """
    Before the quick start, the README warns that Ollama's own port must
    not be reachable from the network, and says how.
    """
    top = README.read_text().split("## Quick start")[0]
    assert "Ollama itself must not be reachable from the network" in top
    assert "OLLAMA_HOST=127.0.0.1" in top and "11434" in top


def test_key_and_usage_commands_work_as_written(tmp_path: Path) -> None:
    """
    Every C{ollamaproxy} command in the README's code blocks, run in order
    as written, succeeds.
    """
    commands = code_block_commands(README.read_text(), "ollamaproxy")
    assert ["keys", "add", "alice"] in commands and ["usage"] in commands
    environ = {"OLLAMAPROXY_KEYS_FILE": str(tmp_path / "keys.json"),
               "OLLAMAPROXY_USAGE_FILE": str(tmp_path / "usage.sqlite3"), "HOME": str(tmp_path)}
    for argv in commands:
        err = io.StringIO()
        code = main(argv, stdout=io.StringIO(), stderr=err, environ=environ)
        assert (code, err.getvalue()) == (0, ""), argv


def test_a_lost_first_start_key_is_recovered_as_the_readme_says(tmp_path: Path) -> None:
    """
    The key made on the first start is named C{default}, so C{ollamaproxy
    keys rotate default}, as the README says, gives it a new secret that
    the proxy accepts, keeping its admin scope.
    """
    keys_file = tmp_path / "keys.json"
    config = Config(listen=("tcp:0:interface=127.0.0.1",), keys_file=str(keys_file),
                    usage_file=str(tmp_path / "usage.sqlite3"))
    build_service(config, MemoryReactorClock(), lambda text: None)
    text = README.read_text()
    assert "ollamaproxy keys rotate default" in text
    [before] = load_keys_file(str(keys_file))
    out = io.StringIO()
    code = main(["keys", "rotate", "default", "--keys-file", str(keys_file)], stdout=out,
                stderr=io.StringIO(), environ={})
    assert code == 0
    [after] = load_keys_file(str(keys_file))
    new_key = out.getvalue().splitlines()[-1]
    assert (after.name, after.scopes) == ("default", before.scopes)
    assert after.digest == digest(new_key) != before.digest
