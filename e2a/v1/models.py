"""Typed results of the e2a SDK and the inbound email with its verification gate."""

from __future__ import annotations

import base64
import email as email_lib
import json
from dataclasses import dataclass, field
from email.policy import default as default_policy
from typing import TYPE_CHECKING, Any

from e2a.v1 import verify as _verify
from e2a.v1.errors import UnverifiedEmailError

if TYPE_CHECKING:
    from e2a.v1.client import AsyncE2AClient, E2AClient


@dataclass
class Attachment:
    """A file attached to a message; ``data`` is the raw bytes (base64 only on the wire)."""

    filename: str
    content_type: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def to_wire(self) -> dict[str, str]:
        return {
            "filename": self.filename,
            "content_type": self.content_type or "application/octet-stream",
            "data": base64.b64encode(self.data).decode("ascii"),
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Attachment:
        return cls(obj.get("filename", ""), obj.get("content_type", ""), base64.b64decode(obj.get("data", "")))


@dataclass
class AuthHeaders:
    """The signed ``X-E2A-Auth-*`` set. ``verified`` is the server's claim, not a check."""

    verified: bool
    sender: str
    entity_type: str
    domain_check: str
    delegation: str
    signature: str
    timestamp: str
    message_id: str
    body_hash: str
    raw: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_headers(cls, headers: dict[str, str] | None) -> AuthHeaders:
        h = dict(headers or {})
        return cls(
            verified=str(h.get("X-E2A-Auth-Verified", "")).lower() == "true",
            sender=h.get("X-E2A-Auth-Sender", ""),
            entity_type=h.get("X-E2A-Auth-Entity-Type", ""),
            domain_check=h.get("X-E2A-Auth-Domain-Check", ""),
            delegation=h.get("X-E2A-Auth-Delegation", ""),
            signature=h.get("X-E2A-Auth-Signature", ""),
            timestamp=h.get("X-E2A-Auth-Timestamp", ""),
            message_id=h.get("X-E2A-Auth-Message-Id", ""),
            body_hash=h.get("X-E2A-Auth-Body-Hash", ""),
            raw=h,
        )


@dataclass
class SendResult:
    """Answer of send / reply / approve / test: ``status`` is ``sent`` or ``pending_approval``."""

    status: str
    message_id: str
    method: str | None = None
    smtp_message_id: str | None = None
    delivery_status: str | None = None
    approval_expires_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SendResult:
        return cls(
            status=obj.get("status", ""),
            message_id=obj.get("message_id", ""),
            method=obj.get("method"),
            smtp_message_id=obj.get("smtp_message_id"),
            delivery_status=obj.get("delivery_status"),
            approval_expires_at=obj.get("approval_expires_at"),
            raw=obj,
        )


@dataclass
class MessageSummary:
    """One inbox row (no body)."""

    message_id: str
    conversation_id: str | None
    sender: str
    recipient: str
    to: list[str]
    cc: list[str]
    subject: str
    status: str
    created_at: str

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MessageSummary:
        return cls(
            message_id=obj.get("message_id", ""),
            conversation_id=obj.get("conversation_id") or None,
            sender=obj.get("from", ""),
            recipient=obj.get("recipient", ""),
            to=list(obj.get("to") or []),
            cc=list(obj.get("cc") or []),
            subject=obj.get("subject", ""),
            status=obj.get("status", ""),
            created_at=obj.get("created_at", ""),
        )


@dataclass
class MessageList:
    messages: list[MessageSummary]
    next_token: str | None = None


@dataclass
class WSNotification:
    """One WebSocket notification: enough to decide whether to fetch the message."""

    message_id: str
    conversation_id: str | None
    sender: str
    recipient: str
    subject: str
    received_at: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> WSNotification:
        return cls(
            message_id=obj.get("message_id", ""),
            conversation_id=obj.get("conversation_id") or None,
            sender=obj.get("from", ""),
            recipient=obj.get("recipient", ""),
            subject=obj.get("subject", ""),
            received_at=obj.get("received_at", ""),
            raw=obj,
        )


# ---------------------------------------------------------------------------- MIME


def parse_raw_email(raw: bytes) -> tuple[str, str, str | None, list[Attachment]]:
    """Subject (decoded), text body, HTML body and attachments from the raw MIME bytes."""
    try:
        msg = email_lib.message_from_bytes(raw, policy=default_policy)
    except Exception:  # noqa: BLE001 - a broken message still yields an empty view
        return "", "", None, []
    try:
        subject = str(msg.get("Subject", "") or "")
    except Exception:  # noqa: BLE001
        subject = ""
    text_body, html_body, attachments = "", None, []
    for part in msg.walk() if msg.is_multipart() else [msg]:
        ctype = part.get_content_type()
        if ctype.startswith("multipart/"):
            continue
        disposition = part.get_content_disposition()
        is_body = disposition not in ("attachment",) and ctype in ("text/plain", "text/html")
        if is_body and ctype == "text/plain" and not text_body:
            text_body = _content(part)
        elif is_body and ctype == "text/html" and html_body is None:
            html_body = _content(part)
        elif not is_body or disposition == "attachment":
            data = part.get_payload(decode=True) or b""
            attachments.append(Attachment(part.get_filename() or "unnamed", ctype, data))
    return subject, text_body, html_body, attachments


def _content(part: Any) -> str:
    try:
        return str(part.get_content())
    except Exception:  # noqa: BLE001 - unknown charset: fall back to a lossy decode
        return (part.get_payload(decode=True) or b"").decode("utf-8", "replace")


def load_body(body: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("webhook body must be a JSON object")
    return data


# ---------------------------------------------------------------------------- inbound email

_GATED = (
    "message_id", "conversation_id", "sender", "recipient", "to", "cc", "subject",
    "text_body", "html_body", "attachments", "received_at",
)


class _InboundBase:
    """Shared state and gate of :class:`InboundEmail` and :class:`AsyncInboundEmail`."""

    def __init__(self, payload: dict[str, Any], client: Any, *, trusted: bool = False) -> None:
        raw_b64 = payload.get("raw_message") or ""
        self._raw_message = base64.b64decode(raw_b64) if raw_b64 else b""
        subject, text_body, html_body, attachments = parse_raw_email(self._raw_message)
        self._fields: dict[str, Any] = {
            "message_id": payload.get("message_id", ""),
            "conversation_id": payload.get("conversation_id") or None,
            "sender": payload.get("from", ""),
            "recipient": payload.get("recipient", ""),
            "to": list(payload.get("to") or []),
            "cc": list(payload.get("cc") or []),
            "subject": subject or payload.get("subject", ""),
            "text_body": text_body,
            "html_body": html_body,
            "attachments": attachments,
            "received_at": payload.get("received_at") or payload.get("created_at"),
        }
        self._payload = payload
        self._auth = AuthHeaders.from_headers(payload.get("auth_headers"))
        self._client = client
        self._verified = trusted

    # always readable ------------------------------------------------------------------------

    @property
    def auth(self) -> AuthHeaders:
        return self._auth

    @property
    def raw_message(self) -> bytes:
        return self._raw_message

    @property
    def verified(self) -> bool:
        """The server's claim that the sender authenticated (``X-E2A-Auth-Verified``).

        Readable before the signature check, as the client contract says, so it is only as
        trustworthy as the signature: check :attr:`signature_verified` (or use
        ``parse_webhook``) before acting on it.
        """
        return self._auth.verified

    @property
    def is_verified(self) -> bool:
        """Alias of :attr:`verified` (the server's claim)."""
        return self._auth.verified

    @property
    def signature_verified(self) -> bool:
        """True once the ``X-E2A-Auth-*`` signature was checked here (or the email came over the
        authenticated API): the claim fields are readable from then on."""
        return self._verified

    @property
    def unverified_payload(self) -> dict[str, Any]:
        """The parsed fields without any check: attacker-controllable until verified."""
        out = {k: v for k, v in self._fields.items() if k != "attachments"}
        out["attachments_count"] = len(self._fields["attachments"])
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON document the API returned (what ``e2a listen --json`` prints).

        Gated like the claim fields: it holds all of them (``unverified_payload`` is the
        explicit way to look without trust)."""
        if not self._verified:
            raise UnverifiedEmailError("to_dict() is not available before verification: use .unverified_payload")
        return dict(self._payload)

    def verify_signature(self, secret: str | list[str] | None = None) -> bool:
        """Check the ``X-E2A-Auth-*`` MAC, body hash and age; unlock the fields on success."""
        try:
            self.check_signature(secret)
        except PermissionError:
            return False
        return True

    def check_signature(self, secret: str | list[str] | None = None, *, now: float | None = None) -> None:
        """As :meth:`verify_signature` but raising :class:`WebhookVerificationError` with the reason."""
        _verify.verify_auth_headers(self._auth.raw, self._raw_message, secret, now=now)
        if self._fields["message_id"] and self._fields["message_id"] != self._auth.message_id:
            raise _verify.WebhookVerificationError("message_id does not match X-E2A-Auth-Message-Id")
        self._verified = True

    def __getattr__(self, name: str) -> Any:
        if name in _GATED:
            if not self.__dict__.get("_verified"):
                raise UnverifiedEmailError(
                    f"{name} is not verified yet: use parse_webhook(body, secret) or verify_signature(secret);"
                    " for inspection without trust use .unverified_payload"
                )
            return self.__dict__["_fields"][name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        state = "verified" if self._verified else "UNVERIFIED"
        f = self._fields
        return f"{type(self).__name__}<{state}>(message_id={f['message_id']!r}, subject={f['subject']!r})"


class InboundEmail(_InboundBase):
    """An inbound email; claim fields raise :class:`UnverifiedEmailError` until verified."""

    _client: E2AClient

    def reply(
        self,
        body: str,
        html_body: str | None = None,
        reply_all: bool | None = None,
        cc: list[str] | None = None,
        bcc: list[str] | None = None,
        conversation_id: str | None = None,
        attachments: list[Attachment] | None = None,
    ) -> SendResult:
        """Reply as the agent this copy was delivered to."""
        return self._client.reply(
            self.message_id, body, html_body=html_body, reply_all=reply_all, cc=cc, bcc=bcc,
            conversation_id=conversation_id, attachments=attachments, agent_email=self.recipient,
        )


class AsyncInboundEmail(_InboundBase):
    """Async twin of :class:`InboundEmail` (``reply`` is a coroutine)."""

    _client: AsyncE2AClient

    async def reply(
        self,
        body: str,
        html_body: str | None = None,
        reply_all: bool | None = None,
        cc: list[str] | None = None,
        bcc: list[str] | None = None,
        conversation_id: str | None = None,
        attachments: list[Attachment] | None = None,
    ) -> SendResult:
        return await self._client.reply(
            self.message_id, body, html_body=html_body, reply_all=reply_all, cc=cc, bcc=bcc,
            conversation_id=conversation_id, attachments=attachments, agent_email=self.recipient,
        )


__all__ = [
    "AsyncInboundEmail",
    "Attachment",
    "AuthHeaders",
    "InboundEmail",
    "MessageList",
    "MessageSummary",
    "SendResult",
    "WSNotification",
    "parse_raw_email",
]
