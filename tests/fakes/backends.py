# -*- test-case-name: tests.backends.test_through_proxy,tests.backends.test_everywhere -*-
"""
Two backends behind one proxy, in memory, and the keys that call them.
"""

from __future__ import annotations

from typing import Any

from ollamaproxy.admission.keys import ApiKey, digest
from tests.fakes.chain import Chain

USER = "olpk_userkeyuserkeyuserkeyuserkeyuser00"
OTHER = "olpk_otherkeyotherkeyotherkeyotherkey00"
HI = [{"role": "user", "content": "hi"}]


def two_backends(**kwargs: Any) -> Chain:
    """
    Backend 0 has llama3.2 and hold; backend 1 has mistral and hold; both
    have said so; keys alice (admin), user and other (inference).
    """
    chain = Chain(backends=[["llama3.2:latest", "hold:latest"], ["mistral:latest", "hold:latest"]],
                  **kwargs)
    chain.keys.replace([*chain.keys, ApiKey("user", digest(USER)),
                        ApiKey("other", digest(OTHER))])
    chain.pool.refresh_all()
    chain.flush()
    return chain
