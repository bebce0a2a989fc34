"""
Usage and keys in PostgreSQL, shared by every proxy given the same
C{--database}.

  - L{ollamaproxy.postgres.database}: connecting, and the versioned schema;
  - L{ollamaproxy.postgres.usage}: the usage rows;
  - L{ollamaproxy.postgres.keys}: the keys and their change marker;
  - L{ollamaproxy.postgres.shared}: what C{--database} adds to the proxy.
"""
