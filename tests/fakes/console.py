# -*- test-case-name: tests.console.test_web -*-
"""
Shared pieces of the console's tests.
"""

from __future__ import annotations

from typing import Any

from ollamaproxy.admission.keys import ApiKey, digest
from tests.fakes.chain import Chain

INFERENCE_KEY = "olpk_consoleinferencekeyconsoleinference"


def add_inference_key(chain: Chain, name: str = "bob", **fields: Any) -> None:
    """
    Give the chain a second key, C{bob}: an inference key.
    """
    keys = [*chain.keys, ApiKey(name, digest(INFERENCE_KEY), **fields)]
    chain.keys.replace(keys)
