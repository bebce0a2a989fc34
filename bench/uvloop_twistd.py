"""
twistd on Twisted's asyncio reactor driven by uvloop's event loop, for
C{bench/alternatives}; the arguments are twistd's:

    python3 bench/uvloop_twistd.py -n --pidfile= ollamaproxy ...
"""

from __future__ import annotations

import sys

import uvloop
from twisted.internet import asyncioreactor


def main() -> None:
    asyncioreactor.install(uvloop.new_event_loop())

    from twisted.scripts.twistd import run

    sys.argv[0] = "twistd"
    run()


if __name__ == "__main__":
    main()
