"""The signed ``X-E2A-Auth-*`` header contract (mail.md §3), its Standard Webhooks twin
(§4.2), forged-header stripping and the trace fields of the stored bytes (§1.8).

Everything here is pure: no reactor, no I/O, and the clock is always an argument, so the
byte-exact rules can be tested against the spec vectors and with property tests. Header
work is done on ``bytes`` because received headers may carry 8-bit octets and the stored
bytes are hashed: decoding and re-encoding would silently change what was signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

# The header section parser lives in e2a.mailsyntax.headers; re-exported for existing callers.
from e2a.mailsyntax.headers import HeaderField as HeaderField
from e2a.mailsyntax.headers import field_value as field_value
from e2a.mailsyntax.headers import is_well_formed as is_well_formed
from e2a.mailsyntax.headers import split_header_section as split_header_section
from e2a.timefmt import ts_frac, ts_sec

# ---------------------------------------------------------------- signed header set (§3)

H_VERIFIED = "X-E2A-Auth-Verified"
H_SENDER = "X-E2A-Auth-Sender"
H_ENTITY_TYPE = "X-E2A-Auth-Entity-Type"
H_DOMAIN_CHECK = "X-E2A-Auth-Domain-Check"
H_DELEGATION = "X-E2A-Auth-Delegation"
H_TIMESTAMP = "X-E2A-Auth-Timestamp"
H_MESSAGE_ID = "X-E2A-Auth-Message-Id"
H_BODY_HASH = "X-E2A-Auth-Body-Hash"
H_SIGNATURE = "X-E2A-Auth-Signature"

#: Window of §3.4: ``age = now - timestamp`` must lie in [-30 s, +300 s], bounds inclusive.
MIN_AGE = timedelta(seconds=-30)
MAX_AGE = timedelta(seconds=300)

_RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
)


class VerificationError(Exception):
    """A signed header set was rejected. ``reason`` is one of the stable strings
    ``missing_signature``, ``body_hash_mismatch``, ``timestamp_out_of_window``,
    ``signature_mismatch``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AuthFields:
    """The eight signed values of §3.2, as they go on the wire.

    ``delegation`` is ``""`` when absent (it still occupies its line in the canonical
    string); ``timestamp`` is a ``ts-sec`` string so that re-signing reproduces the exact
    bytes that were signed.
    """

    verified: bool
    sender: str
    entity_type: str
    domain_check: str
    delegation: str
    timestamp: str
    message_id: str
    body_hash: str

    def values(self) -> list[str]:
        """The 8 wire values in canonical order."""
        return [
            "true" if self.verified else "false",
            self.sender,
            self.entity_type,
            self.domain_check,
            self.delegation,
            self.timestamp,
            self.message_id,
            self.body_hash,
        ]

    def at(self, signed_at: datetime) -> AuthFields:
        """The same set with a fresh signing time: every webhook attempt signs again (§3.3)."""
        return replace(self, timestamp=format_ts_sec(signed_at))

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> AuthFields:
        """Rebuild the fields from an ``X-E2A-Auth-*`` map (keys compared case-insensitively).

        Raises:
            ValueError: ``Verified`` is not exactly ``true``/``false`` or a value is missing.
        """
        h = _lower_keys(headers)
        verified = h.get(H_VERIFIED.lower())
        if verified not in ("true", "false"):
            raise ValueError(f"{H_VERIFIED} must be 'true' or 'false'")
        try:
            return cls(
                verified=verified == "true",
                sender=h[H_SENDER.lower()],
                entity_type=h[H_ENTITY_TYPE.lower()],
                domain_check=h[H_DOMAIN_CHECK.lower()],
                delegation=h.get(H_DELEGATION.lower(), ""),
                timestamp=h[H_TIMESTAMP.lower()],
                message_id=h[H_MESSAGE_ID.lower()],
                body_hash=h[H_BODY_HASH.lower()],
            )
        except KeyError as exc:
            raise ValueError(f"missing header {exc.args[0]}") from None


def build_fields(
    *,
    verified: bool,
    sender: str,
    entity_type: str,
    domain_check: str,
    delegation: str = "",
    signed_at: datetime,
    message_id: str,
    stored: bytes,
) -> AuthFields:
    """Convenience constructor: hashes the stored bytes and formats the signing time."""
    return AuthFields(
        verified=verified,
        sender=sender,
        entity_type=entity_type,
        domain_check=domain_check,
        delegation=delegation,
        timestamp=format_ts_sec(signed_at),
        message_id=message_id,
        body_hash=body_hash(stored),
    )


def _join_canonical(values: Sequence[str]) -> bytes:
    return "\n".join(values).encode("utf-8")


def canonical_string(fields: AuthFields) -> bytes:
    """The exact bytes of §3.2: 8 values joined by LF, no trailing LF, UTF-8.

    Raises:
        ValueError: a value contains CR or LF. LF would make the encoding ambiguous (two
            different field sets, one string) and CR/LF would also split the HTTP header it
            is sent in, so such a value can never be signed.
    """
    values = fields.values()
    for v in values:
        if "\n" in v or "\r" in v:
            raise ValueError("signed header values must not contain CR or LF")
    return _join_canonical(values)


def _mac_hex(secret: str, canonical: bytes) -> str:
    # The key is the secret's 64 ASCII characters; the hex is deliberately NOT decoded
    # (the "key_hex_decoded" pitfall of vectors/signature.json).
    return hmac.new(secret.encode("ascii"), canonical, hashlib.sha256).hexdigest()


def sign(fields: AuthFields, secret: str) -> str:
    """``X-E2A-Auth-Signature``: lowercase hex HMAC-SHA256 of the canonical string (§3.3)."""
    return _mac_hex(secret, canonical_string(fields))


def auth_headers(fields: AuthFields, secret: str) -> dict[str, str]:
    """The complete ``X-E2A-Auth-*`` map, keys in ascending byte order (§4.1 ``auth_headers``);
    ``X-E2A-Auth-Delegation`` only when non-empty."""
    values = {
        H_VERIFIED: "true" if fields.verified else "false",
        H_SENDER: fields.sender,
        H_ENTITY_TYPE: fields.entity_type,
        H_DOMAIN_CHECK: fields.domain_check,
        H_TIMESTAMP: fields.timestamp,
        H_MESSAGE_ID: fields.message_id,
        H_BODY_HASH: fields.body_hash,
        H_SIGNATURE: sign(fields, secret),
    }
    if fields.delegation:
        values[H_DELEGATION] = fields.delegation
    return {k: values[k] for k in sorted(values, key=lambda s: s.encode("ascii"))}


def body_hash(raw: bytes) -> str:
    """``X-E2A-Auth-Body-Hash``: lowercase hex SHA-256 of the stored bytes."""
    return hashlib.sha256(raw).hexdigest()


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def parse_rfc3339(value: str) -> datetime | None:
    """Parse an RFC 3339 timestamp (``Z`` or offset, 0–9 fraction digits); None if invalid."""
    m = _RFC3339_RE.fullmatch(value)
    if m is None:
        return None
    text = value
    if m.group(1) and len(m.group(1)) > 7:  # Python keeps microseconds: drop extra digits
        text = value[: m.start(1) + 7] + value[m.end(1):]
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def verify(headers: Mapping[str, str], raw: bytes, secrets: Iterable[str], now: datetime) -> None:
    """Receiver-side verification of §3.4, in the spec's order.

    ``headers`` keys are compared case-insensitively (HTTP stacks lowercase them). The
    canonical string is rebuilt from the received *strings*, never from re-parsed values,
    so a receiver checks exactly what was signed.

    Raises:
        VerificationError: with ``reason`` missing_signature, body_hash_mismatch,
            timestamp_out_of_window (also for a missing or unparseable timestamp) or
            signature_mismatch.
        ValueError: ``now`` is naive.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    h = _lower_keys(headers)
    sig = h.get(H_SIGNATURE.lower(), "")
    if not sig:
        raise VerificationError("missing_signature")
    if not hmac.compare_digest(body_hash(raw).encode(), h.get(H_BODY_HASH.lower(), "").encode("utf-8")):
        raise VerificationError("body_hash_mismatch")
    ts = parse_rfc3339(h.get(H_TIMESTAMP.lower(), ""))
    if ts is None or not (MIN_AGE <= now - ts <= MAX_AGE):
        raise VerificationError("timestamp_out_of_window")
    values = [
        h.get(name.lower(), "")
        for name in (H_VERIFIED, H_SENDER, H_ENTITY_TYPE, H_DOMAIN_CHECK, H_DELEGATION,
                     H_TIMESTAMP, H_MESSAGE_ID, H_BODY_HASH)
    ]
    if any("\n" in v or "\r" in v for v in values):
        raise VerificationError("signature_mismatch")
    canonical = _join_canonical(values)
    sig_bytes = sig.encode("utf-8")
    ok = False
    for secret in secrets:
        # No early exit: the time taken does not reveal which secret matched.
        ok |= hmac.compare_digest(_mac_hex(secret, canonical).encode(), sig_bytes)
    if not ok:
        raise VerificationError("signature_mismatch")


# ---------------------------------------------------------------- time formats (api.md §0.5)

def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    return dt.astimezone(UTC)


# The wire time formats live in e2a.timefmt; re-exported here under the names signing uses.
format_ts_sec = ts_sec
format_ts_frac = ts_frac


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_rfc5322_date(dt: datetime) -> str:
    """RFC 5322 date-time in UTC with a numeric ``+0000`` zone (``Mon, 27 Apr 2026 12:05:00 +0000``)."""
    d = _utc(dt)
    return (f"{_DAYS[d.weekday()]}, {d.day:02d} {_MONTHS[d.month - 1]} {d.year:04d} "
            f"{d.hour:02d}:{d.minute:02d}:{d.second:02d} +0000")


# ---------------------------------------------------------------- Standard Webhooks (§4.2)

def standard_webhook_signature(webhook_id: str, timestamp: int, body: bytes, secrets: Sequence[str]) -> str:
    """``webhook-signature``: ``v1,<base64>`` per secret in the order given (pass newest
    first), joined by one space. The key is the secret's ASCII bytes, as for §3.3.

    Raises:
        ValueError: no secret given (an unsigned request must never be sent).
    """
    if not secrets:
        raise ValueError("at least one signing secret is required")
    content = f"{webhook_id}.{int(timestamp)}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(s.encode("ascii"), content, hashlib.sha256).digest()).decode("ascii")
        for s in secrets
    )


def whsec(secret: str) -> str:
    """What a Standard Webhooks library is configured with: ``whsec_`` + base64(ASCII bytes)."""
    return "whsec_" + base64.b64encode(secret.encode("ascii")).decode("ascii")


# ---------------------------------------------------------------- header section (§1.7, §1.8)

_WSP = b" \t"
# authserv-id token: ends at whitespace, a comment, ";" or a quote.
_AUTHSERV_TOKEN_RE = re.compile(rb'[^\s();"]+')


def _skip_cfws(v: bytes, i: int) -> int:
    """Skip folding whitespace and (nested, quoted-pair aware) comments from ``i``."""
    n = len(v)
    while i < n:
        c = v[i:i + 1]
        if c in (b" ", b"\t", b"\r", b"\n"):
            i += 1
        elif c == b"(":
            depth = 0
            while i < n:
                c = v[i:i + 1]
                if c == b"\\":
                    i += 2
                    continue
                if c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        else:
            break
    return i


def authserv_id_of(field: HeaderField) -> bytes | None:
    """The authserv-id of an ``Authentication-Results`` field: the first token after the
    colon with comments and whitespace skipped (a quoted-string is unquoted). None if empty."""
    v = field_value(field)
    i = _skip_cfws(v, 0)
    if i >= len(v):
        return None
    if v[i:i + 1] == b'"':
        out = bytearray()
        i += 1
        while i < len(v) and v[i:i + 1] != b'"':
            if v[i:i + 1] == b"\\" and i + 1 < len(v):
                i += 1
            out += v[i:i + 1]
            i += 1
        return bytes(out)
    m = _AUTHSERV_TOKEN_RE.match(v, i)
    return m.group(0) if m else None


def _is_e2a_name(name: bytes | None) -> bool:
    return name is not None and name.lower().startswith(b"x-e2a-")


def strip_forged_headers(raw: bytes, authserv_id: str) -> bytes:
    """Remove, from the top-level header section only, every ``X-E2A-*`` field and every
    ``Authentication-Results`` field claiming our ``authserv_id`` (§1.8), each with all its
    continuation lines. Every other byte (other fields, separator, body, nested
    ``message/rfc822`` parts) is kept identical, because the result is what gets hashed.
    """
    fields, _ = split_header_section(raw)
    return strip_fields(raw, fields, authserv_id)


def strip_fields(raw: bytes, fields: Sequence[HeaderField], authserv_id: str) -> bytes:
    """:func:`strip_forged_headers` for a header section already parsed with
    :func:`split_header_section` (one parse per message, §1.7)."""
    ours = authserv_id.encode("ascii").lower()
    kept: list[bytes] = []
    header_len = 0
    for f in fields:
        header_len += len(f.raw)
        if _is_e2a_name(f.name):
            continue
        if f.name is not None and f.name.lower() == b"authentication-results":
            sid = authserv_id_of(f)
            if sid is not None and sid.lower() == ours:
                continue
        kept.append(f.raw)
    return b"".join(kept) + raw[header_len:]


# ---------------------------------------------------------------- trace fields (§1.8)

SPF_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
DKIM_RESULTS = frozenset({"pass", "fail", "neutral", "none", "policy", "temperror", "permerror"})
DMARC_RESULTS = frozenset({"pass", "fail", "none", "temperror", "permerror"})
PROTOCOLS = frozenset({"SMTP", "ESMTP", "ESMTPS"})

# RFC 2045 token (RFC 8601 ``value`` is token / quoted-string).
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
# RFC 8601 pvalue also allows ``[local-part] "@" domain-name`` unquoted (RFC 8601 §2.2
# examples: ``smtp.auth=sender@example.com``).
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_ADDR_RE = re.compile(rf"(?:{_ATEXT}+(?:\.{_ATEXT}+)*)?@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


class DkimClause(NamedTuple):
    """One evaluated DKIM signature for the trace field: RFC 8601 result, ``d=`` and ``s=``
    (empty when the signature did not carry them)."""

    result: str
    domain: str = ""
    selector: str = ""


# Every code point outside printable ASCII (one ``?`` per code point, surrogates included).
_NON_PRINTABLE_RE = re.compile(r"[^ -~]")
# Also SP and the structure characters of ``Received:`` (``;`` before the date, comments).
_NON_RECEIVED_WORD_RE = re.compile(r"[^!-~]|[;()]")


def _printable(text: str) -> str:
    # Header bytes must never carry CR/LF/controls from peer-supplied values (HELO, MAIL FROM).
    # One C-level regex pass instead of a per-character generator (several calls per copy).
    return _NON_PRINTABLE_RE.sub("?", text)


def pvalue(text: str) -> str:
    """An RFC 8601 property value: as is when it is a token or ``[local]@domain``,
    otherwise a quoted-string (non-printable characters replaced by ``?``)."""
    if _TOKEN_RE.fullmatch(text) or _ADDR_RE.fullmatch(text):
        return text
    body = _printable(text).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{body}"'


def _received_word(text: str) -> str:
    """A peer-supplied word in ``Received:`` (HELO): printable, no space, no structure
    characters that would shift the ``;`` date or the comment."""
    return _NON_RECEIVED_WORD_RE.sub("?", text) or "?"


def _check(value: str, allowed: frozenset[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} result {value!r}")


def trace_headers(
    *,
    authserv_id: str,
    helo: str,
    client_ip: str,
    mail_from: str,
    spf: str,
    dkim: Sequence[DkimClause | tuple[str, str, str]],
    dmarc: str,
    from_domain: str | None,
    smtp_domain: str,
    protocol: str,
    message_id: str,
    recipient: str,
    date: datetime,
) -> bytes:
    """The two fields prepended to external mail (§1.8): ``Authentication-Results`` then
    ``Received``, CRLF-terminated and folded with CRLF+TAB between clauses.

    ``mail_from`` ``""`` is the null reverse-path (→ ``smtp.helo=``); ``dkim`` holds one
    clause per evaluated signature (empty → ``dkim=none``); ``from_domain`` None/"" omits
    ``header.from``; ``protocol`` is ``ESMTPS``/``ESMTP``/``SMTP``.

    Raises:
        ValueError: a result or protocol outside the RFC 8601 / §1.8 vocabulary.
    """
    _check(spf, SPF_RESULTS, "spf")
    _check(dmarc, DMARC_RESULTS, "dmarc")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    clauses = [f"{pvalue(authserv_id)};"]
    if mail_from:
        clauses.append(f"spf={spf} smtp.mailfrom={pvalue(mail_from)};")
    else:
        clauses.append(f"spf={spf} smtp.helo={pvalue(helo)};")
    for item in dkim or [DkimClause("none")]:
        c = DkimClause(*item)
        _check(c.result, DKIM_RESULTS, "dkim")
        parts = [f"dkim={c.result}"]
        if c.result == "policy":
            parts.append("(partial body)")
        if c.domain:
            parts.append(f"header.d={pvalue(c.domain)}")
        if c.selector:
            parts.append(f"header.s={pvalue(c.selector)}")
        clauses.append(" ".join(parts) + ";")
    dm = f"dmarc={dmarc}"
    if from_domain:
        dm += f" header.from={pvalue(from_domain)}"
    clauses.append(dm)
    ar = "Authentication-Results: " + "\r\n\t".join(clauses) + "\r\n"
    received = (
        f"Received: from {_received_word(helo)} ([{_received_word(client_ip)}])\r\n"
        f"\tby {_received_word(smtp_domain)} (e2a) with {protocol} id {_received_word(message_id)}\r\n"
        f"\tfor <{_received_word(recipient)}>; {format_rfc5322_date(date)}\r\n"
    )
    return (ar + received).encode("ascii")


def internal_trace_headers(
    *,
    authserv_id: str,
    sender: str,
    smtp_domain: str,
    message_id: str,
    recipient: str,
    date: datetime,
) -> bytes:
    """The internal-route variant (§1.8, §7.3): ``auth=pass smtp.auth=<sending agent>`` and a
    ``Received: from api … with LOCAL`` field, byte-compatible with the signature vector."""
    ar = f"Authentication-Results: {pvalue(authserv_id)}; auth=pass smtp.auth={pvalue(sender)}\r\n"
    received = (
        f"Received: from api by {_received_word(smtp_domain)} (e2a) with LOCAL id {_received_word(message_id)}\r\n"
        f"\tfor <{_received_word(recipient)}>; {format_rfc5322_date(date)}\r\n"
    )
    return (ar + received).encode("ascii")
