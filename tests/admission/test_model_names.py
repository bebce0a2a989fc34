"""
Tests for L{ollamaproxy.admission.model_names}: model names as Ollama resolves them.
"""

from __future__ import annotations

import pytest

from ollamaproxy.admission.model_names import ModelName, matches, resolve


@pytest.mark.parametrize(
    ("name", "canonical", "cloud"),
    [
        ("llama3.2", "llama3.2:latest", False),
        ("LLAMA3.2:Latest", "llama3.2:latest", False),
        (" llama3.2 ", "llama3.2:latest", False),
        ("registry.ollama.ai/library/llama3.2:1b", "llama3.2:1b", False),
        ("library/llama3.2", "llama3.2:latest", False),
        ("someone/llama3.2", "someone/llama3.2:latest", False),
        ("hf.co/User/Repo:Q4_K_M", "hf.co/user/repo:q4_k_m", False),
        ("https://registry.ollama.ai/library/mistral", "mistral:latest", False),
        ("localhost:5000/ns/model", "localhost:5000/ns/model:latest", False),
        ("llama3.2:local", "llama3.2:latest", False),
        ("gpt-oss:cloud", "gpt-oss:latest", True),
        ("gpt-oss:CLOUD", "gpt-oss:latest", True),
        ("gpt-oss:120b-cloud", "gpt-oss:120b", True),
        ("gpt-oss:120B-Cloud", "gpt-oss:120b", True),
        ("qwen3-cloud", "qwen3-cloud:latest", False),
    ],
)
def test_resolve(name: str, canonical: str, cloud: bool) -> None:
    """
    A name resolves as Ollama reads it: default host, namespace and tag,
    case folded, source suffix taken off and remembered.
    """
    assert resolve(name) == ModelName(canonical, cloud)


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("llama3.2", "llama3.2", True),
        ("llama3.2", "llama3.2:latest", True),
        ("LLAMA3.2", "llama3.2", True),
        ("llama3.2", "llama3.2:1b", False),
        ("llama3.2:latest", "llama3.2", True),
        ("llama3*", "llama3.2:1b", True),
        ("llama3*", "Llama3.1", True),
        ("llama3*", "codellama", False),
        ("mistral:7b", "mistral:7b", True),
        ("mistral:7b", "mistral", False),
        ("gpt-oss:120b", "gpt-oss:120b-cloud", True),
        ("*", "anything:else", True),
    ],
)
def test_matches(pattern: str, name: str, expected: bool) -> None:
    """
    A key's pattern is a glob over resolved names, or a name meaning its
    resolved form; a cloud model matches its base name (the cloud scope
    decides whether it may run).
    """
    assert matches(resolve(name), pattern) is expected
