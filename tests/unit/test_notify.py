"""Pure rules of the reviewer notification (mail.md §8.7): the subject cut and the composed mail."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest

from e2a.outbound.notify import compose_notification, cut_subject, notification_subject, rfc5322_utc


@pytest.mark.parametrize(("subject", "expected"), [
    ("", ""),
    ("short", "short"),
    ("a" * 60, "a" * 60),
    ("a" * 61, "a" * 60 + "..."),
    ("é" * 30, "é" * 30),                      # exactly 60 octets
    ("é" * 31, "é" * 30 + "..."),              # 62 octets: cut after 30 characters
    ("a" + "é" * 30, "a" + "é" * 29 + "..."),  # the 60th octet is half of an é: dropped
    ("a" * 58 + "€x", "a" * 58 + "..."),        # € is 3 octets: 58 + 3 > 60
    ("a" * 57 + "€x", "a" * 57 + "€" + "..."),  # 57 + 3 = 60: kept, then cut
])
def test_cut_subject_at_60_octets_on_character_boundary(subject, expected):
    """At most 60 octets of UTF-8, never half a character, ``...`` only when cut."""
    assert cut_subject(subject) == expected
    assert len(cut_subject(subject).removesuffix("...").encode()) <= 60


def test_notification_subject_format():
    """``[e2a] approve outbound from <agent>: <cut subject>``."""
    assert notification_subject("bot@agents.test", "x" * 70) == "[e2a] approve outbound from bot@agents.test: " + "x" * 60 + "..."


def test_rfc5322_utc_drops_fraction_and_converts():
    """Expires is an RFC 5322 date in UTC."""
    from datetime import timedelta, timezone

    dt = datetime(2026, 12, 6, 21, 30, 5, 999999, tzinfo=timezone(timedelta(hours=2)))
    assert rfc5322_utc(dt) == "Sun, 06 Dec 2026 19:30:05 +0000"


def _mail(**kw) -> bytes:
    args = dict(
        notification_id="msg_" + "1" * 32, mail_domain="m.test", reviewers=["rev@example.org"],
        agent="bot@agents.test", to=["a@x.test"], cc=[], bcc=["b@x.test"], subject="Grüße & <b>",
        expires=datetime(2026, 12, 7, 8, 0, tzinfo=UTC),
        approve_url="https://e2a.test/api/v1/approve?t=AAA.BBB", reject_url="https://e2a.test/api/v1/reject?t=CCC.DDD",
        date=datetime(2026, 12, 6, 8, 0, tzinfo=UTC), random_hex=lambda: "ab" * 16,
    )
    args.update(kw)
    return compose_notification(**args)


def test_composed_notification_headers_and_parts():
    """From/Reply-To hitl-noreply@M, Message-ID <msg_…@M>, multipart/alternative text then HTML,
    the HTML escapes values, CRLF only."""
    raw = _mail()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"] == "e2a <hitl-noreply@m.test>"
    assert msg["Reply-To"] == "hitl-noreply@m.test"
    assert msg["Message-ID"] == "<msg_" + "1" * 32 + "@m.test>"
    assert msg["Subject"] == "[e2a] approve outbound from bot@agents.test: Grüße & <b>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "multipart/alternative" and msg.get_boundary() == "e2a_" + "ab" * 16
    text, page = (p.get_content() for p in msg.get_payload())
    assert "Bcc:     b@x.test" in text and "Cc:      -" in text
    assert "Expires: Mon, 07 Dec 2026 08:00:00 +0000" in text
    assert "Approve: https://e2a.test/api/v1/approve?t=AAA.BBB" in text
    assert "Reject:  https://e2a.test/api/v1/reject?t=CCC.DDD" in text
    assert "Grüße &amp; &lt;b&gt;" in page and "<b>" not in page.replace("<b>bot@agents.test</b>", "")
    assert 'href="https://e2a.test/api/v1/approve?t=AAA.BBB"' in page


def test_composed_notification_is_deterministic_for_fixed_inputs():
    """Same inputs (date, boundary source) → same bytes (what the DKIM test relies on)."""
    assert _mail() == _mail()
