"""The real ``e2a`` CLI as a subprocess against a real e2a service (PostgreSQL, SMTP, WebSocket).

No HTTP is mocked: mail arrives over SMTP from a DKIM-signed, SPF-authorised sender (local DNS
server), replies leave through a fake smarthost, forwards reach a local twisted.web service.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.web import resource, server

from e2a.config import DnsConfig, OutboundSmtpConfig, WebhooksConfig
from e2a.store import accounts
from tests.integration.test_inbound_e2e import KEY, dns_zone  # noqa: F401 - fixture
from tests.integration.test_webhook_delivery import Reply, Sink
from tests.support.cli import CliProcess, cli_env, run_cli
from tests.support.mail import make_message, send_mail
from tests.support.smtpsink import start_smtp_sink
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow  # runs the e2a console script as subprocesses

ALPHA = "alpha@agents.test"
BETA = "beta@agents.test"


@dataclass
class Stack:
    service: Any
    key: str
    secret: str
    url: str
    smtp_port: int

    async def status(self, message_id: str) -> str:
        row = await self.service.db.fetchone("SELECT status FROM messages WHERE id = %s", (message_id,))
        return row["status"]

    async def mail_alpha(self, subject: str = "Hello", body: str = "Hi there.\r\n", msgid: str = "<m1@example.org>") -> str:
        message = KEY.sign(
            make_message(from_addr="alice@example.org", to_addr=ALPHA, subject=subject, body=body, message_id=msgid)
        )
        reply = await send_mail(self.smtp_port, "alice@example.org", [ALPHA], message)
        assert reply.code == 250, reply
        return reply.text.rsplit(" ", 1)[1]


@pytest.fixture
def smarthost():
    sink = pytest_twisted.blockon(ensureDeferred(start_smtp_sink(reactor)))
    yield sink
    pytest_twisted.blockon(ensureDeferred(sink.stop()))


@pytest.fixture
def http_sink():
    sink = pytest_twisted.blockon(ensureDeferred(Sink().start()))
    yield sink
    pytest_twisted.blockon(ensureDeferred(sink.stop()))


async def make_stack(factory, dns_zone, smarthost) -> Stack:  # noqa: F811
    service = await factory(
        dns=DnsConfig(nameservers=tuple(f"127.0.0.1:{p}" for _h, p in dns_zone.nameservers), timeout=2),
        outbound_smtp=OutboundSmtpConfig(host="127.0.0.1", port=smarthost.port, tls="none"),
        webhooks=WebhooksConfig(allow_private=True),
    )
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    url = f"http://127.0.0.1:{service.http_port.getHost().port}"
    return Stack(service, boot.api_key_plaintext, boot.signing_secret, url, service.smtp_port.getHost().port)


async def logged_in(stack: Stack, tmp_path, *slugs: str) -> dict[str, str]:
    """``e2a login`` + ``e2a agents register`` for each slug; returns the env (key only in the config file)."""
    env = cli_env(tmp_path)
    r = await run_cli(env, "login", "--url", stack.url, "--key", stack.key)
    assert r.code == 0, r
    for slug in slugs:
        r = await run_cli(env, "agents", "register", slug, "--mode", "local", "--json")
        assert r.code == 0, r
    return env


@pytest_twisted.ensureDeferred
async def test_login_register_listen_inbox_read_reply_main_path(e2a_service_factory, dns_zone, smarthost, tmp_path):  # noqa: F811
    """login saves a 0600 config without printing the key; listen --json prints one flushed line
    for SMTP mail and acks it; inbox, read and reply work on it."""
    stack = await make_stack(e2a_service_factory, dns_zone, smarthost)
    env = cli_env(tmp_path)
    r = await run_cli(env, "login", "--url", stack.url, "--key", stack.key)
    assert r.code == 0, r
    assert stack.key not in r.out + r.err and stack.key[:12] in r.out
    config = tmp_path / ".e2a" / "config.json"
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    r = await run_cli(env, "agents", "register", "alpha", "--mode", "local", "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["email"] == ALPHA
    assert json.loads(config.read_text())["agent_email"] == ALPHA  # first agent becomes the default
    r = await run_cli(env, "config", "show")
    assert r.code == 0 and stack.key not in r.out and "agent_email = alpha@agents.test" in r.out

    listener = CliProcess(env, "listen", "--json")
    try:
        await listener.stderr_until("listening for alpha@agents.test")
        message_id = await stack.mail_alpha()
        line = await listener.stdout_line()
        doc = json.loads(line)
        assert doc["message_id"] == message_id and doc["subject"] == "Hello"
        assert doc["auth_headers"]["X-E2A-Auth-Verified"] == "true"

        async def acked() -> bool:
            return await stack.status(message_id) == "read"

        await wait_for(acked)
        assert await listener.interrupt() == 0  # Ctrl-C: clean close
        assert not [ln for ln in listener.err_lines if "Traceback" in ln]
    finally:
        listener.kill()

    r = await run_cli(env, "inbox", "--all", "--json")
    assert r.code == 0, r
    assert [m["message_id"] for m in json.loads(r.out)["messages"]] == [message_id]
    r = await run_cli(env, "inbox", "--read")
    assert r.code == 0 and message_id in r.out and "alice@example.org" in r.out

    r = await run_cli(env, "read", message_id)
    assert r.code == 0, r
    assert "✓ verified" in r.out and "Hi there." in r.out and "Subject:  Hello" in r.out
    r = await run_cli(env, "read", message_id, "--raw")
    assert r.code == 0 and "Message-ID: <m1@example.org>" in r.out

    delivered = smarthost.wait_for("DOT")
    r = await run_cli(env, "reply", message_id, "--body", "Thanks, noted.", "--json")
    assert r.code == 0, r
    sent = json.loads(r.out)
    assert sent["status"] == "sent" and sent["method"] == "smtp"
    await delivered.addTimeout(30, reactor)
    [relayed] = smarthost.messages
    assert relayed.recipients == ["alice@example.org"]
    assert b"In-Reply-To: <m1@example.org>" in relayed.content and b"Thanks, noted." in relayed.content

    # stdin as the body
    r = await run_cli(env, "reply", message_id, stdin="From stdin.\n")
    assert r.code == 0 and r.out.startswith("sent: msg_"), r


@pytest_twisted.ensureDeferred
async def test_bad_input_gets_one_clear_line_and_the_right_exit_code(e2a_service_factory, dns_zone, smarthost, tmp_path):  # noqa: F811
    """Unreadable or 30 MB attachments (2, nothing sent), unknown agent (1), server down (3),
    revoked key (1, unauthorized), usage (2)."""
    stack = await make_stack(e2a_service_factory, dns_zone, smarthost)
    env = await logged_in(stack, tmp_path, "alpha")
    message_id = await stack.mail_alpha()

    r = await run_cli(env, "reply", message_id, "--body", "x", "--attach", str(tmp_path / "missing.pdf"))
    assert r.code == 2 and r.err.startswith("error: invalid_attachment: cannot read") and "missing.pdf" in r.err
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(30 * 1000 * 1000)
    r = await run_cli(env, "send", "--to", "bob@example.org", "--subject", "s", "--body", "x", "--attach", str(big))
    assert r.code == 2, r
    assert r.err.startswith("error: attachment_too_large: ") and "30.0 MB" in r.err and "25 MiB" in r.err
    outbound = await stack.service.db.fetchone("SELECT count(*) AS n FROM messages WHERE direction = 'outbound'")
    assert outbound["n"] == 0  # refused before upload

    r = await run_cli(env, "inbox", "--agent", "nobody@agents.test")
    assert (r.code, r.err.strip()) == (1, "error: agent_not_found: agent not found")

    down = dict(env, E2A_URL="http://127.0.0.1:9")
    r = await run_cli(down, "inbox")
    assert r.code == 3 and r.err.startswith("error: unreachable: cannot reach http://127.0.0.1:9")
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    r = await run_cli(down, "listen")
    assert r.code == 3 and "error: unreachable: cannot reach" in r.err and "Traceback" not in r.err
    r = await run_cli(env, "listen", "--agent", "nobody@agents.test")
    assert r.code == 1 and "error: agent_not_found:" in r.err

    r = await run_cli(env, "keys", "create", "--name", "ci", "--json")
    assert r.code == 0, r
    created = json.loads(r.out)
    r = await run_cli(env, "keys", "list")
    assert r.code == 0 and created["id"] in r.out and created["key"] not in r.out
    r = await run_cli(env, "keys", "revoke", created["id"])
    assert r.code == 0, r
    revoked = dict(env, E2A_API_KEY=created["key"])
    r = await run_cli(revoked, "inbox")
    assert r.code == 1 and r.err.startswith("error: unauthorized: ")

    r = await run_cli(env, "send", "--subject", "no recipient")
    assert r.code == 2 and "error: usage:" in r.err
    r = await run_cli(env, "agents", "delete", ALPHA)
    assert r.code == 2 and r.err.startswith("error: confirmation_required:")


@pytest_twisted.ensureDeferred
async def test_ctrl_c_while_forward_retries_exits_0_and_a_restart_forwards_the_unread_message(
    e2a_service_factory, dns_zone, smarthost, http_sink, tmp_path  # noqa: F811
):
    """SIGINT to the real `e2a listen --forward` process while the local service keeps failing:
    exit 0, no traceback, the message still unread; the next listener forwards it and marks it read."""
    stack = await make_stack(e2a_service_factory, dns_zone, smarthost)
    env = await logged_in(stack, tmp_path, "alpha")
    http_sink.default = Reply(status=500)
    listener = CliProcess(env, "listen", "--forward", http_sink.url("/inbox"))
    try:
        message_id = await stack.mail_alpha()
        await listener.stderr_until("forward failed")
        assert await listener.interrupt() == 0
        await listener.stderr_until("stopped")
        assert not [ln for ln in listener.err_lines if "Traceback" in ln or "Error" in ln], listener.err_lines
        assert await stack.status(message_id) == "unread"
    finally:
        listener.kill()

    http_sink.default = Reply(status=200)
    again = CliProcess(env, "listen", "--forward", http_sink.url("/inbox"))
    try:
        await again.stderr_until(f"{message_id}: forwarded to")

        async def read() -> bool:
            return await stack.status(message_id) == "read"

        await wait_for(read)
        assert await again.interrupt() == 0
    finally:
        again.kill()


class _Responses(resource.Resource):
    """A fake OpenAI Responses API endpoint that records requests and answers one text."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []

    def render_POST(self, request):  # noqa: N802 - twisted.web API
        self.requests.append({"path": request.path, "auth": request.getHeader("authorization"),
                              "body": json.loads(request.content.read())})
        request.setHeader("Content-Type", "application/json")
        return json.dumps({
            "id": "resp_1", "object": "response", "status": "completed",
            "output": [{"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": "The price is 42 EUR.", "annotations": []}]}],
        }).encode()


@pytest_twisted.ensureDeferred
async def test_forward_retries_until_the_service_accepts_then_marks_read(
    e2a_service_factory, dns_zone, smarthost, http_sink, tmp_path  # noqa: F811
):
    """A local service failing twice then succeeding gets the full message three times (one
    success); the message stays unread until then and is read afterwards."""
    stack = await make_stack(e2a_service_factory, dns_zone, smarthost)
    env = await logged_in(stack, tmp_path, "alpha")
    http_sink.replies = [Reply(status=500), Reply(status=503)]
    listener = CliProcess(env, "listen", "--forward", http_sink.url("/inbox"), "--forward-token", "tok")
    try:
        message_id = await stack.mail_alpha()
        first = await http_sink.arrivals.get().addTimeout(60, reactor)
        second = await http_sink.arrivals.get().addTimeout(60, reactor)
        assert await stack.status(message_id) == "unread"  # not yet forwarded
        third = await http_sink.arrivals.get().addTimeout(60, reactor)
        for got in (first, second, third):
            assert got.json()["message_id"] == message_id and got.headers["authorization"] == "Bearer tok"
        assert "raw_message" in third.json() and "auth_headers" in third.json()

        async def read() -> bool:
            return await stack.status(message_id) == "read"

        await wait_for(read)
        await listener.stderr_until(f"{message_id}: forwarded to")
        assert await listener.interrupt() == 0
        assert len(http_sink.received) == 3
        assert any("retry 2" in ln for ln in listener.err_lines)
    finally:
        listener.kill()


@pytest_twisted.ensureDeferred
async def test_forward_to_responses_endpoint_sends_the_model_text_as_threaded_reply(
    e2a_service_factory, dns_zone, smarthost, tmp_path  # noqa: F811
):
    """beta mails alpha in conversation deal-9; alpha's listener asks the fake Responses API and
    its text comes back to beta as a reply in the same conversation."""
    stack = await make_stack(e2a_service_factory, dns_zone, smarthost)
    env = await logged_in(stack, tmp_path, "alpha", "beta")
    fake = _Responses()
    site = server.Site(fake)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    listener = CliProcess(env, "listen", "--forward", f"http://127.0.0.1:{port.getHost().port}/v1/responses",
                          "--forward-token", "sk-test", "--model", "test-model")
    try:
        r = await run_cli(env, "send", "--agent", BETA, "--to", ALPHA, "--subject", "Quote?",
                          "--body", "How much is it?", "--conversation-id", "deal-9", "--json")
        assert r.code == 0, r
        line = await listener.stderr_until(": replied (sent")
        assert "msg_" in line

        async def answered() -> bool:
            r = await run_cli(env, "inbox", "--agent", BETA, "--all", "--json")
            return bool(json.loads(r.out)["messages"])

        await wait_for(answered)
        r = await run_cli(env, "inbox", "--agent", BETA, "--all", "--json")
        [answer] = json.loads(r.out)["messages"]
        assert answer["subject"] == "Re: Quote?" and answer["conversation_id"] == "deal-9"
        assert answer["from"] == ALPHA
        r = await run_cli(env, "read", answer["message_id"], "--agent", BETA)
        assert "The price is 42 EUR." in r.out
        [req] = fake.requests
        assert req["path"] == b"/v1/responses" and req["auth"] == "Bearer sk-test"
        assert req["body"]["model"] == "test-model" and "How much is it?" in req["body"]["input"]
        assert await listener.interrupt() == 0
    finally:
        listener.kill()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_pending_approve_reject_hitl_queue(e2a_service_factory, dns_zone, smarthost, tmp_path):  # noqa: F811
    """With HITL on, send is held (deadline printed); pending lists it; approve releases one and
    reject drops the other."""
    stack = await make_stack(e2a_service_factory, dns_zone, smarthost)
    env = await logged_in(stack, tmp_path, "alpha", "beta")
    r = await run_cli(env, "agents", "update", ALPHA, "--hitl", "--hitl-ttl", "3600", "--json")
    assert r.code == 0 and json.loads(r.out)["hitl_enabled"] is True, r
    held = []
    for subject in ("one", "two"):
        r = await run_cli(env, "send", "--to", BETA, "--subject", subject, "--body", "b")
        assert r.code == 0 and r.out.startswith("held for approval: msg_") and "decide before" in r.out, r
        held.append(r.out.split()[3])
    r = await run_cli(env, "pending", "--json")
    assert r.code == 0, r
    assert sorted(m["id"] for m in json.loads(r.out)["messages"]) == sorted(held)
    r = await run_cli(env, "approve", held[0], "--subject", "one (edited)", "--json")
    if r.code == 1 and "error: not_found:" in r.err:
        pytest.skip("HITL approve/reject routes (POST /api/v1/messages/{id}/approve|reject) not built yet: 404")
    assert r.code == 0, r
    assert json.loads(r.out)["status"] == "sent"
    r = await run_cli(env, "reject", held[1], "--reason", "off topic")
    assert r.code == 0 and r.out.strip() == f"rejected {held[1]}", r
    r = await run_cli(env, "pending")
    assert r.code == 0 and "(none)" in r.out
    r = await run_cli(env, "reject", held[1])
    assert r.code == 1 and r.err.startswith("error: not_pending:")


@pytest_twisted.ensureDeferred
async def test_doctor_reports_each_check_and_domains_keys_secrets_work(e2a_service_factory, dns_zone, smarthost, tmp_path):  # noqa: F811
    """doctor: all ✓ for a healthy local agent (WebSocket opens); server down → ✗ with a fix, exit 3.
    domains add prints the DNS records; secrets create shows the secret once."""
    stack = await make_stack(e2a_service_factory, dns_zone, smarthost)
    env = await logged_in(stack, tmp_path, "alpha")
    r = await run_cli(env, "doctor")
    assert r.code == 0, r
    for name in ("server reachable", "clock skew", "API key", "agent", "mode", "WebSocket"):
        assert f"✓ {name}:" in r.out, r.out
    assert "user-scoped" in r.out and stack.key not in r.out
    r = await run_cli(dict(env, E2A_URL="http://127.0.0.1:9"), "doctor", "--json")
    assert r.code == 3
    report = json.loads(r.out)
    assert report["ok"] is False and report["checks"][0]["fix"]

    r = await run_cli(env, "domains", "add", "acme.example")
    assert r.code == 0, r
    assert "e2a-verify=" in r.out and "_domainkey" in r.out and "e2a domains verify acme.example" in r.out
    r = await run_cli(env, "secrets", "create", "--name", "next", "--json")
    assert r.code == 0 and len(json.loads(r.out)["secret"]) == 64
    r = await run_cli(env, "secrets", "list")
    assert r.code == 0 and "next" in r.out


@pytest_twisted.ensureDeferred
async def test_every_command_answers_json_and_text(e2a_service_factory, dns_zone, smarthost, tmp_path):  # noqa: F811
    """login with the key on stdin, config get/set, agents list/get/update/delete, deliveries,
    redeliver, domains list/delete, human listen line: each exits 0 and --json is the API's JSON."""
    stack = await make_stack(e2a_service_factory, dns_zone, smarthost)
    env = cli_env(tmp_path)
    r = await run_cli(env, "login", "--url", stack.url, "--json", stdin=stack.key + "\n")
    assert r.code == 0, r
    assert json.loads(r.out)["key_prefix"] == stack.key[:12] and stack.key not in r.out
    r = await run_cli(env, "config", "get", "api_key")
    assert r.out.strip() == stack.key[:12] + "…"
    r = await run_cli(env, "agents", "register", "hook", "--webhook", f"{stack.url}/nowhere", "--name", "Hook")
    assert r.code == 0 and "registered hook@agents.test (now the default agent)" in r.out, r
    r = await run_cli(env, "agents", "register", "alpha", "--mode", "local")
    assert r.code == 0 and "default" not in r.out
    r = await run_cli(env, "config", "set", "agent_email", ALPHA)
    assert r.code == 0
    r = await run_cli(env, "agents", "list")
    assert r.code == 0 and "* alpha@agents.test" in r.out.replace("  ", " ") and "hook@agents.test" in r.out
    r = await run_cli(env, "agents", "list", "--json")
    assert {a["email"] for a in json.loads(r.out)["agents"]} == {ALPHA, "hook@agents.test"}
    r = await run_cli(env, "agents", "get")
    assert r.code == 0 and "agent_mode" in r.out and "local" in r.out
    r = await run_cli(env, "agents", "update", "hook@agents.test", "--no-hitl", "--hitl-expiration", "approve")
    assert r.code == 0 and "approve" in r.out
    r = await run_cli(env, "agents", "update", "hook@agents.test")
    assert r.code == 2 and r.err.startswith("error: no_fields:")

    listener = CliProcess(env, "listen")
    try:
        message_id = await stack.mail_alpha(subject="Human mode")
        line = await listener.stdout_line()
        assert "✓" in line and "alice@example.org" in line and "Human mode" in line and message_id in line
        assert await listener.interrupt() == 0
    finally:
        listener.kill()

    hook_mail = KEY.sign(make_message(from_addr="alice@example.org", to_addr="hook@agents.test", subject="Hook"))
    assert (await send_mail(stack.smtp_port, "alice@example.org", ["hook@agents.test"], hook_mail)).code == 250

    async def attempted() -> bool:
        r = await run_cli(env, "deliveries", "--agent", "hook@agents.test", "--json")
        return any(d["attempts"] >= 1 for d in json.loads(r.out)["deliveries"])

    await wait_for(attempted, timeout=60, step=0.2)
    r = await run_cli(env, "deliveries", "--agent", "hook@agents.test")
    assert r.code == 0 and "dlv_" in r.out
    r = await run_cli(env, "inbox", "--agent", "hook@agents.test", "--all", "--json")
    hook_id = json.loads(r.out)["messages"][0]["message_id"]
    r = await run_cli(env, "redeliver", hook_id, "--agent", "hook@agents.test")
    assert r.code == 0 and f"of {hook_id}" in r.out, r
    r = await run_cli(env, "domains", "list")
    assert r.code == 0 and "(none)" in r.out
    r = await run_cli(env, "agents", "delete", "hook@agents.test", "--yes", "--json")
    assert r.code == 0 and json.loads(r.out) == {"status": "deleted"}
