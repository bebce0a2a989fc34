# -*- test-case-name: tests.admission.test_policy -*-
"""
Which models a request names, and whether its key may use them.

A key limited to some models, or without the C{cloud} scope, has every
request that names a model read before it goes on: the JSON body's
top-level fields, a multipart form's fields and the query string, or the
path (the catalogue, L{ollamaproxy.routes}, says which).  Reading is bounded:
a body over L{MAX_CHECKED_BODY} is refused with 413, and a JSON body with more
values than L{MAX_JSON_VALUES} or nested deeper than Python's decoder goes is
refused with 400, before anything is built from it, so a crafted body costs
no more memory and reactor time than an honest one of that size
(C{bench/body_check.py} measures it).  A body the proxy cannot read (an
unknown C{Content-Encoding}, a malformed form) is refused, never passed on
unchecked.

A JSON body is read as Ollama reads it, with Go's C{encoding/json} decoder
(gin's C{ShouldBindJSON}, C{json.NewDecoder(...).Decode}): the first JSON
value, whatever follows it (trailing data is never looked at); invalid UTF-8
inside a string is read as U+FFFD, one per byte, as is a lone surrogate
escape; C{NaN} and C{Infinity} are not JSON.  Brackets and commas inside
strings are text, not structure: only those outside count against the
bounds.
"""

from __future__ import annotations

import json
import re
from email.message import Message
from urllib.parse import parse_qs

from ollamaproxy.admission.keys import ApiKey
from ollamaproxy.errors import ProxyError
from ollamaproxy.model_names import ModelName, listed_model, matches, resolve
from ollamaproxy.routes import ModelIn, RouteSpec

#: The largest body read whole to find its model (chat requests with a few
#: images fit; model uploads name none and are never read).
MAX_CHECKED_BODY = 16 * 1024 * 1024
#: The most JSON arrays, objects and separators a checked body may hold:
#: ten times a long chat's, a tenth of what stalls the reactor noticeably.
MAX_JSON_VALUES = 1_000_000
#: The most arrays and objects among them (each costs a Python object).
MAX_JSON_CONTAINERS = 100_000

_OBJECT = object()

# A JSON string, escapes and all, or an unterminated one to the end: it
# always matches once begun, so no quote is tried twice (an unterminated
# string full of escaped quotes would make the scan quadratic).
_STRING = re.compile(rb'"[^"\\]*(?:\\.?[^"\\]*)*(?:"|\Z)', re.DOTALL)
# What Go's decoder reads as U+FFFD in a string: an invalid byte (which
# surrogateescape decodes as one lone surrogate each) or a lone surrogate
# escape.
_SURROGATE = re.compile("[\ud800-\udfff]")
# JSON's whitespace, which Go's decoder skips before a value.
_WHITESPACE = " \t\n\r"


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def needs_body_check(key: ApiKey) -> bool:
    """
    Whether a key's requests must have their models read: it is limited to
    some models, or may not use cloud models.
    """
    return bool(key.models) or not key.cloud


def json_models(body: bytes, fields: tuple[str, ...]) -> list[str]:
    """
    Every model a JSON body names in its top-level C{fields}
    (L{json_model_fields}, without the fields).
    """
    return [name for _, name in json_model_fields(body, fields)]


def json_model_fields(
    body: bytes, fields: tuple[str, ...], members: dict[str, object] | None = None
) -> list[tuple[str, str]]:
    """
    Every model a JSON body names in its top-level C{fields}, with the field
    that names it, in the body's order.  Go's decoder,
    which Ollama uses, matches field names without regard to case and takes
    the last of repeated ones, so every spelling and repetition counts here.

    @param members: If given, filled with the body's top-level members by
        case-folded name (the last of repeated ones, as Go's decoder), each
        object inside them as the list of its C{(name, value)} pairs and
        each number as the length of its text: what the conversation's
        digest is made of (L{ollamaproxy.admission.conversation}), from
        this one parse.  Without it, nothing inside the top-level object is
        kept while the body is parsed.

    @raise ProxyError: 400 if the body is not a JSON object, names a model
        with something other than a string, or is too large a structure to
        check.
    """
    containers = body.count(b"{") + body.count(b"[")
    if containers > MAX_JSON_CONTAINERS or containers + body.count(b",") > MAX_JSON_VALUES:
        # Counted again without the strings' text (which costs a scan of
        # every string: about 0.5 s for 16 MiB of short strings, so only a
        # body that could be over the bounds pays it).
        structure = _STRING.sub(b"", body)
        containers = structure.count(b"{") + structure.count(b"[")
        if containers > MAX_JSON_CONTAINERS or (
            containers + structure.count(b",") > MAX_JSON_VALUES
        ):
            raise ProxyError(400, "request body has too many JSON values to check its model")
    pairs: list[tuple[str, object]] = []

    def keep_pairs(items: list[tuple[str, object]]) -> object:
        # Objects are decoded inside out: the last one is the body.  None is
        # kept of the others.
        pairs[:] = items
        return _OBJECT

    def keep_all(items: list[tuple[str, object]]) -> object:
        # The same, each object kept as its pairs: the body is an object if
        # it is the last one decoded.
        nonlocal pairs
        pairs = items
        return items

    # Numbers are not needed: their length stands in (a builtin, and no
    # big int is built, which Python refuses past 4300 digits and Go not).
    decoder = json.JSONDecoder(object_pairs_hook=keep_pairs if members is None else keep_all,
                               parse_constant=_not_json,
                               parse_int=len, parse_float=len)
    text = body.decode("utf-8", "surrogateescape").lstrip(_WHITESPACE)
    try:
        document, _ = decoder.raw_decode(text)
    except RecursionError:
        raise ProxyError(400, "request body is nested too deeply") from None
    except ValueError:
        raise ProxyError(400, "request body is not valid JSON") from None
    if document is not (_OBJECT if members is None else pairs):
        raise ProxyError(400, "request body must be a JSON object")
    if members is not None:
        members.update((field.casefold(), value) for field, value in pairs)
    wanted = {field.casefold() for field in fields}
    names = []
    for field, value in pairs:
        if field.casefold() in wanted:
            if not isinstance(value, str):
                raise ProxyError(400, f"{field} must be a string")
            names.append((field.casefold(), _SURROGATE.sub("\ufffd", value)))
    return names


def form_models(body: bytes, content_type: bytes | None, query: bytes, field: str) -> list[str]:
    """
    Every value of C{field} in a C{multipart/form-data} body and in the query
    string, both of which Go's C{FormValue} reads.

    @raise ProxyError: 400 if the body is not a well-formed form, or names
        no model at all.
    """
    names = parse_qs(query.decode("utf-8", "replace"), keep_blank_values=True).get(field, [])
    names.extend(_form_fields(body, content_type, field))
    if not names:
        raise ProxyError(400, f"the form names no {field}")
    return names


def _form_fields(body: bytes, content_type: bytes | None, field: str) -> list[str]:
    header = Message()
    header["content-type"] = (content_type or b"").decode("latin-1")
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise ProxyError(400, "request body must be a multipart/form-data form")
    delimiter = b"--" + boundary.encode("latin-1")
    parts = body.split(delimiter)
    if len(parts) < 2 or not parts[-1].startswith(b"--"):
        raise ProxyError(400, "malformed multipart/form-data body")
    values = []
    for part in parts[1:-1]:
        head, separator, content = _split_part(part)
        if not separator:
            raise ProxyError(400, "malformed multipart/form-data body")
        disposition = Message()
        for line in head.splitlines():
            name, colon, value = line.partition(b":")
            if not colon:
                raise ProxyError(400, "malformed multipart/form-data body")
            if name.strip().lower() == b"content-disposition":
                disposition["content-disposition"] = value.strip().decode("utf-8", "replace")
        if disposition.get_param("name", header="content-disposition") == field:
            values.append(content.decode("utf-8", "replace"))
    return values


def _split_part(part: bytes) -> tuple[bytes, bytes, bytes]:
    """
    A form part's header block and content, without the line ends around
    them (CRLF, or LF as Go's reader also takes).
    """
    part = part.removeprefix(b"\r\n").removeprefix(b"\n")
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, content = part.partition(separator)
        if found:
            return head, found, content.removesuffix(b"\n").removesuffix(b"\r")
    return part, b"", b""


def path_model(path: bytes, route: RouteSpec) -> str:
    """
    The model a path names (C{/v1/models/{model}}), the path being already
    percent-decoded.
    """
    prefix = route.prefix or b""
    return path[len(prefix):].decode("utf-8", "replace")


def check_models(key: ApiKey, names: list[str]) -> None:
    """
    @raise ProxyError: 403 if the key may not use one of the models, or one
        of them runs on ollama.com and the key lacks the C{cloud} scope.
    """
    for name in names:
        model = resolve(name)
        if not allows(key, model):
            raise ProxyError(403, f"API key {key.name!r} may not use model {name!r}")
        if model.cloud and not key.cloud:
            raise ProxyError(
                403,
                f"API key {key.name!r} may not use cloud model {name!r}: "
                "it needs the 'cloud' scope",
            )


def allows(key: ApiKey, model: ModelName) -> bool:
    """
    Whether a key's model list admits a model.
    """
    return not key.models or any(matches(model, pattern) for pattern in key.models)


def models_named(route: RouteSpec, body: bytes, content_type: bytes | None,
                 query: bytes, members: dict[str, object] | None = None
                 ) -> list[tuple[str, str]]:
    """
    The models a request on C{route} names in its body (JSON or form), each
    with the field that names it.

    @param members: If given, filled with a JSON body's top-level members
        (L{json_model_fields}).
    """
    if route.model_in is ModelIn.FORM:
        field = route.model_fields[0]
        return [(field, name) for name in form_models(body, content_type, query, field)]
    return json_model_fields(body, route.model_fields, members)


def filter_listing(key: ApiKey, field: str, body: bytes) -> bytes:
    """
    A model listing (C{/api/tags}, C{/api/ps}, C{/v1/models}) showing only
    the models the key may use.
    """
    document = json.loads(body)
    document[field] = [
        entry for entry in document.get(field) or [] if allows(key, listed_model(entry, field))
    ]
    return json.dumps(document, separators=(",", ":")).encode("utf-8")
