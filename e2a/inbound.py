"""accept(envelope, raw): verify → strip forged headers and sign → store → notify.

The one path every inbound copy takes — SMTP mail and, later, internal agent-to-agent mail.
All copies of one message and their delivery jobs are written in ONE transaction; the caller
answers 250 only after it returns (mail.md §1.7). Everything that must not happen twice on a
retried transaction (pushes to sockets) is an after-commit hook or a NOTIFY, which PostgreSQL
only delivers on commit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from e2a import ids, maillog
from e2a.abort import AbortSignal
from e2a.delivery.port import InboundDelivery
from e2a.mailauth import authheaders
from e2a.mailauth.verdict import sender_value
from e2a.messageview import MessageView
from e2a.metrics import E2AMetrics, metrics_of
from e2a.smtp.replies import R_NO_RCPT, MessageRejected
from e2a.store import agents as agent_store
from e2a.store import deliveries, messages
from e2a.store.accounts import SecretCache, newest_secret_txn
from e2a.store.database import Database, Txn
from e2a.store.deliveries import ClaimedJob
from e2a.store.events import CHANNEL_DELIVERY, CHANNEL_INBOUND
from e2a.store.models import InboundMessage

log = Logger()


class EnvelopeLike(Protocol):
    # Read-only members, so a frozen dataclass (e2a.smtp.envelope.Envelope) satisfies it.
    @property
    def client_ip(self) -> str: ...
    @property
    def helo(self) -> str: ...
    @property
    def helo_kind(self) -> str: ...  # "EHLO" | "HELO"
    @property
    def tls(self) -> bool: ...
    @property
    def mail_from(self) -> str: ...  # "" for the null reverse-path
    @property
    def recipients(self) -> Sequence[str]: ...  # canonical agent addresses, RCPT order, deduplicated


@dataclass(frozen=True)
class TraceInput:
    """What the trace headers and the signed set need from verification, per message."""

    spf: str  # RFC 8601 result for Authentication-Results
    dkim: list[tuple[str, str, str]]  # (result, d, s) per evaluated signature
    dmarc: str
    from_domain: str | None
    domain_check: str  # "spf=…; dkim=…; dmarc=…"
    verified: bool
    from_address: str | None  # §2.1 valid From address, None when invalid


@dataclass
class _Reservations:
    """The slots one accept reserved (agent per reservation, recorded before any await so a
    failure anywhere releases them), the jobs inserted asking for a lease, and the
    transaction that tells, once committed, which leases PostgreSQL granted."""

    reserved: list[str] = field(default_factory=list)
    jobs: list[ClaimedJob] = field(default_factory=list)
    txn: Txn | None = None


@dataclass
class _Outcome:
    """What the last attempt of the accept transaction would answer (``first_id``) and the id
    of a copy it inserts (``new_id``; None when it inserts none), recorded once its writes are
    queued. The ids are chosen before the INSERT, so :meth:`InboundPipeline._committed` can
    tell the real outcome of a transaction whose own answer was lost (e2a.abort ``probe``)."""

    first_id: str = ""
    new_id: str | None = None


@dataclass(frozen=True)
class StoredCopy:
    delivery_id: str | None  # the webhook job of a cloud agent's copy
    auth_headers: dict[str, str]


class Verifier(Protocol):
    async def verify(
        self, raw: bytes, client_ip: str, helo: str, mail_from: str, *, header_fields: Any = None,
        crlf_only: bool = False,
    ) -> Any: ...


# A header section above this many octets is parsed in a worker thread (address lists are
# pure-Python parsing, bounded per field by e2a.messageview but still ~ms per KiB).
LARGE_HEADER_SECTION = 8 * 1024
# Content above this many octets is hashed (duplicate check) in a worker thread.
LARGE_CONTENT = 1024 * 1024
# At most this many local agents' contexts are remembered per process (InboundPipeline);
# beyond, the least recently used go first.
REMEMBERED_AGENTS = 10_000
# At most this many (agent, Message-ID) pairs of recent copies are kept per process (as
# hashes), so that a resend is checked by the read, not refused by its INSERT
# (InboundPipeline._seen).
SEEN_MESSAGE_IDS = 20_000
# What a local agent's copy needs of the accept's read (the agent and its owner's newest
# secret), as remembered.
_REMEMBERED_KEYS = ("id", "user_id", "agent_mode", "secret_id", "secret")


def _put_newest(entries: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Put ``key`` at the newest end of ``entries`` (insertion order = age), first dropping
    the oldest entries beyond ``limit``: the bounded memories of InboundPipeline."""
    entries.pop(key, None)
    while len(entries) >= limit:
        del entries[next(iter(entries))]
    entries[key] = value


def content_digest(raw: bytes) -> str:
    """SHA-256 (hex) of the DATA content as received, before e2a adds or strips any header:
    a true RFC 1047 resend carries the same bytes, a forged copy with a copied Message-ID does
    not (issue 15.5). Not the signed ``X-E2A-Auth-Body-Hash``: that one covers each copy's
    stored bytes, trace headers included, so it differs per copy and per attempt."""
    return hashlib.sha256(raw).hexdigest()


def _parsed_view(fields: Sequence[authheaders.HeaderField]) -> MessageView:
    """The message's one view with every address field parsed (mail.md §1.7 item 1)."""
    return MessageView.from_fields(fields).parse()


async def _guarded(abort: AbortSignal | None, d: Deferred[Any]) -> Any:
    """Await a step that commits nothing; an abort cancels it (:meth:`AbortSignal.guard`)."""
    if abort is None:
        return await d
    abort.check()
    return await abort.guard(d)


def smtp_protocol(envelope: EnvelopeLike) -> str:
    if envelope.tls:
        return "ESMTPS"
    return "ESMTP" if envelope.helo_kind.upper() == "EHLO" else "SMTP"


class InboundPipeline:
    def __init__(
        self,
        db: Database,
        verifier: Verifier | None,
        master_key: bytes,
        smtp_domain: str,
        authserv_id: str,
        now: Callable[[], datetime] | None = None,
        to_trace: Callable[[Any], TraceInput] | None = None,
        delivery: InboundDelivery | None = None,
        in_thread: Callable[..., Deferred[Any]] | None = None,
        metrics: E2AMetrics | None = None,
    ) -> None:
        # This process's counters (e2a.metrics); None: not counted (tests).
        self.metrics = metrics
        self.db = db
        self.verifier = verifier
        self.master_key = master_key
        self.smtp_domain = smtp_domain
        self.authserv_id = authserv_id
        self.now = now or (lambda: datetime.now(UTC))
        self.to_trace = to_trace or trace_from_verdict
        self._secrets = SecretCache()
        # The one way into webhook delivery (e2a.delivery.port): per-agent backpressure and
        # fresh jobs. None: never wait, every job goes through the queue.
        self.delivery = delivery
        # ``in_thread(fn, *args)``: run a pure function in a worker thread (the mail-auth pool);
        # a large header section is parsed there, not on the reactor (issue 15.3).
        self.in_thread = in_thread
        # recipient → the accept's read of a local agent (_REMEMBERED_KEYS). A copy for that
        # agent is then written without the read: its INSERT checks, on the database's current
        # rows, that the agent and its owner's newest secret are still the remembered ones and
        # that the copy has no duplicate, and computes the conversation
        # (e2a.store.messages.Remembered). When a check fails nothing is written and the accept
        # runs again with the read. The read was one of the two round trips of every accepted
        # message (docs/performance.md).
        self._remembered: dict[str, dict[str, Any]] = {}
        # (recipient, Message-ID) of the copies this process stored or found to be resends
        # lately, oldest first. A copy whose pair is here is checked by the read: a resend
        # refused by its INSERT rolls back the group commit it shares with other mail, and a
        # client repeating one message would otherwise make every repeat do that. Kept as
        # hashes: a collision only sends a copy through the read.
        self._seen: dict[int, None] = {}

    async def accept(self, envelope: EnvelopeLike, raw: bytes) -> str:
        """Store one copy per recipient agent; returns the first copy's ``msg_…`` id.

        While the webhook backlog of one of its recipient agents is above its high-water mark
        (:mod:`e2a.delivery.backpressure`, per agent), the mail first waits — before
        verification and storage, so before the 250 — until that backlog drains or the
        gate's ``max_wait`` passes. Other agents' backlogs never hold it.

        ``envelope.abort`` (set on ``smtp.store_timeout``, :mod:`e2a.abort`) is honoured: the
        waits before the transaction are cancelled, the transaction stops at its next statement
        or has its statement cancelled; this then raises :class:`~e2a.abort.Aborted`, unless
        the commit had already happened — then it returns the id as usual.

        Raises:
            TransientError (and subclasses): nothing was committed; the sender should retry.
            MessageRejected: ``550 5.1.1``, every recipient agent was deleted after RCPT;
                nothing was committed.
        """
        abort: AbortSignal | None = getattr(envelope, "abort", None)
        if abort is not None:
            abort.handled = True
        started = time.perf_counter()  # for the mail-flow log line: end of DATA → commit
        port = self.delivery
        if port is not None and port.holds(envelope.recipients):
            await _guarded(abort, port.wait(envelope.recipients))
        fields, body_offset = authheaders.split_header_section(raw)
        if self.in_thread is not None and body_offset > LARGE_HEADER_SECTION:
            view = await _guarded(abort, self.in_thread(_parsed_view, fields))
        else:
            view = _parsed_view(fields)
        assert self.verifier is not None
        # Hand over the fields split above: the verifier's §2.1 From check then does not split
        # the header section a second time (from_address_of_fields).
        verdict = await _guarded(
            abort,
            Deferred.fromCoroutine(
                self.verifier.verify(
                    raw, envelope.client_ip, envelope.helo, envelope.mail_from, header_fields=fields,
                    crlf_only=getattr(envelope, "crlf_only", False),
                )
            ),
        )
        trace = self.to_trace(verdict)
        if self.in_thread is not None and len(raw) > LARGE_CONTENT:
            digest = await _guarded(abort, self.in_thread(content_digest, raw))
        else:
            digest = content_digest(raw)
        stripped = authheaders.strip_fields(raw, fields, self.authserv_id)
        received_at = self.now()
        # run_batched: the reads (one statement per recipient) go out at once, every write of
        # every copy (messages, delivery jobs, NOTIFYs) in ONE query that PostgreSQL commits
        # as one transaction; this returns only after that commit (mail.md §1.7 item 4).
        # A cloud copy whose agent has a free webhook slot in this process is inserted asking
        # for a lease, which PostgreSQL grants when the agent's slots in every process allow
        # it; a granted job is attempted right after the commit (no NOTIFY, no claim), any
        # other is queued with a NOTIFY (e2a.store.deliveries.insert_job_txn).
        fresh = _Reservations()
        outcome = _Outcome()
        if abort is not None:
            abort.probe = lambda: self._committed(outcome)
        first_id = ""
        try:
            for remember in (True, False):
                try:
                    first_id = await self.db.run_batched(
                        "accept_inbound", self._accept_txn, envelope, view, stripped, trace, received_at, fresh,
                        abort=abort, outcome=outcome, content_sha256=digest, remember=remember,
                    )
                    break
                except Exception as e:
                    if not (remember and messages.remembered_context_stale(e)):
                        raise
                    # A remembered context no longer held, or the copy is a resend: nothing
                    # was written. The read decides, as for any agent not remembered.
                    for recipient in envelope.recipients:
                        self._remembered.pop(recipient, None)
        except BaseException:
            self._release(fresh)
            raise
        self._saw(envelope.recipients, view.message_id_token)
        if not first_id:
            # Every recipient agent was deleted after its RCPT was accepted (the RCPT check may
            # also have remembered it: e2a.smtp.recipients). Nothing was written; the answer
            # is the one RCPT now gives.
            raise MessageRejected(R_NO_RCPT)
        maillog.accepted(
            message_id=first_id, client_ip=envelope.client_ip, mail_from=envelope.mail_from,
            agents=envelope.recipients, domain_check=trace.domain_check, size=len(raw),
            ms=(time.perf_counter() - started) * 1000,
        )
        assert port is not None or not fresh.jobs
        for job in fresh.jobs:
            assert port is not None and fresh.txn is not None
            if deliveries.lease_granted(fresh.txn, job.id):
                port.start_fresh(job)
            else:
                # Another process's leases filled the agent's slots (or held its lock) after
                # our count: the job was committed queued, with a NOTIFY; the slot goes back.
                port.release_fresh(job.agent_id)
        return first_id

    async def _committed(self, outcome: _Outcome) -> str | None:
        """The id to answer 250 with when the accept transaction committed although its
        caller saw it fail or gave up on it; None when it did not (or wrote nothing)."""
        if outcome.new_id is None:
            return None
        return outcome.first_id if await messages.inbound_exists(self.db, outcome.new_id) else None

    def _release(self, fresh: _Reservations) -> None:
        """Give back the slots reserved by an attempt of the accept transaction that did not
        commit (it failed, or run_batched is running it again)."""
        if self.delivery is not None:
            for agent_id in fresh.reserved:
                self.delivery.release_fresh(agent_id)
        fresh.reserved.clear()
        fresh.jobs.clear()

    def forget_agents(self, _event: str = "") -> None:
        """Forget every remembered agent context: the next copy to each agent reads again. A
        revocation (``CHANNEL_REVOKE``: an agent or an account deleted) calls it, so deleted
        agents are not kept until they are pushed out; nothing depends on it for correctness,
        since every write checks what it remembered."""
        self._remembered.clear()

    def _saw(self, recipients: Sequence[str], message_id: str) -> None:
        """Note the copies of a message this process stored or found to be resends (``_seen``)."""
        if not message_id:
            return  # without a Message-ID a copy is never a resend
        for recipient in recipients:
            _put_newest(self._seen, hash((recipient, message_id)), None, SEEN_MESSAGE_IDS)

    def _remember(self, recipient: str, agent: dict[str, Any] | None) -> None:
        """Keep the read of a local agent with a signing secret for the next copy to it (see
        ``_remembered``); forget any other. A cloud agent's copy keeps the read: its fresh
        hand-on needs the agent's leases in flight and the conversation before the commit."""
        if agent is None or agent["agent_mode"] != "local" or agent["secret_id"] is None:
            self._remembered.pop(recipient, None)
            return
        _put_newest(self._remembered, recipient, {key: agent[key] for key in _REMEMBERED_KEYS}, REMEMBERED_AGENTS)

    async def _accept_txn(
        self,
        txn: Txn,
        envelope: EnvelopeLike,
        view: MessageView,
        stripped: bytes,
        trace: TraceInput,
        received_at: datetime,
        fresh: _Reservations,
        *,
        outcome: _Outcome | None = None,
        content_sha256: str | None = None,
        remember: bool = False,
    ) -> str:
        self._release(fresh)  # a retried transaction starts afresh
        fresh.txn = txn
        if outcome is not None:
            outcome.first_id, outcome.new_id = "", None
        first_id = ""
        cloud_agents: list[str] = []
        candidates = view.thread_candidates()
        sender = sender_value(trace.from_address, envelope.mail_from)
        # A resend is suppressed only when it carries the same verdict from the same client and
        # the same bytes: a forged copy that arrived first must not stand in for the genuine
        # one, not even from the same client with the same verdict (issue 15.5).
        verdict = messages.Verdict(
            envelope.client_ip, trace.domain_check, "true" if trace.verified else "false", sender, content_sha256
        )
        new_id: str | None = None
        for recipient in envelope.recipients:
            remembered = None
            if remember and hash((recipient, view.message_id_token)) not in self._seen:
                remembered = self._remembered.get(recipient)
            if remembered is not None:
                _put_newest(self._remembered, recipient, remembered, REMEMBERED_AGENTS)  # most recently used
                agent = dict(remembered, conversation_id="")  # the INSERT computes it
                checked = messages.Remembered(
                    remembered["secret_id"], verdict.domain_check, verdict.verified, candidates
                )
            else:
                checked = None
                read = await messages.inbound_context_txn(
                    txn, recipient, view.message_id_token, envelope.mail_from, candidates, received_at, verdict,
                    # without delivery no job is leased here, so the count is not needed
                    in_flight_cap=self.delivery.max_per_agent if self.delivery is not None else 0,
                )
                self._remember(recipient, read)
                if read is None:
                    continue  # deleted between RCPT and end of data: nothing to deliver to
                agent = read
                duplicate = agent["duplicate_id"]
                if duplicate is not None:
                    first_id = first_id or duplicate
                    continue
            message_id = ids.new_message_id()
            stored = (
                authheaders.trace_headers(
                    authserv_id=self.authserv_id,
                    helo=envelope.helo,
                    client_ip=envelope.client_ip,
                    mail_from=envelope.mail_from,
                    spf=trace.spf,
                    dkim=trace.dkim,
                    dmarc=trace.dmarc,
                    from_domain=trace.from_domain,
                    smtp_domain=self.smtp_domain,
                    protocol=smtp_protocol(envelope),
                    message_id=message_id,
                    recipient=agent["id"],
                    date=received_at,
                )
                + stripped
            )
            if agent["secret_id"] is None:
                raise RuntimeError(f"user {agent['user_id']} has no signing secret")
            secret = self._secrets.decrypt(self.master_key, agent["secret_id"], agent["secret"])
            fields = authheaders.build_fields(
                verified=trace.verified,
                sender=sender,
                entity_type="human",
                domain_check=trace.domain_check,
                delegation="",
                signed_at=received_at,
                message_id=message_id,
                stored=stored,
            )
            lease = None
            if self.delivery is not None and agent["agent_mode"] == "cloud" and agent["webhook_status"] != "disabled":
                lease_until = self.delivery.reserve_fresh(agent["id"], agent["in_flight"], agent["user_id"])
                if lease_until is not None:
                    fresh.reserved.append(agent["id"])  # before any await: released on failure
                    lease = deliveries.FreshLease(lease_until, received_at, self.delivery.max_per_agent)
            display_from = view.display_sender()
            copy = await store_copy_txn(
                txn,
                agent=agent,
                view=view,
                fields=fields,
                secret=secret,
                stored=stored,
                route="smtp",
                display_from=display_from,
                envelope_from=envelope.mail_from,
                client_ip=envelope.client_ip,
                conversation_id=agent["conversation_id"],
                received_at=received_at,
                notify_delivery=False,
                lease=lease,
                content_sha256=content_sha256,
                remembered=checked,
            )
            await metrics_of(self).stored_copy_txn(txn, "smtp", agent["id"])
            if lease is not None:
                assert copy.delivery_id is not None
                fresh.jobs.append(
                    ClaimedJob(
                        copy.delivery_id,
                        message_id,
                        agent["id"],
                        0,
                        _attempt_row(agent, message_id, view, display_from, stored, copy, received_at),
                        lease.until,
                    )
                )
            elif agent["agent_mode"] == "cloud":
                cloud_agents.append(agent["id"])
            first_id = first_id or message_id
            new_id = new_id or message_id
        if cloud_agents:
            # One NOTIFY per message. Naming the agent (when there is exactly one) lets a
            # worker whose slots for that agent are all busy skip the claim: each busy slot
            # leases the agent's next job itself when it finishes (e2a.delivery.worker).
            await txn.notify(CHANNEL_DELIVERY, cloud_agents[0] if len(cloud_agents) == 1 else "")
        if outcome is not None:
            outcome.first_id, outcome.new_id = first_id, new_id
        return first_id


async def store_copy_txn(
    txn: Txn,
    *,
    agent: dict[str, Any],
    view: MessageView,
    fields: authheaders.AuthFields,
    secret: str,
    stored: bytes,
    route: str,
    display_from: str,
    envelope_from: str,
    client_ip: str,
    conversation_id: str,
    received_at: datetime,
    notify_delivery: bool,
    lease: deliveries.FreshLease | None = None,
    content_sha256: str | None = None,
    remembered: messages.Remembered | None = None,
) -> StoredCopy:
    """Insert one signed inbound copy and announce it: a delivery job for a cloud agent (the
    NOTIFY on the delivery channel is sent here or, for a batch, once by the caller; a job
    inserted asking for ``lease`` is this process's to attempt if the lease is granted, and
    is announced by the store when it is not: :func:`e2a.store.deliveries.insert_job_txn`), a
    per-message NOTIFY for a local agent's WebSockets. SMTP and internal mail share this.
    ``content_sha256`` (:func:`content_digest`) is what a later resend must match to be
    suppressed as its duplicate; None (internal mail) never matches. ``remembered``: the copy
    was prepared without the accept's read, and its INSERT checks that context
    (:class:`e2a.store.messages.Remembered`)."""
    headers = authheaders.auth_headers(fields, secret)
    await messages.insert_inbound_txn(
        txn,
        InboundMessage(
            id=fields.message_id,
            agent_id=agent["id"],
            user_id=agent["user_id"],
            status="unread",
            route=route,
            sender=fields.sender,
            display_from=display_from,
            recipient=agent["id"],
            envelope_from=envelope_from,
            client_ip=client_ip,
            subject=view.subject,
            to_addrs=view.to_addresses(),
            cc_addrs=view.cc_addresses(),
            email_message_id=view.message_id_token,
            in_reply_to=view.in_reply_to,
            references_ids=view.references,
            conversation_id=conversation_id,
            auth_headers=headers,
            raw_message=stored,
            created_at=received_at,
        ),
        content_sha256=content_sha256,
        remembered=remembered,
    )
    delivery_id = None
    if agent["agent_mode"] == "cloud":
        delivery_id = await enqueue_delivery_txn(txn, fields.message_id, agent, lease)
        if notify_delivery and lease is None:
            await txn.notify(CHANNEL_DELIVERY, "")
    else:
        await txn.notify(CHANNEL_INBOUND, f"{agent['id']}\t{fields.message_id}")
    return StoredCopy(delivery_id, headers)


def _attempt_row(
    agent: dict[str, Any],
    message_id: str,
    view: MessageView,
    display_from: str,
    stored: bytes,
    copy: StoredCopy,
    received_at: datetime,
) -> dict[str, Any]:
    """What a claim would read for this copy's first attempt (``deliveries._ATTEMPT_COLUMNS``),
    from what the accept already holds: the attempt needs no read of its own."""
    return {
        "id": copy.delivery_id,
        "message_id": message_id,
        "agent_id": agent["id"],
        "attempts": 0,
        "m_id": message_id,
        "conversation_id": agent["conversation_id"],
        "display_from": display_from,
        "to_addrs": view.to_addresses(),
        "cc_addrs": view.cc_addresses(),
        "recipient": agent["id"],
        "raw_message": stored,
        "auth_headers": copy.auth_headers,
        "created_at": received_at,
        "a_id": agent["id"],
        "agent_mode": agent["agent_mode"],
        "webhook_url": agent["webhook_url"],
        "webhook_status": agent["webhook_status"],
        "user_id": agent["user_id"],
        "secret_ids": agent["secret_ids"],
        "secrets": agent["secrets"],
    }


async def enqueue_delivery_txn(
    txn: Txn, message_id: str, agent: dict[str, Any], lease: deliveries.FreshLease | None = None
) -> str:
    """A webhook delivery job: pending and due now (asking for ``lease`` for this process's
    worker when given), or paused while the webhook is disabled."""
    delivery_id = ids.new_delivery_id()
    await deliveries.insert_job_txn(
        txn,
        delivery_id,
        message_id,
        agent["id"],
        agent["webhook_url"],
        paused=agent["webhook_status"] == "disabled",
        lease=lease,
    )
    return delivery_id


def trace_from_verdict(verdict: Any) -> TraceInput:
    """Adapt :class:`e2a.mailauth.verdict.Verdict` to what signing and trace headers need."""
    return TraceInput(
        spf=verdict.spf,
        dkim=[(s.result, s.domain, s.selector) for s in verdict.dkim_signatures],
        dmarc=verdict.dmarc,
        from_domain=verdict.from_domain,
        domain_check=verdict.domain_check(),
        verified=verdict.verified,
        from_address=verdict.from_address,
    )


INTERNAL_DOMAIN_CHECK = "spf=none; dkim=none; dmarc=none"


async def accept_internal_txn(
    txn: Txn,
    *,
    composed: bytes,
    sender: str,
    delegation: str,
    recipient: str,
    conversation_id: str,
    master_key: bytes,
    smtp_domain: str,
    authserv_id: str,
    received_at: datetime,
) -> str | None:
    """Store one internal-route copy (mail.md §7.3) inside the sender's transaction.

    The copy goes through the same strip → trace → sign → store steps as SMTP mail, with the
    internal values of §2.5: verified, entity type ``agent``, the delegation header (absent for
    the test email) and the sender's own conversation id. Returns the new ``msg_…`` id, or None
    when the recipient agent no longer exists.
    """
    found = await agent_store.fetch_agent_txn(txn, None, recipient)
    if found is None:
        return None
    agent = {
        "id": found.id,
        "user_id": found.user_id,
        "agent_mode": found.agent_mode,
        "webhook_url": found.webhook_url,
        "webhook_status": found.webhook_status,
    }
    fields, _ = authheaders.split_header_section(composed)
    view = MessageView.from_fields(fields)
    stripped = authheaders.strip_fields(composed, fields, authserv_id)
    message_id = ids.new_message_id()
    stored = (
        authheaders.internal_trace_headers(
            authserv_id=authserv_id,
            sender=sender,
            smtp_domain=smtp_domain,
            message_id=message_id,
            recipient=agent["id"],
            date=received_at,
        )
        + stripped
    )
    secret = await newest_secret_txn(txn, master_key, agent["user_id"])
    signed = authheaders.build_fields(
        verified=True,
        sender=sender,
        entity_type="agent",
        domain_check=INTERNAL_DOMAIN_CHECK,
        delegation=delegation,
        signed_at=received_at,
        message_id=message_id,
        stored=stored,
    )
    await store_copy_txn(
        txn,
        agent=agent,
        view=view,
        fields=signed,
        secret=secret,
        stored=stored,
        route="internal",
        display_from=view.display_sender() or sender,
        envelope_from=sender,
        client_ip="",
        conversation_id=conversation_id,
        received_at=received_at,
        notify_delivery=True,
    )
    return message_id
