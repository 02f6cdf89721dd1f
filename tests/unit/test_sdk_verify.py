"""SDK verification, parsing and small rules against the contract's vectors (no sockets)."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from e2a.v1 import (
    Attachment,
    E2AClient,
    UnverifiedEmailError,
    WebhookVerificationError,
    verify_auth_headers,
    verify_standard_webhook,
)
from e2a.v1.api import error_from_status, seg
from e2a.v1.client import BACKOFF_CAP, backoff_delay, ws_url
from e2a.v1.verify import canonical_string, parse_ts_sec

VECTORS = Path(__file__).parent.parent / "vectors"
SIG = json.loads((VECTORS / "signature.json").read_text())
STD = json.loads((VECTORS / "standard-webhooks.json").read_text())
REF = SIG["positive"][0]


def _raw(case: dict) -> bytes:
    return base64.b64decode(case["raw_message_b64"])


def _client() -> E2AClient:
    return E2AClient(api_key="e2a_" + "0" * 64, base_url="http://127.0.0.1:9")


@pytest.mark.parametrize("case", SIG["positive"], ids=lambda c: c["name"])
def test_auth_headers_positive_vectors_verify(case):
    """Every positive vector verifies at its verify_at, and the canonical string matches."""
    assert canonical_string(case["auth_headers"]) == case["canonical"]
    verify_auth_headers(case["auth_headers"], _raw(case), case["secret"], now=parse_ts_sec(case["verify_at"]))


@pytest.mark.parametrize("case", SIG["negative"], ids=lambda c: c["name"])
def test_auth_headers_negative_vectors_refused_with_reason(case):
    """Tampered body, tampered sender and a stale timestamp are refused, each with its reason."""
    words = {"body_hash_mismatch": "body hash", "signature_mismatch": "signature", "timestamp_out_of_window": "stale"}
    with pytest.raises(WebhookVerificationError) as info:
        verify_auth_headers(case["auth_headers"], _raw(case), REF["secret"], now=parse_ts_sec(case["verify_at"]))
    assert words[case["reason"]] in info.value.reason
    assert isinstance(info.value, PermissionError)


@pytest.mark.parametrize("check", SIG["window_checks"]["cases"], ids=lambda c: str(c["offset_seconds"]))
def test_auth_headers_window_bounds_inclusive(check):
    """−30 s and +300 s accepted, −31 s and +301 s refused."""
    now = parse_ts_sec(REF["fields"]["timestamp"]) + check["offset_seconds"]
    if check["expect"] == "accept":
        verify_auth_headers(REF["auth_headers"], _raw(REF), REF["secret"], now=now)
    else:
        with pytest.raises(WebhookVerificationError):
            verify_auth_headers(REF["auth_headers"], _raw(REF), REF["secret"], now=now)


def test_auth_headers_rotation_any_secret_verifies():
    """A list of secrets (old and new) verifies when any one matches; none matching is refused."""
    now = parse_ts_sec(REF["verify_at"])
    verify_auth_headers(REF["auth_headers"], _raw(REF), ["f" * 64, REF["secret"]], now=now)
    with pytest.raises(WebhookVerificationError):
        verify_auth_headers(REF["auth_headers"], _raw(REF), ["f" * 64, "e" * 64], now=now)


def test_secret_missing_is_value_error(monkeypatch):
    """No secret passed and none in E2A_WEBHOOK_SECRET → ValueError, never a silent failure."""
    monkeypatch.delenv("E2A_WEBHOOK_SECRET", raising=False)
    # The server's deployment secret never signs webhooks: it is not a fallback.
    monkeypatch.setenv("E2A_HMAC_SECRET", "x" * 64)
    with pytest.raises(ValueError):
        verify_auth_headers(REF["auth_headers"], _raw(REF))


def test_secret_from_environment_accepts_a_rotation_list(monkeypatch):
    """E2A_WEBHOOK_SECRET may hold several comma-separated secrets."""
    monkeypatch.setenv("E2A_WEBHOOK_SECRET", f"{'a' * 64},{REF['secret']}")
    verify_auth_headers(REF["auth_headers"], _raw(REF), now=parse_ts_sec(REF["verify_at"]))


def _std_headers(signature: str = STD["webhook_signature"]) -> dict[str, str]:
    return {"Webhook-Id": STD["webhook_id"], "Webhook-Timestamp": STD["webhook_timestamp"], "webhook-signature": signature}


def test_standard_webhooks_vector_and_rotation_verify():
    """The vector verifies (header names case-insensitive); with two entries each secret alone verifies."""
    now = int(STD["webhook_timestamp"]) + 10
    verify_standard_webhook(_std_headers(), STD["body"].encode(), STD["secret"], now=now)
    both = _std_headers(STD["rotation"]["webhook_signature"])
    for secret in STD["rotation"]["secrets_newest_first"]:
        verify_standard_webhook(both, STD["body"], secret, now=now)


@pytest.mark.parametrize(
    ("body", "offset", "reason"),
    [(STD["body"].replace("alice@", "mallory@"), 0, "mismatch"), (STD["body"], 301, "stale"), (STD["body"], -301, "stale")],
)
def test_standard_webhooks_tampered_or_stale_refused(body, offset, reason):
    """A changed body byte or a timestamp outside ±5 min is refused."""
    with pytest.raises(WebhookVerificationError) as info:
        verify_standard_webhook(_std_headers(), body, STD["secret"], now=int(STD["webhook_timestamp"]) + offset)
    assert reason in info.value.reason


def test_parse_gates_claim_fields_until_verified():
    """parse() is unverified: claims raise, auth/raw/unverified_payload readable; check unlocks them."""
    email = _client().parse(STD["body"])
    for name in ("sender", "subject", "text_body", "message_id", "recipient", "attachments", "to"):
        with pytest.raises(UnverifiedEmailError):
            getattr(email, name)
    with pytest.raises(UnverifiedEmailError):
        email.reply("hi")
    assert email.auth.sender == "alice@example.com" and email.is_verified is True and email.verified is True and email.signature_verified is False
    assert email.unverified_payload["sender"] == "alice@example.com"
    assert email.raw_message.startswith(b"From: Alice")
    email.check_signature(STD["secret"], now=parse_ts_sec("2026-04-27T12:01:00Z"))
    assert email.signature_verified and email.subject == "Hello bot" and email.text_body.strip() == "Hi bot!"
    assert email.to == ["bot@agents.example.com"] and email.sender == "alice@example.com"


def test_parse_webhook_refuses_stale_live_delivery():
    """parse_webhook on the (2026-04) vector today is a stale timestamp → PermissionError."""
    with pytest.raises(PermissionError, match="stale"):
        _client().parse_webhook(STD["body"], STD["secret"])


def test_parse_raw_email_multipart_attachment():
    """Subject (RFC 2047 decoded), text, HTML and an attachment come from the MIME."""
    raw = (
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain\r\n"
        b"--b\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n"
        b'--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="a.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n--b--\r\n"
    )
    from e2a.v1.models import parse_raw_email

    subject, text, html, attachments = parse_raw_email(raw)
    assert subject == "Grüße" and text.strip() == "plain" and html.strip() == "<p>html</p>"
    assert attachments == [Attachment("a.pdf", "application/pdf", b"%PDF")]
    assert attachments[0].to_wire()["data"] == "JVBERg=="


def test_error_body_code_message_and_retry_after():
    """The JSON error body gives code and message; Retry-After seconds are kept; non-JSON still works."""
    err = error_from_status(429, b'{"error":{"code":"rate_limited","message":"slow down"}}', "7")
    assert (err.status_code, err.code, err.message, err.retry_after) == (429, "rate_limited", "slow down", 7.0)
    err = error_from_status(502, b"Bad Gateway")
    assert (err.code, err.message, err.retry_after) == ("http_502", "Bad Gateway", None)


def test_backoff_full_jitter_doubles_to_cap():
    """Delays stay within [0, min(30, 2^n)] and reach the cap."""
    rng = random.Random(7)
    for attempt in range(12):
        for _ in range(50):
            assert 0 <= backoff_delay(attempt, rng) <= min(BACKOFF_CAP, 2**attempt)
    assert max(backoff_delay(10, rng) for _ in range(200)) > 20


def test_path_segments_and_ws_url_are_percent_encoded():
    """Addresses go into paths percent-encoded; http → ws, https → wss."""
    assert seg("bot+x@a.test") == "bot%2Bx%40a.test" and seg("a/b") == "a%2Fb"
    assert ws_url("https://e2a.example", "bot@a.test") == "wss://e2a.example/api/v1/agents/bot%40a.test/ws"
    assert ws_url("http://127.0.0.1:8080", "b@a.test").startswith("ws://127.0.0.1:8080/")


def test_client_requires_key_and_never_shows_it(monkeypatch):
    """No key anywhere → ValueError; repr never contains the key."""
    monkeypatch.delenv("E2A_API_KEY", raising=False)
    with pytest.raises(ValueError):
        E2AClient(base_url="http://127.0.0.1:9")
    client = _client()
    assert "e2a_" not in repr(client) and "e2a_" not in repr(client.api)


def test_readme_webhook_snippet_refuses_a_stale_delivery(monkeypatch):
    """The README's webhook handler runs as printed and answers 401 to a replayed (stale) delivery."""
    readme = (Path(__file__).parent.parent.parent / "README.md").read_text()
    snippet = next(b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if "def handle_webhook" in b)
    monkeypatch.setenv("E2A_API_KEY", "e2a_" + "0" * 64)
    monkeypatch.setenv("E2A_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("E2A_WEBHOOK_SECRET", STD["secret"])
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["handle_webhook"](STD["body"].encode(), _std_headers()) == 401
