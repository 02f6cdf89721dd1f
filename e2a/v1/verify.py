"""Webhook verification, exactly as the contract's receivers do it.

Two independent checks exist. The ``X-E2A-Auth-*`` set (signed at receipt, re-signed per
attempt) binds the verdict to the raw message bytes; the Standard Webhooks headers cover the
whole HTTP body (``from``, ``to``, ``recipient``… are outside the first MAC). Both use the
signing secret's 64 ASCII characters as the HMAC key, and any one of several secrets may
verify so that a receiver can hold old and new secrets during a rotation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from e2a.v1.errors import WebhookVerificationError

MIN_AGE = -30  # seconds: a timestamp up to 30 s in the future is clock skew, not forgery
MAX_AGE = 300  # seconds: older deliveries are replays
STANDARD_TOLERANCE = 300  # Standard Webhooks: ±5 min on webhook-timestamp

CANONICAL_ORDER = (
    "X-E2A-Auth-Verified",
    "X-E2A-Auth-Sender",
    "X-E2A-Auth-Entity-Type",
    "X-E2A-Auth-Domain-Check",
    "X-E2A-Auth-Delegation",
    "X-E2A-Auth-Timestamp",
    "X-E2A-Auth-Message-Id",
    "X-E2A-Auth-Body-Hash",
)


def resolve_secrets(secret: str | Iterable[str] | None) -> list[str]:
    """The secrets to try: the argument (one or a list), else ``E2A_WEBHOOK_SECRET``.

    The environment variable may hold several secrets separated by commas or spaces (rotation).
    No secret at all is a programming error (``ValueError``), never a silent failed check."""
    if secret is None:
        env = os.environ.get("E2A_WEBHOOK_SECRET", "")
        found = [s for s in env.replace(",", " ").split() if s]
    elif isinstance(secret, str):
        found = [secret] if secret else []
    else:
        found = [s for s in secret if s]
    if not found:
        raise ValueError("a webhook signing secret is required: pass secret= or set E2A_WEBHOOK_SECRET")
    return found


def canonical_string(headers: Mapping[str, str]) -> str:
    """The 8 values joined by LF (Delegation '' when absent), no trailing LF."""
    return "\n".join(str(headers.get(name, "") or "") for name in CANONICAL_ORDER)


def parse_ts_sec(value: str) -> float:
    """Unix seconds of an RFC 3339 UTC timestamp (``Z`` or an offset, any fraction)."""
    text = value.strip().replace("z", "Z")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def verify_auth_headers(
    headers: Mapping[str, str],
    raw_message: bytes,
    secret: str | Iterable[str] | None = None,
    *,
    now: float | None = None,
) -> None:
    """Raise :class:`WebhookVerificationError` unless the ``X-E2A-Auth-*`` set verifies."""
    secrets = resolve_secrets(secret)
    signature = str(headers.get("X-E2A-Auth-Signature", "") or "")
    if not signature:
        raise WebhookVerificationError("missing signature")
    body_hash = hashlib.sha256(raw_message).hexdigest()
    if not hmac.compare_digest(body_hash, str(headers.get("X-E2A-Auth-Body-Hash", "") or "")):
        raise WebhookVerificationError("body hash mismatch: raw_message was altered")
    try:
        signed_at = parse_ts_sec(str(headers.get("X-E2A-Auth-Timestamp", "")))
    except ValueError:
        raise WebhookVerificationError("bad timestamp") from None
    age = (time.time() if now is None else now) - signed_at
    if age < MIN_AGE or age > MAX_AGE:
        raise WebhookVerificationError(f"stale timestamp: signed {int(age)} s ago (allowed -30…300 s)")
    canonical = canonical_string(headers).encode("utf-8")
    for key in secrets:
        expected = hmac.new(key.encode("ascii"), canonical, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, signature.lower()):
            return
    raise WebhookVerificationError("signature mismatch: wrong secret or altered headers")


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return ""


def verify_standard_webhook(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str | Iterable[str] | None = None,
    *,
    now: float | None = None,
    tolerance: int = STANDARD_TOLERANCE,
) -> None:
    """Verify the Standard Webhooks headers of a raw request (header names case-insensitive).

    ``body`` must be the exact bytes received. Raises :class:`WebhookVerificationError`."""
    secrets = resolve_secrets(secret)
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    webhook_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if not (webhook_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        sent_at = int(stamp)
    except ValueError:
        raise WebhookVerificationError("bad webhook-timestamp") from None
    if abs((time.time() if now is None else now) - sent_at) > tolerance:
        raise WebhookVerificationError("stale timestamp: webhook-timestamp outside ±5 min")
    content = webhook_id.encode() + b"." + stamp.encode() + b"." + raw
    offered = [part[3:] for part in signatures.split() if part.startswith("v1,")]
    for key in secrets:
        expected = base64.b64encode(hmac.new(key.encode("ascii"), content, hashlib.sha256).digest()).decode()
        if any(hmac.compare_digest(expected, sig) for sig in offered):
            return
    raise WebhookVerificationError("webhook-signature mismatch: wrong secret or altered body")


__all__ = [
    "canonical_string",
    "parse_ts_sec",
    "resolve_secrets",
    "verify_auth_headers",
    "verify_standard_webhook",
]
