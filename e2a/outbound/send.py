"""SendService: send, reply and test mail from an agent (api.md §4.6, §5.3, §6; mail.md §7).

The request is validated and routed completely before anything is stored (changed in the spec:
held mail used to be validated only at approval). Then, in ONE transaction: the outbound
record, one ``outbound_recipients`` row per envelope recipient, and — for recipients that are
agents on this deployment — their inbound copies through the inbound pipeline. 200 therefore
means "durably queued"; the relay worker sends SMTP recipients afterwards.

HITL: when the agent has ``hitl_enabled`` the validated request is stored as a
``pending_approval`` hold instead (202). Release of a hold re-enters :meth:`SendService._release`
with the stored content, which is why composition happens at release, never at hold time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger

from e2a import ids, maillog
from e2a.config import OutboundConfig, RateLimitConfig
from e2a.errors import BadRequest, E2AError, Forbidden, NotFound
from e2a.inbound import accept_internal_txn
from e2a.mailauth import dkimkeys
from e2a.mailsyntax.addresses import lookup_key
from e2a.metrics import E2AMetrics, metrics_of
from e2a.outbound import compose, dkimsign
from e2a.outbound.identity import MailIdentity
from e2a.outbound.notify import ReviewerNotifier
from e2a.store import agents as agents_store
from e2a.store import approvals as approvals_store
from e2a.store import domains as domains_store
from e2a.store import outbound as outbound_store
from e2a.store import ratelimits
from e2a.store.database import Database, Txn
from e2a.store.events import CHANNEL_OUTBOUND
from e2a.store.models import Agent, HeldAttachment, NewOutboundMessage
from e2a.timefmt import ts_frac

log = Logger()


class OutboundNotConfigured(E2AError):
    status = 503
    code = "outbound_not_configured"
    default_message = "a recipient needs SMTP delivery but no upstream relay or direct MX is configured"


@dataclass(frozen=True)
class Draft:
    """A validated, routed outbound message, ready to hold or release."""

    agent: Agent
    type: str  # send | reply | test
    recipients: compose.Recipients
    routes: dict[str, str]  # address → internal | smtp
    content: compose.Content
    in_reply_to: str = ""
    references: str = ""
    replied_message_id: str = ""  # email_message_id of the replied-to message

    @property
    def method(self) -> str:
        return "internal" if all(r == "internal" for r in self.routes.values()) else "smtp"


@dataclass(frozen=True)
class PreparedRelease:
    """A draft composed (and signed when it leaves by SMTP) for release as ``message_id``."""

    message_id: str
    smtp_message_id: str
    composed: bytes  # unsigned: the internal copies
    smtp_bytes: bytes | None  # DKIM-signed: the relay queue; None when every recipient is internal
    now: datetime

    @property
    def delivery_status(self) -> str:
        return "queued" if self.smtp_bytes else "sent"


def log_internal_outcomes(draft: Draft, prepared: PreparedRelease) -> None:
    """After a release committed: one ``outbound.recipient`` line per recipient on this e2a's own
    agents (delivered inside that transaction, so ``sent`` at attempt 1). Called after the commit,
    not in the transaction, because a retried transaction would log twice; SMTP recipients get
    their lines from the relay worker (docs/logging.md)."""
    for address, route in draft.routes.items():
        if route == "internal":
            maillog.outbound_recipient(
                message_id=prepared.message_id, recipient=address, status="sent", attempt=1, reply="internal delivery"
            )


def release_result(draft: Draft, prepared: PreparedRelease) -> dict[str, Any]:
    """The 200 body of a release (api.md §6.1; §7.3 adds ``edited``)."""
    return {
        "status": "sent",
        "message_id": prepared.message_id,
        "smtp_message_id": prepared.smtp_message_id,
        "method": draft.method,
        "delivery_status": prepared.delivery_status,
    }


class SendService:
    def __init__(
        self, db: Database, identity: MailIdentity, outbound: OutboundConfig, rate_limits: RateLimitConfig,
        master_key: bytes, clock: Any, reactor: Any, pool: Any,
        *, notifier: ReviewerNotifier | None = None, metrics: E2AMetrics | None = None,
    ) -> None:
        # Reviewer mail for held messages (e2a.outbound.notify); None = no notifications.
        self.notifier = notifier
        # This process's counters (e2a.metrics); None: not counted (tests).
        self.metrics = metrics
        self.db = db
        self.identity = identity
        self.outbound = outbound  # ``outbound.max_recipients`` (HoldReview)
        self.rate_limits = rate_limits  # ``rate_limits.send_per_minute``
        self.master_key = master_key
        self.clock = clock
        self.reactor = reactor
        self.pool = pool

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    # ---- entry points (called by the routes after authentication) -------------------------

    async def resolve_sender(self, principal: Any, from_value: str | None) -> Agent:
        """§6.1 #5: ``from`` must be an agent of the user (and the agent key's agent)."""
        if from_value:
            key = lookup_key(from_value)
            if key is None:  # as the API's path rule: a control character names no agent
                raise NotFound("agent not found", code="agent_not_found")
            agent = await agents_store.get_agent(self.db, principal.user_id, key)
            if agent is None or not principal.may_see_agent(agent.id):
                raise BadRequest("from is not an agent this key may send as", code="invalid_from")
            return agent
        if not principal.is_user_scoped:
            agent = await agents_store.get_agent(self.db, principal.user_id, principal.agent_id or "")
            if agent is None:
                raise BadRequest("from is not an agent this key may send as", code="invalid_from")
            return agent
        agents = await agents_store.list_agents(self.db, principal.user_id)
        if len(agents) != 1:
            raise BadRequest("from is required: the user does not have exactly one agent", code="ambiguous_sender")
        return agents[0]

    async def check_send_allowed(self, agent: Agent) -> None:
        """Send limit (per agent, all processes), then the agent's domain must be verified."""
        await ratelimits.hit(
            self.db, f"send:{agent.id.lower()}", self.rate_limits.send_per_minute, 60, self.clock.seconds()
        )
        if not agent.domain_verified:
            raise Forbidden("the agent's domain is not verified", code="domain_not_verified")

    async def route(self, recipients: Sequence[str]) -> dict[str, str]:
        """mail.md §7.3: agents on this deployment are internal; everything else needs SMTP."""
        routes: dict[str, str] = {}
        internal = await agents_store.existing_agent_keys(self.db, list(recipients))
        for address in recipients:
            routes[address] = "internal" if address.lower() in internal else "smtp"
        if "smtp" in routes.values() and not self.identity.can_relay:
            raise OutboundNotConfigured()
        return routes

    async def submit(self, draft: Draft) -> tuple[int, dict[str, Any]]:
        """Hold (HITL, 202) or release (200) a validated draft."""
        if draft.agent.hitl_enabled:
            return 202, await self._hold(draft)
        return 200, await self._release(draft)

    # ---- hold ------------------------------------------------------------------------------

    async def _hold(self, draft: Draft) -> dict[str, Any]:
        now = self.now()
        expires = now + timedelta(seconds=draft.agent.hitl_ttl_seconds)
        message_id = ids.new_message_id()
        c = draft.content
        notice = None
        if self.notifier is not None:  # mail.md §8.7: composed and signed before the transaction
            r = draft.recipients
            notice = await self.notifier.prepare(draft.agent, message_id, c.subject, r.to, r.cc, r.bcc, expires)

        async def _hold_txn(txn: Txn) -> None:
            await _insert_outbound_txn(
                txn,
                draft,
                message_id=message_id,
                status="pending_approval",
                smtp_message_id="",
                composed=None,
                created_at=now,
                extra={
                    "body_text": c.body_text,
                    "body_html": c.body_html,
                    "attachments": tuple(
                        HeldAttachment(a.filename, a.content_type, _b64(a.data)) for a in c.attachments
                    ),
                    "approval_expires_at": expires,
                    "hitl_expiration_action": draft.agent.hitl_expiration_action,
                    "method": "",
                    "delivery_status": "",
                },
            )
            await approvals_store.record_hold_txn(txn, message_id)
            if notice is not None:
                await self.notifier.queue_txn(txn, notice)  # never fails the hold

        await self.db.run("hold_outbound", _hold_txn)
        return {"status": "pending_approval", "message_id": message_id, "approval_expires_at": ts_frac(expires)}

    # ---- release ---------------------------------------------------------------------------

    async def _release(self, draft: Draft) -> dict[str, Any]:
        now = self.now()
        message_id = ids.new_message_id()
        prepared = await self.prepare_release(draft, message_id, now)

        async def _release_txn(txn: Txn) -> None:
            await _insert_outbound_txn(
                txn,
                draft,
                message_id=message_id,
                status="sent",
                smtp_message_id=prepared.smtp_message_id,
                composed=prepared.smtp_bytes,
                created_at=now,
                extra={"method": draft.method, "delivery_status": prepared.delivery_status},
            )
            await self.release_jobs_txn(txn, draft, prepared)

        await self.db.run("release_outbound", _release_txn)
        log_internal_outcomes(draft, prepared)
        return release_result(draft, prepared)

    async def prepare_release(self, draft: Draft, message_id: str, now: datetime) -> PreparedRelease:
        """Compose (mail.md §7.4) and, for SMTP, DKIM-sign (§7.5) ``draft`` as ``message_id``.

        Done before the release transaction (signing runs in a thread), so that transaction
        only writes. The approval of a hold passes the held message's own id, keeping its
        Message-ID ``<msg_…@M>``.
        """
        c = draft.content
        composed = compose.compose_message(
            message_id=message_id,
            mail_domain=self.identity.mail_domain,
            agent_address=draft.agent.id,
            agent_name=draft.agent.name,
            to=draft.recipients.to,
            cc=draft.recipients.cc,
            subject=c.subject,
            body_text=c.body_text,
            body_html=c.body_html,
            attachments=c.attachments,
            conversation_id=c.conversation_id,
            in_reply_to=draft.in_reply_to,
            references=draft.references,
            date=now,
            test_email=draft.type == "test",
        )
        smtp_bytes = None
        if draft.method == "smtp":
            smtp_bytes = await self._dkim_sign(composed, draft, now)
        return PreparedRelease(
            message_id, ids.smtp_message_id(message_id, self.identity.mail_domain), composed, smtp_bytes, now
        )

    async def release_jobs_txn(self, txn: Txn, draft: Draft, prepared: PreparedRelease) -> None:
        """Inside the release transaction: one ``outbound_recipients`` row per envelope recipient,
        the internal copies through the inbound pipeline, and the relay worker's wake-up."""
        mail_domain = self.identity.mail_domain
        message_id, now = prepared.message_id, prepared.now
        if draft.type == "test":
            sender, delegation = f"noreply@{mail_domain}", ""
        else:
            sender, delegation = draft.agent.id, f"agent={draft.agent.id};human={draft.agent.user_id}"
        for kind, addresses in (("to", draft.recipients.to), ("cc", draft.recipients.cc), ("bcc", draft.recipients.bcc)):
            for address in addresses:
                route = draft.routes[address]
                await outbound_store.insert_recipient_txn(txn, message_id, address, kind, route, now)
        for address in (a for a, r in draft.routes.items() if r == "internal"):
            await accept_internal_txn(
                txn,
                composed=prepared.composed,
                sender=sender,
                delegation=delegation,
                recipient=address,
                conversation_id=draft.content.conversation_id,
                master_key=self.master_key,
                smtp_domain=self.identity.smtp_domain,
                authserv_id=self.identity.authserv_id,
                received_at=now,
            )
            await metrics_of(self).internal_copy_txn(txn, address)
        await metrics_of(self).released_txn(txn, draft.agent.id)
        if prepared.smtp_bytes:
            await txn.notify(CHANNEL_OUTBOUND, message_id)

    async def _dkim_sign(self, composed: bytes, draft: Draft, now: datetime) -> bytes:
        """mail.md §7.5: sign with the From domain's key; no key → unsigned, with a warning."""
        domain = draft.agent.domain
        key = await domains_store.get_signing_key(self.db, domain)
        identity = self.identity

        def thd_sign() -> bytes | None:
            if key is not None and not key.is_shared and key.dkim_private_key:
                selector = key.dkim_selector
                pem = dkimkeys.open_private_key(self.master_key, key.dkim_private_key, domain)
            elif domain in (identity.shared_domain, identity.mail_domain):
                selector, pem = dkimsign.thd_load_deployment_key(
                    identity.data_dir, domain, identity.dkim.keys, identity.dkim.selector
                )
            else:
                return None
            return dkimsign.thd_dkim_sign(composed, domain, selector, pem, int(now.timestamp()))

        if self.pool is None:
            signed = await deferToThread(thd_sign)
        else:
            signed = await deferToThreadPool(self.reactor, self.pool, thd_sign)
        if signed is None:
            log.warn("no DKIM key for {domain}: sending unsigned", domain=domain)
            return composed
        return signed


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


async def _insert_outbound_txn(
    txn: Txn,
    draft: Draft,
    *,
    message_id: str,
    status: str,
    smtp_message_id: str,
    composed: bytes | None,
    created_at: datetime,
    extra: dict[str, Any],
) -> None:
    message = NewOutboundMessage(
        id=message_id,
        agent_id=draft.agent.id,
        user_id=draft.agent.user_id,
        type=draft.type,
        status=status,
        sender=draft.agent.id,
        subject=draft.content.subject,
        to_addrs=tuple(draft.recipients.to),
        cc_addrs=tuple(draft.recipients.cc),
        bcc_addrs=tuple(draft.recipients.bcc),
        email_message_id=draft.replied_message_id,
        in_reply_to=draft.in_reply_to,
        references_ids=draft.references,
        smtp_message_id=smtp_message_id,
        conversation_id=draft.content.conversation_id,
        composed=composed,
        created_at=created_at,
        **extra,
    )
    await outbound_store.insert_message_txn(txn, message)


def not_found_message() -> NotFound:
    return NotFound("message not found", code="message_not_found")
