"""
ollamaproxy: an Ollama server that needs a key.

Rooms of the house, each with one job: L{ollamaproxy.config} (settings),
L{ollamaproxy.app} (the Klein route tree), L{ollamaproxy.auth} and
L{ollamaproxy.keys} (who may ask), L{ollamaproxy.headers} (what crosses),
L{ollamaproxy.relay} (streaming a response back),
L{ollamaproxy.request_body} (sending a request body on),
L{ollamaproxy.upstream} (the HTTP client to Ollama), L{ollamaproxy.logs}
(what is written down) and L{ollamaproxy.tap} (twistd wiring).
"""

__version__ = "0.1.0"
