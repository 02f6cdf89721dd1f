"""Magic-link approval tokens (mail.md §8.4).

The token is ``base64url(payload) "." base64url(mac)`` (no padding) with payload
``<message id>|<action>|<exp>``. The MAC key is derived from the deployment's
``signing.hmac_secret`` only, so agents, who hold their users' webhook signing secrets,
cannot mint approvals. Verification is strict (one canonical spelling per token) so that a
token cannot be re-encoded into a second valid string that slips past logging redaction or
caches. Pure: the current time is an argument.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from e2a.errors import BadRequest, E2AError

APPROVAL_KEY_LABEL = b"e2a-approval-token-v1"
DEFAULT_GRACE = 600  # hitl.token_grace, seconds
ACTIONS = ("approve", "reject")
PAYLOAD_RE = re.compile(r"msg_[0-9a-f]{32}\|(approve|reject)\|[0-9]{1,12}")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
# Longest valid payload is 4+32+1+7+1+12 = 57 bytes → 76 chars; plus "." and 43 chars.
MAX_TOKEN_LEN = 128
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class InvalidToken(BadRequest):
    """Malformed token, bad MAC, or action ≠ endpoint (api.md §8: 400 "invalid link")."""

    code = "invalid_link"
    default_message = "invalid link"


class ExpiredToken(E2AError):
    """Well-formed, authentic token whose ``exp`` has passed (api.md §8: 410 "link expired")."""

    status = 410
    code = "link_expired"
    default_message = "link expired"


@dataclass(frozen=True)
class TokenClaims:
    message_id: str
    action: str
    exp: int


def derive_approval_key(hmac_secret: str) -> bytes:
    """approval key = HMAC-SHA256(key = UTF-8 of ``signing.hmac_secret``, ``e2a-approval-token-v1``)."""
    return hmac.new(hmac_secret.encode("utf-8"), APPROVAL_KEY_LABEL, hashlib.sha256).digest()


def token_exp(approval_expires_at: datetime, grace: int = DEFAULT_GRACE) -> int:
    """``exp`` = floor(approval_expires_at as unix seconds) + grace."""
    if approval_expires_at.tzinfo is None:
        raise ValueError("approval_expires_at must be timezone-aware")
    return (approval_expires_at - _EPOCH) // timedelta(seconds=1) + grace


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode_strict(part: str) -> bytes:
    """Decode unpadded base64url, rejecting padding, other characters and non-canonical
    spellings (e.g. non-zero trailing bits) so each byte string has exactly one token."""
    if not _B64URL_RE.fullmatch(part) or len(part) % 4 == 1:
        raise InvalidToken()
    try:
        data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken() from None
    if _b64url(data) != part:
        raise InvalidToken()
    return data


def mint_token(key: bytes, message_id: str, action: str, exp: int) -> str:
    """A token for one action on one held message. ``key`` from :func:`derive_approval_key`.

    Raises:
        ValueError: the payload would not pass verification (bad id, action or exp).
    """
    payload = f"{message_id}|{action}|{exp}"
    if not PAYLOAD_RE.fullmatch(payload):
        raise ValueError("cannot mint a token for this message id / action / exp")
    raw = payload.encode("ascii")
    return _b64url(raw) + "." + _b64url(hmac.new(key, raw, hashlib.sha256).digest())


def verify_token(key: bytes, token: str, action: str, now: datetime) -> TokenClaims:
    """Check a token for the endpoint ``action`` in the order of §8.4.

    Raises:
        InvalidToken: wrong shape, padding/other characters, bad MAC, payload not matching
            the regex, or a token for the other action.
        ExpiredToken: authentic and for this action, but ``exp`` < now.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if len(token) > MAX_TOKEN_LEN or token.count(".") != 1:
        raise InvalidToken()
    p64, m64 = token.split(".")
    payload = _b64url_decode_strict(p64)
    mac = _b64url_decode_strict(m64)
    expected = hmac.new(key, payload, hashlib.sha256).digest()
    if len(mac) != 32 or not hmac.compare_digest(mac, expected):
        raise InvalidToken()
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidToken() from None
    if not PAYLOAD_RE.fullmatch(text):
        raise InvalidToken()
    message_id, tok_action, exp_s = text.split("|")
    if tok_action != action:
        raise InvalidToken()
    exp = int(exp_s)
    # Compare as durations since the epoch: a 12-digit exp is beyond datetime's year 9999.
    if timedelta(seconds=exp) < now - _EPOCH:
        raise ExpiredToken()
    return TokenClaims(message_id=message_id, action=tok_action, exp=exp)


def approval_url(public_url: str, action: str, token: str) -> str:
    """``<http.public_url>/api/v1/<action>?t=<token>`` (token is URL-safe as is)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    return f"{public_url.rstrip('/')}/api/v1/{action}?t={token}"


class ApprovalTokens:
    """Mint and verify tokens for one deployment: built once from ``signing.hmac_secret`` and
    ``hitl.token_grace`` so the key is derived once and callers never touch it."""

    def __init__(self, hmac_secret: str, grace: int = DEFAULT_GRACE) -> None:
        if not hmac_secret:
            raise ValueError("signing.hmac_secret is required for approval tokens")
        self._key = derive_approval_key(hmac_secret)
        self._grace = grace

    def mint(self, message_id: str, action: str, approval_expires_at: datetime) -> str:
        return mint_token(self._key, message_id, action, token_exp(approval_expires_at, self._grace))

    def verify(self, token: str, action: str, now: datetime) -> TokenClaims:
        return verify_token(self._key, token, action, now)
