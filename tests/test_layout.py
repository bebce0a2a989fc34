"""
The tests' own rules: helpers come only from L{tests.fakes}, every
C{test-case-name} header names tests that exist, every folder of tests is a
package, and the markers follow from where a test is and what it uses.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.fakes.markers import marks_for

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
HEADER = re.compile(r"^# -\*- test-case-name: (?P<names>[\w.,]+) -\*-$")


def imported_tests_modules(source: str) -> list[str]:
    """
    The modules of the C{tests} package that C{source} imports, by name; a
    relative import is given as its dots and name, since it can only be
    one of them.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                found.append("." * node.level + (node.module or ""))
            elif node.module is not None and node.module.split(".")[0] == "tests":
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "tests"]
    return found


def test_imports_are_read_from_import_statements() -> None:
    """
    L{imported_tests_modules} finds C{from} imports, plain imports and
    relative imports of test modules, and nothing else.
    """
    source = (
        "import json\nimport tests.web.test_app\nfrom tests.fakes.chain import Chain\n"
        "from .test_usage import x\nfrom ollamaproxy.tests import y\n"
        "def f():\n    from tests.record.test_usage import ManualWorker\n"
    )
    assert imported_tests_modules(source) == [
        "tests.web.test_app",
        "tests.fakes.chain",
        ".test_usage",
        "tests.record.test_usage",
    ]


def test_no_test_module_imports_another() -> None:
    """
    Every module under C{tests/} imports from the tests only what
    L{tests.fakes} holds: a helper kept in a test module is found by nobody
    who needs it, and importing a test module collects its tests twice.
    """
    wrong = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in imported_tests_modules(path.read_text(encoding="utf-8"))
        if not (name == "tests.fakes" or name.startswith("tests.fakes."))
    ]
    assert wrong == []


def test_test_case_names_name_tests_that_exist() -> None:
    """
    Every module of the proxy (but a package's C{__init__}) and of
    L{tests.fakes} starts with a C{test-case-name} header, and each name
    in it is a test module that exists.
    """
    modules = [
        *(REPO / "ollamaproxy").rglob("*.py"),
        *(TESTS / "fakes").rglob("*.py"),
    ]
    wrong = []
    for path in sorted(modules):
        if path.name == "__init__.py":
            continue
        first = path.read_text(encoding="utf-8").partition("\n")[0]
        header = HEADER.match(first)
        if header is None:
            wrong.append(f"{path.relative_to(REPO)}: no test-case-name header")
            continue
        for name in header.group("names").split(","):
            test = REPO.joinpath(*name.split(".")).with_suffix(".py")
            if not (name.startswith("tests.") and test.name.startswith("test_") and test.is_file()):
                wrong.append(f"{path.relative_to(REPO)}: {name} is no test module")
    assert wrong == []


def test_every_folder_of_tests_is_a_package() -> None:
    """
    Every folder under C{tests/} that holds Python files has an
    C{__init__.py}: the tests import one another's helpers as
    C{tests.fakes.x}, and pytest names two C{test_app.py} in two rooms
    apart only by their packages.
    """
    folders = {path.parent for path in TESTS.rglob("*.py")}
    assert sorted(
        str(folder.relative_to(REPO)) for folder in folders
        if not (folder / "__init__.py").is_file()
    ) == []


@pytest.mark.parametrize(
    ("where", "fixtures", "engines", "marks"),
    [
        ("web/test_app.py", ["tmp_path", "access_events"], False, set()),
        ("test_tap.py", [], False, set()),
        ("integration/test_twistd.py", ["reactor", "twistd"], False, {"integration"}),
        ("integration/test_postgres.py", ["postgres_url", "postgres", "postgres_cluster"], False,
         {"integration", "engines"}),
        ("integration/test_redis_shared.py", ["tmp_path"], False, {"integration", "engines"}),
        ("test_database_tap.py", ["postgres_url", "postgres_cluster"], False,
         {"integration", "engines"}),
        ("redis/test_limits.py", ["redis_server"], False, {"integration", "engines"}),
        ("console/test_usage_view.py", ["database"], True, {"integration", "engines"}),
        ("integration/test_console_browser.py", ["reactor"], False, {"integration", "browser"}),
    ],
)
def test_marks_follow_location_and_fixtures(
    where: str, fixtures: list[str], engines: bool, marks: set[str]
) -> None:
    """
    Under C{integration/}, a test is C{integration}; one that starts a real
    engine (by fixture, by its module, or marked so) is C{engines} and
    C{integration} wherever it is; the browser's is C{browser} too; any
    other test has no marker, and so runs in the quick loop.
    """
    assert marks_for(where, fixtures, engines) == marks
