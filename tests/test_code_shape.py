"""
The shape the package keeps (docs/development.md): functions short enough to
read at once, the request and the reactor typed by what is used of them, and
Twisted's private names only in their fenced module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ollamaproxy"
#: The modules that wire or read options, held to a shorter length.
WIRING = ("tap.py", "config.py", "options.py", "cli")
FENCE = PACKAGE / "twisted_internals.py"


def modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_long_functions() -> None:
    """
    No function of the package is over 80 lines, nor over 60 in the modules
    that wire the daemon and read its options.
    """
    long = []
    for path, tree in modules():
        relative = path.relative_to(PACKAGE)
        limit = 60 if relative.parts[0] in WIRING else 80
        long += [
            f"{relative}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in functions(tree)
            if node.end_lineno is not None and node.end_lineno - node.lineno + 1 > limit
        ]
    assert long == []


def test_request_and_reactor_are_typed() -> None:
    """
    No parameter named C{request} or C{reactor} is annotated C{Any}: a
    request is the web server's or the relay's protocol, a reactor the
    interfaces used of it.
    """
    untyped = []
    for path, tree in modules():
        for node in functions(tree):
            arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            untyped += [
                f"{path.relative_to(PACKAGE)}: {node.name}({argument.arg})"
                for argument in arguments
                if argument.arg in ("request", "reactor")
                and isinstance(argument.annotation, ast.Name)
                and argument.annotation.id == "Any"
            ]
    assert untyped == []


def test_private_twisted_names_only_in_their_fence() -> None:
    """
    Only L{ollamaproxy.twisted_internals} imports a name Twisted keeps
    private (a C{_name}, or from a C{_module}).
    """
    found = []
    for path, tree in modules():
        if path == FENCE:
            continue
        for node in ast.walk(tree):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module is not None and module.startswith("twisted"):
                assert isinstance(node, ast.ImportFrom)
                private_module = any(part.startswith("_") for part in module.split("."))
                names = [alias.name for alias in node.names if alias.name.startswith("_")]
                if private_module or names:
                    found.append(f"{path.relative_to(PACKAGE)}: {module} {names}")
    assert found == []
