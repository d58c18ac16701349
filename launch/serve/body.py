"""An HTTP request's body: read within the server's byte limit (413 before it is all read) and
parsed as JSON within a depth limit (400), so that the request model sees plain values and names
the field of every other problem."""

from __future__ import annotations

import json
from typing import Any

from ..request import RequestError

MAX_JSON_DEPTH = 16   # a request is two levels deep


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
