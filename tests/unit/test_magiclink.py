"""Magic-link approval tokens (mail.md §8.4) against vectors/magic-link-token.json."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2a.outbound import magiclink as ml
from e2a.outbound.magiclink import ApprovalTokens, ExpiredToken, InvalidToken

DOC = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "magic-link-token.json").read_text("utf-8"))
EX = DOC["example"]
KEY = ml.derive_approval_key(EX["hmac_secret"])
EXPIRES = datetime.fromisoformat(EX["approval_expires_at"].replace("Z", "+00:00"))
EXP_AT = datetime.fromtimestamp(EX["exp"], tz=UTC)
NOW = EXPIRES - timedelta(hours=1)
MID = EX["message_id"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_approval_key_derivation_matches_vector() -> None:
    """approval key = HMAC-SHA256(hmac_secret UTF-8, 'e2a-approval-token-v1')."""
    assert KEY.hex() == EX["approval_key_hex"]


def test_token_exp_is_floor_plus_grace() -> None:
    """exp = floor(approval_expires_at) + 600; fractional seconds are floored."""
    assert ml.token_exp(EXPIRES) == EX["exp"]
    assert ml.token_exp(EXPIRES + timedelta(microseconds=999999)) == EX["exp"]
    assert ml.token_exp(EXPIRES, grace=0) == EX["exp"] - 600


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_mint_matches_vector_token(action: str) -> None:
    """Minting reproduces the vector tokens byte for byte and matches the token regex."""
    token = ml.mint_token(KEY, MID, action, EX["exp"])
    assert token == EX[action]["token"]
    assert re.fullmatch(DOC["token_regex"], token)
    assert ApprovalTokens(EX["hmac_secret"]).mint(MID, action, EXPIRES) == token


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_verify_vector_token_returns_claims(action: str) -> None:
    """A vector token verifies for its own action and yields the payload fields."""
    claims = ml.verify_token(KEY, EX[action]["token"], action, NOW)
    assert claims == ml.TokenClaims(MID, action, EX["exp"])


def test_verify_action_bound_other_endpoint_invalid() -> None:
    """An approve token presented to reject (and vice versa) is invalid, not expired."""
    with pytest.raises(InvalidToken):
        ml.verify_token(KEY, EX["approve"]["token"], "reject", NOW)
    with pytest.raises(InvalidToken):
        ml.verify_token(KEY, EX["reject"]["token"], "approve", EXP_AT + timedelta(days=1))


def test_verify_exp_boundary_inclusive() -> None:
    """exp ≥ now is valid; one microsecond later is expired (410)."""
    token = EX["approve"]["token"]
    ml.verify_token(KEY, token, "approve", EXP_AT)
    with pytest.raises(ExpiredToken) as e:
        ml.verify_token(KEY, token, "approve", EXP_AT + timedelta(microseconds=1))
    assert e.value.status == 410


def test_verify_bad_mac_before_expiry() -> None:
    """A forged token is invalid even when it would also be expired (MAC checked first)."""
    payload = f"{MID}|approve|1".encode()
    forged = _b64(payload) + "." + _b64(hmac.new(b"wrong", payload, hashlib.sha256).digest())
    with pytest.raises(InvalidToken):
        ml.verify_token(KEY, forged, "approve", NOW)


def test_verify_other_deployment_secret_invalid() -> None:
    """Tokens minted with another hmac_secret do not verify."""
    other = ApprovalTokens("another-deployment-secret-0123456789abcdef")
    with pytest.raises(InvalidToken):
        other.verify(EX["approve"]["token"], "approve", NOW)


def _variants() -> list[tuple[str, str]]:
    t = EX["approve"]["token"]
    p, m = t.split(".")
    payload = EX["approve"]["payload"].encode()
    mac = base64.urlsafe_b64decode(m + "=")

    def signed(raw: bytes) -> str:
        return _b64(raw) + "." + _b64(hmac.new(KEY, raw, hashlib.sha256).digest())

    return [
        ("empty", ""),
        ("no_dot", p + m),
        ("two_dots", t + ".x"),
        ("trailing_dot", t + "."),
        ("padding_mac", t + "="),
        ("padding_payload", p + "==." + m),
        ("std_b64_chars", base64.b64encode(payload).decode().rstrip("=") + "." + base64.b64encode(mac).decode().rstrip("=").replace("_", "/").replace("-", "+") + "+"),
        ("space", " " + t),
        ("newline", t + "\n"),
        ("empty_payload", "." + m),
        ("empty_mac", p + "."),
        ("short_mac", p + "." + m[:-1]),
        ("long_mac", p + "." + m + "A"),
        ("noncanonical_tail_bits", p + "." + m[:-1] + chr(ord(m[-1]) + 1)),
        ("len_mod4_1", p + "A" + "." + m),
        ("huge", "A" * 5000 + "." + m),
        ("payload_bad_id", signed(b"msg_XYZ|approve|1777896600")),
        ("payload_upper_hex", signed(f"msg_{'A' * 32}|approve|1777896600".encode())),
        ("payload_bad_action", signed(f"{MID}|approved|1777896600".encode())),
        ("payload_exp_13_digits", signed(f"{MID}|approve|1234567890123".encode())),
        ("payload_negative_exp", signed(f"{MID}|approve|-1".encode())),
        ("payload_trailing_newline", signed(payload + b"\n")),
        ("payload_extra_field", signed(payload + b"|x")),
        ("payload_non_ascii", signed(payload.replace(b"approve", b"appr\xc3\xb6ve"))),
        ("payload_non_utf8", signed(b"\xff" + payload)),
        ("unicode_digits", signed(f"{MID}|approve|١٢٣".encode())),
    ]


@pytest.mark.parametrize(("name", "token"), _variants(), ids=[n for n, _ in _variants()])
def test_verify_malformed_token_invalid(name: str, token: str) -> None:
    """Every malformed spelling (padding, other characters, bad payload) is invalid."""
    with pytest.raises(InvalidToken) as e:
        ml.verify_token(KEY, token, "approve", NOW)
    assert e.value.status == 400


def test_noncanonical_variant_decodes_to_same_bytes() -> None:
    """Sanity: the non-canonical tail-bit variant really decodes to the same MAC bytes."""
    m = EX["approve"]["token"].split(".")[1]
    alt = m[:-1] + chr(ord(m[-1]) + 1)
    assert base64.urlsafe_b64decode(alt + "=") == base64.urlsafe_b64decode(m + "=")


@given(st.text(max_size=120))
def test_verify_random_text_never_accepts(token: str) -> None:
    """Random strings are invalid and never raise anything but InvalidToken."""
    with pytest.raises(InvalidToken):
        ml.verify_token(KEY, token, "approve", NOW)


@given(st.binary(min_size=16, max_size=16).map(bytes.hex), st.sampled_from(["approve", "reject"]),
       st.integers(min_value=0, max_value=999_999_999_999))
def test_mint_verify_roundtrip(hex32: str, action: str, exp: int) -> None:
    """Anything minted verifies (before exp) with the same claims."""
    token = ml.mint_token(KEY, "msg_" + hex32, action, exp)
    assert re.fullmatch(DOC["token_regex"], token)
    now = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=min(exp, 253402300799))
    assert ml.verify_token(KEY, token, action, now) == ml.TokenClaims("msg_" + hex32, action, exp)


def test_verify_max_exp_beyond_datetime_range_not_expired() -> None:
    """A 12-digit exp (beyond year 9999) verifies instead of overflowing."""
    token = ml.mint_token(KEY, MID, "approve", 999_999_999_999)
    assert ml.verify_token(KEY, token, "approve", NOW).exp == 999_999_999_999


@pytest.mark.parametrize(("mid", "action", "exp"), [("msg_x", "approve", 1), (MID, "hold", 1), (MID, "approve", -1),
                                                    (MID, "approve", 10**12)])
def test_mint_refuses_unverifiable_payload(mid: str, action: str, exp: int) -> None:
    """Never mint a token that verification would reject."""
    with pytest.raises(ValueError):
        ml.mint_token(KEY, mid, action, exp)


def test_approval_url_matches_vector() -> None:
    """URL uses query key t under /api/v1/<action>."""
    assert ml.approval_url("https://e2a.example.com/", "approve", EX["approve"]["token"]) == EX["url_approve"]
    with pytest.raises(ValueError):
        ml.approval_url("https://e2a.example.com", "delete", "x")


def test_approval_tokens_requires_secret() -> None:
    """An empty hmac_secret cannot mint."""
    with pytest.raises(ValueError):
        ApprovalTokens("")


def test_naive_now_rejected() -> None:
    """A naive datetime is a programming error."""
    with pytest.raises(ValueError):
        ml.verify_token(KEY, EX["approve"]["token"], "approve", datetime(2026, 5, 1))
