"""
The Ollama servers behind the proxy, and talking to them.

  - L{ollamaproxy.backends.pool}: the backends, their health, models and
    models in memory;
  - L{ollamaproxy.backends.router}: gives a request a backend (and a slot),
    or makes it wait in L{ollamaproxy.backends.queue}, the fair queue;
  - L{ollamaproxy.backends.upstream}: the HTTP client to one backend;
  - L{ollamaproxy.backends.relay}: one request sent, its response streamed
    back as it comes;
  - L{ollamaproxy.backends.listings}, L{ollamaproxy.backends.everywhere}:
    the answers that take every backend (model lists; a pull or a delete);
  - L{ollamaproxy.backends.probe}: the start-up line per backend.
"""
