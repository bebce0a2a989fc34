"""
What happened, written down, once per request by
L{ollamaproxy.record.recorder}: the access log and its files
(L{ollamaproxy.record.logs}), with credentials blanked
(L{ollamaproxy.record.redact}); what a generation used, from Ollama's final
object (L{ollamaproxy.record.summary}); the Prometheus metrics
(L{ollamaproxy.record.metrics}); and the usage per key and model
(L{ollamaproxy.record.usage}, the service; L{ollamaproxy.record.usage_db},
the SQLite file; in PostgreSQL: L{ollamaproxy.postgres}).
"""
