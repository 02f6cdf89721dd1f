"""The account export document (api.md §12.1) built from the store's snapshot (pure).

The store reads everything in one repeatable-read snapshot (:func:`e2a.store.accounts.export_user`);
this module only decides the JSON: key order, which unset values are omitted, time formats.
Used by the API route and the console's download alike.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from e2a.api.wire import delivery_json, signing_secret_json
from e2a.store.models import AccountExport, Agent, ApiKey, ExportedDomain, ExportedMessage, UsageEvent
from e2a.timefmt import ts_frac

__all__ = ["EXPORT_SCHEMA_VERSION", "export_document"]

EXPORT_SCHEMA_VERSION = "1"


def _put(out: dict[str, Any], name: str, value: Any) -> None:
    """Set ``name`` unless the value is unset (None or ""): §12.1 omits unset values."""
    if value is None or value == "":
        return
    if isinstance(value, datetime):
        value = ts_frac(value)
    out[name] = value


def _agent(agent: Agent) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": agent.id,
        "domain": agent.domain,
        "email": agent.id,
        "name": agent.name,
        "webhook_url": agent.webhook_url,
        "agent_mode": agent.agent_mode,
        "domain_verified": bool(agent.domain_verified),
        "created_at": ts_frac(agent.created_at),
        "hitl_enabled": agent.hitl_enabled,
        "hitl_ttl_seconds": agent.hitl_ttl_seconds,
        "hitl_expiration_action": agent.hitl_expiration_action,
        "hitl_notify": agent.hitl_notify,
        "hitl_reviewers": list(agent.hitl_reviewers or []),
        "webhook_status": agent.webhook_status,
    }
    if agent.webhook_status == "disabled" and agent.webhook_disabled_at is not None:
        out["webhook_disabled_at"] = ts_frac(agent.webhook_disabled_at)
    out["user_id"] = agent.user_id
    out["public"] = True
    return out


def _message(m: ExportedMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("id", "agent_id", "direction", "sender", "recipient", "subject", "email_message_id",
                 "provider_message_id", "method", "type"):
        _put(out, name, getattr(m, name))
    if m.raw_message is not None and m.direction == "inbound":
        out["raw_message"] = base64.b64encode(m.raw_message).decode("ascii")
    _put(out, "auth_headers", m.auth_headers)
    for name in ("conversation_id", "status", "delivery_status", "created_at", "expires_at"):
        _put(out, name, getattr(m, name))
    _put(out, "to_recipients", m.to_addrs)
    _put(out, "cc", m.cc_addrs)
    _put(out, "bcc", m.bcc_addrs)
    for name in ("approval_expires_at", "reviewed_at", "rejection_reason"):
        _put(out, name, getattr(m, name))
    out["edited"] = bool(m.edited)
    for name in ("body_text", "body_html", "attachments", "smtp_message_id"):
        _put(out, name, getattr(m, name))
    return out


def _key(key: ApiKey) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": key.id,
        "name": key.name,
        "key_prefix": key.key_prefix,
        "created_at": ts_frac(key.created_at),
    }
    if key.last_used_at is not None:
        out["last_used_at"] = ts_frac(key.last_used_at)
    if key.revoked_at is not None:
        out["revoked_at"] = ts_frac(key.revoked_at)
    out["scope"] = key.scope
    out["agent"] = key.agent_id if key.scope == "agent" else None
    return out


def _domain(d: ExportedDomain) -> dict[str, Any]:
    out: dict[str, Any] = {
        "domain": d.domain,
        "user_id": d.user_id,
        "verified": d.verified,
        "verification_token": d.verification_token,
        "created_at": ts_frac(d.created_at),
    }
    if d.verified_at is not None:
        out["verified_at"] = ts_frac(d.verified_at)
    return out


def _usage(e: UsageEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "agent_id": e.agent_id,
        "domain": e.domain,
        "direction": e.direction,
        "event_type": e.event_type,
        "created_at": ts_frac(e.created_at),
    }


def export_document(snapshot: AccountExport) -> dict[str, Any]:
    """The §12.1 document (JSON-ready) of one account snapshot."""
    user = snapshot.user
    doc: dict[str, Any] = {
        "generated_at": ts_frac(snapshot.generated_at),
        "schema_version": EXPORT_SCHEMA_VERSION,
        "user": {"id": user.id, "email": user.email, "name": user.name, "created_at": ts_frac(user.created_at)},
        "domains": [_domain(d) for d in snapshot.domains],
        "agents": [_agent(a) for a in snapshot.agents],
        "api_keys": [_key(k) for k in snapshot.api_keys],
        "signing_secrets": [signing_secret_json(s) for s in snapshot.signing_secrets],
        "messages": [_message(m) for m in snapshot.messages],
        "deliveries": [delivery_json(d, next_attempt_always=True) for d in snapshot.deliveries],
    }
    if snapshot.usage_events:
        doc["usage_events"] = [_usage(e) for e in snapshot.usage_events]
    return doc
