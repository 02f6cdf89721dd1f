"""HITL review routes: approve and reject a held message by API key (api.md §7.3, §7.4).

The routes only authenticate, enforce the key scope and read the body; every other check, in
the contract's order, and the transition itself belong to
:class:`~e2a.outbound.hitl.HoldReview`, which the magic-link pages share.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from twisted.web.server import Request

from e2a import ids
from e2a.api import wire
from e2a.api.auth import authenticate
from e2a.api.http import JSON_CAP, MAIL_HEADER_FIELDS, SEND_CAP, parse_json_object, read_body, write_json
from e2a.errors import BadRequest
from e2a.outbound.hitl import HoldReview


def hold_review(deps: Any) -> HoldReview:
    """The deployment's one HoldReview (built by e2a/service.py), looked up per request."""
    review: HoldReview = deps.services.hold_review
    return review


def install(router: Klein, deps: Any) -> None:
    db = deps.db

    async def _body(
        request: Request, message_id: str, action: str, user_id: str, cap: int,
        header_fields: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """The optional JSON body. A malformed one is reported only after the 404/409 checks,
        which the contract orders before validation. ``header_fields`` may hold NUL here: the
        edit validation answers it with ``invalid_header_value``, as a send does (api.md §0.11)."""
        raw = read_body(request, cap)
        try:
            return parse_json_object(raw, optional=True, header_fields=header_fields)
        except BadRequest:
            await hold_review(deps).check(message_id, action, user_id=user_id)
            raise

    @router.route("/api/v1/messages/<message_id>/approve", methods=["POST"])
    async def approve(request: Request, message_id: str) -> bytes:
        principal = await authenticate(request, db)
        principal.require_user_scope()
        message_id = _path_id(message_id)
        edits = await _body(request, message_id, "approve", principal.user_id, SEND_CAP, MAIL_HEADER_FIELDS)
        result = await hold_review(deps).approve(message_id, user_id=principal.user_id, edits=edits, via="api")
        return write_json(request, 200, result)

    @router.route("/api/v1/messages/<message_id>/reject", methods=["POST"])
    async def reject(request: Request, message_id: str) -> bytes:
        principal = await authenticate(request, db)
        principal.require_user_scope()
        message_id = _path_id(message_id)
        body = await _body(request, message_id, "reject", principal.user_id, JSON_CAP)
        reason = body.get("reason", "")
        result = await hold_review(deps).reject(message_id, user_id=principal.user_id, reason=reason, via="api")
        return write_json(request, 200, result)


def _path_id(raw: str) -> str:
    """Not of the exact ``msg_`` form → 404 without a query (NUL must never reach SQL: 500)."""
    return wire.path_id(raw, ids.MESSAGE_ID_RE, "message_not_found", "message")


__all__ = ["hold_review", "install"]
