"""
Who may ask what, and how much.

  - L{ollamaproxy.access.keys}: keys, their hashes and the keys file;
    L{ollamaproxy.access.key_storage}, L{ollamaproxy.access.key_sources},
    L{ollamaproxy.access.reload}, L{ollamaproxy.access.first_key}: where keys
    are kept, added up and reloaded, and the key made on a first start;
  - L{ollamaproxy.access.auth}: the key a request presents, and its scope;
  - L{ollamaproxy.access.request_plan}, L{ollamaproxy.access.policy},
    L{ollamaproxy.access.model_names}, L{ollamaproxy.access.caps}: the
    models a request names, checked against the key, and its caps;
  - L{ollamaproxy.access.limits}, L{ollamaproxy.access.quotas},
    L{ollamaproxy.access.quota_periods}: rates, requests in flight, token
    quotas and the guess throttle, kept in this process (in Redis:
    L{ollamaproxy.redis}).
"""
