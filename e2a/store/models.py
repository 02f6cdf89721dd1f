"""Frozen dataclasses returned by the stores (Buildbot's models): one per stored aggregate.

Stores hand these out instead of dict rows so callers never depend on column order or names,
and so nothing downstream can mutate a row it was given. Other stores append their own
classes here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


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


@dataclass(frozen=True)
class InboundSummary:
    """What a WebSocket notification says about one stored inbound message (never its body)."""

    message_id: str
    conversation_id: str
    sender: str  # display sender
    recipient: str
    subject: str
    received_at: datetime


@dataclass(frozen=True)
class SocketGrantState:
    """Whether an open WebSocket's key and agent still stand (read in one statement).

    ``key_ok`` is None when the key row is gone (its user was deleted), False when the key
    was revoked or lost its agent; ``agent_mode`` is None when the agent was deleted.
    """

    key_ok: bool | None
    agent_mode: str | None


@dataclass(frozen=True)
class KeyOwner:
    """A live API key found by its hash, with its user's email (who is calling)."""

    key_id: str
    user_id: str
    user_email: str
    scope: str  # "user" | "agent"
    agent_id: str | None  # set for agent-scoped keys


@dataclass(frozen=True)
class OutboundRecord:
    """An outbound message as the API lists and shows it (api.md §7.1-§7.2).

    Address lists and attachments are as stored (JSON arrays, None when unset).
    """

    id: str
    agent_id: str
    subject: str
    type: str
    conversation_id: str
    to_addrs: list[str] | None
    cc_addrs: list[str] | None
    bcc_addrs: list[str] | None
    status: str
    approval_expires_at: datetime | None
    created_at: datetime
    email_message_id: str
    body_text: str | None
    body_html: str | None
    attachments: list[dict[str, Any]] | None
    edited: bool
    reviewed_at: datetime | None
    rejection_reason: str
    method: str
    smtp_message_id: str
    provider_message_id: str
    delivery_status: str


@dataclass(frozen=True)
class OutboundRecipientState:
    """One recipient row of an outbound message, as its detail shows it."""

    address: str
    kind: str
    route: str
    status: str
    attempts: int
    last_reply: str
    updated_at: datetime


@dataclass(frozen=True)
class ReplySource:
    """What a reply needs from the inbound message it answers."""

    raw_message: bytes | None
    subject: str
    display_from: str
    conversation_id: str
    email_message_id: str


@dataclass(frozen=True)
class NewOutboundMessage:
    """An outbound record as the send path writes it (held or released).

    ``composed`` is the signed SMTP message (None for holds and internal-only mail); the body,
    attachments and expiry are set only on holds, and are removed when a hold ends.
    """

    id: str
    agent_id: str
    user_id: str
    type: str  # send | reply | test
    status: str
    sender: str
    subject: str
    to_addrs: tuple[str, ...]
    cc_addrs: tuple[str, ...]
    bcc_addrs: tuple[str, ...]
    email_message_id: str  # replies: the Message-ID of the message replied to
    in_reply_to: str
    references_ids: str
    smtp_message_id: str
    conversation_id: str
    composed: bytes | None
    created_at: datetime
    body_text: str | None = None
    body_html: str | None = None
    attachments: tuple[HeldAttachment, ...] | None = None
    approval_expires_at: datetime | None = None
    hitl_expiration_action: str = ""
    method: str = ""
    delivery_status: str = ""


@dataclass(frozen=True)
class DomainSigningKey:
    """What DKIM signing of outbound mail reads of a domain row (the key stays encrypted)."""

    is_shared: bool
    dkim_selector: str
    dkim_private_key: str | None


@dataclass(frozen=True)
class Delivery:
    """A webhook delivery job as the API lists it (api.md §2.7)."""

    id: str
    message_id: str
    agent_id: str
    webhook_url: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Delivery:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ExportedDomain:
    domain: str
    user_id: str | None
    verified: bool
    verification_token: str
    created_at: datetime
    verified_at: datetime | None


@dataclass(frozen=True)
class ExportedMessage:
    """A message row as the account export (api.md §12.1) shows it, inbound or outbound."""

    id: str
    agent_id: str | None
    direction: str
    sender: str
    recipient: str
    subject: str
    email_message_id: str
    provider_message_id: str
    method: str
    type: str
    raw_message: bytes | None
    auth_headers: dict[str, str] | None
    conversation_id: str
    status: str
    delivery_status: str
    created_at: datetime
    expires_at: datetime | None
    to_addrs: list[str] | None
    cc_addrs: list[str] | None
    bcc_addrs: list[str] | None
    approval_expires_at: datetime | None
    reviewed_at: datetime | None
    rejection_reason: str
    edited: bool
    body_text: str | None
    body_html: str | None
    attachments: list[dict[str, Any]] | None
    smtp_message_id: str


@dataclass(frozen=True)
class UsageEvent:
    id: str
    agent_id: str | None
    domain: str
    direction: str
    event_type: str
    created_at: datetime


@dataclass(frozen=True)
class AccountExport:
    """Everything a user owns, read in one repeatable-read snapshot at ``generated_at``."""

    generated_at: datetime
    user: User
    domains: tuple[ExportedDomain, ...]
    agents: tuple[Agent, ...]
    api_keys: tuple[ApiKey, ...]
    signing_secrets: tuple[SigningSecret, ...]
    messages: tuple[ExportedMessage, ...]
    deliveries: tuple[Delivery, ...]
    usage_events: tuple[UsageEvent, ...]


@dataclass(frozen=True)
class InboundMessage:
    """A stored inbound message: the one shape it is written and read as (mail.md §1.9).

    One copy per recipient agent. ``raw_message`` is the stored bytes (what is hashed and
    served); reads that list messages leave it ``b""``. ``auth_headers`` are the signed
    X-E2A-Auth-* headers as stored at receipt.
    """

    id: str
    agent_id: str
    user_id: str
    status: str  # unread | read
    route: str  # smtp | internal
    sender: str  # the signed sender
    display_from: str  # the unsigned display sender (Reply-To, else From)
    recipient: str  # the agent address of this copy
    envelope_from: str  # MAIL FROM
    client_ip: str
    subject: str
    to_addrs: list[str] | None
    cc_addrs: list[str] | None
    email_message_id: str
    in_reply_to: str
    references_ids: str
    conversation_id: str
    auth_headers: dict[str, str]
    raw_message: bytes
    created_at: datetime
