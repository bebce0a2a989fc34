"""
ollamaproxy: an Ollama server that needs a key.

Rooms of the house, each with one job: L{ollamaproxy.config} (settings),
L{ollamaproxy.tap} (twistd wiring), L{ollamaproxy.checks} and
L{ollamaproxy.backends.probe} (what is checked at start), L{ollamaproxy.web.client_address}
(who a request comes from), L{ollamaproxy.web.site} (the web server:
streamed request bodies, slow clients, idle connections, requests refused
before they reach the app), L{ollamaproxy.descriptors} (the open files limit
and the connections it leaves room for), L{ollamaproxy.web.app} (the Klein route
tree), L{ollamaproxy.routes} (the catalogue of Ollama's routes),
L{ollamaproxy.access.auth}, L{ollamaproxy.access.policy}, L{ollamaproxy.access.model_names},
L{ollamaproxy.access.keys}, L{ollamaproxy.access.first_key}, L{ollamaproxy.access.limits},
L{ollamaproxy.access.reload} and L{ollamaproxy.web.cors} (who may ask, and how much),
L{ollamaproxy.backends} (several Ollama servers: their health and models,
the router and the fair queue), L{ollamaproxy.access.request_plan} and
L{ollamaproxy.access.caps} (what is read of a request, and clamped, before it
goes on), L{ollamaproxy.web.headers} (what crosses), L{ollamaproxy.backends.relay} (streaming a
response back), L{ollamaproxy.web.request_body} (passing a request body on),
L{ollamaproxy.backends.upstream} (the HTTP client to Ollama), L{ollamaproxy.exchange}
(the record of one request), L{ollamaproxy.record.logs},
L{ollamaproxy.record.summary}, L{ollamaproxy.record.metrics}, L{ollamaproxy.record.usage} and
L{ollamaproxy.record.usage_db}
(what is written down), L{ollamaproxy.errors} (the proxy's own answers) and
L{ollamaproxy.cli} (the C{ollamaproxy} command).
"""

__version__ = "0.1.0"
