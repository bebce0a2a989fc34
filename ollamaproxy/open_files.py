# -*- test-case-name: tests.test_open_files -*-
"""
The open files limit (file descriptors): as many as the system allows, and
how many client connections they leave room for.

Every client connection is a descriptor, and so is each connection to Ollama
(one per request in flight, and up to L{POOLED} idle ones kept for reuse),
each log file and the usage database.  When they run out, C{accept()} fails
for every client, not only for the one holding hundreds of idle sockets.
The proxy therefore raises its soft C{RLIMIT_NOFILE} to the hard limit at
start (L{raise_open_files_limit}), and closes idle client connections beyond
L{connection_limit} (L{ollamaproxy.web.site.ProxySite}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

log = Logger()

# Idle connections to Ollama the upstream pool keeps (see upstream.py).
POOLED = 64
# Log files, the usage database and its journal, listening sockets, the
# reactor's own, standard streams: with room to spare.
OTHERS = 64
# Below this many client connections, the proxy is not worth running.
MINIMUM_CONNECTIONS = 8

Limits = tuple[int, int]


def connection_limit(open_files: int) -> int:
    """
    How many client connections may be open with C{open_files} descriptors:
    each may need a second one towards Ollama while its request runs, and
    the rest of the proxy needs a few.
    """
    return max(MINIMUM_CONNECTIONS, (open_files - POOLED - OTHERS) // 2)


def raise_open_files_limit(
    getrlimit: Callable[[], Limits] | None = None,
    setrlimit: Callable[[Limits], None] | None = None,
) -> int:
    """
    Raise the soft limit on open files to the hard limit, and log the limit
    in force.

    @param getrlimit: Returns the (soft, hard) limits; C{RLIMIT_NOFILE}'s
        by default.
    @param setrlimit: Sets them; C{RLIMIT_NOFILE}'s by default.
    @return: The soft limit in force afterwards.
    """
    import resource

    def get() -> Limits:
        return resource.getrlimit(resource.RLIMIT_NOFILE)

    def set_(limits: Limits) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)

    soft, hard = (getrlimit or get)()
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            (setrlimit or set_)((hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warn(
                "Could not raise the open files limit from {soft} to {hard}: {error}",
                soft=soft, hard=hard, error=str(e),
            )
    log.info(
        "Open files limit: {limit}, room for {connections} client connections",
        limit=soft,
        connections=connection_limit(soft),
    )
    return soft
