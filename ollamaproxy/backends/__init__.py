"""
The Ollama servers behind the proxy, and talking to them.

  - L{ollamaproxy.backends.pool}: the backends, their health, models and
    models in memory; L{ollamaproxy.backends.gauges}, the same as metrics;
  - L{ollamaproxy.backends.router}: gives a request a backend (and a slot),
    or makes it wait in L{ollamaproxy.backends.queue}, the fair queue, or
    asks the queue shared by every proxy (L{ollamaproxy.backends.shared});
  - L{ollamaproxy.backends.dispatch}: an admitted request sent to the
    backend the router gives it (another if it cannot be reached), or to
    every backend, or a listing merged from all;
  - L{ollamaproxy.backends.relay}: one request sent, its answer streamed
    back as it comes, into a L{ollamaproxy.backends.downstream.Downstream};
  - L{ollamaproxy.backends.request_body}, L{ollamaproxy.backends.headers}:
    a client's body passed on while it arrives, and the headers that pass;
  - L{ollamaproxy.backends.upstream}: the HTTP client to one backend;
  - L{ollamaproxy.backends.listings}, L{ollamaproxy.backends.everywhere}:
    the answers that take every backend (model lists; a pull or a delete);
  - L{ollamaproxy.backends.probe}: the start-up line per backend.
"""
