"""
ollamaproxy: an Ollama server that needs a key.

The house, room by room, each importing only the rooms below it (each
room's own docstring lists its modules; docs/architecture.md draws it):

  - L{ollamaproxy.web}: the HTTP side: the web server, the Klein route tree
    and its pipeline, the key check, CORS, who the client is;
  - L{ollamaproxy.admission}: who may ask what, and how much: keys, their
    scopes and models, caps, rates, requests in flight, token quotas;
  - L{ollamaproxy.backends}: the Ollama servers: health and models, the
    router and the fair queue, dispatch, the HTTP client, the relay;
  - L{ollamaproxy.record}: what happened: log events and files, redaction,
    metrics, usage;
  - L{ollamaproxy.redis}, L{ollamaproxy.postgres}: the shared engines, for
    several proxies;
  - L{ollamaproxy.console}: the live operator console;
  - above them: L{ollamaproxy.assembly} (the proxy put together),
    L{ollamaproxy.tap} (twistd wiring), L{ollamaproxy.cli} (the
    C{ollamaproxy} command);
  - below them, the base: L{ollamaproxy.routes} (the catalogue of Ollama's
    routes), L{ollamaproxy.exchange} (the record of one request),
    L{ollamaproxy.model_names}, L{ollamaproxy.errors},
    L{ollamaproxy.readiness}, L{ollamaproxy.config},
    L{ollamaproxy.reactors}, L{ollamaproxy.twisted_internals},
    L{ollamaproxy.reuseport}, L{ollamaproxy.open_files} and
    L{ollamaproxy.checks}.
"""

__version__ = "0.1.0"
