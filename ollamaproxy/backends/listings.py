# -*- test-case-name: tests.backends.test_listings -*-
"""
One model listing from several backends.

C{GET /api/tags}, C{/api/ps} and C{/v1/models} list the union over the
healthy backends, each model once (the first backend's entry, in the order
the backends were configured), in the shape Ollama gives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ollamaproxy.model_names import listed_model


def merge_listings(bodies: Sequence[bytes], field: str) -> bytes:
    """
    The union of listings C{bodies}, whose entries are in C{field}
    (C{models}, or C{data} on C{/v1/models}).

    @raise ValueError: If a body is not a listing.
    """
    merged: dict[object, object] = {}
    document: dict[str, object] = {}
    for body in bodies:
        listing = json.loads(body)
        if not isinstance(listing, dict) or not isinstance(listing.get(field) or [], list):
            raise ValueError("not a model listing")
        if not document:
            document = listing
        for entry in listing.get(field) or []:
            merged.setdefault(listed_model(entry, field), entry)
    document[field] = list(merged.values())
    return json.dumps(document, separators=(",", ":")).encode("utf-8")
