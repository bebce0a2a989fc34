"""
Tests for the table of options (L{ollamaproxy.config.Config}'s fields) and
what is made from it (L{ollamaproxy.options}): every option reaches
twistd's options and help, the environment the C{.tac} file reads, the
L{Config} and C{docs/configuration.md}, and the table stays in the base
layer.
"""

# Twisted's usage.Options is unannotated; pyproject.toml allows calling it.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest

from ollamaproxy.config import Config, Option, table
from ollamaproxy.options import COMMAND, markdown
from ollamaproxy.tap import Options, ProxyOptions

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
# The rooms above the base layer: the table may import none of them.
ROOMS = ("web", "admission", "backends", "record", "redis", "postgres", "console", "tap",
         "cli")
# A value for each option other than its default.
SAMPLES = {
    "listen": "tcp:5001",
    "upstream": "gpu-box",
    "parallel": "2",
    "max-queue": "7",
    "queue-timeout": "5",
    "fair-share": "requests",
    "output-token-weight": "1.5",
    "switch-hold": "0",
    "max-keep-alive": "10m",
    "max-num-ctx": "2048",
    "api-key": "sample-key-0123456789",
    "keys-file": "/sample/keys.json",
    "log-dir": "/sample/logs",
    "open-routes": "GET /health",
    "connect-timeout": "1",
    "header-timeout": "2",
    "idle-timeout": "3",
    "client-timeout": "4",
    "grace-period": "0",
    "drain-delay": "5",
    "max-body-size": "1M",
    "min-body-rate": "2K",
    "cors-origins": "https://chat.example.com",
    "usage-file": "/sample/usage.sqlite3",
    "metrics-listen": "tcp:9100:interface=127.0.0.1",
    "log-max-bytes": "1M",
    "log-backups": "3",
    "log-bodies": "1",
    "log-body-bytes": "1K",
    "trusted-proxies": "10.0.0.5",
    "database": "postgresql://db/proxy",
    "redis": "redis://cache",
    "redis-failure": "closed",
    "redis-lease": "10",
    "keep-loaded-context": "no",
    "affinity-slack": "off",
}
ENVIRON = {"HOME": "/home/sample"}


def options() -> list[tuple[str, Option]]:
    """
    The table: each option with the name of its L{Config} field.
    """
    return list(table())


def from_environment(environ: dict[str, str]) -> Config:
    """
    The settings as the C{.tac} file reads them: no arguments, only the
    environment.
    """
    parsed = Options(environ=environ)
    parsed.parseOptions([])
    return parsed.config


def test_every_field_is_an_option() -> None:
    """Each field of Config is declared with its option, and no two options share a name."""
    names = [spec.name for _, spec in options()]
    assert [field for field, _ in options()] == [each.name for each in fields(Config)]
    assert len(set(names)) == len(names)


def test_samples_cover_the_table() -> None:
    """The tests below have a value for every option, so a new option cannot go unchecked."""
    assert sorted(SAMPLES) == sorted(spec.name for _, spec in options())


def test_every_option_in_twistd_help() -> None:
    """twistd ollamaproxy --help lists every option, with its default."""
    # The help is wrapped at hyphens too (vscode-file://): rejoin those.
    text = " ".join(re.sub(r"(?<=\w-)\n\s+", "", str(ProxyOptions(environ={}))).split())
    for _, spec in options():
        assert f"--{spec.name}" in text
        assert f"[default: {spec.shown}]" in text


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_tac_reads_every_variable(name: str) -> None:
    """Each option's variable, alone in the environment, changes the option's field."""
    field, spec = next((field, spec) for field, spec in options() if spec.name == name)
    default = from_environment(ENVIRON)
    config = from_environment({**ENVIRON, spec.variable: SAMPLES[name]})
    assert getattr(config, field) != getattr(default, field)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_option_and_variable_agree(name: str) -> None:
    """Each option given to twistd sets the same value as its variable does."""
    spec = next(spec for _, spec in options() if spec.name == name)
    args = [f"--{name}"] if spec.flag else [f"--{name}", SAMPLES[name]]
    given = ProxyOptions(environ=ENVIRON)
    given.parseOptions(args)
    assert given.config == from_environment({**ENVIRON, spec.variable: SAMPLES[name]})


def test_defaults_are_the_fields_defaults() -> None:
    """
    With nothing given, every field holds the default Config declares for
    it, read from its option's default text; only the files whose place
    depends on the environment differ.
    """
    config = Config.from_sources({}, ENVIRON)
    assert config == Config(keys_file="/home/sample/.config/ollamaproxy/keys.json",
                            usage_file="/home/sample/.local/state/ollamaproxy/usage.sqlite3")
    for field, spec in options():
        if spec.default and not spec.repeats:
            assert spec.parse(spec.name, spec.default) == getattr(Config(), field)


def test_a_bad_variable_names_the_option() -> None:
    """A bad value in any option's variable is refused with the option's name."""
    for name in ("max-queue", "redis-lease", "trusted-proxies", "metrics-listen"):
        variable = next(spec.variable for _, spec in options() if spec.name == name)
        with pytest.raises(SystemExit, match=f"^ollamaproxy: --{name}: "):
            from_environment({variable: "not right"})


def test_bodies_are_logged_only_with_log_bodies() -> None:
    """--log-body-bytes says how much is logged, but only --log-bodies turns it on."""
    assert Config(log_body_bytes=100).body_sample_bytes == 0
    assert Config(log_bodies=True, log_body_bytes=100).body_sample_bytes == 100


def test_every_option_in_the_doc() -> None:
    """docs/configuration.md has a row for every option, naming its variable."""
    text = DOC.read_text()
    for _, spec in options():
        assert f"| `--{spec.name}" in text
        assert f"`{spec.variable}" in text


def test_the_doc_is_current() -> None:
    """The committed docs/configuration.md is what the table makes now."""
    assert DOC.read_text() == markdown(), f"docs/configuration.md is stale: run {COMMAND}"


def imports(module: str) -> set[str]:
    """
    The ollamaproxy modules that C{module} imports when it runs, directly
    or through another ollamaproxy module (read from the source, not
    imported; imports for annotations alone do not count).
    """
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text())
        only_typing = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in only_typing:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                found = [node.module]
            elif isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            else:
                continue
            todo.extend(each for each in found if each.startswith("ollamaproxy."))
    return seen - {module}


@pytest.mark.parametrize("module", ["ollamaproxy.config", "ollamaproxy.options"])
def test_the_table_is_in_the_base_layer(module: str) -> None:
    """The table and what is made from it import no room, not even indirectly."""
    rooms = {name for name in imports(module) if name.split(".")[1] in ROOMS}
    assert rooms == set()


@pytest.mark.parametrize(("value", "keep"), [("yes", True), ("on", True), ("No", False),
                                             ("0", False)])
def test_keep_loaded_context_is_a_switch(value: str, keep: bool) -> None:
    """
    C{--keep-loaded-context} is on by default and takes yes or no (or a
    flag's other words); anything else stops the start.
    """
    assert from_environment({}).keep_loaded_context is True
    parsed = Options(environ={})
    parsed.parseOptions(["--keep-loaded-context", value])
    assert parsed.config.keep_loaded_context is keep
    with pytest.raises(SystemExit, match=r"^ollamaproxy: --keep-loaded-context: "):
        Options(environ={}).parseOptions(["--keep-loaded-context", "maybe"])
