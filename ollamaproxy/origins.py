# -*- test-case-name: tests.web.test_cors,tests.test_options -*-
"""
Browser origins allowed to call the proxy (C{--cors-origins}): the
defaults, and reading a list of origin patterns.

In the base layer so that the options (L{ollamaproxy.config}) can check
the setting without importing the web room; L{ollamaproxy.web.cors}
answers browsers with what is read here.
"""

from __future__ import annotations

import re

from ollamaproxy.errors import ConfigError

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")

DEFAULT_ORIGINS: tuple[str, ...] = (
    "chrome-extension://*",
    "moz-extension://*",
    "safari-web-extension://*",
    *(
        f"{scheme}://{host}{port}"
        for host in _LOCAL_HOSTS
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    # Ollama's own defaults: desktop apps, local files, editor webviews.
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)

_PATTERN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s*]*\*?[^/\s*]*$")


def parse_origins(value: str, *, option: str = "cors-origins") -> tuple[str, ...]:
    """
    Parse a comma-separated list of origin patterns, such as
    C{"https://chat.example.com,chrome-extension://*"}.

    Patterns are lower-cased and empty items skipped, so C{""} allows no
    origin (only same-site ones, see L{Cors.allows}).  A C{*} anywhere in the
    list allows every origin, and the result is then C{("*",)}.

    @param option: The setting's name, for error messages.
    @raise ConfigError: If an item is neither C{*} nor C{scheme://host[:port]}
        with at most one C{*} and no path.
    """
    origins: list[str] = []
    for item in value.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item == "*":
            return ("*",)
        if not _PATTERN.match(item) or item.endswith("://"):
            raise ConfigError(
                f"--{option}: {item!r} is not '*' or an origin such as "
                "https://chat.example.com or chrome-extension://* "
                "(scheme://host[:port], at most one '*', no path or trailing '/')"
            )
        if item not in origins:
            origins.append(item)
    return tuple(origins)
