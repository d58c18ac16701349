"""An HTTP request's body: read within the server's byte limit (413 before it is all read) and
parsed, as JSON within a depth limit or as a multipart form (what OpenAI's SDK sends) within part
limits (400 otherwise), so that the request model sees plain values and names the field of every
other problem."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..request import RequestError

MAX_JSON_DEPTH = 16   # a request is two levels deep
MAX_FORM_FIELDS = 64  # a request with every cache setting has about 30
MAX_FORM_FILES = 1    # input_reference
MAX_FORM_DEPTH = 2    # cache[degree], input_reference[image_url]
_FORM_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")


@dataclass(frozen=True)
class FilePart:
    """A file of a multipart form, read into memory (the body limit bounds it)."""

    filename: str
    content_type: Optional[str]
    data: bytes


async def read_payload(http_request, max_bytes: int) -> tuple[Any, bool]:
    """The values of a request's body and whether they are text: a multipart form's fields,
    nested by their bracketed names, text for the request model to read by each field's type
    (``True``), or a JSON value (``False``)."""
    from python_multipart.multipart import parse_options_header

    body = await read_body(http_request, max_bytes)
    content_type, _ = parse_options_header(http_request.headers.get("content-type", ""))
    if content_type == b"multipart/form-data":
        return await parse_form(http_request.headers, body, max_bytes), True
    return parse_json(body), False


async def read_body(http_request, max_bytes: int) -> bytes:
    """The body of a Starlette request, refused (413) as soon as it grows past ``max_bytes``."""
    declared = http_request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestError("body", f"is {declared} bytes, more than the server's max_body_bytes {max_bytes}", 413)
    body = bytearray()
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise RequestError("body", f"is more than the server's max_body_bytes {max_bytes}", 413)
    return bytes(body)


async def parse_form(headers, body: bytes, max_part_size: int) -> dict:
    """A multipart body's fields (text) and files (:class:`FilePart`) as a nested object, parsed
    by Starlette's parser within the part limits; its spooled files are closed, so none is left."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def chunks():
        yield body

    parser = MultiPartParser(headers, chunks(), max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS,
                             max_part_size=max_part_size)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestError("body", f"is not a multipart form this server reads: {error.message}", status=400) from None
    try:
        items = [(name, FilePart(value.filename or "", value.content_type, await value.read())
                  if isinstance(value, UploadFile) else value) for name, value in form.multi_items()]
    finally:
        await form.close()
    return nest_form(items)


def nest_form(items) -> dict:
    """Form fields by their bracketed names, as OpenAI's SDK writes nested values
    (``cache[degree]``, ``input_reference[image_url]``), as a nested object; a list (``name[]``),
    a name given twice or deeper than ``MAX_FORM_DEPTH`` is refused naming it."""
    body: dict = {}
    for key, value in items:
        match = _FORM_KEY.fullmatch(key)
        if match is None:
            raise RequestError(key or "body", "is not a field name")
        path = [match[1], *re.findall(r"\[([^\[\]]*)\]", match[2])]
        field = ".".join(name for name in path if name)
        if "" in path:
            raise RequestError(field, "must be one value, not a list")
        if len(path) > MAX_FORM_DEPTH:
            raise RequestError(field, f"nests deeper than {MAX_FORM_DEPTH} levels")
        target = body
        for depth, name in enumerate(path[:-1]):
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise RequestError(".".join(path[:depth + 1]), "is given both as a value and as an object")
        if path[-1] in target:
            raise RequestError(field, "is given twice")
        target[path[-1]] = value
    return body


class HugeInteger:
    """A JSON integer too long for Python to read (over 4300 digits): kept as a value that every
    field refuses, so that the error names the field."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def parse_json(body: bytes) -> Any:
    """An HTTP body as JSON; ``RequestError`` (400, ``body``) for one that is empty, not UTF-8, not
    JSON, or nested deeper than ``MAX_JSON_DEPTH``."""
    if not body.strip():
        raise RequestError("body", "must be a JSON object with at least 'prompt'", status=400)
    try:
        value = json.loads(body.decode("utf-8"), parse_int=_parse_int)
    except UnicodeDecodeError as error:
        raise RequestError("body", f"is not UTF-8 ({error.reason} at byte {error.start})", status=400) from None
    except RecursionError:
        raise RequestError("body", f"nests deeper than {MAX_JSON_DEPTH} levels", status=400) from None
    except json.JSONDecodeError as error:
        raise RequestError("body", f"is not valid JSON ({error})", status=400) from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError("body", f"nests deeper than {MAX_JSON_DEPTH} levels", status=400)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return value


def _parse_int(text: str):
    try:
        return int(text)
    except ValueError:   # over sys.get_int_max_str_digits()
        return HugeInteger(len(text.lstrip("-")))
