# -*- test-case-name: tests.test_options -*-
"""
What is made from the table of options (the fields of
L{ollamaproxy.config.Config}): the options of C{twistd ollamaproxy}, and
C{docs/configuration.md}.

    python -m ollamaproxy.options > docs/configuration.md

writes the documentation; a test fails while the committed file differs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from twisted.python import usage

from ollamaproxy.config import Option, table

_Options = TypeVar("_Options", bound=type[usage.Options])

COMMAND = "python -m ollamaproxy.options > docs/configuration.md"

_INTRODUCTION = f"""\
# Configuration

<!-- Made by `{COMMAND}` from the table of options in
ollamaproxy/config.py: edit it there, not here. -->

Every option can also be given as an environment variable: `OLLAMAPROXY_` and the option's name
in capitals, `_` for `-`.  An option on the command line wins over the variable.  The `.tac`
file reads only the variables.  `twistd ollamaproxy --help` lists the same.  A setting the proxy
cannot work with (an endpoint string with a typo, an `ssl:` endpoint without its key, a log
directory or usage database it cannot write, a keys file of the wrong shape, a short `--api-key`)
stops the start with one line saying what is wrong and exit status 1, from `twistd ollamaproxy`
and the `.tac` file alike; `twistd ollamaproxy --version` prints the version.

"""

_CLOSING = """
Several instances side by side: `twistd -n --pidfile= ollamaproxy --listen tcp:5001 ...`.

The [README](../README.md) says more of what these settings do: several Ollama servers and the
fair queue, running many proxies (`reuseport:`, PostgreSQL, Redis), keys and their caps,
browsers (CORS), TLS, logging and metrics.
"""


def twistd_options(options: _Options) -> _Options:
    """
    Give a L{usage.Options} class one option for each row of the table:
    C{optParameters} for an option with a value, C{optFlags} for a flag,
    and an C{opt_} method that adds to a list for a repeating option
    (whose list L{repeating} names, for the class to start empty).

    Every default shows as C{[default: ...]}; the option's own default is
    L{None} (or C{0} for a flag), so that L{ollamaproxy.config.Config}
    knows it was not given and looks at the environment.
    """
    parameters: list[list[str | None]] = []
    flags: list[list[str | None]] = []
    for _, spec in table():
        line = f"{spec.help} [default: {spec.shown}]"
        if spec.flag:
            flags.append([spec.name, spec.short, line])
        elif spec.repeats:
            add = _adder(spec.name, line)
            for name in (spec.name, spec.short):
                if name:
                    setattr(options, "opt_" + name.replace("-", "_"), add)
        else:
            parameters.append([spec.name, spec.short, None, line])
    # usage.Options reads both as class attributes it does not declare.
    setattr(options, "optParameters", parameters)  # noqa: B010
    setattr(options, "optFlags", flags)  # noqa: B010
    return options


def repeating() -> list[str]:
    """
    The names of the options that may be given more than once.
    """
    return [spec.name for _, spec in table() if spec.repeats]


def _adder(name: str, doc: str) -> Callable[[usage.Options, str], None]:
    """
    An C{opt_} method for a repeating option: it adds each value given to
    the option's list.
    """

    def add(self: usage.Options, value: str) -> None:
        self[name].append(value)

    add.__doc__ = doc
    return add


def markdown() -> str:
    """
    C{docs/configuration.md}: what holds for every option, then one row of
    the table for each.
    """
    rows = [_row(spec) for _, spec in table()]
    return (
        _INTRODUCTION
        + "| option | variable | default | meaning |\n|---|---|---|---|\n"
        + "".join(f"| {' | '.join(row)} |\n" for row in rows)
        + _CLOSING
    )


def _row(spec: Option) -> list[str]:
    """
    The cells of an option's row in the documentation.
    """
    names = [f"--{spec.name}"] + ([f"-{spec.short}"] if spec.short else [])
    given = ", ".join(f"`{name}`" if spec.flag else f"`{name} {spec.metavar}`"
                      for name in names)
    variable = f"`{spec.variable}`"
    if spec.flag:
        variable = f"`{spec.variable}=1`"
    if spec.repeats:
        variable += " (comma-separated)"
    if spec.fallback:
        variable += f", then `{spec.fallback}`"
    default = spec.shown if spec.shown_default or spec.default is None else f"`{spec.shown}`"
    return [given, variable, default or "none", spec.doc]


def main() -> None:
    """
    Write C{docs/configuration.md} to standard output.
    """
    sys.stdout.write(markdown())


if __name__ == "__main__":
    main()
