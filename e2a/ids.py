"""Identifier formats of api.md §0.4. Random parts come from the OS CSPRNG."""

from __future__ import annotations

import re
import secrets

_HEX32 = r"[0-9a-f]{32}"
MESSAGE_ID_RE = re.compile(rf"^msg_{_HEX32}$")
KEY_ID_RE = re.compile(rf"^apk_{_HEX32}$")
SECRET_ID_RE = re.compile(rf"^wsec_{_HEX32}$")
DELIVERY_ID_RE = re.compile(rf"^dlv_{_HEX32}$")
API_KEY_RE = re.compile(r"^e2a_[0-9a-f]{64}$")


def _hex16() -> str:
    return secrets.token_hex(16)


def new_user_id() -> str:
    return _hex16()


def new_message_id() -> str:
    return "msg_" + _hex16()


def new_key_id() -> str:
    return "apk_" + _hex16()


def new_secret_id() -> str:
    return "wsec_" + _hex16()


def new_delivery_id() -> str:
    return "dlv_" + _hex16()


def new_feedback_id() -> str:
    return "fb_" + _hex16()


def new_api_key() -> str:
    """A user-facing API key: ``e2a_`` + 64 hex (32 random bytes)."""
    return "e2a_" + secrets.token_hex(32)


def new_signing_secret() -> str:
    """A webhook signing secret: 64 lowercase hex; its ASCII bytes are the HMAC key."""
    return secrets.token_hex(32)


def new_verification_token() -> str:
    return "e2a-verify=" + _hex16()


def smtp_message_id(message_id: str, mail_domain: str) -> str:
    """The RFC 5322 Message-ID e2a writes on outbound mail: ``<msg_…@M>``."""
    return f"<{message_id}@{mail_domain}>"
