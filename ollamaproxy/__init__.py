"""
ollamaproxy: an Ollama server that needs a key.

Rooms of the house, each with one job: L{ollamaproxy.config} (settings),
L{ollamaproxy.tap} (twistd wiring), L{ollamaproxy.checks} and
L{ollamaproxy.probe} (what is checked at start), L{ollamaproxy.client_address}
(who a request comes from), L{ollamaproxy.site} (the web server:
streamed request bodies, slow clients, idle connections, requests refused
before they reach the app), L{ollamaproxy.descriptors} (the open files limit
and the connections it leaves room for), L{ollamaproxy.app} (the Klein route
tree), L{ollamaproxy.routes} (the catalogue of Ollama's routes),
L{ollamaproxy.auth}, L{ollamaproxy.policy}, L{ollamaproxy.model_names},
L{ollamaproxy.keys}, L{ollamaproxy.first_key}, L{ollamaproxy.limits},
L{ollamaproxy.reload} and L{ollamaproxy.cors} (who may ask, and how much),
L{ollamaproxy.backends} (several Ollama servers: their health and models,
the router and the fair queue), L{ollamaproxy.request_plan} and
L{ollamaproxy.caps} (what is read of a request, and clamped, before it
goes on), L{ollamaproxy.headers} (what crosses), L{ollamaproxy.relay} (streaming a
response back), L{ollamaproxy.request_body} (passing a request body on),
L{ollamaproxy.upstream} (the HTTP client to Ollama), L{ollamaproxy.exchange}
(the record of one request), L{ollamaproxy.logs},
L{ollamaproxy.summary}, L{ollamaproxy.metrics}, L{ollamaproxy.usage} and
L{ollamaproxy.usage_db}
(what is written down), L{ollamaproxy.errors} (the proxy's own answers) and
L{ollamaproxy.cli} (the C{ollamaproxy} command).
"""

__version__ = "0.1.0"
