# -*- test-case-name: tests.admission.test_estimate -*-
"""
What a request is expected to cost in tokens, before Ollama has said.

Two consumers need a figure before Ollama's own count comes: the quotas,
which reserve a request's cost once its body is planned, after its rate and
streams were admitted (so that requests running together cannot overshoot a
quota by more than one request's error), and
the meter, which charges a request whose answer was cut before Ollama's
final object with the prompt tokens estimated here.

The rule, which an operator can check against C{ollamaproxy usage}:

  - the prompt is one token per L{BYTES_PER_TOKEN} bytes of the request
    body, rounded up: its JSON's own bytes count too, about as many as the
    chat template Ollama adds.  A body with images (C{images},
    C{image_url}: base64 that is no text) counts only the bytes (UTF-8) of
    its string values but the model's name, the images and C{keep_alive};
  - the output is what the request asks for at most
    (C{options.num_predict} on Ollama's routes, C{max_tokens} or
    C{max_completion_tokens} on C{/v1}), else L{DEFAULT_OUTPUT_TOKENS};
    embeddings generate nothing;
  - a body the proxy did not read (sent in chunks, compressed, too large
    to check) counts no prompt tokens, and a route that runs no model
    costs nothing.

Pure functions of the route and the body: no I/O, no clock.  A body is
parsed only when it has images or asks for a length, so that the estimate
of a plain chat costs a few calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from ollamaproxy.routes import RouteSpec

#: Bytes of text per prompt token: about what Ollama's tokenizers make of
#: English text, more for code and other scripts.
BYTES_PER_TOKEN: Final = 4

#: The output expected of a generation that sets no limit of its own.
DEFAULT_OUTPUT_TOKENS: Final = 512

# Strings that are no prompt text.
_NOT_TEXT: Final = frozenset({"model", "images", "image_url", "keep_alive"})


@dataclass(frozen=True)
class Estimate:
    """
    A request's expected cost.

    @ivar prompt: Tokens of its prompt.
    @ivar output: Tokens it may generate.
    """

    prompt: int = 0
    output: int = 0

    @property
    def tokens(self) -> int:
        """
        Prompt and output together: what a quota reserves.
        """
        return self.prompt + self.output


#: The cost of a request that runs no model.
NOTHING: Final = Estimate()


def estimate(route: RouteSpec | None, body: bytes | None) -> Estimate:
    """
    What a request on C{route} with C{body} is expected to cost (see the
    module for the rule).

    @param body: The request's body as read, or L{None} if it was not read.
    """
    if route is None or not route.runs:
        return NOTHING
    if not body:
        document: object = None
        size = 0
    elif b'"images"' in body or b'"image_url"' in body:
        document = _document(body)
        size = _text_bytes(document) if document is not None else len(body)
    else:
        document = None
        size = len(body)
    prompt = -(-size // BYTES_PER_TOKEN)
    if route.embeds:
        return Estimate(prompt, 0)
    if document is None and body and (
        b'"num_predict"' in body or b'"max_tokens"' in body
        or b'"max_completion_tokens"' in body
    ):
        document = _document(body)
    asked = 0 if document is None else _asked_output(document)
    return Estimate(prompt, asked or DEFAULT_OUTPUT_TOKENS)


def _document(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:  # a form, or not JSON: Ollama answers for it
        return None


def _text_bytes(value: object) -> int:
    """
    The UTF-8 length of the prompt text in a request's JSON.
    """
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    if isinstance(value, list):
        return sum(_text_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_bytes(item) for name, item in value.items() if name not in _NOT_TEXT)
    return 0


def _asked_output(document: object) -> int:
    """
    The most tokens the request asks to generate, or 0 if it sets no limit.
    """
    if not isinstance(document, dict):
        return 0
    options = document.get("options")
    asked = [options.get("num_predict")] if isinstance(options, dict) else []
    asked += [document.get("max_tokens"), document.get("max_completion_tokens")]
    counts = [n for n in asked if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    return max(counts, default=0)
