"""
Several Ollama servers behind one proxy: the backends, their health and
models (L{ollamaproxy.backends.pool}), the fair queue for a busy model
(L{ollamaproxy.backends.queue}), and the router that gives a request a
backend (L{ollamaproxy.backends.router}).
"""
