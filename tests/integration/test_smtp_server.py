"""The receive layer over real loopback sockets: every hole of stock twisted.mail is closed.

Each test names the stock behaviour it guards against in its docstring.
"""

from __future__ import annotations

import datetime

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from twisted.internet import defer, endpoints, protocol, reactor, ssl, task
from twisted.logger import globalLogPublisher

from e2a import maillog
from e2a.errors import TransientError
from e2a.smtp.server import load_tls_options
from tests.support.smtpclient import WAIT, SmtpTestClient
from tests.support.smtpharness import DOMAIN, SmtpHarness
from tests.support.waiting import wait_for

GOOD = b"From: a@sender.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest_twisted.async_yield_fixture
async def env():
    harness = SmtpHarness()
    yield harness
    await harness.close()


async def open_transaction(env, port, rcpts=("bot@agents.test",)):
    client = await env.connect(port)
    assert (await client.command("EHLO client.test")).code == 250
    assert str(await client.command("MAIL FROM:<a@sender.test>")) == "250 2.1.0 Ok"
    for rcpt in rcpts:
        assert str(await client.command(f"RCPT TO:<{rcpt}>")) == "250 2.1.5 Ok"
    assert (await client.command("DATA")).code == 354
    return client


# -- baseline ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_session_greeting_and_ehlo_keywords_exact(env):
    """Greeting and EHLO keywords are exactly those of mail.md §1.1 (no AUTH, no STARTTLS)."""
    port = env.start()
    client = await env.connect(port, greet=False)
    assert str(await client.reply()) == f"220 {DOMAIN} ESMTP e2a"
    ehlo = await client.command("EHLO client.test")
    assert ehlo.code == 250
    assert ehlo.lines == (DOMAIN, "SIZE 10485760", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES")
    assert str(await client.command("HELO client.test")) == f"250 {DOMAIN}"


@pytest_twisted.ensureDeferred
async def test_message_accepted_with_exact_bytes_and_envelope(env):
    """A clean message reaches accept byte for byte (unstuffed, no Received header) → 250 queued."""
    port = env.start()
    client = await open_transaction(env, port, rcpts=("bot@agents.test", "alias@agents.test", "Other@Agents.test"))
    client.send(GOOD + b"..dot\r\n.\r\n")
    assert str(await client.reply()) == "250 2.0.0 Ok: queued as msg_1"
    (envelope, raw), = env.accepted
    assert raw == GOOD + b".dot\r\n"
    assert envelope.mail_from == "a@sender.test"
    assert envelope.recipients == ("bot@agents.test", "other@agents.test")
    assert (envelope.helo, envelope.helo_kind, envelope.tls, envelope.client_ip) == ("client.test", "EHLO", False, "127.0.0.1")
    assert str(await client.command("QUIT")) == "221 2.0.0 Bye"
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_reply_table_commands(env):
    """Replies of the §1.6 table for the simple commands and sequence errors."""
    port = env.start(max_errors=100)
    client = await env.connect(port)
    expected = [
        ("MAIL FROM:<a@b.test>", "503 5.5.1"),
        ("HELO", "501 5.5.4"),
        ("EHLO", "501 5.5.4"),
        ("HELO c.test", "250"),
        ("RCPT TO:<bot@agents.test>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("NOOP", "250 2.0.0"),
        ("VRFY bot", "252 2.5.0"),
        ("VRFY", "252 2.5.0"),
        ("HELP", "214 2.0.0"),
        ("EXPN list", "502 5.5.1"),
        ("AUTH PLAIN", "502 5.5.1"),
        ("BDAT 10", "502 5.5.1"),
        ("ETRN x", "502 5.5.1"),
        ("TURN", "502 5.5.1"),
        ("STARTTLS", "502 5.5.1"),
        ("FOO", "500 5.5.2"),
        ("MAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME", "250 2.1.0"),
        ("MAIL FROM:<a@b.test>", "503 5.5.1"),
        ("DATA", "554 5.5.1"),
        ("RCPT TO:<bot@agents.test> NOTIFY=NEVER", "555 5.5.4"),
        ("RCPT TO:<nobody@agents.test>", "550 5.1.1"),
        ("RCPT TO:<boom@agents.test>", "451 4.3.0"),
        ("RCPT TO:bot@agents.test", "501 5.1.3"),
        ("RSET", "250 2.0.0"),
        ("MAIL FROM:<>", "250 2.1.0"),
        ("RSET", "250 2.0.0"),
        ("MAIL FROM:<a@b.test> FOO=1", "555 5.5.4"),
        ("MAIL FROM:<a b@c>", "501 5.1.7"),
    ]
    for command, reply in expected:
        got = await client.command(command)
        assert str(got).startswith(reply), (command, str(got))
    client.send(b"MAIL\x00 FROM:<a@b.test>\r\n")
    assert str(await client.reply()).startswith("500 5.5.2")
    client.send("NOOP \u00e9\r\n".encode("latin-1"))
    assert str(await client.reply()).startswith("500 5.5.2")
    client.send(b"NOOP\nNOOP\r\n")
    assert str(await client.reply()).startswith("500 5.5.2")


@pytest_twisted.ensureDeferred
async def test_rcpt_refused_by_a_failed_lookup_is_in_the_mail_flow_log(env):
    """A RCPT answered 451 because its lookup failed is a ``mail.refused`` line like any other
    refusal (docs/logging.md), naming the cause."""
    port = env.start()
    client = await env.connect(port)
    assert str(await client.command("HELO c.test")).startswith("250")
    assert str(await client.command("MAIL FROM:<a@b.test>")).startswith("250")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert str(await client.command("RCPT TO:<boom@agents.test>")).startswith("451 4.3.0")
    finally:
        globalLogPublisher.removeObserver(events.append)
    [refused] = [e for e in events if e.get("event") == maillog.EVENT_REFUSED]
    assert refused["code"] == 451 and refused["mail_from_domain"] == "b.test"
    assert "boom@agents.test (TransientError)" in refused["reason"]


@pytest.mark.parametrize(
    "rcpt",
    ['"bot"@agents.test', "bot%x@agents.test", "x!bot@agents.test", "bot@x@agents.test", "bot@[127.0.0.1]", "bot@agents.test.", "@relay.test:bot@agents.test", "postmaster"],
)
@pytest_twisted.ensureDeferred
async def test_rcpt_unroutable_forms_refused_without_lookup(env, rcpt):
    """Address forms of §1.4 that can never be an agent → 550 5.1.1 and no lookup is made."""
    port = env.start()
    client = await env.connect(port)
    await client.command("EHLO c.test")
    await client.command("MAIL FROM:<a@b.test>")
    assert str(await client.command(f"RCPT TO:<{rcpt}>")) == "550 5.1.1 recipient not found"
    assert env.lookup_calls == []


# -- hole 1: bare LF / CR in DATA ------------------------------------------------------------


@pytest.mark.parametrize("body", [b"Subject: x\nFrom: a\r\n\r\nhi\r\n", b"Subject: x\r\n\r\nhi\rthere\r\n", b"S: x\r\n\r\nnul\x00\r\n"])
@pytest_twisted.ensureDeferred
async def test_bare_line_ending_in_data_rejected_550(env, body):
    """Stock twisted stores bare LF/CR/NUL content; we answer 550 5.6.0 and store nothing."""
    port = env.start()
    client = await open_transaction(env, port)
    client.send(body + b".\r\n")
    assert (await client.reply()).text.startswith("5.6.0")
    assert env.accepted == []
    assert str(await client.command("NOOP")) == "250 2.0.0 Ok"


# -- hole 2: over-long DATA line -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_overlong_data_line_stays_in_data(env):
    """Stock twisted drops to command mode and runs the body; we stay in DATA and answer 552."""
    port = env.start(max_line_length=1000)
    client = await open_transaction(env, port)
    client.send(b"Subject: x\r\n\r\n" + b"A" * 5000 + b"\r\nRSET\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<other@agents.test>\r\n")
    client.send(b"DATA\r\nSubject: smuggled\r\n\r\n.\r\n")
    reply = await client.reply()
    assert str(reply).startswith("552 5.3.4"), reply
    assert str(await client.command("NOOP")) == "250 2.0.0 Ok"
    assert env.accepted == [] and env.lookup_calls == ["bot@agents.test"]


# -- hole 3: endless command line ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_endless_command_line_closes_421(env):
    """Stock twisted buffers 16 KiB then drops silently; we discard, then 421 4.7.0 at 64 KiB."""
    port = env.start()
    client = await env.connect(port)
    for _ in range(70):
        client.send(b"X" * 1024)
    reply = await client.reply()
    assert str(reply).startswith("421 4.7.0"), reply
    await client.wait_closed()
    assert all(len(s._inbuf) < 2048 for f in env.factories for s in f.sessions)


@pytest_twisted.ensureDeferred
async def test_overlong_command_discarded_500(env):
    """A command over 512 octets is discarded to its CRLF, answered 500 5.5.2, session goes on."""
    port = env.start()
    client = await env.connect(port)
    client.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert str(await client.reply()).startswith("500 5.5.2")
    assert str(await client.reply()) == "250 2.0.0 Ok"
    assert str(await client.command(b"NOOP " + b"y" * 505)) == "250 2.0.0 Ok"  # 512 with CRLF


# -- hole 4: storage failure is never 5xx ----------------------------------------------------


@pytest.mark.parametrize("error", [TransientError("db down"), RuntimeError("bug")])
@pytest_twisted.ensureDeferred
async def test_accept_failure_answers_451(env, error):
    """Stock twisted answers 550 to any eomReceived failure; we answer 451 4.3.0."""
    env.accept_error = error
    port = env.start()
    client = await open_transaction(env, port)
    client.send(GOOD + b".\r\n")
    assert str(await client.reply()).startswith("451 4.3.0")
    assert str(await client.command("NOOP")) == "250 2.0.0 Ok"


@pytest_twisted.ensureDeferred
async def test_store_timeout_answers_451(env):
    """Storage not committed within store_timeout → 451 4.3.0 and the accept call is cancelled."""
    clock = task.Clock()
    env.hold_accepts = True
    port = env.start(clock=clock, store_timeout=30)
    client = await open_transaction(env, port)
    client.send(GOOD + b".\r\nNOOP\r\n")
    while not env.pending_accepts:
        await task.deferLater(reactor, 0, lambda: None)
    clock.advance(30)
    assert str(await client.reply()).startswith("451 4.3.0")
    assert env.pending_accepts[0][2].called  # cancelled → the store rolls back
    assert str(await client.reply()) == "250 2.0.0 Ok"  # the pipelined NOOP, after the verdict


# -- hole 5: pipelining with slow lookups ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelined_commands_replied_in_order_with_slow_lookups(env):
    """Stock twisted races async validateTo replies; we run one command at a time, in order."""
    env.hold_lookups = True
    port = env.start()
    client = await env.connect(port)
    await client.command("EHLO c.test")
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bot@agents.test>\r\nRCPT TO:<other@agents.test>\r\nDATA\r\n")
    assert str(await client.reply()) == "250 2.1.0 Ok"
    assert [a for a, _ in env.pending_lookups] == ["bot@agents.test"]  # second not started yet
    env.pending_lookups[0][1].callback("bot@agents.test")
    assert str(await client.reply()) == "250 2.1.5 Ok"
    assert [a for a, _ in env.pending_lookups] == ["bot@agents.test", "other@agents.test"]
    assert not client.replies
    env.pending_lookups[1][1].callback("other@agents.test")
    assert str(await client.reply()) == "250 2.1.5 Ok"
    assert (await client.reply()).code == 354
    client.send(GOOD + b".\r\n")
    assert (await client.reply()).code == 250
    assert env.accepted[0][0].recipients == ("bot@agents.test", "other@agents.test")


@pytest_twisted.ensureDeferred
async def test_refused_data_with_buffered_input_closes_421(env):
    """Content pipelined after a refused DATA is never read as commands: refusal, 421 4.5.0."""
    port = env.start()
    client = await env.connect(port)
    await client.command("EHLO c.test")
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@agents.test>\r\nDATA\r\nRSET\r\nMAIL FROM:<x@y.test>\r\n")
    assert (await client.reply()).code == 250
    assert str(await client.reply()).startswith("550 5.1.1")
    assert str(await client.reply()).startswith("554 5.5.1")
    assert str(await client.reply()).startswith("421 4.5.0")
    await client.wait_closed()


# -- hole 6: STARTTLS command injection ------------------------------------------------------


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return load_tls_options(str(cert_path), str(key_path))


@pytest_twisted.ensureDeferred
async def test_starttls_discards_pipelined_commands_and_resets(env, tmp_path):
    """Stock twisted executes commands sent with STARTTLS after the handshake; we discard them."""
    port = env.start(tls=_self_signed(tmp_path))
    client = await env.connect(port)
    ehlo = await client.command("EHLO c.test")
    assert ehlo.lines[-1] == "STARTTLS"
    assert str(await client.command("STARTTLS now")) == "501 5.5.4 Syntax error: no arguments allowed"
    client.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<bot@agents.test>\r\n")
    assert str(await client.reply()) == "220 2.0.0 Ready to start TLS"
    await client.start_tls(ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2))
    # The injected MAIL was dropped and the HELO state reset: MAIL needs EHLO again.
    assert str(await client.command("MAIL FROM:<a@b.test>")) == "503 5.5.1 Bad sequence of commands"
    ehlo = await client.command("EHLO c.test")
    assert "STARTTLS" not in ehlo.lines
    assert str(await client.command("STARTTLS")).startswith("503 5.5.1")
    assert env.lookup_calls == []
    await client.command("MAIL FROM:<a@b.test>")
    await client.command("RCPT TO:<bot@agents.test>")
    await client.command("DATA")
    client.send(GOOD + b".\r\n")
    assert (await client.reply()).code == 250
    assert env.accepted[0][0].tls is True
    # The producer registration survived the TLS swap and is dropped on close: QUIT really closes.
    assert str(await client.command("QUIT")) == "221 2.0.0 Bye"
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_starttls_after_mail_refused(env, tmp_path):
    """STARTTLS inside a transaction → 503 5.5.1."""
    port = env.start(tls=_self_signed(tmp_path))
    client = await env.connect(port)
    await client.command("EHLO c.test")
    await client.command("MAIL FROM:<a@b.test>")
    assert str(await client.command("STARTTLS")).startswith("503 5.5.1")


@pytest_twisted.ensureDeferred
async def test_starttls_handshake_failure_closes_server_survives(env, tmp_path):
    """Garbage instead of a TLS handshake closes that session; the listener keeps serving."""
    port = env.start(tls=_self_signed(tmp_path))
    client = await env.connect(port)
    await client.command("EHLO c.test")
    assert (await client.command("STARTTLS")).code == 220
    client.send(b"this is not a TLS record\r\n" * 20)
    await client.wait_closed()
    other = await env.connect(port)
    assert (await other.command("NOOP")).code == 250


# -- hole 7: limits --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_declared_size_over_limit_552(env):
    """MAIL … SIZE=n over the limit → 552 5.3.4 (stock twisted ignores SIZE)."""
    port = env.start(max_message_size=1000)
    client = await env.connect(port)
    assert "SIZE 1000" in (await client.command("EHLO c.test")).lines
    assert str(await client.command("MAIL FROM:<a@b.test> SIZE=1001")).startswith("552 5.3.4")
    assert str(await client.command("MAIL FROM:<a@b.test> SIZE=1000")) == "250 2.1.0 Ok"


@pytest_twisted.ensureDeferred
async def test_actual_size_over_limit_552(env):
    """Content over max_message_size is consumed to the end and refused 552 5.3.4."""
    port = env.start(max_message_size=1000)
    client = await open_transaction(env, port)
    client.send(b"Subject: x\r\n\r\n" + b"z" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 20 + b".\r\n")
    assert str(await client.reply()).startswith("552 5.3.4")
    assert env.accepted == []
    assert str(await client.command("NOOP")) == "250 2.0.0 Ok"


@pytest_twisted.ensureDeferred
async def test_recipient_cap_452_duplicates_still_250(env):
    """Beyond max_recipients distinct agents → 452 4.5.3; a repeated agent still gets 250."""
    port = env.start(max_recipients=1)
    client = await env.connect(port)
    await client.command("EHLO c.test")
    await client.command("MAIL FROM:<a@b.test>")
    assert str(await client.command("RCPT TO:<bot@agents.test>")) == "250 2.1.5 Ok"
    assert str(await client.command("RCPT TO:<other@agents.test>")).startswith("452 4.5.3")
    assert str(await client.command("RCPT TO:<BOT@agents.test>")) == "250 2.1.5 Ok"
    await client.command("DATA")
    client.send(GOOD + b".\r\n")
    assert (await client.reply()).code == 250
    assert env.accepted[0][0].recipients == ("bot@agents.test",)


@pytest_twisted.ensureDeferred
async def test_data_timeout_421_nothing_stored(env):
    """From 354, data_timeout without end of data → 421 4.4.2, close, nothing stored."""
    clock = task.Clock()
    port = env.start(clock=clock, data_timeout=600, idle_timeout=300)
    client = await open_transaction(env, port)
    client.send(GOOD)
    clock.advance(599)
    assert not client.replies and client.connected_
    clock.advance(1)
    assert str(await client.reply()).startswith("421 4.4.2")
    await client.wait_closed()
    assert env.accepted == []


@pytest_twisted.ensureDeferred
async def test_idle_timeout_421(env):
    """No complete command line within idle_timeout → 421 4.4.2 and close."""
    clock = task.Clock()
    port = env.start(clock=clock, idle_timeout=300)
    client = await env.connect(port)
    assert (await client.command("NOOP")).code == 250
    clock.advance(299)
    assert (await client.command("NOOP")).code == 250
    clock.advance(299)
    assert client.connected_
    clock.advance(1)
    assert str(await client.reply()).startswith("421 4.4.2")
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_per_ip_connection_limit_421(env):
    """Connections beyond max_connections_per_ip from one address → 421 4.7.0 and close."""
    port = env.start(max_connections_per_ip=2)
    first = await env.connect(port)
    await env.connect(port)
    third = await env.connect(port, greet=False)
    assert str(await third.reply()).startswith("421 4.7.0")
    await third.wait_closed()
    assert (await first.command("QUIT")).code == 221
    await first.wait_closed()
    # A slot was freed: a new connection is admitted again (after the server saw the close).
    while sum(f._per_ip["127.0.0.1"] for f in env.factories) > 1:
        await task.deferLater(reactor, 0, lambda: None)
    fourth = await env.connect(port)
    assert (await fourth.command("NOOP")).code == 250


async def _connect_from(env, port: int, source: str):
    """A raw client bound to ``source`` (another loopback address), so it counts as another IP."""
    client = SmtpTestClient()
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    await endpoints.connectProtocol(endpoint, client)
    env._clients.append(client)  # closed by the fixture like every harness client
    return client


@pytest_twisted.ensureDeferred
async def test_total_connection_limit_421(env):
    """Beyond max_connections in total (each from its own IP) → 421 4.7.0 and close; a freed slot admits again."""
    port = env.start(max_connections=2, max_connections_per_ip=100)
    first = await _connect_from(env, port, "127.0.0.1")
    assert (await first.reply()).code == 220
    second = await _connect_from(env, port, "127.0.0.2")
    assert (await second.reply()).code == 220
    third = await _connect_from(env, port, "127.0.0.3")
    assert str(await third.reply()).startswith("421 4.7.0")
    await third.wait_closed()
    (factory,) = env.factories
    assert set(factory._per_ip) == {"127.0.0.1", "127.0.0.2"}  # the per-IP limit was never in play
    assert (await first.command("QUIT")).code == 221
    await first.wait_closed()
    await wait_for(lambda: defer.succeed(len(factory.sessions) == 1), timeout=WAIT)
    fourth = await _connect_from(env, port, "127.0.0.3")
    assert (await fourth.reply()).code == 220
    assert (await fourth.command("NOOP")).code == 250


@pytest_twisted.ensureDeferred
async def test_max_errors_421(env):
    """After max_errors error replies the session ends with 421 4.7.0."""
    port = env.start(max_errors=3)
    client = await env.connect(port)
    client.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    for _ in range(3):
        assert (await client.reply()).code == 500
    assert str(await client.reply()).startswith("421 4.7.0")
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_max_messages_per_session_421(env):
    """The MAIL after max_messages_per_session messages → 421 4.7.0."""
    port = env.start(max_messages_per_session=1)
    client = await open_transaction(env, port)
    client.send(GOOD + b".\r\n")
    assert (await client.reply()).code == 250
    assert str(await client.command("MAIL FROM:<a@b.test>")).startswith("421 4.7.0")
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_shutdown_sends_421_4_3_2(env):
    """factory.shutdown() answers 421 4.3.2 to live sessions, closes them and refuses new ones."""
    port = env.start()
    client = await env.connect(port)
    done = env.factories[0].shutdown()
    assert str(await client.reply()).startswith("421 4.3.2")
    await client.wait_closed()
    await done
    late = await env.connect(port, greet=False)
    assert str(await late.reply()).startswith("421 4.3.2")


# -- smtpsmug --------------------------------------------------------------------------------


SMUGGLE = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\n.\r", b"\r.\n", b"\r\n\x00.\r\n", b"\r.\r\n"]


@pytest.mark.parametrize("variant", SMUGGLE, ids=repr)
@pytest_twisted.ensureDeferred
async def test_smtp_smuggling_never_yields_second_message(env, variant):
    """An smtpsmug end-of-data variant never ends DATA: one 550 5.6.0, no message at all."""
    port = env.start()
    client = await open_transaction(env, port)
    client.send(
        GOOD + b"first" + variant
        + b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<other@agents.test>\r\nDATA\r\n"
        + b"From: ceo@bank.test\r\n\r\nsmuggled\r\n.\r\n"
    )
    assert str(await client.reply()).startswith("550 5.6.0")
    assert str(await client.command("NOOP")) == "250 2.0.0 Ok"
    assert env.accepted == []
    assert env.lookup_calls == ["bot@agents.test"]


class _SlowReader(protocol.Protocol):
    """A client that pipelines without reading until told to, then counts reply bytes."""

    def __init__(self) -> None:
        self.received = 0
        self.done: defer.Deferred[None] = defer.Deferred()
        self.expected = -1

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received == self.expected and not self.done.called:
            self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_pipelining_client_that_never_reads_cannot_grow_output_buffer(env):
    """Stock twisted queues every reply for a client that never reads; we stop at the send buffer."""
    port = env.start()
    client = await endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), _SlowReader()
    )
    client.transport.pauseProducing()  # the client stops reading
    count = 131072
    client.transport.write(b"EHLO c\r\n" * count)  # ~13 MB of replies, far beyond socket buffers
    (session,) = env.factories[0].sessions
    for _ in range(200):
        if session._write_blocked:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert session._write_blocked
    for _ in range(5):
        queued = len(session.transport.dataBuffer) + session.transport._tempDataLen
        assert queued < 256 * 1024
        await task.deferLater(reactor, 0.02, lambda: None)
    greeting = len(f"220 {DOMAIN} ESMTP e2a\r\n")
    one = len(f"250-{DOMAIN}\r\n250-SIZE 10485760\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
    client.expected = greeting + one * count
    client.transport.resumeProducing()  # now it reads: every reply arrives, in full
    await client.done
    client.transport.loseConnection()
