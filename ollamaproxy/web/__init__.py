"""
The HTTP side: what a client talks to.

  - L{ollamaproxy.web.site}: the web server (connections, timeouts, requests
    twisted.web refuses itself), and L{ollamaproxy.backends.request_body}, a
    client's body streamed on as it arrives;
  - L{ollamaproxy.web.app}: the Klein route tree every request enters by:
    the key check, the relay, the record;
  - L{ollamaproxy.backends.headers}, L{ollamaproxy.web.cors},
    L{ollamaproxy.web.client_address}: what passes in and out, browsers'
    origins, and who the client is behind a trusted proxy.
"""
