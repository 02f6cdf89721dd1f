"""Frozen dataclasses returned by the stores (Buildbot's models): one per stored aggregate.

Stores hand these out instead of dict rows so callers never depend on column order or names,
and so nothing downstream can mutate a row it was given. Other stores append their own
classes here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class User:
    id: str
    email: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: never the plaintext, never the hash."""

    id: str
    user_id: str
    name: str
    key_prefix: str
    scope: str  # "user" | "agent"
    agent_id: str | None
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class SigningSecret:
    """A signing secret's metadata; the value itself is only ever returned separately."""

    id: str
    user_id: str
    name: str
    secret_prefix: str
    created_at: datetime
    last_signed_at: datetime | None = None


@dataclass(frozen=True)
class Domain:
    """A custom domain (or the shared domain: ``user_id`` None, ``is_shared``).

    The DKIM private key stays encrypted in the store; only the public half travels.
    """

    domain: str
    user_id: str | None
    is_shared: bool
    verified: bool
    verification_token: str
    claimed_at: datetime
    created_at: datetime
    verified_at: datetime | None
    dkim_selector: str
    dkim_public_key: str


@dataclass(frozen=True)
class Agent:
    """An agent row plus ``domain_verified`` from its domain."""

    id: str
    user_id: str
    domain: str
    name: str
    agent_mode: str  # "cloud" | "local"
    webhook_url: str
    webhook_status: str  # "active" | "disabled" | "none"
    webhook_disabled_at: datetime | None
    hitl_enabled: bool
    hitl_ttl_seconds: int
    hitl_expiration_action: str  # "approve" | "reject"
    hitl_notify: bool
    hitl_reviewers: tuple[str, ...]
    created_at: datetime
    domain_verified: bool


@dataclass(frozen=True)
class HeldAttachment:
    """An attachment of a held message as stored: ``data`` stays base64 (api.md §2.2 shape)."""

    filename: str
    content_type: str
    data: str


@dataclass(frozen=True)
class HeldMessage:
    """An outbound message as the HITL review sees it (mail.md §8.2-§8.3).

    Bodies and attachments are only present while ``status`` is ``pending_approval``: every
    terminal transition removes them from the row, so ``body_text`` is then None too.
    ``expiration_action`` is the agent's action at hold time (``""`` for holds older than
    the column: use the agent's current setting).
    """

    id: str
    agent_id: str  # the agent's address
    user_id: str
    type: str  # send | reply | test
    status: str
    subject: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    body_text: str | None
    body_html: str | None  # None when the message has no HTML body
    attachments: tuple[HeldAttachment, ...]
    conversation_id: str
    in_reply_to: str
    references: str
    replied_message_id: str  # for replies: the Message-ID of the message replied to
    approval_expires_at: datetime | None
    created_at: datetime
    edited: bool
    reviewed_at: datetime | None
    rejection_reason: str
    expiration_action: str

    @property
    def agent_address(self) -> str:
        return self.agent_id

    @property
    def is_pending(self) -> bool:
        return self.status == "pending_approval"
