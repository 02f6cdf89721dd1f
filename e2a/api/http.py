"""HTTP plumbing shared by every route: JSON bodies with caps, JSON responses, client IP.

Pure helpers where possible; the Klein routes stay thin.
"""

from __future__ import annotations

import ipaddress
import json
import re
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


# Paths whose JSON bodies may be large (api.md §0.6); every other JSON body is capped at 64 KiB.
_LARGE_BODY_PATH = re.compile(
    rb"^/api/v1/(send|agents/[^?]*/messages/[^/?]+/reply|messages/[^/?]+/approve)(\?|$)"
    # the console's approve form carries the same edited bodies as the API's approve
    rb"|^/console/approvals/[^/?]+/approve(\?|$)"
)
_CONSOLE_PATH = re.compile(rb"^/console(/|\?|$)")
_FORM_PATH = re.compile(rb"^/api/v1/(approve|reject)(\?|$)")


def body_cap_for_path(path: bytes) -> int:
    if _LARGE_BODY_PATH.match(path):
        return SEND_CAP
    if _FORM_PATH.match(path):
        return FORM_CAP
    return JSON_CAP


class CappedRequest(Request):
    """A Request that stops reading the body at its route's cap (api.md §0.6).

    twisted.web buffers the whole body before routing; without this a client could make the
    server spool an arbitrarily large upload (to a temporary file, with blocking writes) or
    stream forever. Past the cap — declared by Content-Length or reached while reading — the
    answer is 400 ``body_too_large`` and the connection is closed without reading further.
    """

    body_length = 0
    body_truncated = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted API
        super().gotLength(length)
        self.body_length = 0
        self.body_truncated = False
        self._cap = body_cap_for_path(getattr(self.channel, "_path", b"") or b"")
        if length is not None and length > self._cap:
            self._refuse_oversize()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted API
        if self.body_truncated:
            return
        self.body_length += len(data)
        if self.body_length > self._cap:
            self._refuse_oversize()
            return
        super().handleContentChunk(data)

    def _refuse_oversize(self) -> None:
        self.body_truncated = True
        if _CONSOLE_PATH.match(getattr(self.channel, "_path", b"") or b""):  # console pages answer HTML
            from e2a.console.routes import oversize_response

            self.channel.transport.write(oversize_response(self._cap))
            self.channel.transport.loseConnection()
            return
        if self._cap == FORM_CAP:  # magic-link pages answer HTML with their headers (api.md §8)
            from e2a.api.magiclink_pages import oversize_response

            self.channel.transport.write(oversize_response(self._cap))
            self.channel.transport.loseConnection()
            return
        body = json.dumps(
            {"error": {"code": "body_too_large", "message": f"request body exceeds {self._cap} bytes"}},
            separators=(",", ":"),
        ).encode()
        transport = self.channel.transport
        transport.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        transport.loseConnection()


def header_str(request: Request, name: str) -> str | None:
    """A request header as text, or None; bytes that are not UTF-8 never raise (they become
    U+FFFD and then fail whatever syntax check the caller applies)."""
    values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
    if not values:
        return None
    value = values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


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


#: Header-bound fields (api.md §0.11) of the agent routes and of send/reply: a NUL in them is
#: left to the field's own check (``invalid_header_value``, at the step the route's check order
#: gives it) instead of the blanket ``invalid_request_body`` below. Dotted names reach into
#: list items: ``attachments.filename`` is the ``filename`` of every attachment object.
AGENT_HEADER_FIELDS = frozenset({"name"})
MAIL_HEADER_FIELDS = frozenset(
    {"subject", "conversation_id", "attachments.filename", "attachments.content_type"}
)


def parse_json_object(
    body: bytes, *, optional: bool = False, header_fields: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Decode a JSON object body per api.md §0.6 (empty allowed when optional; last key wins).

    ``header_fields``: paths whose strings may hold NUL here because the route validates them
    as header-bound text before anything is stored (a route passing a field here must do so).
    """
    if optional and not body.strip():
        return {}
    try:
        text = body.decode("utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON", code="invalid_request_body") from None
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_request_body")
    if not _storable(value, nul_ok=header_fields):
        raise BadRequest("request body contains NUL or unpaired surrogate characters", code="invalid_request_body")
    # null = absent
    return {k: v for k, v in value.items() if v is not None}


def _storable(value: Any, depth: int = 0, path: str = "", nul_ok: frozenset[str] = frozenset()) -> bool:
    """No string anywhere holds NUL (except at a ``nul_ok`` path) or a lone surrogate
    (PostgreSQL text and UTF-8 refuse them)."""
    if isinstance(value, str):
        if "\x00" in value and path not in nul_ok:
            return False
        return not any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return all(
            _storable(k, depth) and _storable(v, depth + 1, f"{path}.{k}" if path else k, nul_ok)
            for k, v in value.items()
        )
    if isinstance(value, list):
        return all(_storable(v, depth + 1, path, nul_ok) for v in value)
    return True


def json_body(
    request: Request, cap: int = JSON_CAP, *, optional: bool = False, header_fields: frozenset[str] = frozenset()
) -> dict[str, Any]:
    return parse_json_object(read_body(request, cap), optional=optional, header_fields=header_fields)


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


def encode_json(body: Any) -> bytes:
    """Compact UTF-8 JSON, the encoding of every API response."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_headers(request: Request, status: int, *, authenticated: bool = True) -> None:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    if authenticated:
        request.setHeader(b"Cache-Control", b"no-store")


def write_json(request: Request, status: int, body: Any, *, authenticated: bool = True) -> bytes:
    json_headers(request, status, authenticated=authenticated)
    return encode_json(body)


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
