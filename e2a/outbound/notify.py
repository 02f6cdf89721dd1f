"""Reviewer notification email on each hold (mail.md §8.7).

Split in two so the mail rides in the hold's own transaction without doing slow work there:
:meth:`ReviewerNotifier.prepare` (before the transaction: reviewers, routes, composition,
DKIM signing in a thread) and :meth:`ReviewerNotifier.queue_txn` (inside it, under a
savepoint: the queue rows). Both swallow their own failures: a notification may be lost, a
hold must never fail or wait because of it. Nothing here ever reads the held body or
attachments — the mail carries only the envelope facts and the two magic links, so a
forwarded or leaked notification reveals no content and a link scanner that follows the
links only reaches a confirmation page (api.md §8).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger

from e2a import ids
from e2a.config import HitlConfig
from e2a.metrics import E2AMetrics, metrics_of
from e2a.outbound import dkimsign
from e2a.outbound.compose import (
    _POLICY,
    _set_addresses,
    _set_boundaries,
    _set_subject,
    _text_cte,
)
from e2a.outbound.identity import MailIdentity
from e2a.outbound.magiclink import ApprovalTokens, approval_url
from e2a.store import accounts
from e2a.store import notifications as store
from e2a.store.database import Database, Txn
from e2a.store.events import CHANNEL_OUTBOUND

__all__ = [
    "SUBJECT_CUT_OCTETS",
    "Notice",
    "ReviewerNotifier",
    "compose_notification",
    "cut_subject",
    "notification_subject",
    "rfc5322_utc",
]

log = Logger()

SENDER_LOCAL_PART = "hitl-noreply"
SUBJECT_CUT_OCTETS = 60


# ------------------------------------------------------------------------------ pure rules


def cut_subject(subject: str, limit: int = SUBJECT_CUT_OCTETS) -> str:
    """At most ``limit`` octets of UTF-8 cut at a character boundary, ``...`` appended when
    cut (mail.md §8.7)."""
    data = subject.encode("utf-8")
    if len(data) <= limit:
        return subject
    return data[:limit].decode("utf-8", "ignore") + "..."


def notification_subject(agent_address: str, subject: str) -> str:
    """``[e2a] approve outbound from <agent address>: <cut subject>``."""
    return f"[e2a] approve outbound from {agent_address}: {cut_subject(subject)}"


def rfc5322_utc(dt: datetime) -> str:
    """``Sun, 06 Dec 2026 19:14:04 +0000``: the Expires line of the mail and the pages."""
    if dt.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    return format_datetime(dt.astimezone(UTC).replace(microsecond=0))


def _list(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "-"


def notification_text(
    agent: str, to: Sequence[str], cc: Sequence[str], bcc: Sequence[str], subject: str, expires: datetime,
    approve: str, reject: str,
) -> str:
    return (
        f"The agent {agent} wants to send an email that needs your approval.\n"
        "\n"
        f"To:      {_list(to)}\n"
        f"Cc:      {_list(cc)}\n"
        f"Bcc:     {_list(bcc)}\n"
        f"Subject: {subject}\n"
        f"Expires: {rfc5322_utc(expires)}\n"
        "\n"
        f"Approve: {approve}\n"
        "\n"
        f"Reject:  {reject}\n"
        "\n"
        "Each link opens a confirmation page; nothing happens until you confirm there.\n"
        "This email never contains the message body or its attachments.\n"
    )


def notification_html(
    agent: str, to: Sequence[str], cc: Sequence[str], bcc: Sequence[str], subject: str, expires: datetime,
    approve: str, reject: str,
) -> str:
    e = html.escape
    rows = "".join(
        f'<tr><th align="left" style="padding:2px 12px 2px 0">{name}</th><td>{e(value)}</td></tr>\n'
        for name, value in (
            ("To", _list(to)), ("Cc", _list(cc)), ("Bcc", _list(bcc)), ("Subject", subject),
            ("Expires", rfc5322_utc(expires)),
        )
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Approval needed</title></head>\n"
        '<body style="font-family:sans-serif">\n'
        f"<p>The agent <b>{e(agent)}</b> wants to send an email that needs your approval.</p>\n"
        f"<table>\n{rows}</table>\n"
        f'<p><a href="{e(approve)}">Approve</a> &nbsp; <a href="{e(reject)}">Reject</a></p>\n'
        "<p>Each link opens a confirmation page; nothing happens until you confirm there.\n"
        "This email never contains the message body or its attachments.</p>\n"
        "</body></html>\n"
    )


def compose_notification(
    *,
    notification_id: str,
    mail_domain: str,
    reviewers: Sequence[str],
    agent: str,
    to: Sequence[str],
    cc: Sequence[str],
    bcc: Sequence[str],
    subject: str,
    expires: datetime,
    approve_url: str,
    reject_url: str,
    date: datetime,
    random_hex: Any = None,
) -> bytes:
    """The notification as CRLF bytes: From/Reply-To ``hitl-noreply@M``, To the reviewers,
    ``multipart/alternative`` (text, then HTML), Message-ID ``<msg_…@M>`` — the header rules
    and transfer encodings of mail.md §7.4, through the same helpers as agent mail."""
    sender = f"{SENDER_LOCAL_PART}@{mail_domain}"
    msg = EmailMessage(policy=_POLICY)
    msg.set_raw("From", f"e2a <{sender}>")
    _set_addresses(msg, "To", reviewers)
    msg["Reply-To"] = sender
    _set_subject(msg, notification_subject(agent, subject))
    msg["Date"] = date.astimezone(UTC)
    msg.set_raw("Message-ID", ids.smtp_message_id(notification_id, mail_domain))
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to hitl-noreply
    msg["MIME-Version"] = "1.0"
    args = (agent, to, cc, bcc, subject, expires, approve_url, reject_url)
    text, page = notification_text(*args), notification_html(*args)
    msg.set_content(text, subtype="plain", charset="utf-8", cte=_text_cte(text))
    msg.add_alternative(page, subtype="html", charset="utf-8", cte=_text_cte(page))
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    if random_hex is None:
        import secrets

        random_hex = lambda: secrets.token_hex(16)  # noqa: E731
    _set_boundaries(msg, random_hex)
    return msg.as_bytes()


# ------------------------------------------------------------------------------ service


@dataclass(frozen=True)
class Notice:
    """A composed notification waiting for the hold's transaction."""

    notification_id: str
    held_message_id: str
    agent_id: str
    user_id: str
    sender: str
    subject: str
    to: tuple[str, ...]
    routes: dict[str, str]
    smtp_message_id: str
    composed: bytes  # unsigned: what internal reviewers receive
    signed: bytes | None  # what the relay sends; None when no reviewer is reached by SMTP
    now: datetime


class ReviewerNotifier:
    """Builds and queues notification mail for one e2a process.

    Args:
        db: the database.
        identity: the deployment's mail domain, DKIM keys, route and trace values.
        hitl: ``hitl.*`` (``notify``, ``token_grace``).
        public_url: ``http.public_url`` (the base of the magic links; empty: no notifications).
        master_key: signs internal copies (:func:`e2a.inbound.accept_internal_txn`).
        hmac_secret: the resolved ``signing.hmac_secret`` (approval tokens).
        clock: ``seconds()`` for the Date header and queue times.
        reactor, pool: DKIM signing runs in ``pool`` (default: the reactor's thread pool).
    """

    def __init__(
        self, db: Database, identity: MailIdentity, hitl: HitlConfig, public_url: str, master_key: bytes,
        hmac_secret: str, clock: Any, reactor: Any = None, pool: Any = None, metrics: E2AMetrics | None = None,
    ) -> None:
        # This process's counters (e2a.metrics); None: not counted (tests).
        self.metrics = metrics
        self.db = db
        self.identity = identity
        self.hitl = hitl
        self.public_url = public_url
        self.master_key = master_key
        self.clock = clock
        self.reactor = reactor
        self.pool = pool
        self.tokens = ApprovalTokens(hmac_secret, hitl.token_grace) if hmac_secret else None
        self._warned: set[str] = set()

    def _warn_once(self, reason: str, message: str, **fields: Any) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warn(message, **fields)

    async def prepare(
        self, agent: Any, held_message_id: str, subject: str, to: Sequence[str], cc: Sequence[str],
        bcc: Sequence[str], expires: datetime,
    ) -> Notice | None:
        """The notification for a hold about to be stored, or None when none is due (switched
        off, no public URL, no reviewer with a route) or it could not be built (logged)."""
        try:
            return await self._prepare(agent, held_message_id, subject, to, cc, bcc, expires)
        except Exception:
            log.failure("reviewer notification for {message_id} not built", message_id=held_message_id)
            return None

    async def _prepare(
        self, agent: Any, held_message_id: str, subject: str, to: Sequence[str], cc: Sequence[str],
        bcc: Sequence[str], expires: datetime,
    ) -> Notice | None:
        identity = self.identity
        if not (self.hitl.notify and agent.hitl_notify):
            return None
        if not self.public_url:
            self._warn_once("public_url", "http.public_url is not set: HITL reviewer notifications are not sent")
            return None
        if self.tokens is None or not identity.mail_domain:
            self._warn_once("setup", "no signing.hmac_secret or mail domain: HITL reviewer notifications are not sent")
            return None
        reviewers = list(dict.fromkeys(r.lower() for r in agent.hitl_reviewers))
        if not reviewers:
            user = await accounts.get_user(self.db, agent.user_id)
            reviewers = [user.email.lower()] if user is not None and user.email else []
        internal = await store.internal_addresses(self.db, reviewers)
        can_smtp = identity.can_relay
        routes: dict[str, str] = {}
        for address in reviewers:
            if address in internal:
                routes[address] = "internal"
            elif can_smtp:
                routes[address] = "smtp"
        if not routes:
            self._warn_once(
                "route", "no route for HITL reviewer notifications (no upstream relay or direct MX): dropped"
            )
            return None
        if len(routes) < len(reviewers):
            log.warn("HITL notification for {message_id}: reviewers without a route dropped",
                     message_id=held_message_id)
        now = datetime.fromtimestamp(self.clock.seconds(), UTC)
        mail_domain = identity.mail_domain
        notification_id = ids.new_message_id()
        public_url = self.public_url
        composed = compose_notification(
            notification_id=notification_id,
            mail_domain=mail_domain,
            reviewers=list(routes),
            agent=agent.id,
            to=to,
            cc=cc,
            bcc=bcc,
            subject=subject,
            expires=expires,
            approve_url=approval_url(public_url, "approve", self.tokens.mint(held_message_id, "approve", expires)),
            reject_url=approval_url(public_url, "reject", self.tokens.mint(held_message_id, "reject", expires)),
            date=now,
        )
        signed = await self._sign(composed, now) if "smtp" in routes.values() else None
        return Notice(
            notification_id=notification_id,
            held_message_id=held_message_id,
            agent_id=agent.id,
            user_id=agent.user_id,
            sender=f"{SENDER_LOCAL_PART}@{mail_domain}",
            subject=notification_subject(agent.id, subject),
            to=tuple(routes),
            routes=routes,
            smtp_message_id=ids.smtp_message_id(notification_id, mail_domain),
            composed=composed,
            signed=signed,
            now=now,
        )

    async def _sign(self, composed: bytes, now: datetime) -> bytes:
        """mail.md §7.5 with the key of ``M`` (``dkim.keys`` or ``<data_dir>/dkim/M.pem``);
        no usable key → unsigned, with a warning."""
        identity = self.identity
        domain = identity.mail_domain

        def thd_sign() -> bytes:
            selector, pem = dkimsign.thd_load_deployment_key(identity.data_dir, domain, identity.dkim.keys,
                                                              identity.dkim.selector)
            return dkimsign.thd_dkim_sign(composed, domain, selector, pem, int(now.timestamp()))

        try:
            if self.pool is None or self.reactor is None:
                return await deferToThread(thd_sign)
            return await deferToThreadPool(self.reactor, self.pool, thd_sign)
        except Exception as exc:
            self._warn_once("dkim", "no DKIM key for {domain} ({why}): HITL notifications sent unsigned",
                            domain=domain, why=str(exc))
            return composed

    async def queue_txn(self, txn: Txn, notice: Notice | None) -> None:
        """Queue ``notice`` inside the hold's transaction. A failure rolls back only the
        notification (savepoint) and is logged; the hold commits regardless."""
        if notice is None:
            return
        from e2a.inbound import accept_internal_txn

        try:
            async with store.savepoint_txn(txn, "hitl_notify"):
                await store.insert_notification_txn(
                    txn,
                    notification_id=notice.notification_id,
                    held_message_id=notice.held_message_id,
                    agent_id=notice.agent_id,
                    user_id=notice.user_id,
                    sender=notice.sender,
                    subject=notice.subject,
                    to=notice.to,
                    routes=notice.routes,
                    smtp_message_id=notice.smtp_message_id,
                    composed=notice.signed,
                    now=notice.now,
                )
                for address, route in notice.routes.items():
                    if route == "internal":
                        await accept_internal_txn(
                            txn,
                            composed=notice.composed,
                            sender=notice.sender,
                            delegation="",
                            recipient=address,
                            conversation_id="",
                            master_key=self.master_key,
                            smtp_domain=self.identity.smtp_domain,
                            authserv_id=self.identity.authserv_id,
                            received_at=notice.now,
                        )
                        await metrics_of(self).stored_copy_txn(txn, "internal", address)
                if notice.signed is not None:
                    await txn.notify(CHANNEL_OUTBOUND, notice.notification_id)
        except Exception:
            log.failure("reviewer notification for {message_id} not queued", message_id=notice.held_message_id)
