"""Signed header contract (mail.md §3), Standard Webhooks (§4.2), stripping and trace fields
(§1.8), checked against the spec vectors (copied to tests/vectors/) and with property tests."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2a.mailauth import authheaders as ah
from e2a.mailauth.authheaders import AuthFields, VerificationError

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
SIG = json.loads((VECTORS / "signature.json").read_text("utf-8"))
SW = json.loads((VECTORS / "standard-webhooks.json").read_text("utf-8"))
POSITIVE = {v["name"]: v for v in SIG["positive"]}
REF = POSITIVE["reference_human_inbound"]


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def fields_of(v: dict) -> AuthFields:
    f = v["fields"]
    return AuthFields(
        verified=f["verified"] == "true", sender=f["sender"], entity_type=f["entity_type"],
        domain_check=f["domain_check"], delegation=f["delegation"], timestamp=f["timestamp"],
        message_id=f["message_id"], body_hash=v["body_hash"],
    )


def raw_of(v: dict) -> bytes:
    return base64.b64decode(v["raw_message_b64"])


# ---------------------------------------------------------------- signature vectors

@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_canonical_string_matches_vector_bytes(name: str) -> None:
    """The canonical string equals the vector's canonical text and its UTF-8 hex."""
    v = POSITIVE[name]
    c = ah.canonical_string(fields_of(v))
    assert c == v["canonical"].encode("utf-8")
    assert c.hex() == v["canonical_utf8_hex"]


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_body_hash_matches_vector_raw(name: str) -> None:
    """body_hash of the raw message is the vector's body hash."""
    v = POSITIVE[name]
    assert ah.body_hash(raw_of(v)) == v["body_hash"]


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_sign_matches_vector_signature(name: str) -> None:
    """The HMAC of the canonical string equals the recorded signature."""
    v = POSITIVE[name]
    assert ah.sign(fields_of(v), v["secret"]) == v["signature"]


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_auth_headers_match_vector_map_and_order(name: str) -> None:
    """auth_headers equals the vector map, keys in ascending byte order."""
    v = POSITIVE[name]
    got = ah.auth_headers(fields_of(v), v["secret"])
    assert got == v["auth_headers"]
    assert list(got) == list(v["auth_headers"])
    assert list(got) == sorted(got, key=lambda k: k.encode())


def test_auth_headers_omit_delegation_when_empty() -> None:
    """Delegation is absent from the map when empty and present when set."""
    assert ah.H_DELEGATION not in ah.auth_headers(fields_of(REF), REF["secret"])
    agent = POSITIVE["internal_agent_to_agent"]
    assert ah.H_DELEGATION in ah.auth_headers(fields_of(agent), agent["secret"])


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_verify_accepts_positive_vector_at_verify_at(name: str) -> None:
    """Both positive vectors verify at their verify_at time."""
    v = POSITIVE[name]
    ah.verify(v["auth_headers"], raw_of(v), [v["secret"]], ts(v["verify_at"]))


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_verify_accepts_when_any_secret_matches_rotation(name: str) -> None:
    """During rotation, any held secret that matches is enough."""
    v = POSITIVE[name]
    ah.verify(v["auth_headers"], raw_of(v), ["f" * 64, v["secret"]], ts(v["verify_at"]))


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_verify_rejects_foreign_secret_signature_mismatch(name: str) -> None:
    """A secret that did not sign gives signature_mismatch."""
    v = POSITIVE[name]
    with pytest.raises(VerificationError) as e:
        ah.verify(v["auth_headers"], raw_of(v), ["f" * 64], ts(v["verify_at"]))
    assert e.value.reason == "signature_mismatch"


def test_verify_rejects_no_secrets_signature_mismatch() -> None:
    """With no secret at all nothing can match."""
    with pytest.raises(VerificationError) as e:
        ah.verify(REF["auth_headers"], raw_of(REF), [], ts(REF["verify_at"]))
    assert e.value.reason == "signature_mismatch"


@pytest.mark.parametrize("neg", SIG["negative"], ids=lambda n: n["name"])
def test_verify_rejects_negative_vector_with_reason(neg: dict) -> None:
    """Each negative vector is rejected with its recorded reason."""
    with pytest.raises(VerificationError) as e:
        ah.verify(neg["auth_headers"], raw_of(neg), [REF["secret"]], ts(neg["verify_at"]))
    assert e.value.reason == neg["reason"]


@pytest.mark.parametrize("neg", SIG["negative"], ids=lambda n: n["name"])
def test_negative_vector_recomputed_values_match(neg: dict) -> None:
    """Recorded recomputed body hash / signature of the negatives are what we compute."""
    if "recomputed_body_hash" in neg:
        assert ah.body_hash(raw_of(neg)) == neg["recomputed_body_hash"]
    if "recomputed_signature" in neg:
        f = AuthFields.from_headers(neg["auth_headers"])
        assert ah.sign(f, REF["secret"]) == neg["recomputed_signature"]


@pytest.mark.parametrize("case", SIG["window_checks"]["cases"], ids=lambda c: str(c["offset_seconds"]))
def test_verify_window_bounds_inclusive(case: dict) -> None:
    """-31 s and +301 s are rejected, -30 s and +300 s accepted."""
    now = ts(REF["fields"]["timestamp"]) + timedelta(seconds=case["offset_seconds"])
    if case["expect"] == "accept":
        ah.verify(REF["auth_headers"], raw_of(REF), [REF["secret"]], now)
    else:
        with pytest.raises(VerificationError) as e:
            ah.verify(REF["auth_headers"], raw_of(REF), [REF["secret"]], now)
        assert e.value.reason == "timestamp_out_of_window"


@pytest.mark.parametrize("offset", [timedelta(seconds=300, microseconds=1), timedelta(seconds=-30, microseconds=-1)])
def test_verify_window_rejects_sub_second_past_bound(offset: timedelta) -> None:
    """The bounds are exact: a microsecond beyond them is outside."""
    now = ts(REF["fields"]["timestamp"]) + offset
    with pytest.raises(VerificationError, match="timestamp_out_of_window"):
        ah.verify(REF["auth_headers"], raw_of(REF), [REF["secret"]], now)


def test_verify_accepts_other_timezone_now() -> None:
    """`now` in a non-UTC zone denotes the same instant."""
    now = ts(REF["verify_at"]).astimezone(timezone(timedelta(hours=5)))
    ah.verify(REF["auth_headers"], raw_of(REF), [REF["secret"]], now)


def test_verify_rejects_naive_now() -> None:
    """A naive `now` is a programming error, not a verdict."""
    with pytest.raises(ValueError):
        ah.verify(REF["auth_headers"], raw_of(REF), [REF["secret"]], datetime(2026, 4, 27, 12, 1))


@pytest.mark.parametrize("value", [None, ""])
def test_verify_rejects_missing_signature(value: str | None) -> None:
    """Absent or empty signature → missing_signature, before anything else."""
    h = dict(REF["auth_headers"])
    if value is None:
        del h[ah.H_SIGNATURE]
    else:
        h[ah.H_SIGNATURE] = value
    with pytest.raises(VerificationError) as e:
        ah.verify(h, b"other bytes", [REF["secret"]], ts(REF["verify_at"]))
    assert e.value.reason == "missing_signature"


def test_verify_lowercased_header_names_accepted() -> None:
    """HTTP stacks lowercase header names; lookups are case-insensitive."""
    h = {k.lower(): v for k, v in REF["auth_headers"].items()}
    ah.verify(h, raw_of(REF), [REF["secret"]], ts(REF["verify_at"]))


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-04-27 12:00:00Z", "2026-04-27T12:00:00"])
def test_verify_unparseable_timestamp_out_of_window(bad: str) -> None:
    """A missing or malformed timestamp can never be inside the window."""
    h = dict(REF["auth_headers"], **{ah.H_TIMESTAMP: bad})
    with pytest.raises(VerificationError, match="timestamp_out_of_window"):
        ah.verify(h, raw_of(REF), [REF["secret"]], ts(REF["verify_at"]))


def test_verify_added_delegation_signature_mismatch() -> None:
    """Adding a Delegation header to an unsigned-delegation set breaks the MAC."""
    h = dict(REF["auth_headers"], **{ah.H_DELEGATION: "agent=x@y.example;human=1"})
    with pytest.raises(VerificationError, match="signature_mismatch"):
        ah.verify(h, raw_of(REF), [REF["secret"]], ts(REF["verify_at"]))


def test_verify_lf_in_value_signature_mismatch() -> None:
    """A received value containing LF is rejected rather than shifting canonical lines."""
    h = dict(REF["auth_headers"], **{ah.H_SENDER: "alice@example.com\n"})
    with pytest.raises(VerificationError, match="signature_mismatch"):
        ah.verify(h, raw_of(REF), [REF["secret"]], ts(REF["verify_at"]))


def test_verify_uppercase_signature_mismatch() -> None:
    """The signature is lowercase hex; an uppercased copy does not verify."""
    h = dict(REF["auth_headers"], **{ah.H_SIGNATURE: REF["signature"].upper()})
    with pytest.raises(VerificationError, match="signature_mismatch"):
        ah.verify(h, raw_of(REF), [REF["secret"]], ts(REF["verify_at"]))


@pytest.mark.parametrize("pitfall", SIG["pitfalls"], ids=lambda p: p["name"])
def test_pitfall_signature_never_verifies(pitfall: dict) -> None:
    """Signatures from known implementation mistakes are rejected and differ from ours."""
    assert ah.sign(fields_of(REF), REF["secret"]) != pitfall["wrong_signature"]
    h = dict(REF["auth_headers"], **{ah.H_SIGNATURE: pitfall["wrong_signature"]})
    with pytest.raises(VerificationError, match="signature_mismatch"):
        ah.verify(h, raw_of(REF), [REF["secret"]], ts(REF["verify_at"]))


def test_pitfall_recorded_values_are_the_mistakes() -> None:
    """The pitfall values are reproduced by making exactly those mistakes."""
    f, secret = REF["fields"], REF["secret"]
    canon = REF["canonical"]
    wrong = {
        "delegation_line_dropped": canon.replace("\n\n", "\n"),
        "trailing_newline": canon + "\n",
    }
    by = {p["name"]: p["wrong_signature"] for p in SIG["pitfalls"]}
    for name, text in wrong.items():
        assert hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest() == by[name]
    assert hmac.new(bytes.fromhex(secret), canon.encode(), hashlib.sha256).hexdigest() == by["key_hex_decoded"]
    assert f["delegation"] == ""


def test_from_headers_roundtrips_auth_headers() -> None:
    """from_headers rebuilds the exact fields that produced a map."""
    for v in POSITIVE.values():
        assert AuthFields.from_headers(v["auth_headers"]) == fields_of(v)


@pytest.mark.parametrize("verified", ["True", "1", "", None])
def test_from_headers_rejects_bad_verified(verified: str | None) -> None:
    """Verified must be exactly true/false."""
    h = dict(REF["auth_headers"])
    if verified is None:
        del h[ah.H_VERIFIED]
    else:
        h[ah.H_VERIFIED] = verified
    with pytest.raises(ValueError):
        AuthFields.from_headers(h)


def test_at_resigns_with_fresh_timestamp() -> None:
    """Re-signing for a webhook attempt changes only the timestamp and signature."""
    f = fields_of(REF)
    later = f.at(datetime(2026, 4, 27, 13, 0, 0, 999999, tzinfo=UTC))
    assert later.timestamp == "2026-04-27T13:00:00Z"
    assert later.message_id == f.message_id and later.body_hash == f.body_hash
    assert ah.sign(later, REF["secret"]) != REF["signature"]


def test_build_fields_hashes_and_formats() -> None:
    """build_fields reproduces the reference vector's fields."""
    f = ah.build_fields(verified=True, sender="alice@example.com", entity_type="human",
                        domain_check="spf=pass; dkim=none", signed_at=ts("2026-04-27T12:00:00Z"),
                        message_id=REF["fields"]["message_id"], stored=raw_of(REF))
    assert f == fields_of(REF)


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "\n"])
def test_canonical_string_refuses_cr_lf(bad: str) -> None:
    """A value with CR or LF can never be signed."""
    with pytest.raises(ValueError):
        ah.canonical_string(AuthFields(True, bad, "human", "spf=pass", "", "t", "m", "h"))


# ---------------------------------------------------------------- canonical string properties

_value = st.text(alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=20)
_fields = st.builds(AuthFields, st.booleans(), _value, _value, _value, _value, _value, _value, _value)
_real_hash = st.binary(max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())
_signed_fields = st.builds(AuthFields, st.booleans(), _value, _value, _value, _value, _value, _value, _real_hash)


@given(_signed_fields)
def test_canonical_string_has_eight_values_no_trailing_lf(f: AuthFields) -> None:
    """Always exactly 8 LF-separated values, in order, never a trailing LF."""
    c = ah.canonical_string(f)
    parts = c.decode("utf-8").split("\n")
    assert len(parts) == 8
    assert parts == f.values()
    assert not c.endswith(b"\n")


@given(_fields, _fields)
def test_canonical_string_injective(a: AuthFields, b: AuthFields) -> None:
    """Different field sets never share a canonical string."""
    if a != b:
        assert ah.canonical_string(a) != ah.canonical_string(b)


@given(_fields)
def test_sign_then_verify_roundtrip(f: AuthFields) -> None:
    """Whatever we sign, verify accepts within the window (ASCII-folded values)."""
    ascii_f = AuthFields(f.verified, *(v.encode("ascii", "replace").decode() for v in f.values()[1:5]),
                         timestamp="2026-04-27T12:00:00Z", message_id="msg_x", body_hash=ah.body_hash(b"x"))
    headers = ah.auth_headers(ascii_f, "a" * 64)
    ah.verify(headers, b"x", ["a" * 64], ts("2026-04-27T12:00:10Z"))


# ---------------------------------------------------------------- time formats

@pytest.mark.parametrize(
    ("dt", "sec", "frac"),
    [
        (datetime(2026, 4, 27, 12, 0, 0, tzinfo=UTC), "2026-04-27T12:00:00Z", "2026-04-27T12:00:00.000000Z"),
        (datetime(2026, 4, 27, 12, 0, 0, 123456, tzinfo=UTC), "2026-04-27T12:00:00Z", "2026-04-27T12:00:00.123456Z"),
        (datetime(2026, 4, 27, 14, 0, 0, 999999, tzinfo=timezone(timedelta(hours=2))),
         "2026-04-27T12:00:00Z", "2026-04-27T12:00:00.999999Z"),
        (datetime(9, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "0009-01-02T03:04:05Z", "0009-01-02T03:04:05.000006Z"),
    ],
)
def test_format_ts_sec_and_frac(dt: datetime, sec: str, frac: str) -> None:
    """ts-sec truncates to seconds; ts-frac always has 6 digits; both UTC with Z."""
    assert ah.format_ts_sec(dt) == sec
    assert ah.format_ts_frac(dt) == frac


def test_format_ts_rejects_naive() -> None:
    """Naive datetimes are refused rather than guessed."""
    with pytest.raises(ValueError):
        ah.format_ts_sec(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("dt", "text"),
    [
        (datetime(2026, 4, 27, 12, 5, 0, tzinfo=UTC), "Mon, 27 Apr 2026 12:05:00 +0000"),
        (datetime(2026, 5, 4, 1, 2, 3, tzinfo=timezone(timedelta(hours=-3))), "Mon, 04 May 2026 04:02:03 +0000"),
    ],
)
def test_format_rfc5322_date_utc(dt: datetime, text: str) -> None:
    """RFC 5322 dates are in UTC with +0000."""
    assert ah.format_rfc5322_date(dt) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-04-27T12:00:00Z", datetime(2026, 4, 27, 12, tzinfo=UTC)),
        ("2026-04-27T12:00:00.123456789Z", datetime(2026, 4, 27, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2026-04-27T14:00:00+02:00", datetime(2026, 4, 27, 12, tzinfo=UTC)),
        ("2026-04-27T12:00:00", None),
        ("2026-13-27T12:00:00Z", None),
        ("2026-04-27T12:00:00Z\n", None),
    ],
)
def test_parse_rfc3339_table(text: str, expected: datetime | None) -> None:
    """RFC 3339 with Z/offset and 0-9 fraction digits parses; anything else is None."""
    assert ah.parse_rfc3339(text) == expected


# ---------------------------------------------------------------- Standard Webhooks

def test_standard_webhook_signature_matches_vector() -> None:
    """Single-secret signature equals the vector and its signed-content hash."""
    sig = ah.standard_webhook_signature(SW["webhook_id"], int(SW["webhook_timestamp"]),
                                        SW["body"].encode(), [SW["secret"]])
    assert sig == SW["webhook_signature"]
    content = f'{SW["webhook_id"]}.{SW["webhook_timestamp"]}.{SW["body"]}'.encode()
    assert hashlib.sha256(content).hexdigest() == SW["signed_content_sha256"]


def test_standard_webhook_signature_rotation_newest_first() -> None:
    """Two secrets give two space-separated entries in the order given (newest first)."""
    rot = SW["rotation"]
    sig = ah.standard_webhook_signature(SW["webhook_id"], int(SW["webhook_timestamp"]),
                                        SW["body"].encode(), rot["secrets_newest_first"])
    assert sig == rot["webhook_signature"]
    assert sig.count(" ") == 1 and all(p.startswith("v1,") for p in sig.split(" "))


def test_standard_webhook_signature_tampered_body_differs() -> None:
    """The tampered body yields a different signature."""
    sig = ah.standard_webhook_signature(SW["webhook_id"], int(SW["webhook_timestamp"]),
                                        SW["tampered"]["body"].encode(), [SW["secret"]])
    assert sig != SW["webhook_signature"]


def test_standard_webhook_signature_requires_a_secret() -> None:
    """Never produce an empty signature header."""
    with pytest.raises(ValueError):
        ah.standard_webhook_signature("msg_x", 1, b"{}", [])


def test_whsec_matches_vector() -> None:
    """whsec_ + base64 of the ASCII secret, for both the single and rotation secrets."""
    assert ah.whsec(SW["secret"]) == SW["whsec"]
    for s, w in zip(SW["rotation"]["secrets_newest_first"], SW["rotation"]["whsec_newest_first"], strict=True):
        assert ah.whsec(s) == w


def test_sw_body_auth_headers_verify_with_our_verifier() -> None:
    """The webhook body's auth_headers verify with our §3.4 verifier, same second as webhook-timestamp."""
    body = json.loads(SW["body"])
    now = datetime.fromtimestamp(int(SW["webhook_timestamp"]), tz=UTC) + timedelta(seconds=60)
    ah.verify(body["auth_headers"], base64.b64decode(body["raw_message"]), [SW["secret"]], now)
    assert ts(body["auth_headers"][ah.H_TIMESTAMP]).timestamp() == int(SW["webhook_timestamp"])


@pytest.fixture
def frozen_sw_clock():
    """Freeze the standardwebhooks library clock at webhook-timestamp + 60 s."""
    import standardwebhooks.webhooks as whm

    frozen = datetime.fromtimestamp(int(SW["webhook_timestamp"]), tz=UTC) + timedelta(seconds=60)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return frozen if tz is None else frozen.astimezone(tz)

    original = whm.datetime
    whm.datetime = Frozen
    try:
        yield whm
    finally:
        whm.datetime = original


def _sw_headers(sig: str, timestamp: str | None = None) -> dict[str, str]:
    return {"webhook-id": SW["webhook_id"], "webhook-timestamp": timestamp or SW["webhook_timestamp"],
            "webhook-signature": sig}


def test_standardwebhooks_library_verifies_our_header(frozen_sw_clock) -> None:
    """The independent library accepts the header we produce for the vector."""
    sig = ah.standard_webhook_signature(SW["webhook_id"], int(SW["webhook_timestamp"]),
                                        SW["body"].encode(), [SW["secret"]])
    frozen_sw_clock.Webhook(ah.whsec(SW["secret"])).verify(SW["body"], _sw_headers(sig))


def test_standardwebhooks_library_verifies_rotation_each_secret(frozen_sw_clock) -> None:
    """Each rotation secret alone verifies the two-entry header."""
    rot = SW["rotation"]
    sig = ah.standard_webhook_signature(SW["webhook_id"], int(SW["webhook_timestamp"]),
                                        SW["body"].encode(), rot["secrets_newest_first"])
    for s in rot["secrets_newest_first"]:
        frozen_sw_clock.Webhook(ah.whsec(s)).verify(SW["body"], _sw_headers(sig))


def test_standardwebhooks_library_rejects_tampered_and_hex_key(frozen_sw_clock) -> None:
    """Tampered body and a hex-decoded key are rejected by the library."""
    whm = frozen_sw_clock
    sig = ah.standard_webhook_signature(SW["webhook_id"], int(SW["webhook_timestamp"]),
                                        SW["body"].encode(), [SW["secret"]])
    with pytest.raises(whm.WebhookVerificationError):
        whm.Webhook(ah.whsec(SW["secret"])).verify(SW["tampered"]["body"], _sw_headers(sig))
    with pytest.raises(whm.WebhookVerificationError):
        whm.Webhook(bytes.fromhex(SW["secret"])).verify(SW["body"], _sw_headers(sig))


def test_standardwebhooks_library_verifies_live_clock() -> None:
    """A signature made for the current second verifies against the library's real clock."""
    import standardwebhooks.webhooks as whm

    now = int(datetime.now(UTC).timestamp())
    body = b'{"message_id":"msg_00112233445566778899aabbccddeeff","attempt":1}'
    secrets = ["0f" * 32, SW["secret"]]
    sig = ah.standard_webhook_signature(SW["webhook_id"], now, body, secrets)
    for s in secrets:
        whm.Webhook(ah.whsec(s)).verify(body, _sw_headers(sig, str(now)))


# ---------------------------------------------------------------- header section parsing

def test_split_header_section_basic() -> None:
    """Fields with continuations, separator, body offset."""
    raw = b"From: a@b\r\nSubject: x\r\n\ty\r\nTo : c@d\r\n\r\nbody\r\n"
    fields, off = ah.split_header_section(raw)
    assert [f.name for f in fields] == [b"From", b"Subject", b"To"]
    assert fields[1].raw == b"Subject: x\r\n\ty\r\n"
    assert raw[off:] == b"body\r\n"
    assert ah.is_well_formed(fields)


@pytest.mark.parametrize(
    ("raw", "names", "body"),
    [
        (b"", [], b""),
        (b"\r\n", [], b""),
        (b"\r\nX-E2A-Auth-Verified: true\r\n", [], b"X-E2A-Auth-Verified: true\r\n"),
        (b"A: 1", [b"A"], b""),
        (b"A: 1\r\n", [b"A"], b""),
        (b"A: 1\nB: 2\n\nbody", [b"A", b"B"], b"body"),
        (b" lead\r\nA: 1\r\n\r\n", [None, b"A"], b""),
        (b"garbage\r\nA: 1\r\n\r\nx", [None, b"A"], b"x"),
        (b"A: 1\r\n \r\n\r\nx", [b"A"], b"x"),
    ],
)
def test_split_header_section_edges(raw: bytes, names: list, body: bytes) -> None:
    """Edge cases: empty, no headers, no body, bare LF, leading continuation, garbage line."""
    fields, off = ah.split_header_section(raw)
    assert [f.name for f in fields] == names
    assert raw[off:] == body
    hlen = sum(len(f.raw) for f in fields)
    assert raw[:hlen] == b"".join(f.raw for f in fields)


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b"A: 1\r\n\r\n", True),
        (b"A \t: 1\r\n\r\n", True),
        (b"A B: 1\r\n\r\n", False),
        (b"nocolon\r\n\r\n", False),
        (b": empty name\r\n\r\n", False),
        (b"\xc3\xa4: 8bit name\r\n\r\n", False),
        (b"A: \xc3\xa4 8bit value ok\r\n\r\n", True),
        (b" cont first\r\n\r\n", False),
    ],
)
def test_is_well_formed_table(raw: bytes, ok: bool) -> None:
    """§1.5 item 5: printable ASCII names without colon, whitespace before colon tolerated."""
    assert ah.is_well_formed(ah.split_header_section(raw)[0]) is ok


# ---------------------------------------------------------------- stripping (§1.8)

AUTHSERV = "mx.e2a.example"


@pytest.mark.parametrize(
    "field",
    [
        b"X-E2A-Auth-Verified: true\r\n",
        b"x-e2a-auth-verified: true\r\n",
        b"X-e2A-AUTH-Sender:alice@example.com\r\n",
        b"X-E2A-Auth-Signature \t: abc\r\n",
        b"X-E2A-Conversation-Id: conv\r\n",
        b"X-E2A-Anything-Else: 1\r\n",
        b"X-E2A-: 1\r\n",
        b"X-E2A-Auth-Domain-Check: spf=pass;\r\n\tdkim=pass;\r\n dmarc=pass\r\n",
        b"X-E2A-Auth Verified: true\r\n",
        b"X-E2A-Auth-Sender: \xff\xfe 8bit\r\n",
        b"Authentication-Results: mx.e2a.example; spf=pass\r\n",
        b"Authentication-Results: MX.E2A.Example; dkim=pass\r\n",
        b"authentication-results :\r\n\t(comment (nested) \\) x) mx.e2a.example;\r\n\tdmarc=pass\r\n",
        b"Authentication-Results: mx.e2a.example(c); spf=pass\r\n",
        b'Authentication-Results: "mx.e2a.example"; spf=pass\r\n',
        b"Authentication-Results: mx.e2a.example 1; spf=pass\r\n",
        b"Authentication-Results: mx.e2a.example\r\n",
    ],
)
def test_strip_removes_forged_field(field: bytes) -> None:
    """Each forged spelling is removed with its continuation lines; the rest is byte-identical."""
    head = b"Received: from x by y; Mon, 27 Apr 2026 12:00:00 +0000\r\nFrom: a@b.example\r\n"
    tail = b"Subject: hi\r\n\r\nX-E2A-Auth-Verified: true\r\nbody\r\n"
    assert ah.strip_forged_headers(head + field + tail, AUTHSERV) == head + tail


@pytest.mark.parametrize(
    "field",
    [
        b"Authentication-Results: other.example; spf=pass\r\n",
        b"Authentication-Results: mx.e2a.example.evil; spf=pass\r\n",
        b"Authentication-Results: (mx.e2a.example) other.example; spf=pass\r\n",
        b"Authentication-Results: ; none\r\n",
        b"Authentication-Results:\r\n",
        b"X-E2A: not our prefix\r\n",
        b"X-E2AAuth-Verified: true\r\n",
        b"XX-E2A-Auth-Verified: true\r\n",
        b"Comments: X-E2A-Auth-Verified: true\r\n",
        b"ARC-Authentication-Results: i=1; mx.e2a.example; spf=pass\r\n",
    ],
)
def test_strip_keeps_other_fields(field: bytes) -> None:
    """Fields that merely look similar are kept byte-identical."""
    raw = b"From: a@b.example\r\n" + field + b"Subject: hi\r\n\r\nbody"
    assert ah.strip_forged_headers(raw, AUTHSERV) == raw


def test_strip_leaves_body_and_nested_message_untouched() -> None:
    """Only the top-level header section is touched: nested message/rfc822 parts keep X-E2A fields."""
    nested = (
        b"Content-Type: message/rfc822\r\n\r\n"
        b"X-E2A-Auth-Verified: true\r\nAuthentication-Results: mx.e2a.example; spf=pass\r\n\r\ninner\r\n"
    )
    body = b"--b\r\n" + nested + b"--b--\r\n"
    raw = (b"X-E2A-Auth-Verified: true\r\nContent-Type: multipart/mixed; boundary=b\r\n"
           b"Authentication-Results: mx.e2a.example; spf=pass\r\n\r\n" + body)
    out = ah.strip_forged_headers(raw, AUTHSERV)
    assert out == b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + body


def test_strip_keeps_8bit_headers_byte_identical() -> None:
    """8-bit octets in kept headers survive unchanged."""
    raw = b"Subject: \xe4\xf6\xfc caf\xc3\xa9\r\nX-E2A-Auth-Sender: x\r\nFrom: \xff@b\r\n\r\n\x80body"
    assert ah.strip_forged_headers(raw, AUTHSERV) == b"Subject: \xe4\xf6\xfc caf\xc3\xa9\r\nFrom: \xff@b\r\n\r\n\x80body"


def test_strip_fields_reuses_one_parse() -> None:
    """strip_fields on a pre-parsed section equals strip_forged_headers."""
    raw = b"X-E2A-Auth-Sender: x\r\nFrom: a@b\r\n\r\nbody"
    fields, _ = ah.split_header_section(raw)
    assert ah.strip_fields(raw, fields, AUTHSERV) == ah.strip_forged_headers(raw, AUTHSERV)


def test_strip_without_body_separator() -> None:
    """A message that is all header (no empty line) is handled, last field unterminated."""
    raw = b"From: a@b\r\nX-E2A-Auth-Verified: true"
    assert ah.strip_forged_headers(raw, AUTHSERV) == b"From: a@b\r\n"


# Property test: random header lists with random X-E2A spellings.

_name_chars = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_plain_name = st.text(_name_chars, min_size=1, max_size=12).filter(lambda n: not n.lower().startswith("x-e2a-"))
_e2a_suffix = st.sampled_from(["Auth-Verified", "Auth-Sender", "Auth-Signature", "Conversation-Id", "", "Foo"])
_value_bytes = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def _random_case(draw, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(text, flips, strict=True))


@st.composite
def _field(draw) -> tuple[bytes, bool]:
    forged = draw(st.booleans())
    if forged:
        name = draw(_random_case("X-E2A-" + draw(_e2a_suffix)))
    else:
        name = draw(_plain_name)
    ws = draw(st.sampled_from(["", " ", "\t", " \t "]))
    first = b" " + draw(_value_bytes)
    conts = draw(st.lists(st.tuples(st.sampled_from([b" ", b"\t", b"  "]), _value_bytes), max_size=3))
    eol = draw(st.sampled_from([b"\r\n"]))
    raw = name.encode() + ws.encode() + b":" + first + eol
    for lead, val in conts:
        raw += lead + val + eol
    return raw, forged


@settings(max_examples=300)
@given(st.lists(_field(), max_size=12), st.binary(max_size=60))
def test_strip_property_no_e2a_survives_rest_identical(fields: list, body: bytes) -> None:
    """No X-E2A-* field survives; every other field and the body are byte-identical, in order."""
    raw = b"".join(f for f, _ in fields) + b"\r\n" + body
    out = ah.strip_forged_headers(raw, AUTHSERV)
    expected = b"".join(f for f, forged in fields if not forged) + b"\r\n" + body
    assert out == expected
    # Independent check of the header section: no unfolded line names an X-E2A field.
    head = out.split(b"\r\n\r\n", 1)[0] if not out.startswith(b"\r\n") else b""
    for line in head.split(b"\r\n"):
        if line[:1] not in (b" ", b"\t"):
            assert not line.split(b":", 1)[0].rstrip(b" \t").lower().startswith(b"x-e2a-")


@settings(max_examples=100)
@given(st.lists(_field(), max_size=8))
def test_strip_property_python_email_sees_no_e2a(fields: list) -> None:
    """Python's email parser (a consumer's view) finds no X-E2A header after stripping."""
    raw = b"".join(f for f, _ in fields) + b"\r\nbody\r\n"
    out = ah.strip_forged_headers(raw, AUTHSERV)
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(out, headersonly=True)
    assert not [k for k in msg.keys() if k.lower().startswith("x-e2a-")]


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_split_header_section_property_partition(raw: bytes) -> None:
    """For any bytes, the fields are a prefix partition and the body offset is consistent."""
    fields, off = ah.split_header_section(raw)
    hlen = sum(len(f.raw) for f in fields)
    assert b"".join(f.raw for f in fields) == raw[:hlen]
    assert hlen <= off <= len(raw)
    assert raw[hlen:off] in (b"", b"\r\n", b"\n")
    out = ah.strip_forged_headers(raw, AUTHSERV)
    assert out.endswith(raw[hlen:])


# ---------------------------------------------------------------- trace headers (§1.8)

DATE = datetime(2026, 4, 27, 12, 5, 0, tzinfo=UTC)


def _external(**kw) -> bytes:
    args = dict(
        authserv_id=AUTHSERV, helo="mail.example.com", client_ip="192.0.2.1",
        mail_from="alice@example.com", spf="pass",
        dkim=[ah.DkimClause("pass", "example.com", "s1")], dmarc="pass", from_domain="example.com",
        smtp_domain="mx.e2a.example", protocol="ESMTPS",
        message_id="msg_00112233445566778899aabbccddeeff", recipient="bot@agents.example.com", date=DATE,
    )
    args.update(kw)
    return ah.trace_headers(**args)


def test_trace_headers_external_exact_bytes() -> None:
    """The external variant is folded exactly as in §1.8."""
    assert _external() == (
        b"Authentication-Results: mx.e2a.example;\r\n"
        b"\tspf=pass smtp.mailfrom=alice@example.com;\r\n"
        b"\tdkim=pass header.d=example.com header.s=s1;\r\n"
        b"\tdmarc=pass header.from=example.com\r\n"
        b"Received: from mail.example.com ([192.0.2.1])\r\n"
        b"\tby mx.e2a.example (e2a) with ESMTPS id msg_00112233445566778899aabbccddeeff\r\n"
        b"\tfor <bot@agents.example.com>; Mon, 27 Apr 2026 12:05:00 +0000\r\n"
    )


def test_trace_headers_null_sender_uses_helo() -> None:
    """Null MAIL FROM → smtp.helo=<HELO>."""
    assert b"\tspf=none smtp.helo=mail.example.com;\r\n" in _external(mail_from="", spf="none")


def test_trace_headers_unsigned_dkim_none_and_no_from() -> None:
    """No signatures → dkim=none; no valid From → header.from omitted."""
    out = _external(dkim=[], dmarc="permerror", from_domain=None)
    assert b"\tdkim=none;\r\n\tdmarc=permerror\r\nReceived:" in out


def test_trace_headers_multiple_dkim_and_partial_body() -> None:
    """One clause per signature; l= partial body → dkim=policy (partial body)."""
    out = _external(dkim=[("fail", "a.example", "x"), ("policy", "b.example", "y"), ("permerror", "", "")])
    assert (b"\tdkim=fail header.d=a.example header.s=x;\r\n"
            b"\tdkim=policy (partial body) header.d=b.example header.s=y;\r\n"
            b"\tdkim=permerror;\r\n") in out


@pytest.mark.parametrize("proto", ["SMTP", "ESMTP", "ESMTPS"])
def test_trace_headers_protocol_word(proto: str) -> None:
    """The with-word follows the session protocol."""
    assert f"(e2a) with {proto} id".encode() in _external(protocol=proto)


def test_trace_headers_quotes_values_outside_rfc8601_syntax() -> None:
    """Values that are not token or [local]@domain are quoted; no CR/LF can be injected."""
    out = _external(mail_from='"john doe"@example.com', from_domain="exa mple.com\r\nX-E2A-Auth-Verified: true")
    assert b'smtp.mailfrom="\\"john doe\\"@example.com";' in out
    assert b'header.from="exa mple.com??X-E2A-Auth-Verified: true"' in out
    fields, _ = ah.split_header_section(out + b"\r\n")
    assert [f.name for f in fields] == [b"Authentication-Results", b"Received"]


def test_trace_headers_sanitises_helo() -> None:
    """A hostile HELO cannot add fields or move the date separator."""
    out = _external(helo="evil; Mon\r\nX-E2A-Auth-Verified: true")
    fields, _ = ah.split_header_section(out + b"\r\n")
    assert [f.name for f in fields] == [b"Authentication-Results", b"Received"]
    assert fields[1].raw.count(b";") == 1


@pytest.mark.parametrize("kw", [{"spf": "good"}, {"dmarc": "softfail"}, {"dkim": [("ok", "", "")]}, {"protocol": "LMTP"}])
def test_trace_headers_rejects_unknown_vocabulary(kw: dict) -> None:
    """Results outside the RFC 8601 vocabulary are programming errors."""
    with pytest.raises(ValueError):
        _external(**kw)


def test_trace_headers_parse_with_email_headerregistry() -> None:
    """The fields parse with a standard email parser and the date round-trips."""
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(_external() + b"\r\nx")
    assert msg["Authentication-Results"].startswith("mx.e2a.example;")
    assert msg["Received"].endswith("Mon, 27 Apr 2026 12:05:00 +0000")


def test_internal_trace_headers_match_vector_prefix() -> None:
    """The internal variant reproduces the first two fields of the agent-to-agent vector."""
    v = POSITIVE["internal_agent_to_agent"]
    out = ah.internal_trace_headers(
        authserv_id="mx.e2a.example", sender="sales@acme.example", smtp_domain="mx.e2a.example",
        message_id="msg_ffeeddccbbaa99887766554433221100", recipient="buyer@agents.e2a.example", date=DATE,
    )
    assert raw_of(v).startswith(out)
    assert re.fullmatch(rb"Authentication-Results: [^\r\n]+\r\nReceived: [^\r\n]+\r\n\t[^\r\n]+\r\n", out)


def test_trace_then_strip_keeps_own_fields_only_when_prepended_after() -> None:
    """Stripping happens before prepending: our own A-R would be stripped if processed again."""
    stored = ah.strip_forged_headers(
        b"Authentication-Results: mx.e2a.example; spf=pass\r\nFrom: a@b\r\n\r\nx", AUTHSERV)
    stored = _external() + stored
    fields, _ = ah.split_header_section(stored)
    assert [f.name for f in fields][:2] == [b"Authentication-Results", b"Received"]
    assert sum(1 for f in fields if f.name == b"Authentication-Results") == 1


@given(st.text(max_size=40))
@settings(max_examples=300)
def test_received_word_and_printable_match_per_character_rule(text: str) -> None:
    """The regex sanitisers equal the per-character rule: printable ASCII kept, else ``?``."""
    word = "".join(c if "!" <= c <= "~" and c not in ";()" else "?" for c in text) or "?"
    assert ah._received_word(text) == word
    assert ah._printable(text) == "".join(c if " " <= c <= "~" else "?" for c in text)
