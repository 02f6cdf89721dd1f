"""HTTP plumbing shared by every route: JSON bodies with caps, JSON responses, client IP.

Pure helpers where possible; the Klein routes stay thin.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from twisted.web.server import Request

from e2a.errors import BadRequest

KIB = 1024
MIB = 1024 * KIB
JSON_CAP = 64 * KIB
SEND_CAP = 25 * MIB
FORM_CAP = 16 * KIB
# Nothing is buffered beyond this, whatever the route (the largest cap of api.md §0.6).
MAX_BUFFERED_BODY = SEND_CAP


class CappedRequest(Request):
    """A Request that stops buffering the body once it passes :data:`MAX_BUFFERED_BODY`.

    twisted.web buffers the whole body before routing; without this a client could make the
    server hold an arbitrarily large upload in memory. Routes then apply their own, smaller cap
    to ``body_length``.
    """

    body_length = 0
    body_truncated = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted API
        super().gotLength(length)
        self.body_length = 0
        self.body_truncated = False

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        self.body_length += len(data)
        if self.body_length > MAX_BUFFERED_BODY:
            self.body_truncated = True
            return
        super().handleContentChunk(data)


def read_body(request: Request, cap: int) -> bytes:
    """The request body, or 400 ``body_too_large`` when it exceeds ``cap`` octets."""
    length = getattr(request, "body_length", None)
    if length is None:
        request.content.seek(0, 2)
        length = request.content.tell()
    if length > cap or getattr(request, "body_truncated", False):
        raise BadRequest(f"request body exceeds {cap} bytes", code="body_too_large")
    request.content.seek(0)
    return request.content.read()


def parse_json_object(body: bytes, *, optional: bool = False) -> dict[str, Any]:
    """Decode a JSON object body per api.md §0.6 (empty allowed when optional; last key wins)."""
    if optional and not body.strip():
        return {}
    try:
        text = body.decode("utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("request body is not valid JSON", code="invalid_request_body") from None
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_request_body")
    # null = absent
    return {k: v for k, v in value.items() if v is not None}


def json_body(request: Request, cap: int = JSON_CAP, *, optional: bool = False) -> dict[str, Any]:
    return parse_json_object(read_body(request, cap), optional=optional)


def get_str(body: dict[str, Any], name: str, default: str = "") -> str:
    """A string field; any other JSON type is ``invalid_request_body`` (api.md §0.3)."""
    value = body.get(name, default)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string", code="invalid_request_body")
    return value


def get_bool(body: dict[str, Any], name: str, default: bool | None = None) -> bool | None:
    value = body.get(name, default)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{name} must be a boolean", code="invalid_request_body")
    return value


def get_int(body: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise BadRequest(f"{name} must be an integer", code="invalid_request_body")
    return value


def get_str_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{name} must be an array of strings", code="invalid_request_body")
    return value


def query_arg(request: Request, name: str) -> str | None:
    """First value of a query parameter (api.md §0.6: repeated parameters, first wins)."""
    values = request.args.get(name.encode())
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def write_json(request: Request, status: int, body: Any, *, authenticated: bool = True) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    if authenticated:
        request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def client_ip(peer_host: str, forwarded_for: str | None, trusted_proxies: list[ipaddress._BaseNetwork]) -> str:
    """api.md §0.9: X-Forwarded-For only from a trusted peer; right-most untrusted entry wins."""

    def trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in trusted_proxies)

    if not forwarded_for or not trusted(peer_host):
        return peer_host
    for entry in reversed([p.strip() for p in forwarded_for.split(",") if p.strip()]):
        if not trusted(entry):
            try:
                return str(ipaddress.ip_address(entry))
            except ValueError:
                return peer_host
    return peer_host
