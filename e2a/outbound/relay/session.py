"""One SMTP session with one address: connect, (START)TLS, AUTH, the envelope and DATA as exact
bytes; the outcome per recipient.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from twisted.logger import Logger
from twisted.mail import smtp

from e2a.outbound.relay.protocol import (
    _ClientProtocol,
    _extensions,
    _SessionLost,
    _SessionTimeout,
    _TlsFailed,
)
from e2a.outbound.relay.rules import (
    COMMAND_TIMEOUT,
    DATA_TIMEOUT,
    RecipientOutcome,
    RecipientStatus,
    SmtpReply,
    _clip,
    parse_provider_message_id,
    status_for_code,
)
from e2a.outbound.relay.tls import (
    _tls_creator,
)

log = Logger()


@dataclass
class _Plan:
    """How to talk to one address."""

    address: str
    port: int
    tls_name: str  # name the certificate is checked against / SNI
    implicit_tls: bool
    starttls: bool  # try STARTTLS when offered
    require_tls: bool
    verify: bool
    username: str = ""
    password: str = ""


@dataclass
class _SessionResult:
    """``greeted`` False: the host never answered usefully (try the next one)."""

    greeted: bool
    outcomes: dict[str, RecipientOutcome]
    error: str = ""
    greeting_code: int = 0
    tls_failed: bool = False


BeforeData = Callable[[list[str]], Awaitable[None]]


class _Session:
    """One SMTP conversation, start to QUIT, as a straight line of awaits."""

    def __init__(self, proto: _ClientProtocol, plan: _Plan, helo_name: str, upstream: bool) -> None:
        self.proto = proto
        self.plan = plan
        self.helo = helo_name.encode("idna") if not helo_name.isascii() else helo_name.encode("ascii")
        self.upstream = upstream
        self.greeted = False
        self.tls_active = plan.implicit_tls
        self.step = "greeting"

    async def run(
        self,
        payload: bytes,
        eight_bit: bool,
        mail_from: str,
        recipients: list[str],
        before_data: BeforeData | None,
    ) -> _SessionResult:
        outcomes: dict[str, RecipientOutcome] = {}
        pending = list(recipients)
        try:
            return await self._run(payload, eight_bit, mail_from, recipients, before_data, outcomes, pending)
        except _TlsFailed as exc:
            error = f"TLS handshake failed ({exc})"
            outcomes.update(_all(pending, "deferred", error))
            return _SessionResult(self.greeted and self.upstream, outcomes, error=error, tls_failed=True)
        except (_SessionLost, _SessionTimeout) as exc:
            what = "timeout" if isinstance(exc, _SessionTimeout) else "connection lost"
            error = f"{what} at {self.step}" + (f" ({exc})" if str(exc) else "")
            if isinstance(exc, _SessionTimeout):
                self.proto.abort()
            doubt = self.step == "end of data"
            outcomes.update({r: RecipientOutcome("deferred", _clip(error), in_doubt=doubt) for r in pending})
            return _SessionResult(self.greeted, outcomes, error=error)

    async def _expect_2xx(self, reply: SmtpReply, pending: list[str], outcomes: dict[str, RecipientOutcome]) -> bool:
        status = status_for_code(reply.code)
        if status is None:
            return True
        outcomes.update(_all(pending, status, reply.line()))
        pending.clear()
        return False

    async def _run(
        self,
        payload: bytes,
        eight_bit: bool,
        mail_from: str,
        recipients: list[str],
        before_data: BeforeData | None,
        outcomes: dict[str, RecipientOutcome],
        pending: list[str],
    ) -> _SessionResult:
        proto, plan = self.proto, self.plan
        try:
            greeting = await proto.read_reply(COMMAND_TIMEOUT)
        except _SessionLost as exc:
            if plan.implicit_tls:
                raise _TlsFailed(str(exc)) from exc
            raise
        if status_for_code(greeting.code) is not None:
            error = greeting.line()
            return _SessionResult(
                False, _all(recipients, status_for_code(greeting.code) or "deferred", error),
                error=error, greeting_code=greeting.code,
            )
        self.greeted = True

        self.step = "EHLO"
        ehlo = await proto.command(b"EHLO " + self.helo)
        if 500 <= ehlo.code <= 599 and not plan.require_tls and not plan.username:
            self.step = "HELO"
            ehlo = await proto.command(b"HELO " + self.helo)
        if not await self._expect_2xx(ehlo, pending, outcomes):
            return _SessionResult(True, outcomes)
        extensions = _extensions(ehlo.text)

        if not self.tls_active and plan.starttls and "STARTTLS" in extensions:
            self.step = "STARTTLS"
            reply = await proto.command(b"STARTTLS")
            if status_for_code(reply.code) is None:
                proto.start_tls(_tls_creator(plan.tls_name, plan.verify))
                self.tls_active = True
                self.step = "EHLO after STARTTLS"
                try:
                    ehlo = await proto.command(b"EHLO " + self.helo)
                except _SessionLost as exc:
                    raise _TlsFailed(str(exc)) from exc
                if not await self._expect_2xx(ehlo, pending, outcomes):
                    return _SessionResult(True, outcomes)
                extensions = _extensions(ehlo.text)
            elif plan.require_tls:
                await self._expect_2xx(reply, pending, outcomes)
                return _SessionResult(True, outcomes)
        if plan.require_tls and not self.tls_active:
            outcomes.update(_all(pending, "deferred", "TLS required but the relay does not offer STARTTLS"))
            pending.clear()
            return _SessionResult(True, outcomes)

        if plan.username:
            self.step = "AUTH"
            if not await self._authenticate(extensions, pending, outcomes):
                return _SessionResult(True, outcomes)

        self.step = "MAIL FROM"
        mail = b"MAIL FROM:" + smtp.quoteaddr(mail_from.encode("utf-8"))
        if eight_bit and "8BITMIME" in extensions:
            mail += b" BODY=8BITMIME"
        if not await self._expect_2xx(await proto.command(mail), pending, outcomes):
            return _SessionResult(True, outcomes)

        accepted: list[str] = []
        for rcpt in recipients:
            self.step = "RCPT TO"
            reply = await proto.command(b"RCPT TO:" + smtp.quoteaddr(rcpt.encode("utf-8")))
            status = status_for_code(reply.code)
            if status is None:
                accepted.append(rcpt)
            else:
                outcomes[rcpt] = RecipientOutcome(status, reply.line())
                pending.remove(rcpt)
        if not accepted:
            return _SessionResult(True, outcomes)

        self.step = "DATA"
        reply = await proto.command(b"DATA")
        if reply.code != 354:
            status = status_for_code(reply.code) or "deferred"
            outcomes.update(_all(accepted, status, reply.line()))
            pending.clear()
            return _SessionResult(True, outcomes)

        if before_data is not None:
            try:
                await before_data(accepted)
            except Exception as exc:
                log.failure("could not record the in-flight state; not sending")
                proto.abort()
                outcomes.update(_all(pending, "deferred", f"not sent: {type(exc).__name__}"))
                pending.clear()
                return _SessionResult(True, outcomes)

        self.step = "end of data"
        final = await proto.send_data(payload, COMMAND_TIMEOUT, DATA_TIMEOUT)
        status = status_for_code(final.code)
        provider_id = parse_provider_message_id(final.text) if status is None and self.upstream else ""
        for rcpt in accepted:
            outcomes[rcpt] = RecipientOutcome(status or "sent", final.line(), provider_id)
        pending.clear()
        return _SessionResult(True, outcomes)

    async def _authenticate(
        self, extensions: dict[str, str], pending: list[str], outcomes: dict[str, RecipientOutcome]
    ) -> bool:
        proto, plan = self.proto, self.plan
        mechanisms = {m.upper() for m in extensions.get("AUTH", "").split()}
        user = plan.username.encode("utf-8")
        secret = plan.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            reply = await proto.command(b"AUTH PLAIN " + token)
            if reply.code == 334:  # server wanted the initial response separately
                reply = await proto.command(token)
        elif "LOGIN" in mechanisms:
            reply = await proto.command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = await proto.command(base64.b64encode(user))
            if reply.code == 334:
                reply = await proto.command(base64.b64encode(secret))
        else:
            outcomes.update(_all(pending, "deferred", "the relay offers neither AUTH PLAIN nor AUTH LOGIN"))
            pending.clear()
            return False
        if reply.code == 334:
            await proto.command(b"*")
            outcomes.update(_all(pending, "deferred", "unexpected AUTH challenge"))
            pending.clear()
            return False
        return await self._expect_2xx(reply, pending, outcomes)


def _all(recipients: Sequence[str], status: RecipientStatus, reply: str) -> dict[str, RecipientOutcome]:
    return {r: RecipientOutcome(status, _clip(reply)) for r in recipients}
