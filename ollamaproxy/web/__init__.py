"""
The HTTP side: what a client talks to, and the conductor of each request.

  - L{ollamaproxy.web.site}: the web server (connections, timeouts, requests
    twisted.web refuses itself), whose requests stream their bodies;
  - L{ollamaproxy.web.app}: the Klein route tree every request enters by,
    and the pipeline it takes each request through;
  - L{ollamaproxy.web.answers}: where a request goes (the C{/proxy}
    prefix off), and the errors the proxy answers itself;
  - L{ollamaproxy.web.gate}: the key check every route that needs one
    passes (C{@keyed});
  - L{ollamaproxy.web.in_flight}: the requests in flight, and the drain;
  - L{ollamaproxy.web.cors}, L{ollamaproxy.web.client_address}: browsers'
    origins, and who the client is behind a trusted proxy.
"""
