# -*- test-case-name: tests.admission.test_model_names -*-
"""
Model names as Ollama resolves them, so that a key's model list means what
Ollama will run.

Ollama reads C{name} as C{[host/][namespace/]model[:tag]}, with the host
C{registry.ollama.ai}, the namespace C{library} and the tag C{latest} by
default, and compares names without regard to case.  A source suffix picks
where the model runs: C{:local}, or C{:cloud} and a C{-cloud} tag
(C{gpt-oss:120b-cloud}), which run on ollama.com on the server owner's
account (Ollama's C{internal/modelref}).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"
_DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class ModelName:
    """
    A model name resolved as Ollama resolves it.

    @ivar canonical: The short form Ollama shows (C{llama3.2:latest},
        C{hf.co/user/model:q4}), in lower case, without a source suffix.
    @ivar cloud: Whether the request asks for the model to run on ollama.com.
    """

    canonical: str
    cloud: bool


def resolve(name: str) -> ModelName:
    """
    How Ollama reads a model name.
    """
    base, cloud = _strip_source(name.strip())
    return ModelName(_canonical(base.lower()), cloud)


def listed_model(entry: Any, field: str = "models") -> ModelName:
    """
    The model one entry of a listing names: its C{id} in C{/v1/models}'
    C{data}, its C{name} in C{/api/tags}' and C{/api/ps}' C{models}, else its
    C{model}.
    """
    identity = "id" if field == "data" else "name"
    return resolve(str(entry.get(identity) or entry.get("model") or ""))


def matches(name: ModelName, pattern: str) -> bool:
    """
    Whether a resolved name matches one of a key's model patterns: a glob
    (C{llama3*}) or a name (C{llama3.2}, meaning C{llama3.2:latest}).
    """
    pattern = pattern.strip().lower()
    if not any(c in pattern for c in "*?["):
        pattern = _canonical(_strip_source(pattern)[0])
    return fnmatchcase(name.canonical, pattern)


def _strip_source(name: str) -> tuple[str, bool]:
    """
    A name without its source suffix, and whether that asked for the cloud.
    """
    colon = name.rfind(":")
    if colon < 0:
        return name, False
    suffix = name[colon + 1:].strip().lower()
    if suffix == "cloud":
        return name[:colon], True
    if suffix == "local":
        return name[:colon], False
    if "/" not in suffix and suffix.endswith("-cloud"):
        return name[: len(name) - len("-cloud")], True
    return name, False


def _canonical(name: str) -> str:
    tag = _DEFAULT_TAG
    if name.rfind(":") > name.rfind("/"):
        name, _, tag = name.rpartition(":")
    parts = name.split("/")
    model = parts[-1]
    namespace = parts[-2] if len(parts) > 1 else _DEFAULT_NAMESPACE
    host = "/".join(parts[:-2]) if len(parts) > 2 else _DEFAULT_HOST
    host = host.split("://", 1)[-1]
    if host == _DEFAULT_HOST:
        prefix = "" if namespace == _DEFAULT_NAMESPACE else namespace + "/"
    else:
        prefix = f"{host}/{namespace}/"
    return f"{prefix}{model}:{tag or _DEFAULT_TAG}"
