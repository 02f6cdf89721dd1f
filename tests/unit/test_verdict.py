"""Table tests for the pure mail-authentication rules of mail.md §2 (e2a/mailauth/verdict.py)."""

from __future__ import annotations

import pytest

from e2a.mailauth.authheaders import split_header_section, trace_headers
from e2a.mailauth.verdict import (
    DMARC_FOUND,
    DMARC_MALFORMED,
    DMARC_NONE,
    DMARC_TEMPERROR,
    DkimResult,
    DmarcLookup,
    DmarcPolicy,
    aligns,
    authentication_results_clauses,
    build_verdict,
    dkim_summary,
    dmarc_result,
    from_address_of,
    from_address_of_fields,
    is_dmarc_record,
    mail_from_domain,
    organizational_domain,
    parse_dmarc_record,
    parse_mailbox,
    select_dmarc_record,
    signed_sender,
    spf_to_e2a,
)

# ---------------------------------------------------------------- SPF mapping (§2.2)


@pytest.mark.parametrize(
    ("rfc", "e2a"),
    [
        ("pass", "pass"),
        ("fail", "fail"),
        ("softfail", "fail"),
        ("neutral", "none"),
        ("none", "none"),
        ("temperror", "temperror"),
        ("permerror", "permerror"),
    ],
)
def test_spf_to_e2a_maps_per_table(rfc, e2a):
    """Every RFC 7208 result maps to the §2.2 Domain-Check vocabulary."""
    assert spf_to_e2a(rfc) == e2a


def test_spf_to_e2a_raises_when_result_unknown():
    """An unknown SPF result is a programming error, not a silent value."""
    with pytest.raises(ValueError):
        spf_to_e2a("error")


# ---------------------------------------------------------------- DKIM summary (§2.3)


@pytest.mark.parametrize(
    ("results", "summary"),
    [
        ([], "none"),
        (["none"], "none"),
        (["pass"], "pass"),
        (["fail", "pass"], "pass"),
        (["temperror", "pass", "permerror"], "pass"),
        (["fail", "temperror"], "temperror"),
        (["permerror", "temperror", "policy"], "temperror"),
        (["policy"], "fail"),
        (["permerror", "policy"], "fail"),
        (["permerror", "fail"], "fail"),
        (["permerror"], "permerror"),
        (["none", "permerror"], "permerror"),
        (["none", "none"], "none"),
    ],
)
def test_dkim_summary_follows_ordering(results, summary):
    """pass > temperror > fail/policy > permerror > none, over all signatures."""
    assert dkim_summary([DkimResult(r, "example.com", "s") for r in results]) == summary


# ---------------------------------------------------------------- From address (§2.1)


def _msg(*headers: str) -> bytes:
    return ("\r\n".join(headers) + "\r\n\r\nbody\r\n").encode("utf-8")


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice <alice@example.com>", "alice@example.com"),
        ("<alice@Example.COM>", "alice@example.com"),
        ('"Smith, Alice" <Alice.Smith@Example.com>', "Alice.Smith@example.com"),
        ("=?utf-8?q?Al=C3=AFce?= <alice@example.com>", "alice@example.com"),
        ("Ålice Ünicode <alice@example.com>", "alice@example.com"),
        ("alice@example.com (Alice)", "alice@example.com"),
        ("(c) Alice (x (nested)) <alice@example.com> (trailing)", "alice@example.com"),
        ('"john doe"@example.com', '"john doe"@example.com'),
        ("alice @ example.com", "alice@example.com"),
        ("  Alice\r\n <alice@example.com>", "alice@example.com"),
        ("J. R. Smith <jr@sub.example.co.uk>", "jr@sub.example.co.uk"),
    ],
)
def test_parse_mailbox_accepts_single_mailbox(value, address):
    """One mailbox with a valid ASCII addr-spec: domain lowercased, local part as sent."""
    assert parse_mailbox(value) == address


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "Alice",
        "alice@example.com, bob@example.com",
        "Alice <alice@example.com>, Bob <bob@example.com>",
        "friends: alice@example.com;",
        "undisclosed-recipients:;",
        "<@relay.example:alice@example.com>",
        "alice@[192.0.2.1]",
        "=?utf-8?q?alice=40example.com?=",
        "=?utf-8?q?x?=@example.com",
        '"=?utf-8?q?x?="@example.com',
        "ålice@example.com",
        "alice@exämple.com",
        "alice@example.com>",
        "<alice@example.com",
        "Alice <alice@example.com> extra",
        "<<alice@example.com>>",
        "alice@@example.com",
        "alice@example..com",
        "alice.@example.com",
        "alice . smith@example.com",
        "alice@exa_mple.com",
        "alice@-example.com",
        "(unclosed alice@example.com",
        '"unterminated@example.com',
        "alice@",
        "@example.com",
        '""@example.com',
        "a@b@example.com",
    ],
)
def test_parse_mailbox_refuses_invalid_values(value):
    """Groups, lists, routes, literals, encoded-word addresses and unparseable values are invalid."""
    assert parse_mailbox(value) is None


@pytest.mark.parametrize(
    ("headers", "address"),
    [
        (["From: Alice <alice@Example.com>", "To: x@y.test"], "alice@example.com"),
        (["from : alice@example.com"], "alice@example.com"),
        (["FROM: alice@example.com"], "alice@example.com"),
        (["From: Alice\r\n\t<alice@example.com>"], "alice@example.com"),
        (["Resent-From: r@other.test", "From: alice@example.com"], "alice@example.com"),
        (["From: alice@example.com", "From: alice@example.com"], None),
        (["From: alice@example.com", "from: bob@example.com"], None),
        (["To: x@y.test"], None),
        (["From: group: a@example.com, b@example.com;"], None),
        (["From: =?utf-8?b?YWxpY2VAZXhhbXBsZS5jb20=?="], None),
        (["From: <<<>>>"], None),
    ],
)
def test_from_address_of_requires_exactly_one_from_field(headers, address):
    """Exactly one top-level From field holding exactly one valid mailbox counts."""
    assert from_address_of(_msg(*headers)) == address
    fields, _ = split_header_section(_msg(*headers))
    assert from_address_of_fields(fields) == address  # same rule on already-split fields


def test_from_address_of_ignores_nested_message_headers():
    """A From inside the body (e.g. a forwarded message/rfc822) is not a second From field."""
    raw = b"From: alice@example.com\r\nSubject: fwd\r\n\r\nFrom: mallory@evil.test\r\n"
    assert from_address_of(raw) == "alice@example.com"


def test_from_address_of_refuses_non_ascii_address_bytes():
    """8-bit bytes inside the address make it invalid; in the display name they are fine."""
    assert from_address_of("From: Zoë <zoe@example.com>\r\n\r\n".encode()) == "zoe@example.com"
    assert from_address_of("From: zoë@example.com\r\n\r\n".encode()) is None
    assert from_address_of(b"From: z\xffe@example.com\r\n\r\n") is None


@pytest.mark.parametrize(
    ("mail_from", "helo", "domain"),
    [
        ("bob@Example.COM", "mx.other.test", "example.com"),
        ('"odd@local"@example.com', "h", "example.com"),
        ("", "Mail.Example.com.", "mail.example.com"),
        ("postmaster", "h", ""),
    ],
)
def test_mail_from_domain_uses_helo_for_null_sender(mail_from, helo, domain):
    """The SPF identity domain is MAIL FROM's domain, or the HELO name for the null sender."""
    assert mail_from_domain(mail_from, helo) == domain


# ---------------------------------------------------------------- org domain and alignment (§2.4)


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("a.b.Example.COM.", "example.com"),
        ("example.co.uk", "example.co.uk"),
        ("mail.example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("com", "com"),
        ("alice.github.io", "alice.github.io"),  # private section: github.io is a suffix
        ("www.alice.github.io", "alice.github.io"),
        ("github.io", "github.io"),
        ("bucket.s3.amazonaws.com", "bucket.s3.amazonaws.com"),
        ("x.example.test", "example.test"),  # unknown TLD: "*" rule
    ],
)
def test_organizational_domain_uses_current_psl(domain, org):
    """Public suffix + one label, ICANN and private sections, multi-label suffixes."""
    assert organizational_domain(domain) == org


@pytest.mark.parametrize(
    ("ident", "from_domain", "mode", "expected"),
    [
        ("example.com", "example.com", "r", True),
        ("example.com", "example.com", "s", True),
        ("EXAMPLE.com.", "example.com", "s", True),
        ("mail.example.com", "example.com", "r", True),
        ("mail.example.com", "example.com", "s", False),
        ("example.com", "news.example.com", "r", True),
        ("a.example.com", "b.example.com", "r", True),
        ("a.example.com", "b.example.com", "s", False),
        ("example.net", "example.com", "r", False),
        ("other.co.uk", "example.co.uk", "r", False),
        ("mail.example.co.uk", "example.co.uk", "r", True),
        ("alice.github.io", "bob.github.io", "r", False),
        ("github.io", "alice.github.io", "r", False),
        ("[127.0.0.1]", "example.com", "r", False),
        ("", "example.com", "r", False),
    ],
)
def test_aligns_relaxed_and_strict(ident, from_domain, mode, expected):
    """Relaxed: same organisational domain; strict: identical domain."""
    assert aligns(ident, from_domain, mode) is expected


# ---------------------------------------------------------------- DMARC records


@pytest.mark.parametrize(
    ("txt", "expected"),
    [
        (b"v=DMARC1; p=none", True),
        (b"v=DMARC1", True),
        (b"v = DMARC1 ;p=reject", True),
        (b"v=DMARC1;p=reject", True),
        (b"v=DMARC10; p=none", False),
        (b"v=dmarc1; p=none", False),
        (b"p=none; v=DMARC1", False),
        (b"v=spf1 -all", False),
        (b"", False),
    ],
)
def test_is_dmarc_record_requires_leading_version_tag(txt, expected):
    """Only records starting with the v=DMARC1 tag are DMARC records."""
    assert is_dmarc_record(txt) is expected


@pytest.mark.parametrize(
    ("txt", "policy"),
    [
        (b"v=DMARC1; p=none", DmarcPolicy("none")),
        (b"v=DMARC1; p=Reject; adkim=S; aspf=s", DmarcPolicy("reject", "s", "s")),
        (b"v=DMARC1; p=quarantine; adkim=r;", DmarcPolicy("quarantine", "r", "r")),
        (b"v=DMARC1;p=reject;aspf=s;rua=mailto:d@example.com;pct=50;fo=1", DmarcPolicy("reject", "r", "s")),
        (b"v=DMARC1; p=none; future=thing", DmarcPolicy("none")),
        (b"v=DMARC1; p=none; sp=reject", DmarcPolicy("none")),
        (b"v=DMARC1;; p=none", DmarcPolicy("none")),
        (b"v=DMARC1", None),
        (b"v=DMARC1; p=bogus", None),
        (b"v=DMARC1; p=none; adkim=x", None),
        (b"v=DMARC1; p=none; aspf=", None),
        (b"v=DMARC1; p=none; sp=maybe", None),
        (b"v=DMARC1; p=none; p=reject", None),
        (b"v=DMARC1; p=none; garbage", None),
        (b"v=DMARC1; p=none; 1x=2", None),
        (b"v=DMARC1; p=none; x=\xff", None),
        (b"v=spf1 -all", None),
    ],
)
def test_parse_dmarc_record_table(txt, policy):
    """adkim/aspf default r; malformed records (bad p/sp/adkim/aspf, syntax, duplicates) give None."""
    assert parse_dmarc_record(txt) == policy


@pytest.mark.parametrize(
    ("txts", "expected"),
    [
        ([], None),
        ([b"v=spf1 -all", b"hello"], None),
        ([b"v=DMARC1; p=none"], DmarcLookup(DMARC_FOUND, DmarcPolicy("none"))),
        ([b"other", b"v=DMARC1; p=reject; adkim=s"], DmarcLookup(DMARC_FOUND, DmarcPolicy("reject", "s"))),
        ([b"v=DMARC1; p=none", b"v=DMARC1; p=reject"], DmarcLookup(DMARC_NONE)),
        ([b"v=DMARC1; p=none", b"v=DMARC1; p=junk"], DmarcLookup(DMARC_NONE)),
        ([b"v=DMARC1; p=junk"], DmarcLookup(DMARC_MALFORMED)),
    ],
)
def test_select_dmarc_record_counts_exactly_one(txts, expected):
    """Exactly one v=DMARC1 record counts; several → none; none at all → ask the org domain."""
    assert select_dmarc_record(txts) == expected


# ---------------------------------------------------------------- DMARC result ordering (§2.4 item 5)

FOUND = DmarcLookup(DMARC_FOUND, DmarcPolicy("reject"))


@pytest.mark.parametrize(
    ("from_valid", "lookup", "spf_al", "dkim_al", "spf_temp", "dkim_temp", "result"),
    [
        (False, FOUND, True, True, False, False, "permerror"),
        (False, DmarcLookup(DMARC_TEMPERROR), False, False, False, False, "permerror"),
        (True, DmarcLookup(DMARC_TEMPERROR), True, True, False, False, "temperror"),
        (True, DmarcLookup(DMARC_NONE), True, True, False, False, "none"),
        (True, DmarcLookup(DMARC_NONE), False, False, True, True, "none"),
        (True, DmarcLookup(DMARC_MALFORMED), True, False, False, False, "permerror"),
        (True, FOUND, True, False, False, True, "pass"),
        (True, FOUND, False, True, True, False, "pass"),
        (True, FOUND, False, False, True, False, "temperror"),
        (True, FOUND, False, False, False, True, "temperror"),
        (True, FOUND, False, False, False, False, "fail"),
    ],
)
def test_dmarc_result_first_match_wins(from_valid, lookup, spf_al, dkim_al, spf_temp, dkim_temp, result):
    """No From → permerror; then record temperror/none/malformed; aligned → pass; temperror; fail."""
    assert (
        dmarc_result(
            from_valid=from_valid,
            lookup=lookup,
            spf_aligned=spf_al,
            dkim_aligned=dkim_al,
            spf_temperror=spf_temp,
            dkim_temperror=dkim_temp,
        )
        == result
    )


# ---------------------------------------------------------------- build_verdict and verified (§2.4 item 6, §2.5)


def _verdict(spf="none", sigs=(), from_address="alice@example.com", mail_from="bob@example.com",
             helo="mx.example.net", lookup=FOUND):
    return build_verdict(spf=spf, dkim_signatures=list(sigs), from_address=from_address,
                         mail_from=mail_from, helo=helo, dmarc_lookup=lookup)


@pytest.mark.parametrize(
    ("kwargs", "dmarc", "verified"),
    [
        # SPF pass with an aligned MAIL FROM domain
        ({"spf": "pass"}, "pass", True),
        ({"spf": "pass", "mail_from": "bounce@mail.example.com"}, "pass", True),
        # SPF pass for an unaligned MAIL FROM domain
        ({"spf": "pass", "mail_from": "bounce@example.net"}, "fail", False),
        # strict aspf: subdomain no longer aligns
        ({"spf": "pass", "mail_from": "b@mail.example.com",
          "lookup": DmarcLookup(DMARC_FOUND, DmarcPolicy("none", aspf="s"))}, "fail", False),
        # null sender: the HELO domain is the SPF identity
        ({"spf": "pass", "mail_from": "", "helo": "mx.example.com"}, "pass", True),
        ({"spf": "pass", "mail_from": "", "helo": "[127.0.0.1]"}, "fail", False),
        # SPF softfail/neutral never align
        ({"spf": "softfail"}, "fail", False),
        # DKIM pass with aligned d=
        ({"sigs": [("pass", "example.com", "s")]}, "pass", True),
        ({"sigs": [("pass", "mail.example.com", "s")]}, "pass", True),
        ({"sigs": [("pass", "mail.example.com", "s")],
          "lookup": DmarcLookup(DMARC_FOUND, DmarcPolicy("none", adkim="s"))}, "fail", False),
        # DKIM pass for an unrelated d=
        ({"sigs": [("pass", "example.net", "s")]}, "fail", False),
        # policy (l=) never passes
        ({"sigs": [("policy", "example.com", "s")]}, "fail", False),
        # aligned DKIM, no DMARC record → verified, dmarc none
        ({"sigs": [("pass", "example.com", "s")], "lookup": DmarcLookup(DMARC_NONE)}, "none", True),
        # no record → relaxed alignment for Verified
        ({"spf": "pass", "mail_from": "b@mail.example.com", "lookup": DmarcLookup(DMARC_NONE)}, "none", True),
        # malformed / temperror record: still aligned for Verified
        ({"spf": "pass", "lookup": DmarcLookup(DMARC_MALFORMED)}, "permerror", True),
        ({"spf": "pass", "lookup": DmarcLookup(DMARC_TEMPERROR)}, "temperror", True),
        # temporary errors when nothing aligned
        ({"spf": "temperror"}, "temperror", False),
        ({"sigs": [("temperror", "example.com", "s"), ("pass", "example.net", "t")]}, "temperror", False),
        # no valid From address: permerror, never verified
        ({"spf": "pass", "from_address": None, "sigs": [("pass", "example.com", "s")]}, "permerror", False),
    ],
)
def test_build_verdict_verified_iff_aligned(kwargs, dmarc, verified):
    """Verified = SPF- or DKIM-aligned (§2.4 item 6), independent of the DMARC record."""
    v = _verdict(**kwargs)
    assert (v.dmarc, v.verified, v.aligned) == (dmarc, verified, verified)


def test_build_verdict_fills_summary_fields():
    """The verdict carries both SPF vocabularies, the DKIM list and summary, and the From identity."""
    v = _verdict(spf="neutral", sigs=[("fail", "example.com", "a"), ("pass", "example.com", "b")])
    assert v.spf == "neutral" and v.spf_e2a == "none"
    assert v.dkim_signatures == (DkimResult("fail", "example.com", "a"), DkimResult("pass", "example.com", "b"))
    assert v.dkim == "pass"
    assert (v.from_address, v.from_domain) == ("alice@example.com", "example.com")
    assert (v.spf_aligned, v.dkim_aligned) == (False, True)
    assert v.domain_check() == "spf=none; dkim=pass; dmarc=pass"


def test_domain_check_formats_signed_value():
    """Domain-Check is `spf=<r>; dkim=<r>; dmarc=<r>` with the e2a SPF vocabulary."""
    v = _verdict(spf="softfail", lookup=DmarcLookup(DMARC_NONE))
    assert v.domain_check() == "spf=fail; dkim=none; dmarc=none"


@pytest.mark.parametrize(
    ("from_address", "mail_from", "sender"),
    [
        ("alice@example.com", "bounce@example.net", "alice@example.com"),
        (None, "bounce@example.net", "bounce@example.net"),
        (None, "", ""),
    ],
)
def test_signed_sender_falls_back_to_mail_from(from_address, mail_from, sender):
    """Sender = From address; else MAIL FROM; null sender and no From → ""."""
    v = _verdict(from_address=from_address, mail_from=mail_from)
    assert signed_sender(v, mail_from) == sender


def test_authentication_results_clauses_fit_trace_headers():
    """The clauses feed trace_headers: one dkim clause per signature, policy marked partial body."""
    from datetime import UTC, datetime

    v = _verdict(spf="pass", sigs=[("pass", "example.com", "s1"), ("policy", "example.com", "s2")])
    clauses = authentication_results_clauses(v, "bob@example.com", "mx.example.net")
    text = trace_headers(
        authserv_id="mx.e2a.test", client_ip="127.0.0.1", smtp_domain="mx.e2a.test",
        protocol="ESMTP", message_id="msg_1", recipient="agent@e2a.test",
        date=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), **clauses,
    ).decode("ascii")
    assert "spf=pass smtp.mailfrom=bob@example.com;" in text
    assert "dkim=pass header.d=example.com header.s=s1;" in text
    assert "dkim=policy (partial body) header.d=example.com header.s=s2;" in text
    assert "dmarc=pass header.from=example.com" in text


def test_authentication_results_clauses_for_null_sender_and_no_from():
    """Null sender → smtp.helo; no valid From → header.from omitted; unsigned → dkim=none."""
    from datetime import UTC, datetime

    v = _verdict(spf="none", from_address=None, mail_from="")
    clauses = authentication_results_clauses(v, "", "mx.example.net")
    text = trace_headers(
        authserv_id="mx.e2a.test", client_ip="127.0.0.1", smtp_domain="mx.e2a.test",
        protocol="SMTP", message_id="msg_1", recipient="agent@e2a.test",
        date=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), **clauses,
    ).decode("ascii")
    assert "spf=none smtp.helo=mx.example.net;" in text
    assert "dkim=none;" in text
    assert "dmarc=permerror\r\n" in text
