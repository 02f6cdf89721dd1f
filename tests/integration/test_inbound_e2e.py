"""Inbound end to end on the whole service: SMTP on a socket → SPF/DKIM/DMARC through the
local DNS server → stripped, traced, signed → stored → REST."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
import pytest_twisted

from twisted.internet import reactor

from e2a.config import DnsConfig
from e2a.mailauth import authheaders
from e2a.store import accounts
from tests.support.apiserver import Response
from tests.support.dnsserver import start_dns_server
from tests.support.mail import DkimTestKey, make_message, send_mail

SENDER_DOMAIN = "example.org"
KEY = DkimTestKey.generate(SENDER_DOMAIN, "sel")
# A second signer whose domain publishes no SPF and no DMARC record (dkim pass, dmarc none).
NOSPF_KEY = DkimTestKey.generate("nospf.example", "sel")
SPF_LOCAL = "v=spf1 ip4:127.0.0.1 -all"


@pytest.fixture
def dns_zone():
    handle = _start(handle_records())
    yield handle
    pytest_twisted.blockon(_stop(handle))


def handle_records():
    return {
        SENDER_DOMAIN: {"TXT": ["v=spf1 ip4:127.0.0.1 -all"], "A": ["192.0.2.10"]},
        KEY.dns_name: {"TXT": [KEY.txt_record]},
        f"_dmarc.{SENDER_DOMAIN}": {"TXT": ["v=DMARC1; p=reject"]},
        "fail.example": {"TXT": ["v=spf1 -all"]},
        # one name per SPF outcome of the MAIL FROM domain (mail.md §2.2)
        "softfail.example": {"TXT": ["v=spf1 ~all"]},
        "nospf.example": {"A": ["192.0.2.11"], "TXT": ["not an spf record"]},
        NOSPF_KEY.dns_name: {"TXT": [NOSPF_KEY.txt_record]},
        "servfail.example": "SERVFAIL",
        "slow.example": "TIMEOUT",
        "twospf.example": {"TXT": [SPF_LOCAL, "v=spf1 -all"]},
        "badspf.example": {"TXT": ["v=spf1 ip4:127.0.0.300 -all"]},
        "_dmarc.badspf.example": {"TXT": ["v=DMARC1; p=none"]},
        "other.example": {"TXT": [SPF_LOCAL]},
    }


def _start(records):
    from twisted.internet import defer

    return pytest_twisted.blockon(defer.ensureDeferred(start_dns_server(reactor, records)))


def _stop(handle):
    from twisted.internet import defer

    return defer.ensureDeferred(handle.stop())


async def _setup(e2a_service_factory, dns_zone, mode: str = "local", dns_timeout: float = 2):
    service = await e2a_service_factory(
        dns=DnsConfig(nameservers=tuple(f"127.0.0.1:{p}" for _h, p in dns_zone.nameservers), timeout=dns_timeout)
    )
    result = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    await service.db.execute(
        "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_status) VALUES (%s, %s, 'agents.test', %s, 'none')",
        ("Bot@agents.test", result.user.id, mode),
    )
    return service, result


async def _get(service, path: str, key: str) -> Response:
    import treq

    resp = await treq.get(
        f"http://127.0.0.1:{service.http_port.getHost().port}{path}",
        headers={"Authorization": f"Bearer {key}"},
        persistent=False,
    )
    return Response(resp.code, resp.headers, await treq.content(resp))


@pytest_twisted.ensureDeferred
async def test_dkim_signed_mail_from_spf_authorised_ip_arrives_verified(e2a_service_factory, dns_zone):
    """An aligned, DKIM-signed message from an SPF-authorised IP: pass/pass/pass, verified,
    forged headers gone, signature verifies with the spec's algorithm."""
    service, boot = await _setup(e2a_service_factory, dns_zone)
    forged = (
        "X-E2A-Auth-Verified: true\r\n"
        "x-e2a-auth-sender: ceo@bank.example\r\n"
        "X-E2A-Conversation-Id:\r\n\tstolen-thread\r\n"
        "Authentication-Results: mx.e2a.test; spf=pass smtp.mailfrom=evil\r\n"
    )
    # forged fields added after signing, as a forwarder or attacker would (not in h=)
    message = forged.encode() + KEY.sign(make_message(from_addr="alice@example.org", to_addr="bot@agents.test"))
    reply = await send_mail(service.smtp_port.getHost().port, "alice@example.org", ["BOT@Agents.Test"], message)
    assert reply.code == 250, reply
    assert reply.text.startswith("2.0.0 Ok: queued as msg_")
    msg_id = reply.text.rsplit(" ", 1)[1]

    listing = await _get(service, "/api/v1/agents/bot@agents.test/messages", boot.api_key_plaintext)
    assert listing.code == 200
    [summary] = listing.json()["messages"]
    assert summary["message_id"] == msg_id and summary["status"] == "unread"
    assert summary["from"] == "alice@example.org" and summary["recipient"] == "Bot@agents.test"

    detail = await _get(service, f"/api/v1/agents/bot%40agents.test/messages/{msg_id}", boot.api_key_plaintext)
    body = detail.json()
    assert body["status"] == "read"
    headers = body["auth_headers"]
    assert headers["X-E2A-Auth-Verified"] == "true"
    assert headers["X-E2A-Auth-Domain-Check"] == "spf=pass; dkim=pass; dmarc=pass"
    assert headers["X-E2A-Auth-Sender"] == "alice@example.org"
    assert headers["X-E2A-Auth-Entity-Type"] == "human"
    raw = base64.b64decode(body["raw_message"])
    assert raw.startswith(b"Authentication-Results: mx.e2a.test;")
    assert b"x-e2a-" not in raw.lower()
    assert b"smtp.mailfrom=evil" not in raw
    assert body["conversation_id"] == ""
    signed_at = datetime.strptime(headers["X-E2A-Auth-Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    authheaders.verify(headers, raw, [boot.signing_secret], signed_at)


@pytest_twisted.ensureDeferred
async def test_spf_fail_unsigned_mail_is_not_verified(e2a_service_factory, dns_zone):
    """SPF -all from our IP and no DKIM: spf=fail; dkim=none; dmarc=none, not verified."""
    service, boot = await _setup(e2a_service_factory, dns_zone)
    message = make_message(from_addr="bob@fail.example", to_addr="bot@agents.test", message_id="<m2@fail.example>")
    reply = await send_mail(service.smtp_port.getHost().port, "bob@fail.example", ["bot@agents.test"], message)
    assert reply.code == 250, reply
    msg_id = reply.text.rsplit(" ", 1)[1]
    detail = (await _get(service, f"/api/v1/agents/bot@agents.test/messages/{msg_id}", boot.api_key_plaintext)).json()
    assert detail["auth_headers"]["X-E2A-Auth-Domain-Check"] == "spf=fail; dkim=none; dmarc=none"
    assert detail["auth_headers"]["X-E2A-Auth-Verified"] == "false"


@pytest_twisted.ensureDeferred
async def test_unknown_recipient_is_refused_and_resend_is_deduplicated(e2a_service_factory, dns_zone):
    """550 5.1.1 for strangers; a resent message (same Message-ID, sender, recipient) is
    answered 250 with the first id and stored once (RFC 1047)."""
    service, boot = await _setup(e2a_service_factory, dns_zone)
    port = service.smtp_port.getHost().port
    reply = await send_mail(port, "alice@example.org", ["nobody@agents.test"], b"Subject: x\r\n\r\nx\r\n")
    assert reply.code == 550 and reply.enhanced == "5.1.1"
    message = KEY.sign(make_message(from_addr="alice@example.org", to_addr="bot@agents.test", message_id="<dup@x>"))
    first = await send_mail(port, "alice@example.org", ["bot@agents.test"], message)
    second = await send_mail(port, "alice@example.org", ["bot@agents.test"], message)
    assert first.code == second.code == 250
    assert first.text == second.text
    rows = await service.db.fetchall("SELECT id FROM messages WHERE direction = 'inbound'")
    assert len(rows) == 1


@pytest_twisted.ensureDeferred
async def test_database_failure_at_end_of_data_answers_451(e2a_service_factory, dns_zone):
    """A storage failure is never a 5xx: the sender must retry (451 4.3.0)."""
    service, boot = await _setup(e2a_service_factory, dns_zone)

    async def broken(*args, **kwargs):
        from e2a.store.database import DatabaseUnavailable

        raise DatabaseUnavailable("database down")

    service.inbound.db = type("BrokenDb", (), {"run": staticmethod(broken)})()
    message = make_message(from_addr="alice@example.org", to_addr="bot@agents.test")
    reply = await send_mail(service.smtp_port.getHost().port, "alice@example.org", ["bot@agents.test"], message)
    assert reply.code == 451 and reply.enhanced == "4.3.0"


# One row per authentication outcome over the real SMTP listener. Columns: MAIL FROM, From
# header address, DKIM signer (None = unsigned), body altered after signing, RFC 7208 SPF result
# (in Authentication-Results), expected X-E2A-Auth-Domain-Check, expected Verified.
AUTH_OUTCOMES = [
    pytest.param("alice@example.org", "alice@example.org", KEY, False, "pass",
                 "spf=pass; dkim=pass; dmarc=pass", "true", id="all-pass"),
    pytest.param("alice@example.org", "alice@example.org", KEY, True, "pass",
                 "spf=pass; dkim=fail; dmarc=pass", "true", id="dkim-fail-spf-aligned"),
    pytest.param("bob@fail.example", "bob@fail.example", None, False, "fail",
                 "spf=fail; dkim=none; dmarc=none", "false", id="spf-fail"),
    pytest.param("x@softfail.example", "x@softfail.example", None, False, "softfail",
                 "spf=fail; dkim=none; dmarc=none", "false", id="spf-softfail"),
    pytest.param("x@nospf.example", "x@nospf.example", NOSPF_KEY, False, "none",
                 "spf=none; dkim=pass; dmarc=none", "true", id="spf-none-dkim-aligned-no-dmarc"),
    pytest.param("x@servfail.example", "alice@example.org", KEY, False, "temperror",
                 "spf=temperror; dkim=pass; dmarc=pass", "true", id="spf-temperror-servfail"),
    pytest.param("x@slow.example", "alice@example.org", None, False, "temperror",
                 "spf=temperror; dkim=none; dmarc=temperror", "false", id="spf-temperror-timeout"),
    pytest.param("x@twospf.example", "alice@example.org", KEY, True, "permerror",
                 "spf=permerror; dkim=fail; dmarc=fail", "false", id="spf-permerror-two-records"),
    pytest.param("x@badspf.example", "x@badspf.example", None, False, "permerror",
                 "spf=permerror; dkim=none; dmarc=fail", "false", id="spf-permerror-syntax"),
    pytest.param("bounce@other.example", "alice@example.org", None, False, "pass",
                 "spf=pass; dkim=none; dmarc=fail", "false", id="spf-pass-unaligned"),
]


@pytest.mark.parametrize(("mail_from", "from_addr", "signer", "tamper", "rfc_spf", "domain_check", "verified"),
                         AUTH_OUTCOMES)
@pytest_twisted.ensureDeferred
async def test_auth_outcome_over_smtp_gives_spec_strings(
    e2a_service_factory, dns_zone, mail_from, from_addr, signer, tamper, rfc_spf, domain_check, verified
):
    """Each SPF/DKIM/DMARC outcome, sent through e2a's SMTP listener, is stored with the §2.5 strings."""
    # The TIMEOUT zone never answers: a short dns.timeout keeps that case quick (it is what
    # turns the unanswered query into temperror).
    service, boot = await _setup(e2a_service_factory, dns_zone, dns_timeout=0.5 if "slow" in mail_from else 2)
    message = make_message(from_addr=from_addr, to_addr="bot@agents.test", message_id="<auth@client.test>")
    if signer is not None:
        message = signer.sign(message)
    if tamper:
        message = message.replace(b"Hi there.", b"Hi THERE.")  # after signing: the body hash breaks
    reply = await send_mail(service.smtp_port.getHost().port, mail_from, ["bot@agents.test"], message)
    assert reply.code == 250, reply
    msg_id = reply.text.rsplit(" ", 1)[1]

    detail = await _get(service, f"/api/v1/agents/bot@agents.test/messages/{msg_id}", boot.api_key_plaintext)
    assert detail.code == 200
    body = detail.json()
    headers = body["auth_headers"]
    assert headers["X-E2A-Auth-Domain-Check"] == domain_check
    assert headers["X-E2A-Auth-Verified"] == verified
    assert headers["X-E2A-Auth-Sender"] == from_addr
    raw = base64.b64decode(body["raw_message"])
    trace = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    # Authentication-Results keeps the RFC 7208 result the e2a vocabulary folds (softfail → fail).
    assert f"spf={rfc_spf} smtp.mailfrom={mail_from}" in trace
    signed_at = datetime.strptime(headers["X-E2A-Auth-Timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    authheaders.verify(headers, raw, [boot.signing_secret], signed_at)
