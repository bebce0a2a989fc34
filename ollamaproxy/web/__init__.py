"""
The HTTP side: what a client talks to, and the conductor of each request.

  - L{ollamaproxy.web.site}: the web server (connections, timeouts, requests
    twisted.web refuses itself), whose requests stream their bodies;
  - L{ollamaproxy.web.app}: the pipeline each request to Ollama takes, and
    the route tree every request enters by (L{ollamaproxy.web.front});
  - L{ollamaproxy.web.own_routes}: the proxy's own routes (metrics, the
    console, readiness), in Klein;
  - L{ollamaproxy.web.answers}: where a request goes (the C{/proxy}
    prefix off), and the errors the proxy answers itself;
  - L{ollamaproxy.web.gate}: the key check every route that needs one
    passes (C{@keyed});
  - L{ollamaproxy.web.in_flight}: the requests in flight, and the drain;
  - L{ollamaproxy.web.cors}, L{ollamaproxy.web.client_address}: browsers'
    origins, and who the client is behind a trusted proxy.
"""
