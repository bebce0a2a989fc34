"""
The operator console: a live page, served by the proxy itself at
C{/-/console/} to admin keys, showing who is generating now and how fast,
who waits, the backends' health and load, usage over time and the keys.

  - L{ollamaproxy.console.sampler}: samples the requests in flight, the queue
    and the backends a few times a second, and feeds the open consoles;
  - L{ollamaproxy.console.views}: what each view shows, and what it never
    shows (keys, hashes, credentials);
  - L{ollamaproxy.console.web}: the page, its files, its JSON endpoints and
    the feed, with the key check and the security headers;
  - C{static/}: the page itself, plain HTML, CSS and JavaScript, charts in
    hand-written SVG; no build step, nothing from elsewhere.
"""

from ollamaproxy.console.sampler import Sampler
from ollamaproxy.console.web import CONSOLE_PATH, Console, UsageReader

__all__ = ["CONSOLE_PATH", "Console", "Sampler", "UsageReader"]
