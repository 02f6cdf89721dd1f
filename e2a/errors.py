"""The E2AError hierarchy: every failure that reaches a client carries its own wire mapping.

Raising a typed error deep in a store or rule and translating it once at the edge (one Klein
error handler, one SMTP reply map) keeps the spec's status codes and stable ``code`` strings in
a single place instead of scattered through routes.
"""

from __future__ import annotations


class E2AError(Exception):
    """Base class. ``status`` is the HTTP status, ``code`` the stable API error code."""

    status: int = 500
    code: str = "internal_error"
    default_message: str = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(E2AError):
    status = 400
    code = "invalid_request_body"
    default_message = "invalid request body"


class Unauthorized(E2AError):
    status = 401
    code = "unauthorized"
    default_message = "invalid API key"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="e2a"'})


class Forbidden(E2AError):
    status = 403
    code = "insufficient_scope"
    default_message = "this key may not use this endpoint"


class NotFound(E2AError):
    status = 404
    code = "not_found"
    default_message = "not found"


class MethodNotAllowed(E2AError):
    status = 405
    code = "method_not_allowed"
    default_message = "method not allowed"


class Conflict(E2AError):
    status = 409
    code = "conflict"
    default_message = "conflict"


class PreconditionFailed(E2AError):
    status = 412
    code = "dns_record_not_found"
    default_message = "verification record not found"


class UpgradeRequired(E2AError):
    status = 426
    code = "upgrade_required"
    default_message = "WebSocket upgrade required"


class RateLimited(E2AError):
    status = 429
    code = "rate_limited"
    default_message = "rate limit exceeded"

    def __init__(self, retry_after: int, message: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, int(retry_after)))})
        self.retry_after = retry_after


class Unavailable(E2AError):
    status = 503
    code = "unavailable"
    default_message = "service unavailable, retry later"


class TransientError(Exception):
    """A failure worth retrying later (database down, DNS timeout): SMTP 451, HTTP 503."""


class ConfigError(Exception):
    """Every configuration problem found, reported together (one line each)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
