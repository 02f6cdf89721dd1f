"""The console's sign-in mail: a one-time link to the account address (docs/decisions.md,
"Console: sign-in link by mail").

Composed with the same header helpers as agent mail and reviewer notifications
(:mod:`e2a.outbound.compose`), so the header and transfer-encoding rules are not repeated.
Plain text only: the mail carries one link and nothing an attacker wrote.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage

from e2a import ids
from e2a.outbound.compose import _POLICY, _set_addresses, _set_subject, _text_cte

__all__ = ["SENDER_LOCAL_PART", "SUBJECT", "compose_signin_mail", "signin_mail_text"]

SENDER_LOCAL_PART = "noreply"
SUBJECT = "[e2a] your console sign-in link"


def signin_mail_text(url: str, minutes: int) -> str:
    return (
        "Someone (hopefully you) asked for a link to sign in to the e2a console.\n"
        "\n"
        f"Sign in: {url}\n"
        "\n"
        f"The link works once, within {minutes} minutes; it opens a page with a Sign in button.\n"
        "If you did not ask for it, ignore this mail: nothing happens unless the link is used.\n"
    )


def compose_signin_mail(*, message_id: str, domain: str, recipient: str, url: str, minutes: int,
                        date: datetime) -> bytes:
    """The mail as CRLF bytes: From ``e2a <noreply@domain>``, To the account address,
    Message-ID ``<msg_…@domain>``, ``Auto-Submitted: auto-generated`` (RFC 3834)."""
    msg = EmailMessage(policy=_POLICY)
    msg.set_raw("From", f"e2a <{SENDER_LOCAL_PART}@{domain}>")
    _set_addresses(msg, "To", [recipient])
    _set_subject(msg, SUBJECT)
    msg["Date"] = date.astimezone(UTC)
    msg.set_raw("Message-ID", ids.smtp_message_id(message_id, domain))
    msg["Auto-Submitted"] = "auto-generated"
    msg["MIME-Version"] = "1.0"
    text = signin_mail_text(url, minutes)
    msg.set_content(text, subtype="plain", charset="utf-8", cte=_text_cte(text))
    return msg.as_bytes()
