"""Pure wire rules of e2a/api/wire.py: addresses, domains, slugs, header text, JSON shapes,
cursors."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from e2a.api import wire
from e2a.errors import BadRequest
from e2a.store.models import Agent, Domain

# ------------------------------------------------------------------------------ slugs

VALID_SLUGS = ["ab", "a1", "00", "my-bot", "a-b-c", "x" * 40, "a" + "-" * 38 + "b", "support-2"]
INVALID_SLUG_SHAPES = [
    ("", "empty"),
    ("a", "one char"),
    ("x" * 41, "41 chars"),
    ("-ab", "leading hyphen"),
    ("ab-", "trailing hyphen"),
    ("-", "hyphen only"),
    ("My-bot", "uppercase"),
    ("ABC", "all uppercase"),
    ("a_b", "underscore"),
    ("ab\r", "trailing CR"),
    ("a.b", "dot"),
    ("a b", "space"),
    ("ab\n", "trailing newline"),
    ("bücher", "non-ASCII"),
    ("a@b", "at sign"),
]


@pytest.mark.parametrize("slug", VALID_SLUGS)
def test_slug_accepted_when_valid(slug):
    """2-40 lowercase letters, digits and inner hyphens pass."""
    assert wire.slug_error(slug) is None
    assert wire.check_slug(slug) == slug


@pytest.mark.parametrize(("slug", "why"), INVALID_SLUG_SHAPES)
def test_slug_refused_when_shape_wrong(slug, why):
    """Every shape rule of the slug regex is enforced."""
    with pytest.raises(BadRequest) as exc:
        wire.check_slug(slug)
    assert exc.value.code == "invalid_slug", why


@pytest.mark.parametrize(
    "slug",
    ["admin", "postmaster", "abuse", "noreply", "no-reply", "mailer-daemon", "info", "help",
     "demo", "test", "www", "mail", "agent", "api", "system", "root"],
)
def test_slug_refused_when_reserved(slug):
    """Each reserved word of api.md §4.2 is refused."""
    assert slug in wire.RESERVED_SLUGS
    with pytest.raises(BadRequest) as exc:
        wire.check_slug(slug)
    assert exc.value.code == "invalid_slug"
    assert "reserved" in exc.value.message


def test_reserved_slugs_exactly_the_spec_list():
    """The reserved list has exactly the 16 words of the spec."""
    assert len(wire.RESERVED_SLUGS) == 16


@pytest.mark.parametrize("slug", ["admins", "my-admin", "testing", "api2", "roots"])
def test_slug_accepted_when_only_containing_reserved_word(slug):
    """Reserved words are matched whole, not as substrings."""
    assert wire.slug_error(slug) is None


# ------------------------------------------------------------------------------ domains

DOMAIN_OK = [
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("sub.example.co.uk", "sub.example.co.uk"),
    ("Bücher.de", "xn--bcher-kva.de"),
    ("BÜCHER.DE", "xn--bcher-kva.de"),
    ("xn--bcher-kva.de", "xn--bcher-kva.de"),
    ("faß.de", "xn--fa-hia.de"),  # UTS 46 non-transitional: ß kept
    ("a-b.c-d", "a-b.c-d"),
    ("1.2", "1.2"),
    ("a" * 63 + ".com", "a" * 63 + ".com"),
    (".".join(["a"] * 127), ".".join(["a"] * 127)),
    ("ex\u00adample.com", "example.com"),  # soft hyphen mapped away
]

DOMAIN_BAD = [
    ("", "empty"),
    ("com", "one label"),
    ("example..com", "empty label"),
    (".example.com", "leading dot"),
    ("example.com..", "two trailing dots"),
    ("-a.com", "leading hyphen"),
    ("a-.com", "trailing hyphen"),
    ("a_b.com", "underscore"),
    ("a b.com", "space"),
    (" example.com", "leading space"),
    ("exa\nmple.com", "newline"),
    ("a" * 64 + ".com", "label of 64"),
    (".".join(["a"] * 128), "128 labels"),
    (".".join(["abcdefghi"] * 26) + ".com", "over 253 octets"),
    ("xn--zz.com", "broken punycode"),
    ("exa$mple.com", "dollar"),
    ("example.com/x", "slash"),
    ("[127.0.0.1]", "domain literal"),
    ("⒈.com", "disallowed code point"),
]


@pytest.mark.parametrize(("raw", "expected"), DOMAIN_OK)
def test_domain_normalised_when_valid(raw, expected):
    """Lowercase, trailing dot dropped, UTS 46 + IDNA A-labels."""
    assert wire.normalise_domain(raw) == expected


@pytest.mark.parametrize(("raw", "why"), DOMAIN_BAD)
def test_domain_refused_when_invalid(raw, why):
    """Label syntax, label count and length rules answer invalid_domain."""
    with pytest.raises(BadRequest) as exc:
        wire.normalise_domain(raw)
    assert exc.value.code == "invalid_domain", why


def test_domain_253_octets_accepted_254_refused():
    """The total length bound is 253 octets."""
    name = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 63*3 + 3 + 61 = 253
    assert len(name) == 253 and wire.normalise_domain(name) == name
    with pytest.raises(BadRequest):
        wire.normalise_domain(name + "b")


def test_path_domain_none_when_invalid():
    """A path {domain} that names no valid domain yields None (route answers 404)."""
    assert wire.path_domain("Example.COM.") == "example.com"
    assert wire.path_domain("not a domain") is None


# ------------------------------------------------------------------------------ agent addresses

ADDRESS_OK = [
    ("bot@example.com", "bot@example.com", "example.com"),
    ("Bot@Example.COM", "Bot@example.com", "example.com"),  # local part kept, domain lowered
    ("first.last@example.com", "first.last@example.com", "example.com"),
    ("a+tag@example.com", "a+tag@example.com", "example.com"),
    ("!#$%&'*+-/=?^_`{|}~@example.com", "!#$%&'*+-/=?^_`{|}~@example.com", "example.com"),
    ("bot@bücher.de", "bot@xn--bcher-kva.de", "xn--bcher-kva.de"),
    ("bot@example.com.", "bot@example.com", "example.com"),
    ("x" * 64 + "@example.com", "x" * 64 + "@example.com", "example.com"),
]

ADDRESS_BAD = [
    ("", "empty"),
    ("bot", "no at"),
    ("@example.com", "empty local"),
    ("bot@", "empty domain"),
    ("a@b@example.com", "two ats"),
    (".bot@example.com", "leading dot"),
    ("bot.@example.com", "trailing dot"),
    ("b..ot@example.com", "double dot"),
    ('"bot"@example.com', "quoted local part"),
    ("b ot@example.com", "space"),
    ("bot\r\n@example.com", "CRLF"),
    ("bøt@example.com", "non-ASCII local"),
    ("b(ot)@example.com", "comment chars"),
    ("b,ot@example.com", "comma"),
    ("x" * 65 + "@example.com", "local over 64"),
    ("bot@localhost", "one-label domain"),
    ("bot@exa_mple.com", "bad domain"),
    ("bot@[127.0.0.1]", "domain literal"),
    ("Bot <bot@example.com>", "display name"),
    ("x" * 64 + "@" + ".".join(["a" * 63] * 3) + ".com", "total over 254"),
]


@pytest.mark.parametrize(("raw", "address", "domain"), ADDRESS_OK)
def test_agent_address_normalised_when_valid(raw, address, domain):
    """Dot-atom local part as given; domain normalised."""
    assert wire.normalise_agent_address(raw) == (address, domain)


@pytest.mark.parametrize(("raw", "why"), ADDRESS_BAD)
def test_agent_address_refused_when_invalid(raw, why):
    """Every §0.11 address rule answers invalid_email."""
    with pytest.raises(BadRequest) as exc:
        wire.normalise_agent_address(raw)
    assert exc.value.code == "invalid_email", why


def test_agent_address_254_octets_accepted():
    """An address of exactly 254 octets is accepted."""
    domain = ".".join(["a" * 63, "b" * 63, "c" * 61])  # 189
    local = "x" * (254 - 1 - len(domain))  # 64
    assert len(local) == 64
    address, _ = wire.normalise_agent_address(f"{local}@{domain}")
    assert len(address) == 254


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("Bot@Example.com", "bot@example.com"),
        ("bot@bücher.de", "bot@xn--bcher-kva.de"),
        ("no-at-sign", "no-at-sign"),
        ("bot@bad_domain", "bot@bad_domain"),
    ],
)
def test_path_agent_key_lowercased(raw, key):
    """Path {email} becomes the lowercase lookup key; IDNA when possible."""
    assert wire.path_agent_key(raw) == key


# ------------------------------------------------------------------------------ recipients

RECIPIENT_OK = [
    ("alice@example.com", "alice@example.com"),
    ("Alice@Example.COM", "alice@example.com"),
    ("  alice@example.com  ", "alice@example.com"),
    ("Alice <alice@example.com>", "alice@example.com"),
    ('"Smith, Alice" <Alice@example.com>', "alice@example.com"),
    ("<alice@example.com>", "alice@example.com"),
    ('"alice smith"@example.com', '"alice smith"@example.com'),
    ('"a\\"b"@example.com', '"a\\"b"@example.com'),
    ("Jürgen <j@example.com>", "j@example.com"),
    ("alice@example.com.", "alice@example.com"),
]

RECIPIENT_BAD = [
    ("alice", "no at"),
    ("alice@", "no domain"),
    ("@example.com", "no local"),
    ("<@relay.example:alice@example.com>", "source route"),
    ("friends: alice@example.com;", "group syntax"),
    ("Alice <alice@example.com", "unterminated angle"),
    ("Alice <alice@example.com> x", "text after angle"),
    ("<a@b.com> <c@d.com>", "two angles"),
    ("alice@bücher.de", "non-ASCII domain"),
    ("älice@example.com", "non-ASCII local"),
    ("alice@[127.0.0.1]", "domain literal"),
    ("a..b@example.com", "double dot"),
    ('"unterminated@example.com', "open quote"),
    ("alice@localhost", "one label"),
    ("a@b@example.com", "two ats"),
]


@pytest.mark.parametrize(("raw", "expected"), RECIPIENT_OK)
def test_recipient_parsed_when_valid(raw, expected):
    """Display names are dropped and the address lowercased."""
    assert wire.parse_recipient(raw) == expected


@pytest.mark.parametrize(("raw", "why"), RECIPIENT_BAD)
def test_recipient_refused_when_invalid(raw, why):
    """Unparsable recipients answer invalid_address."""
    with pytest.raises(BadRequest) as exc:
        wire.parse_recipient(raw)
    assert exc.value.code == "invalid_address", why


@pytest.mark.parametrize("raw", ["", "   ", "\t"])
def test_recipient_dropped_when_blank(raw):
    """Blank strings are dropped (None)."""
    assert wire.parse_recipient(raw) is None


@pytest.mark.parametrize("raw", ["alice@example.com\r\nBcc: x@y.com", "a\x00@example.com", "Al\nice <a@example.com>"])
def test_recipient_refused_when_control_chars(raw):
    """CR/LF/NUL in an address that reaches a header → invalid_header_value."""
    with pytest.raises(BadRequest) as exc:
        wire.parse_recipient(raw)
    assert exc.value.code == "invalid_header_value"


def test_reviewers_deduplicated_and_blank_dropped():
    """Reviewers are lowercased, deduplicated in order, blanks dropped."""
    assert wire.parse_reviewers(["B@x.com", "", "b@X.com", "Ann <a@x.com>"]) == ["b@x.com", "a@x.com"]


def test_reviewers_refused_when_more_than_ten():
    """More than 10 distinct reviewers is invalid_field; duplicates do not count."""
    assert len(wire.parse_reviewers([f"r{i}@x.com" for i in range(10)] + ["r0@x.com"])) == 10
    with pytest.raises(BadRequest) as exc:
        wire.parse_reviewers([f"r{i}@x.com" for i in range(11)])
    assert exc.value.code == "invalid_field"


# ------------------------------------------------------------------------------ header-bound text


@pytest.mark.parametrize(
    "value",
    ["", "plain", "with\ttab", "Ünïcödé ✓", "x" * 500, "emoji 🤖", "\u2028 line separator"],
)
def test_header_text_accepted_without_controls(value):
    """TAB and any non-control Unicode are allowed."""
    assert wire.check_header_text("subject", value) == value


@pytest.mark.parametrize(
    "value",
    ["a\rb", "a\nb", "a\r\nb", "a\x00b", "\x01", "\x08", "\x0b", "\x0c", "\x1b[31m", "\x1f", "a\x7f"],
)
def test_header_text_refused_with_controls(value):
    """CR, LF, NUL, other C0 and DEL answer invalid_header_value."""
    with pytest.raises(BadRequest) as exc:
        wire.check_header_text("subject", value)
    assert exc.value.code == "invalid_header_value"


def test_agent_name_refused_when_over_200_chars():
    """Names are ≤ 200 characters (not octets); longer is invalid_field."""
    assert wire.check_agent_name("é" * 200) == "é" * 200
    with pytest.raises(BadRequest) as exc:
        wire.check_agent_name("x" * 201)
    assert exc.value.code == "invalid_field"
    with pytest.raises(BadRequest) as exc:
        wire.check_agent_name("bad\r\nname")
    assert exc.value.code == "invalid_header_value"


# ------------------------------------------------------------------------------ JSON shapes

T0 = datetime(2026, 4, 27, 12, 0, 0, 123456, tzinfo=UTC)


def make_agent(**kw):
    values = dict(
        id="Bot@example.com", user_id="u" * 32, domain="example.com", name="", agent_mode="cloud",
        webhook_url="https://hook.example.com/x", webhook_status="active", webhook_disabled_at=None,
        hitl_enabled=False, hitl_ttl_seconds=604800, hitl_expiration_action="reject",
        hitl_notify=True, hitl_reviewers=(), created_at=T0, domain_verified=True,
    )
    values.update(kw)
    return Agent(**values)


def test_agent_json_has_exact_fields_without_user_id():
    """§2.1 fields, ts-frac, email = id, never user_id."""
    body = wire.agent_json(make_agent())
    assert body == {
        "id": "Bot@example.com",
        "domain": "example.com",
        "email": "Bot@example.com",
        "name": "",
        "webhook_url": "https://hook.example.com/x",
        "agent_mode": "cloud",
        "domain_verified": True,
        "created_at": "2026-04-27T12:00:00.123456Z",
        "hitl_enabled": False,
        "hitl_ttl_seconds": 604800,
        "hitl_expiration_action": "reject",
        "hitl_notify": True,
        "hitl_reviewers": [],
        "webhook_status": "active",
    }


def test_agent_json_shows_disabled_at_only_when_disabled():
    """webhook_disabled_at appears only with status disabled."""
    body = wire.agent_json(make_agent(webhook_status="disabled", webhook_disabled_at=T0))
    assert body["webhook_disabled_at"] == "2026-04-27T12:00:00.123456Z"
    body = wire.agent_json(make_agent(webhook_status="active", webhook_disabled_at=T0))
    assert "webhook_disabled_at" not in body


def make_domain(**kw):
    values = dict(
        domain="example.com", user_id="u" * 32, is_shared=False, verified=False,
        verification_token="e2a-verify=" + "a" * 32, claimed_at=T0, created_at=T0,
        verified_at=None, dkim_selector="e2a20260427", dkim_public_key="MIIBIjAN",
    )
    values.update(kw)
    return Domain(**values)


def test_domain_json_has_dns_records():
    """§2.8 with mx, txt and dkim records; verified_at omitted until verified."""
    body = wire.domain_json(make_domain(), "mx.e2a.test")
    assert body == {
        "domain": "example.com",
        "verified": False,
        "verification_token": "e2a-verify=" + "a" * 32,
        "dns_records": {
            "mx": {"host": "@", "value": "mx.e2a.test", "priority": 10},
            "txt": {"host": "@", "value": "e2a-verify=" + "a" * 32},
            "dkim": {"host": "e2a20260427._domainkey", "value": "v=DKIM1; k=rsa; p=MIIBIjAN"},
        },
        "created_at": "2026-04-27T12:00:00.123456Z",
    }
    verified = wire.domain_json(make_domain(verified=True, verified_at=T0), "mx.e2a.test")
    assert verified["verified"] is True and verified["verified_at"] == "2026-04-27T12:00:00.123456Z"


# ------------------------------------------------------------------------------ cursors


def test_cursor_round_trips_for_same_agent_and_filter():
    """A cursor decodes to its (created_at, id) for the same agent (any case) and filter."""
    token = wire.encode_cursor(T0, "msg_" + "0" * 32, "unread", "Bot@example.com")
    assert "=" not in token and len(token) <= 512
    assert wire.decode_cursor(token, "unread", "bot@example.com") == (T0, "msg_" + "0" * 32)


@pytest.mark.parametrize(
    ("token_args", "filter_value", "agent"),
    [
        ((T0, "msg_1", "unread", "a@x.com"), "read", "a@x.com"),
        ((T0, "msg_1", "unread", "a@x.com"), "unread", "b@x.com"),
    ],
)
def test_cursor_refused_when_bound_elsewhere(token_args, filter_value, agent):
    """Reusing a cursor with another filter or agent is invalid_pagination_token."""
    token = wire.encode_cursor(*token_args)
    with pytest.raises(BadRequest) as exc:
        wire.decode_cursor(token, filter_value, agent)
    assert exc.value.code == "invalid_pagination_token"


@pytest.mark.parametrize(
    "token",
    ["", "!!!", "abc", "x" * 513, "eyJjIjoxfQ", "bnVsbA", "W10",
     # valid base64 of {"c":"nope","i":"x","s":"","a":"a@x.com"}
     "eyJjIjoibm9wZSIsImkiOiJ4IiwicyI6IiIsImEiOiJhQHguY29tIn0"],
)
def test_cursor_refused_when_malformed(token):
    """Garbage, wrong JSON and bad timestamps are invalid_pagination_token."""
    with pytest.raises(BadRequest) as exc:
        wire.decode_cursor(token, "", "a@x.com")
    assert exc.value.code == "invalid_pagination_token"
