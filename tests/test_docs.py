"""
The README and the pages of C{docs/} say what an operator must know, their
commands work as written, their links lead somewhere, and the changelog's
fragments build.
"""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from towncrier.build import _main as towncrier_build
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.scripts.twistd import ServerOptions  # type: ignore[attr-defined]  # per platform

from ollamaproxy.admission.keys import digest, load_keys_file
from ollamaproxy.cli import main
from ollamaproxy.config import Config
from ollamaproxy.exchange import OUTCOMES
from ollamaproxy.reactors import daemon_reactor
from ollamaproxy.tap import build_service

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
#: Every page whose links are followed: what an operator reads.
PAGES = [README, ROOT / "CHANGELOG.md", ROOT / "newsfragments" / "README.md", *DOCS]
#: The README is the front page; the rest is in docs/.
README_LINES = 200


def shell_commands(text: str) -> list[list[str]]:
    """
    The simple commands of a page's C{sh} code blocks, in order, as argument
    lists: continued lines joined, comments dropped, each pipeline, list and
    C{$(...)} split into its commands, and leading C{NAME=value}
    assignments left out.
    """
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            command: list[str] = []
            for token in [*lexer, ";"]:
                if token and set(token) <= set(lexer.punctuation_chars):
                    if command:
                        commands.append(command)
                    command = []
                elif command or not re.match(r"\w+=", token):
                    command.append(token)
    return commands


def commands_of(page: Path, program: str) -> list[list[str]]:
    """
    The arguments of every command of C{program} on C{page} (called by
    name or by a path to it, such as C{.venv/bin/twistd}).
    """
    return [
        command[1:]
        for command in shell_commands(page.read_text())
        if Path(command[0]).name == program
    ]


def github_anchor(heading: str) -> str:
    """
    The anchor GitHub gives a Markdown heading: lower case, punctuation
    other than C{-} and C{_} dropped, spaces as C{-}.
    """
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """
    The anchors of C{page}'s headings (code blocks left out).
    """
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def local_links(page: Path) -> list[tuple[Path, str]]:
    """
    Every link and image of C{page} to a file of the repository, as the
    path it leads to and its anchor (C{""} if none); code is left out.
    """
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        found.append(((page.parent / path).resolve() if path else page, anchor))
    return found


def test_ollama_must_not_be_reachable_is_said_near_the_top() -> None:
    """
    Before the quick start, the README warns that Ollama's own port must
    not be reachable from the network, and says how.
    """
    top = README.read_text().split("## Quick start")[0]
    assert "Ollama itself must not be reachable from the network" in top
    assert "OLLAMA_HOST=127.0.0.1" in top and "11434" in top


def test_readme_is_short() -> None:
    """
    The README stays a front page: the rest of what there is to say goes
    into a page of C{docs/}.
    """
    assert len(README.read_text().splitlines()) <= README_LINES


def test_readme_test_command_is_the_ci_command() -> None:
    """
    The README's test command is the line C{.ci/run} runs, so what a
    newcomer runs is what CI runs.
    """
    ci = (ROOT / ".ci" / "run").read_text().splitlines()[-1]
    assert ci.startswith("bash .ci/system-packages")
    assert f"```sh\n{ci}\n```" in README.read_text()


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: str(page.relative_to(ROOT)))
def test_key_and_usage_commands_work_as_written(page: Path, tmp_path: Path) -> None:
    """
    Every C{ollamaproxy} command in a page's code blocks, run in order as
    written against a keys file and a usage file of its own, succeeds.
    (Their environment, such as an C{export OLLAMAPROXY_DATABASE=...}, is
    the test's: no PostgreSQL is asked.)
    """
    environ = {"OLLAMAPROXY_KEYS_FILE": str(tmp_path / "keys.json"),
               "OLLAMAPROXY_USAGE_FILE": str(tmp_path / "usage.sqlite3"), "HOME": str(tmp_path)}
    for argv in commands_of(page, "ollamaproxy"):
        err = io.StringIO()
        code = main(argv, stdout=io.StringIO(), stderr=err, environ=environ)
        assert (code, err.getvalue()) == (0, ""), argv


def test_the_pages_manage_keys_and_read_usage() -> None:
    """
    The commands above are there to be run: the README and C{docs/keys.md}
    show how to add a key and read the usage.
    """
    for page in (README, ROOT / "docs" / "keys.md"):
        commands = commands_of(page, "ollamaproxy")
        assert ["keys", "add", "alice"] in commands, page.name
    assert ["usage"] in commands_of(README, "ollamaproxy")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: str(page.relative_to(ROOT)))
def test_twistd_commands_parse(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    Every C{twistd} command in a page's code blocks is one twistd and the
    C{ollamaproxy} plugin accept, names a C{.tac} file that exists, and
    gives C{--pidfile=} so that it starts beside another instance in the
    same directory.
    """
    for argv in commands_of(page, "twistd"):
        options = ServerOptions()
        try:
            options.parseOptions(argv)
        except (SystemExit, UsageError) as e:
            pytest.fail(f"{argv}: {e} {capsys.readouterr().err}")
        assert options.subCommand == "ollamaproxy" or (ROOT / options["python"]).is_file(), argv
        assert options["pidfile"] == "", argv


def test_some_pages_show_twistd_commands() -> None:
    """
    The test above has commands to check: the quick start's, the TLS
    endpoint's and the C{.tac} file's among them.
    """
    commands = [argv for page in [README, *DOCS] for argv in commands_of(page, "twistd")]
    assert any("ollamaproxy.tac" in argv for argv in commands)
    assert any(arg.startswith("ssl:") for argv in commands for arg in argv)
    assert ["-n", "--pidfile=", "ollamaproxy"] in commands


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_lead_somewhere(page: Path) -> None:
    """
    Every link of a page to a file of the repository leads to one that
    exists, and a link to a heading leads to a heading that exists.
    """
    for path, anchor in local_links(page):
        assert path.exists(), (page.name, path)
        if anchor:
            assert anchor in anchors(path), (page.name, path.name, anchor)


def test_readme_links_every_page_of_docs() -> None:
    """
    Every page of C{docs/} can be reached from the README, and so can the
    changelog.
    """
    linked = {path for path, _ in local_links(README)}
    assert {*DOCS, ROOT / "CHANGELOG.md"} <= linked


def test_the_access_log_outcomes_are_all_documented() -> None:
    """
    Every outcome an access line can give is explained in the logging page.
    """
    text = (ROOT / "docs" / "logging-and-metrics.md").read_text()
    assert {outcome for outcome in OUTCOMES if f"`{outcome}`" not in text} == set()


def test_the_news_fragments_build() -> None:
    """
    towncrier builds the next changelog entry from C{newsfragments/}: a
    fragment with a name towncrier cannot read fails this, as it would
    fail the release.
    """
    result = CliRunner().invoke(
        towncrier_build, ["--draft", "--version", "0.0.0", "--dir", str(ROOT)]
    )
    assert result.exit_code == 0, result.output


def test_the_news_fragments_say_something() -> None:
    """
    A fragment whose text goes into the changelog (all types but C{misc})
    is not empty.
    """
    for fragment in (ROOT / "newsfragments").iterdir():
        if fragment.name != "README.md" and fragment.name.split(".")[1] != "misc":
            assert fragment.read_text().strip(), fragment.name


def test_a_lost_first_start_key_is_recovered_as_the_readme_says(tmp_path: Path) -> None:
    """
    The key made on the first start is named C{default}, so C{ollamaproxy
    keys rotate default}, as the README says, gives it a new secret that
    the proxy accepts, keeping its admin scope.
    """
    keys_file = tmp_path / "keys.json"
    config = Config(listen=("tcp:0:interface=127.0.0.1",), keys_file=str(keys_file),
                    usage_file=str(tmp_path / "usage.sqlite3"))
    build_service(config, daemon_reactor(MemoryReactorClock()), lambda text: None)
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
