"""OpenAI's request fields (``model``, ``size``, and an endpoint's own such as ``n``) translated
into this API's request, whose model then checks the rest."""

from __future__ import annotations

from typing import Any

from ..request import RequestError


def from_openai(body: Any, served_model: str, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """OpenAI's fields of a body (``model``, ``size`` as ``"WIDTHxHEIGHT"``, and ``extra`` names)
    split from the rest, which stays this API's request; ``size`` becomes ``width`` and ``height``."""
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}", status=400)
    body = dict(body)
    openai = {name: body.pop(name) for name in ("model", "size", *extra) if name in body}
    model = openai.get("model")
    if model is not None and model != served_model:
        raise RequestError("model", f"this server serves {served_model!r}, not {model!r}")
    size = openai.get("size")
    if size is not None:
        if "width" in body or "height" in body:
            raise RequestError("size", "give size or width and height, not both")
        width, _, height = size.partition("x") if isinstance(size, str) else ("", "", "")
        if not (width.isdigit() and height.isdigit()):
            raise RequestError("size", f'must be "WIDTHxHEIGHT" such as "832x480", got {size!r}')
        body.update(width=int(width), height=int(height))
    return body, openai

