"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, for every answer of
the API that is not a success: the SDK raises the exception of the status (``BadRequestError``,
``UnprocessableEntityError``, ``NotFoundError``, ``RateLimitError``, ...) with ``message`` and
``param``, the field at fault."""

from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse

# OpenAI's error type and code for each status this server answers with
KINDS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "unavailable"),
    504: ("server_error", "timeout"),
}


def error_object(status: int, message: str, param: Optional[str] = None) -> dict:
    """The ``error`` member of an answer, and of a failed video job."""
    kind, code = KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", str(status)))
    return {"message": message, "type": kind, "param": param, "code": code}


def error_response(status: int, message: str, param: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": error_object(status, message, param)}, status_code=status, headers=headers)
