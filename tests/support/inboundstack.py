"""The real inbound path (SmtpFactory → InboundPipeline → PostgreSQL) on 127.0.0.1:0, with a
fake verifier so no DNS is needed: the verdict is whatever the test sets on :attr:`verdicts`
(per MAIL FROM domain) or :attr:`default`. For attack tests on the SMTP/accept seam."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor, threads
from twisted.web import resource, server

from e2a.config import SmtpConfig
from e2a.inbound import InboundPipeline, TraceInput
from e2a.smtp.recipients import AgentRecipients
from e2a.smtp.server import SmtpFactory
from e2a.store import accounts
from e2a.store.database import Database
from tests.support.apiserver import TEST_MASTER_KEY
from tests.support.smtpclient import SmtpReply, connect

DOMAIN = "acme.test"
MX = "mx.e2a.test"


class WebhookReceiver(resource.Resource):
    """A webhook endpoint for tenant tests: answers 200 at once, or (``hang``) never answers,
    like a receiver that is stuck; keeps every body it was sent."""

    isLeaf = True

    def __init__(self, hang: bool) -> None:
        super().__init__()
        self.hang = hang
        self.bodies: list[bytes] = []
        self.hanging: list[Any] = []

    def render_POST(self, request: Any) -> Any:  # noqa: N802 - twisted.web API
        self.bodies.append(request.content.read())
        if self.hang:
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return server.NOT_DONE_YET
        return b"ok"


@dataclass(frozen=True)
class Envelope:
    """What ``InboundPipeline.accept`` reads of an SMTP envelope (e2a.inbound.EnvelopeLike),
    for tests that call the pipeline without an SMTP session."""

    recipients: tuple[str, ...]
    client_ip: str = "127.0.0.1"
    helo: str = "client.example"
    helo_kind: str = "EHLO"
    tls: bool = False
    mail_from: str = "alice@example.com"


def trace(spf: str = "pass", dkim: str = "none", dmarc: str = "none", from_domain: str = "example.com") -> TraceInput:
    """A TraceInput as the verifier would give it (``from_domain`` None-able)."""
    return TraceInput(
        spf=spf,
        dkim=[] if dkim == "none" else [(dkim, from_domain, "sel")],
        dmarc=dmarc,
        from_domain=from_domain,
        domain_check=f"spf={'fail' if spf in ('softfail', 'fail') else spf}; dkim={dkim}; dmarc={dmarc}",
        verified=spf == "pass" or dkim == "pass",
        from_address=f"alice@{from_domain}",
    )


@dataclass
class FakeVerifier:
    """Returns a :class:`TraceInput` (the pipeline is built with ``to_trace`` = identity)."""

    default: TraceInput = dataclasses.field(default_factory=trace)
    verdicts: dict[str, TraceInput] = dataclasses.field(default_factory=dict)
    calls: int = 0

    async def verify(
        self, raw: bytes, client_ip: str, helo: str, mail_from: str, header_fields: Any = None, crlf_only: bool = False
    ) -> Any:
        self.calls += 1
        return self.verdicts.get(mail_from.rpartition("@")[2].lower(), self.default)


class InboundStack:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.verifier = FakeVerifier()
        self.pipeline: InboundPipeline | None = None
        self.user_id = ""
        self._ports: list[Any] = []
        self.factories: list[SmtpFactory] = []

    async def setup(self, agents: dict[str, str] | None = None, **pipeline_kwargs: Any) -> InboundStack:
        """A user, the verified domain ``acme.test`` and ``agents`` (local part → mode;
        cloud agents get an unreachable webhook URL and status ``active``)."""
        boot = await accounts.bootstrap(self.db, TEST_MASTER_KEY, "owner@example.com")
        self.user_id = boot.user.id
        await self.db.execute(
            "INSERT INTO domains (domain, user_id, verified) VALUES (%s, %s, TRUE)", (DOMAIN, self.user_id)
        )
        await self.add_agents(agents or {"bot": "local"})
        pipeline_kwargs.setdefault("in_thread", threads.deferToThread)
        self.pipeline = InboundPipeline(
            self.db, self.verifier, TEST_MASTER_KEY, MX, MX, to_trace=lambda v: v, **pipeline_kwargs
        )
        return self

    async def add_agents(self, agents: dict[str, str], user_id: str | None = None) -> None:
        for local, mode in agents.items():
            await self.db.execute(
                "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (f"{local}@{DOMAIN}", user_id or self.user_id, DOMAIN, mode,
                 "http://127.0.0.1:9/hook" if mode == "cloud" else "", "active" if mode == "cloud" else "none"),
            )

    def listen(self, recipients: AgentRecipients | None = None, **smtp_overrides: Any) -> int:
        """An SMTP port; ``recipients``: the RCPT lookup (default: uncached)."""
        assert self.pipeline is not None
        config = dataclasses.replace(SmtpConfig(domain=MX), **smtp_overrides)
        factory = SmtpFactory(config, recipients or AgentRecipients(self.db), self.pipeline.accept, reactor)
        self.factories.append(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self._ports.append(port)
        return port.getHost().port

    async def close(self) -> None:
        for factory in self.factories:
            for session in list(factory.sessions):
                session.transport.abortConnection()
            await factory.shutdown()
        for port in self._ports:
            await port.stopListening()


async def send(port: int, mail_from: str, rcpts: list[str], message: bytes) -> SmtpReply:
    """One SMTP transaction (no dot-stuffing needed by callers: none of their lines start with
    '.'); returns the reply to the final dot."""
    client = await connect(port)
    try:
        assert (await client.reply()).code == 220
        assert (await client.command("EHLO client.example")).code == 250
        assert (await client.command(f"MAIL FROM:<{mail_from}>")).code == 250
        for rcpt in rcpts:
            r = await client.command(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, r
        assert (await client.command("DATA")).code == 354
        client.send(message + b".\r\n")
        return await client.reply()
    finally:
        client.abort()
        await client.closed


def message(message_id: str = "<m1@example.com>", extra: str = "", body: str = "Hi\r\n") -> bytes:
    return (
        "From: Alice <alice@example.com>\r\n"
        f"To: bot@{DOMAIN}\r\n"
        "Subject: hi\r\n"
        f"Message-ID: {message_id}\r\n"
        f"{extra}"
        "\r\n"
        f"{body}"
    ).encode()
