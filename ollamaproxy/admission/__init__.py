"""
Admission: who may ask what, and how much.  (Not C{access}: that is the
namespace of the access log's events, and Twisted's log filters treat
namespaces as a hierarchy.)

  - L{ollamaproxy.admission.keys}: keys, their hashes and the keys file;
    L{ollamaproxy.admission.key_storage}, L{ollamaproxy.admission.key_sources},
    L{ollamaproxy.admission.reload}, L{ollamaproxy.admission.first_key}: where keys
    are kept, added up and reloaded, and the key made on a first start;
  - L{ollamaproxy.admission.auth}: the key a request presents, and its scope;
  - L{ollamaproxy.admission.request_plan}, L{ollamaproxy.admission.policy},
    L{ollamaproxy.admission.caps}: the models a request names
    (L{ollamaproxy.model_names}), checked against the key, and its caps;
  - L{ollamaproxy.admission.limits}, L{ollamaproxy.admission.quotas},
    L{ollamaproxy.admission.quota_periods}: rates, requests in flight, token
    quotas and the guess throttle, kept in this process (in Redis:
    L{ollamaproxy.redis}).
"""
