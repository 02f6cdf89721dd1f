"""SMTP relay end to end on loopback: exact DATA bytes, replies → statuses, STARTTLS + AUTH,
direct MX through the local DNS zone, and the durable queue on the test database."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted

from twisted.internet import defer, reactor, task

from e2a.config import OutboundConfig, OutboundSmtpConfig, WebhooksConfig
from e2a.mailauth.dns import DnsClient
from e2a.outbound.relay import DATA_TIMEOUT, Relay, RouteConfig
from e2a.outbound.worker import OutboundService, RetryConfig
from e2a.store.outbound import IN_DOUBT_PREFIX
from tests.support.dnsserver import start_dns_server
from tests.support.smtpsink import self_signed_tls, start_smtp_sink

CHUNK = 16384
HEADERS = b"From: bot@agents.test\r\nTo: alice@example.test\r\nSubject: t\r\nMessage-ID: <m1@agents.test>\r\n\r\n"
SMUGGLE = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n"


def _upstream(port: int, **kw) -> RouteConfig:
    return RouteConfig(OutboundSmtpConfig(host="127.0.0.1", port=port, **kw), OutboundConfig(), "e2a.test")


def _normalised(message: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def _dot_at(offset: int, newline: bytes) -> bytes:
    """A message whose body puts a '.' line (then smuggled commands) at byte ``offset``."""
    filler = HEADERS + b"x" * max(0, offset - len(HEADERS) - len(newline))
    return filler + newline + b"." + newline + SMUGGLE + b"." + newline + b"tail" + newline


SMUGGLING_BODIES = {
    "crlf-dot-at-boundary": _dot_at(CHUNK, b"\r\n"),
    "crlf-dot-before-boundary": _dot_at(CHUNK - 1, b"\r\n"),
    "crlf-dot-after-boundary": _dot_at(CHUNK + 1, b"\r\n"),
    "crlf-dot-second-boundary": _dot_at(2 * CHUNK, b"\r\n"),
    "bare-lf-dot": _dot_at(CHUNK, b"\n"),
    "bare-cr-dot": _dot_at(CHUNK, b"\r"),
    "mixed": HEADERS + b"a\rb\nc\r\n" + b"y" * (CHUNK - 40) + b"\n.\r..\r\n.\n" + SMUGGLE + b".\r\n.",
    "leading-dot-lines": HEADERS + b".\r\n..\r\n.hidden\r\n" * 3000,
    "no-final-newline": HEADERS + b"end.",
}


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(time.time() + 1)  # rows inserted with the database's now() are due on this clock
    return clock


@pytest.fixture
def sinks():
    started = []

    async def make(**kw):
        sink = await start_smtp_sink(reactor, **kw)
        started.append(sink)
        return sink

    yield make
    for sink in started:
        pytest_twisted.blockon(defer.ensureDeferred(sink.stop()))


# ------------------------------------------------------------------------------ exact bytes


@pytest.mark.parametrize("name", sorted(SMUGGLING_BODIES))
@pytest_twisted.ensureDeferred
async def test_data_bytes_exact_when_body_tries_smuggling(sinks, name):
    """'.' lines at 16 KiB boundaries, CRLF, bare CR and bare LF arrive exact as one message."""
    message = SMUGGLING_BODIES[name]
    sink = await sinks()
    relay = Relay(reactor, reactor, None, _upstream(sink.port, tls="none"))
    outcomes = await relay.deliver(message, "bot@agents.test", ["alice@example.test"])
    assert outcomes["alice@example.test"].status == "sent", outcomes
    assert sink.violations == []
    assert len(sink.messages) == 1
    assert sink.messages[0].content == _normalised(message)
    assert sink.messages[0].recipients == ["alice@example.test"]
    assert [c for c in sink.commands if c.upper().startswith(b"MAIL")] == [b"MAIL FROM:<bot@agents.test>"]


@pytest_twisted.ensureDeferred
async def test_provider_id_and_recipient_outcomes_from_replies(sinks):
    """RCPT 4xx defers, RCPT 5xx fails, the rest is sent with the id from the final 250."""
    sink = await sinks(script={
        "RCPT later@example.test": ["450 4.2.0 greylisted"],
        "RCPT gone@example.test": ["550 5.1.1 no such user"],
        "DOT": ["250 2.0.0 OK <0100018f@provider.test>"],
    })
    relay = Relay(reactor, reactor, None, _upstream(sink.port, tls="none"))
    out = await relay.deliver(HEADERS + b"hi\r\n", "bot@agents.test",
                              ["ok@example.test", "later@example.test", "gone@example.test"])
    assert out["ok@example.test"].status == "sent"
    assert out["ok@example.test"].provider_message_id == "<0100018f@provider.test>"
    assert out["later@example.test"].status == "deferred"
    assert out["later@example.test"].reply == "450 4.2.0 greylisted"
    assert out["gone@example.test"].status == "failed"
    assert out["gone@example.test"].reply == "550 5.1.1 no such user"
    assert sink.messages[0].recipients == ["ok@example.test"]


@pytest.mark.parametrize(("reply", "status"), [("451 4.3.0 try later", "deferred"), ("554 5.7.1 spam", "failed")])
@pytest_twisted.ensureDeferred
async def test_final_dot_reply_decides_status(sinks, reply, status):
    """4xx after the final dot defers, 5xx fails."""
    sink = await sinks(script={"DOT": [reply]})
    relay = Relay(reactor, reactor, None, _upstream(sink.port, tls="none"))
    out = await relay.deliver(HEADERS + b"hi\r\n", "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == status
    assert out["a@example.test"].reply == reply


@pytest_twisted.ensureDeferred
async def test_final_dot_timeout_defers_on_clock(sinks):
    """No answer to the final dot for 600 s (injected clock) → deferred, connection dropped."""
    sink = await sinks(script={"DOT": [None]})
    clock = task.Clock()
    relay = Relay(reactor, clock, None, _upstream(sink.port, tls="none"))
    seen = sink.wait_for("DOT")
    result = defer.ensureDeferred(relay.deliver(HEADERS + b"hi\r\n", "bot@agents.test", ["a@example.test"]))
    await seen
    clock.advance(DATA_TIMEOUT - 1)
    assert not result.called
    clock.advance(1)
    out = await result
    assert out["a@example.test"].status == "deferred"
    assert out["a@example.test"].in_doubt is True
    assert "timeout" in out["a@example.test"].reply


@pytest_twisted.ensureDeferred
async def test_unreachable_relay_defers(sinks):
    """A refused connection is a temporary failure."""
    sink = await sinks()
    port = sink.port
    await sink.stop()
    relay = Relay(reactor, reactor, None, _upstream(port, tls="none"))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "deferred"


# ------------------------------------------------------------------------------ TLS and AUTH


@pytest_twisted.ensureDeferred
async def test_auth_plain_over_starttls_with_self_signed_cert(sinks):
    """tls auto + username: STARTTLS, AUTH PLAIN, certificate not verified with tls_verify false."""
    sink = await sinks(tls_options=self_signed_tls(), auth={"relayuser": "s3cret"}, auth_mechanisms=("LOGIN", "PLAIN"))
    relay = Relay(reactor, reactor, None,
                  _upstream(sink.port, username="relayuser", password="s3cret", tls_verify=False))
    out = await relay.deliver(HEADERS + b"hi\r\n", "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "sent", out
    assert sink.messages[0].tls is True
    assert sink.messages[0].auth_user == "relayuser"
    assert any(c.startswith(b"AUTH PLAIN ") for c in sink.commands)


@pytest_twisted.ensureDeferred
async def test_implicit_tls_relay(sinks):
    """tls implicit: TLS from the first byte, then AUTH."""
    sink = await sinks(implicit_tls=self_signed_tls(), auth={"u": "p"})
    relay = Relay(reactor, reactor, None,
                  _upstream(sink.port, tls="implicit", username="u", password="p", tls_verify=False))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "sent", out
    assert sink.messages[0].tls and sink.messages[0].auth_user == "u"
    assert b"STARTTLS" not in sink.commands


@pytest_twisted.ensureDeferred
async def test_auth_login_when_only_login_offered(sinks):
    """AUTH LOGIN is used when PLAIN is not offered."""
    sink = await sinks(tls_options=self_signed_tls(), auth={"u": "p"}, auth_mechanisms=("LOGIN",))
    relay = Relay(reactor, reactor, None, _upstream(sink.port, username="u", password="p", tls_verify=False))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "sent", out
    assert sink.messages[0].auth_user == "u"


@pytest_twisted.ensureDeferred
async def test_self_signed_cert_refused_when_verifying(sinks):
    """tls_verify true: an unverifiable certificate fails the handshake → deferred, nothing sent."""
    sink = await sinks(tls_options=self_signed_tls(), auth={"u": "p"})
    relay = Relay(reactor, reactor, None, _upstream(sink.port, username="u", password="p"))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "deferred"
    assert "TLS" in out["a@example.test"].reply
    assert sink.messages == []


@pytest_twisted.ensureDeferred
async def test_auth_without_tls_allowed_to_loopback_relay(sinks):
    """tls auto + username to a loopback relay that offers no STARTTLS: AUTH in plain text is allowed."""
    sink = await sinks(auth={"u": "p"})
    relay = Relay(reactor, reactor, None, _upstream(sink.port, username="u", password="p"))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "sent", out
    assert sink.messages[0].tls is False and sink.messages[0].auth_user == "u"


@pytest_twisted.ensureDeferred
async def test_bad_credentials_fail(sinks):
    """535 to AUTH is a 5xx: failed."""
    sink = await sinks(tls_options=self_signed_tls(), auth={"u": "p"})
    relay = Relay(reactor, reactor, None, _upstream(sink.port, username="u", password="wrong", tls_verify=False))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "failed"
    assert out["a@example.test"].reply.startswith("535")


@pytest_twisted.ensureDeferred
async def test_starttls_mode_required_when_not_offered(sinks):
    """tls starttls against a relay without STARTTLS: deferred, no MAIL sent."""
    sink = await sinks()
    relay = Relay(reactor, reactor, None, _upstream(sink.port, tls="starttls"))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "deferred"
    assert not any(c.startswith(b"MAIL") for c in sink.commands)


@pytest_twisted.ensureDeferred
async def test_starttls_discards_plaintext_injected_after_go_ahead(sinks):
    """'220 go' and '250 injected' in one plaintext write: the injected line never answers a TLS command."""
    sink = await sinks(tls_options=self_signed_tls(), auth={"u": "p"},
                       script={"STARTTLS": ["220 2.0.0 go\r\n250 injected"]})
    relay = Relay(reactor, reactor, None, _upstream(sink.port, username="u", password="p", tls_verify=False))
    out = await relay.deliver(HEADERS + b"hi\r\n", "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "sent", out
    assert sink.messages[0].tls and sink.messages[0].auth_user == "u"
    assert sink.violations == []


# ------------------------------------------------------------------------------ hostile servers


@pytest_twisted.ensureDeferred
async def test_huge_multiline_ehlo_reply_aborts_session(sinks):
    """An EHLO reply of thousands of 250- lines is cut at the cap: deferred, nothing more sent."""
    huge = "\r\n".join(["250-sink.test"] + [f"250-X-PADDING-{i:05d}" for i in range(5000)] + ["250 8BITMIME"])
    sink = await sinks(script={"EHLO": [huge]})
    relay = Relay(reactor, reactor, None, _upstream(sink.port, tls="none"))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "deferred"
    assert "reply too long" in out["a@example.test"].reply
    assert not any(c.startswith((b"MAIL", b"QUIT")) for c in sink.commands)


@pytest_twisted.ensureDeferred
async def test_oversized_single_ehlo_reply_aborts_session(sinks):
    """Fewer than 100 lines but over 64 KiB in one reply also drops the connection."""
    huge = "\r\n".join(["250-sink.test"] + ["250-" + "Z" * 4000 for _ in range(40)] + ["250 8BITMIME"])
    sink = await sinks(script={"EHLO": [huge]})
    relay = Relay(reactor, reactor, None, _upstream(sink.port, tls="none"))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "deferred"
    assert "reply too long" in out["a@example.test"].reply


@pytest_twisted.ensureDeferred
async def test_unsolicited_replies_during_data_abort_session(sinks):
    """A server that floods replies while the data is written is dropped, not buffered."""
    flood = "\r\n".join(["354 go"] + ["250 spam"] * 50)
    sink = await sinks(script={"DATA": [flood]})
    relay = Relay(reactor, reactor, None, _upstream(sink.port, tls="none"))
    out = await relay.deliver(HEADERS + b"hi\r\n", "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "deferred"
    assert out["a@example.test"].in_doubt is True
    assert "unsolicited" in out["a@example.test"].reply


@pytest_twisted.ensureDeferred
async def test_cancel_mid_data_aborts_without_quit(sinks, monkeypatch):
    """Cancelling while the body is being written drops the connection; QUIT is never written into DATA."""
    from e2a.outbound import relay as relay_mod

    sent: list[bytes] = []
    original = relay_mod._ClientProtocol.command

    async def spy(self, line, timeout=relay_mod.COMMAND_TIMEOUT):
        sent.append(line)
        return await original(self, line, timeout)

    monkeypatch.setattr(relay_mod._ClientProtocol, "command", spy)
    sink = await sinks(stall_data=True)
    body = HEADERS + (b"x" * 998 + b"\r\n") * 16000  # ~16 MB: cannot fit in socket buffers
    relay = Relay(reactor, reactor, None, _upstream(sink.port, tls="none"))
    stalled = sink.wait_for("DATA_BYTES")
    result = defer.ensureDeferred(relay.deliver(body, "bot@agents.test", ["a@example.test"]))
    await stalled
    result.cancel()
    out = await result
    assert out["a@example.test"].status == "deferred"
    assert out["a@example.test"].in_doubt is True
    assert b"QUIT" not in sent
    assert sent[-1] == b"DATA"
    assert sink.messages == []


# ------------------------------------------------------------------------------ direct MX


async def _mx_relay(records, port, production=False):
    dns_server = await start_dns_server(reactor, records)
    dns = DnsClient(dns_server.nameservers, timeout=2, reactor=reactor)
    route = RouteConfig(OutboundSmtpConfig(), OutboundConfig(direct_mx=True, mx_port=port), "e2a.test", production)
    return dns_server, Relay(reactor, reactor, dns, route, rand=lambda: 0.5)


@pytest_twisted.ensureDeferred
async def test_direct_mx_delivers_to_lowest_preference_host(sinks):
    """MX lookup through e2a's resolver; the best host answers; STARTTLS used unverified."""
    sink = await sinks(tls_options=self_signed_tls("mx1.example.test"))
    records = {
        "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.1"]},
        "mx2.example.test": {"A": ["127.0.0.2"]},
    }
    dns_server, relay = await _mx_relay(records, sink.port)
    try:
        out = await relay.deliver(HEADERS + b"hi\r\n", "bot@agents.test", ["a@example.test", "b@example.test"])
    finally:
        await dns_server.stop()
    assert {r: o.status for r, o in out.items()} == {"a@example.test": "sent", "b@example.test": "sent"}
    assert out["a@example.test"].provider_message_id == ""  # upstream relay only
    assert len(sink.messages) == 1 and sink.messages[0].tls
    assert ("mx2.example.test", "A") not in dns_server.queries


@pytest_twisted.ensureDeferred
async def test_direct_mx_retries_host_without_tls_after_handshake_failure(sinks):
    """A failed STARTTLS handshake → the same host once more in plain text."""
    sink = await sinks(tls_options=self_signed_tls(), broken_starttls=True)
    records = {"example.test": {"MX": [(10, "mx.example.test")]}, "mx.example.test": {"A": ["127.0.0.1"]}}
    dns_server, relay = await _mx_relay(records, sink.port)
    try:
        out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    finally:
        await dns_server.stop()
    assert out["a@example.test"].status == "sent", out
    assert sink.sessions == 2
    assert sink.messages[0].tls is False


@pytest_twisted.ensureDeferred
async def test_upstream_handshake_failure_defers_without_plaintext_retry(sinks):
    """The upstream relay never falls back to plain text after a failed STARTTLS."""
    sink = await sinks(tls_options=self_signed_tls(), broken_starttls=True)
    relay = Relay(reactor, reactor, None, _upstream(sink.port, tls_verify=False))
    out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    assert out["a@example.test"].status == "deferred"
    assert sink.sessions == 1 and sink.messages == []


@pytest_twisted.ensureDeferred
async def test_direct_mx_falls_back_to_address_record(sinks):
    """No MX: the domain's own A record is the implicit MX."""
    sink = await sinks()
    dns_server, relay = await _mx_relay({"plain.test": {"A": ["127.0.0.1"]}}, sink.port)
    try:
        out = await relay.deliver(HEADERS, "bot@agents.test", ["a@plain.test"])
    finally:
        await dns_server.stop()
    assert out["a@plain.test"].status == "sent"


@pytest_twisted.ensureDeferred
async def test_direct_mx_no_mx_no_address_fails(sinks):
    """Neither MX nor A/AAAA: permanent failure without connecting."""
    sink = await sinks()
    dns_server, relay = await _mx_relay({}, sink.port)
    try:
        out = await relay.deliver(HEADERS, "bot@agents.test", ["a@nowhere.test"])
    finally:
        await dns_server.stop()
    assert out["a@nowhere.test"].status == "failed"
    assert sink.sessions == 0


@pytest_twisted.ensureDeferred
async def test_direct_mx_null_mx_fails(sinks):
    """'0 .' fails the recipients without connecting."""
    sink = await sinks()
    dns_server, relay = await _mx_relay({"nomail.test": {"MX": [(0, "")], "A": ["127.0.0.1"]}}, sink.port)
    try:
        out = await relay.deliver(HEADERS, "bot@agents.test", ["a@nomail.test"])
    finally:
        await dns_server.stop()
    assert out["a@nomail.test"].status == "failed"
    assert "null MX" in out["a@nomail.test"].reply
    assert sink.sessions == 0


@pytest_twisted.ensureDeferred
async def test_direct_mx_skips_private_addresses_in_production(sinks):
    """Production: loopback MX addresses are skipped; nothing public left → deferred."""
    sink = await sinks()
    records = {"example.test": {"MX": [(10, "mx.example.test")]}, "mx.example.test": {"A": ["127.0.0.1"]}}
    dns_server, relay = await _mx_relay(records, sink.port, production=True)
    try:
        out = await relay.deliver(HEADERS, "bot@agents.test", ["a@example.test"])
    finally:
        await dns_server.stop()
    assert out["a@example.test"].status == "deferred"
    assert "public" in out["a@example.test"].reply
    assert sink.sessions == 0


@pytest_twisted.ensureDeferred
async def test_direct_mx_dns_failure_defers(sinks):
    """SERVFAIL on the MX lookup is temporary."""
    sink = await sinks()
    dns_server, relay = await _mx_relay({"broken.test": "SERVFAIL"}, sink.port)
    try:
        out = await relay.deliver(HEADERS, "bot@agents.test", ["a@broken.test"])
    finally:
        await dns_server.stop()
    assert out["a@broken.test"].status == "deferred"


# ------------------------------------------------------------------------------ the queue


MESSAGE_ID = "msg_" + "a" * 32


async def _seed(db, recipients, composed=HEADERS + b"queued body\r\n"):
    await db.execute("INSERT INTO users (id, email) VALUES (%s, %s)", ("u" * 32, "owner@example.test"))
    await db.execute("INSERT INTO domains (domain, is_shared, verified) VALUES ('agents.test', TRUE, TRUE)")
    await db.execute("INSERT INTO agents (id, user_id, domain) VALUES ('bot@agents.test', %s, 'agents.test')", ("u" * 32,))
    await db.execute(
        "INSERT INTO messages (id, agent_id, user_id, direction, type, status, sender, composed, method,"
        " delivery_status, smtp_message_id) VALUES (%s, 'bot@agents.test', %s, 'outbound', 'send', 'sent',"
        " 'bot@agents.test', %s, 'smtp', 'queued', '<m1@agents.test>')",
        (MESSAGE_ID, "u" * 32, composed),
    )
    for address in recipients:
        await db.execute(
            "INSERT INTO outbound_recipients (message_id, address, kind, route, status, next_attempt_at)"
            " VALUES (%s, %s, 'to', 'smtp', 'queued', now())",
            (MESSAGE_ID, address),
        )


async def _state(db):
    message = await db.fetchone(
        "SELECT delivery_status, provider_message_id, composed FROM messages WHERE id = %s", (MESSAGE_ID,)
    )
    rows = await db.fetchall(
        "SELECT address, status, attempts, last_reply, next_attempt_at, leased_until FROM outbound_recipients"
        " WHERE message_id = %s ORDER BY id", (MESSAGE_ID,)
    )
    return message, {r["address"]: r for r in rows}


def _service(db, clock, port, **retry):
    route = _upstream(port, tls="none")
    return OutboundService(
        db, None, None, route, RetryConfig.from_sections(WebhooksConfig(), OutboundConfig(**retry)),
        reactor, clock, rng=lambda: 0.5,
    )


@pytest_twisted.ensureDeferred
async def test_queue_defers_on_4xx_then_sends_on_retry(db, sinks):
    """451 after the dot → deferred for 5 s (clock); the retry is sent; composed bytes dropped."""
    sink = await sinks(script={"DOT": ["451 4.3.0 try later"]})
    await _seed(db, ["a@example.test", "b@example.test"])
    clock = _clock()
    svc = _service(db, clock, sink.port)
    assert await svc.run_once() == 1
    message, rows = await _state(db)
    assert message["delivery_status"] == "queued"
    assert {r["status"] for r in rows.values()} == {"deferred"}
    assert rows["a@example.test"]["last_reply"] == "451 4.3.0 try later"
    assert rows["a@example.test"]["attempts"] == 1
    assert rows["a@example.test"]["leased_until"] is None
    due = datetime.fromtimestamp(clock.seconds(), UTC) + timedelta(seconds=5)
    assert abs((rows["a@example.test"]["next_attempt_at"] - due).total_seconds()) < 0.01

    clock.advance(4)
    assert await svc.run_once() == 0
    clock.advance(1.01)
    assert await svc.run_once() == 1
    message, rows = await _state(db)
    assert message["delivery_status"] == "sent"
    assert message["provider_message_id"] == "ABC123"
    assert message["composed"] is None
    assert {r["status"] for r in rows.values()} == {"sent"}
    assert rows["b@example.test"]["attempts"] == 2
    assert len(sink.messages) == 1 and sink.messages[0].recipients == ["a@example.test", "b@example.test"]
    assert sink.messages[0].content == HEADERS + b"queued body\r\n"


@pytest_twisted.ensureDeferred
async def test_queue_5xx_fails_recipient_and_message_partial(db, sinks):
    """One 550 at RCPT, one sent: recipient failed, message partial, composed dropped."""
    sink = await sinks(script={"RCPT b@example.test": ["550 5.1.1 unknown"]})
    await _seed(db, ["a@example.test", "b@example.test"])
    svc = _service(db, _clock(), sink.port)
    await svc.run_once()
    message, rows = await _state(db)
    assert rows["a@example.test"]["status"] == "sent"
    assert rows["b@example.test"]["status"] == "failed"
    assert rows["b@example.test"]["last_reply"] == "550 5.1.1 unknown"
    assert message["delivery_status"] == "partial"
    assert message["composed"] is None


@pytest_twisted.ensureDeferred
async def test_queue_fails_at_max_queue_age(db, sinks):
    """A deferral past max_queue_age is moved to the deadline; failing there → failed."""
    sink = await sinks(script={"DOT": ["451 4.3.0 busy", "451 4.3.0 still busy"]})
    await _seed(db, ["a@example.test"])
    clock = _clock()
    svc = _service(db, clock, sink.port, max_queue_age=3)
    await svc.run_once()
    message, rows = await _state(db)
    assert rows["a@example.test"]["status"] == "deferred"
    queued_at = (await db.fetchone("SELECT queued_at FROM outbound_recipients"))["queued_at"]
    assert rows["a@example.test"]["next_attempt_at"] == queued_at + timedelta(seconds=3)
    clock.advance(10)
    await svc.run_once()
    message, rows = await _state(db)
    assert rows["a@example.test"]["status"] == "failed"
    assert rows["a@example.test"]["last_reply"] == "451 4.3.0 still busy"
    assert message["delivery_status"] == "failed"


@pytest_twisted.ensureDeferred
async def test_queue_claim_is_exclusive_while_leased(db, sinks):
    """A second claimer sees nothing while the first holds the lease."""
    from e2a.store import outbound as store

    await _seed(db, ["a@example.test"])
    now = datetime.fromtimestamp(_clock().seconds(), UTC)
    first = await store.claim_due(db, now, 10, 900)
    second = await store.claim_due(db, now, 10, 900)
    assert list(first) == [MESSAGE_ID] and second == {}
    later = await store.claim_due(db, now + timedelta(seconds=901), 10, 900)
    assert list(later) == [MESSAGE_ID]


@pytest_twisted.ensureDeferred
async def test_queue_in_doubt_marker_survives_crash_after_data(db, sinks):
    """Data written, outcome never recorded: the row carries the in-doubt marker for the retry."""
    sink = await sinks(script={"DOT": [None]})
    await _seed(db, ["a@example.test"])
    clock = _clock()
    svc = _service(db, clock, sink.port)
    seen = sink.wait_for("DOT")
    run = defer.ensureDeferred(svc.run_once())
    await seen
    _message, rows = await _state(db)
    assert rows["a@example.test"]["last_reply"].startswith(IN_DOUBT_PREFIX)
    assert rows["a@example.test"]["status"] == "queued"
    clock.advance(DATA_TIMEOUT)  # the timeout then records the outcome normally
    await run
    _message, rows = await _state(db)
    assert rows["a@example.test"]["status"] == "deferred"
    assert rows["a@example.test"]["last_reply"] == IN_DOUBT_PREFIX + "timeout at end of data"


@pytest_twisted.ensureDeferred
async def test_queue_service_wakes_on_start(db, sinks):
    """start() polls at once; stop() waits for the attempt."""
    sink = await sinks()
    await _seed(db, ["a@example.test"])
    svc = _service(db, _clock(), sink.port)
    seen = sink.wait_for("DOT")
    await svc.start()
    await seen
    await svc.stop()
    message, rows = await _state(db)
    assert rows["a@example.test"]["status"] == "sent"
    assert message["delivery_status"] == "sent"


@pytest_twisted.ensureDeferred
async def test_queue_stale_lease_owner_neither_writes_nor_sends(db, sinks):
    """A's lease expires and B claims the rows: A's renewal, marker and outcome change nothing; A never sends."""
    from e2a.store import outbound as store

    sink = await sinks()
    await _seed(db, ["a@example.test"])
    clock = _clock()
    t0 = datetime.fromtimestamp(clock.seconds(), UTC)
    stale = (await store.claim_due(db, t0, 10, 900))[MESSAGE_ID]
    clock.advance(901)
    t1 = datetime.fromtimestamp(clock.seconds(), UTC)
    fresh = (await store.claim_due(db, t1, 10, 900))[MESSAGE_ID]
    assert stale[0].attempts == fresh[0].attempts == 0
    assert stale[0].lease_token and stale[0].lease_token != fresh[0].lease_token

    async def row():
        return await db.fetchone(
            "SELECT status, attempts, last_reply, leased_until, lease_token FROM outbound_recipients"
        )

    before = await row()
    assert before["lease_token"] == fresh[0].lease_token
    assert await store.extend_leases(db, stale, t1 + timedelta(seconds=5000)) == 0
    with pytest.raises(store.LeaseLost):
        await store.mark_in_doubt(db, stale, t1, t1 + timedelta(seconds=5000))
    changed, _status = await store.record_outcomes(
        db, MESSAGE_ID, [store.RecipientResult(stale[0], "sent", "250 stale")], t1
    )
    assert changed == 0
    assert await row() == before

    # The stale worker's whole attempt: reaches DATA, loses at the in-doubt marker, sends nothing.
    svc = _service(db, clock, sink.port)
    await svc._start_attempt(MESSAGE_ID, stale)
    assert sink.messages == []
    assert b"DATA" in sink.commands
    assert await row() == before

    # The new owner's writes still go through.
    changed, status = await store.record_outcomes(
        db, MESSAGE_ID, [store.RecipientResult(fresh[0], "sent", "250 ok")], t1
    )
    assert (changed, status) == (1, "sent")
    after = await row()
    assert after["status"] == "sent" and after["lease_token"] is None
