"""Route: POST /api/feedback (api.md §3.5) — stored in the ``feedback`` table.

No key is required; a valid key attaches its user (and supplies the email when none is
given), an invalid one is ignored. The feedback limit counts per client IP before anything
else, so the endpoint cannot be used to fill the database.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from twisted.web.server import Request

from e2a.api.agents import request_client_ip
from e2a.api.auth import optional_principal
from e2a.api.http import JSON_CAP, get_str, header_str, json_body, write_json
from e2a.errors import BadRequest
from e2a.ids import new_feedback_id
from e2a.store import feedback as feedback_store
from e2a.store import ratelimits
from e2a.store.database import Database

FEEDBACK_WINDOW_SECONDS = 3600
MAX_MESSAGE_CHARS = 5000
MAX_EMAIL_OCTETS = 254
CATEGORIES = ("bug", "feature", "general")


def parse_feedback(body: dict[str, Any]) -> tuple[str, str, str]:
    """(email, category, message) in the check order of api.md §3.5.

    Raises:
        BadRequest: ``missing_field`` (blank message), ``invalid_field`` (message > 5000
            chars, email > 254 octets, unknown category), ``invalid_request_body`` (types).
    """
    message = get_str(body, "message").strip()
    email = get_str(body, "email").strip()
    category = get_str(body, "category")
    if not message:
        raise BadRequest("message is required", code="missing_field")
    if len(message) > MAX_MESSAGE_CHARS:
        raise BadRequest(f"message must be at most {MAX_MESSAGE_CHARS} characters", code="invalid_field")
    if len(email.encode("utf-8")) > MAX_EMAIL_OCTETS:
        raise BadRequest(f"email must be at most {MAX_EMAIL_OCTETS} octets", code="invalid_field")
    category = category or "general"
    if category not in CATEGORIES:
        raise BadRequest("category must be bug, feature or general", code="invalid_field")
    return email, category, message


async def store_feedback(
    db: Database, *, user_id: str | None, email: str, category: str, message: str, client_ip: str
) -> str:
    """Insert one submission; returns its id."""
    feedback_id = new_feedback_id()
    await feedback_store.insert_feedback(
        db, feedback_id, user_id=user_id, email=email, category=category, message=message, client_ip=client_ip
    )
    return feedback_id


def install(router: Klein, deps: Any) -> None:
    db = deps.db
    config = deps.config

    @router.route("/api/feedback", methods=["POST"])
    async def feedback(request: Request) -> bytes:
        ip = request_client_ip(request, deps)
        await ratelimits.hit(
            db,
            f"feedback:{ip}",
            config.rate_limits.feedback_per_hour,
            FEEDBACK_WINDOW_SECONDS,
            deps.clock.seconds(),
        )
        body = json_body(request, JSON_CAP)
        email, category, message = parse_feedback(body)
        principal = None
        if header_str(request, "authorization") is not None:
            principal = await optional_principal(request, db)
        if not email and principal is not None:
            email = principal.user_email
        await store_feedback(
            db,
            user_id=principal.user_id if principal is not None else None,
            email=email,
            category=category,
            message=message,
            client_ip=ip,
        )
        return write_json(request, 200, {"status": "ok"}, authenticated=principal is not None)
