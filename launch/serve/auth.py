"""API keys, as vLLM and SGLang take them: once a server has keys, every request but ``/healthz``
must carry one as ``Authorization: Bearer <key>``, or is answered 401 in OpenAI's shape (the SDK's
``AuthenticationError``). Every path but the health check, so that no route, misspelt path or
method slips past; Ray's metrics have their own port and stay open."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Callable, Optional, Sequence

from starlette.datastructures import Headers

from .errors import error_response

OPEN_PATHS = frozenset({"/healthz"})


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Whether ``given`` is one of ``keys``, compared in constant time: every key is compared
    in full, so the time says nothing about how much of which key matched."""
    given_bytes = given.encode("latin-1")   # as Starlette decoded the header
    return sum(hmac.compare_digest(given_bytes, key.encode("ascii")) for key in keys) > 0


def key_problem(authorization: Optional[str], keys: Sequence[str]) -> Optional[str]:
    """Why a request with this ``Authorization`` header may not pass, or ``None``."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "no API key: give it in the header Authorization: Bearer <key>"
    if not key_matches(given.strip(), keys):
        return "the API key is not valid"
    return None


class RequireApiKey:
    """ASGI middleware: 401 for a request without a valid key while ``keys()`` gives any."""

    def __init__(self, app, keys: Callable[[], Sequence[str]]):
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            keys = self.keys()
            problem = key_problem(Headers(scope=scope).get("authorization"), keys) if keys else None
            if problem is not None:
                response = error_response(401, problem, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def exposure_warning(host: str, keys: Sequence[str]) -> Optional[str]:
    """A warning for a server opened beyond loopback without a key, or ``None``."""
    if keys or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:   # a host name: it may resolve to anything
        pass
    return (f"spectrum-xdit: warning: serving on {host} without an API key: anyone who can reach it can "
            "run jobs; give --api_key, --api_key_file or SPECTRUM_XDIT_API_KEY")
