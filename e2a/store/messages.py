"""Messages: inbound copies, outbound records, the inbox, and conversation-id lookup.

Inbound rows are written only by :mod:`e2a.inbound` inside its one transaction; this module
holds the SQL so that the lookup rules (threading, duplicates, pagination) live in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from e2a.store.accounts import MAX_WEBHOOK_SECRETS, NEWEST_SECRETS_LATERAL
from e2a.store.database import Database, Prepared, Txn, octets_params, octets_sql
from e2a.store.models import InboundMessage, InboundSummary, ReplySource

# RFC 1047 duplicate suppression: a sender that lost our reply to its final dot resends the
# same message; within this window the same Message-ID from the same MAIL FROM to the same
# agent, from the same client IP, with the same verdict (domain check, verified, sender) and
# the same received content (SHA-256 of the DATA bytes) is answered 250 with the first copy's
# id and not stored twice. A copy whose verdict, client or content differs is stored: else a
# forged copy sent first would stand in for the genuine one (issue 15.5, docs/decisions.md).
DUPLICATE_WINDOW_SECONDS = 3600


# Every column of the stored inbound message (models.InboundMessage), in field order.
INBOUND_COLUMNS = ", ".join(InboundMessage.__dataclass_fields__)
# The same without the stored bytes: list reads (``raw_message`` comes back as b"").
INBOUND_LIST_COLUMNS = INBOUND_COLUMNS.replace("raw_message", "NULL AS raw_message")


# One inbound message of one agent, by id: the rows of ``FROM`` for every read and write of
# a single message the API and the delivery make (placeholders ``%(id)s``, ``%(agent)s``).
# The primary key finds the row and the agent and direction are checked on it: the id is
# fenced (``OFFSET 0``: no condition is pushed into it) because, offered the agent's id too,
# PostgreSQL without statistics (a new or restored database) served it from the inbox index
# and touched 37 to 54 pages of the agent's history for one row (docs/decisions.md).
INBOUND_BY_ID = (
    "(SELECT * FROM messages WHERE id = %(id)s OFFSET 0) one"
    " WHERE one.agent_id = %(agent)s AND one.direction = 'inbound'"
)


def inbound_message(row: dict[str, Any]) -> InboundMessage:
    """A messages row (:data:`INBOUND_COLUMNS`) as the model."""
    raw = row["raw_message"]
    return InboundMessage(
        **{
            **row,
            "auth_headers": row["auth_headers"] or {},
            "raw_message": bytes(raw) if raw is not None else b"",
        }
    )


# Before InboundMessage there were several shapes of one stored message; the name stays for callers.
InboundRecord = InboundMessage


# Each lookup below reads the messages of one agent by the columns of one index, and is fenced
# (``OFFSET 0``) so that only that index's columns are inside the fence; every other condition
# filters the few rows it returns. Without the fence the planner is free to serve the agent id
# from ``messages_inbox_idx`` or ``messages_agent_created_idx`` instead, and did so without
# statistics (a new installation) and in the generic plan of the prepared statement even with
# them: then every accept read all of the agent's recent messages, 9 ms per message at 9,000
# messages in a benchmark minute, growing with the inbox. Same rows, same order.

_DUPLICATE_FILTER = (
    "direction = 'inbound' AND envelope_from = {sender} AND created_at > now() - make_interval(secs => {window})"
    " AND client_ip = {ip} AND auth_headers->>'X-E2A-Auth-Domain-Check' = {check}"
    " AND auth_headers->>'X-E2A-Auth-Verified' = {verified} AND auth_headers->>'X-E2A-Auth-Sender' = {auth_sender}"
    " AND content_sha256 = {sha}"
)


def _duplicate_select(*, agent: str, mid: str, **placeholders: str) -> str:
    """The oldest duplicate's id (only called with a non-empty Message-ID).

    Inside the fence only ``messages_thread_inbound_idx``'s columns (agent + Message-ID;
    ``email_message_id <> ''`` is implied by the equality and matches the partial index).
    """
    rest = _DUPLICATE_FILTER.format(**placeholders)
    return (
        "SELECT id FROM (SELECT id, created_at, direction, envelope_from, client_ip, auth_headers, content_sha256"
        f" FROM messages WHERE agent_id = {agent} AND email_message_id = {mid} AND email_message_id <> ''"
        f" OFFSET 0) dup WHERE {rest} ORDER BY created_at LIMIT 1"
    )


#: mail.md §6 item 2: the message a reply refers to is one of the agent's inbound messages by
#: its Message-ID, or one of its outbound ones by the Message-ID e2a wrote or the id the relay
#: reported (or, for a relay that reports a bare queue id, that id with a domain added).
_CONVERSATION_ARMS = (
    ("email_message_id", "{c}", "inbound", ""),
    ("smtp_message_id", "{c}", "outbound", ""),
    ("provider_message_id", "{c}", "outbound", ""),
    ("provider_message_id", "{bases}", "outbound", " AND position('@' in provider_message_id) = 0"),
)


def _conversation_select(*, agent: str, c: str, bases: str) -> str:
    """The conversation id of the newest of the agent's messages a reply refers to.

    One arm per thread index (``messages_thread_*_idx``: agent + that id), each looking up the
    candidates one at a time by equality on both columns: with ``= ANY(array)`` and no
    statistics, the planner served the agent id alone from another index and read the agent's
    whole history.
    """
    arms = [
        f"SELECT m.conversation_id, m.created_at FROM unnest({ids.format(c=c, bases=bases)}) AS cand(v),"
        f" LATERAL (SELECT conversation_id, created_at, direction FROM messages"
        f" WHERE agent_id = {agent} AND {column} = cand.v AND {column} <> ''{extra} OFFSET 0) m"
        f" WHERE m.direction = '{direction}' AND m.conversation_id <> ''"
        for column, ids, direction, extra in _CONVERSATION_ARMS
    ]
    return "SELECT conversation_id FROM (" + " UNION ALL ".join(arms) + ") arms ORDER BY created_at DESC LIMIT 1"


@dataclass(frozen=True)
class Verdict:
    """What a copy must share with a stored one to be its duplicate, besides the envelope."""

    client_ip: str
    domain_check: str  # X-E2A-Auth-Domain-Check
    verified: str  # X-E2A-Auth-Verified ("true" / "false")
    sender: str  # X-E2A-Auth-Sender
    content_sha256: str | None = None  # the received DATA content (e2a.inbound.content_digest); None never matches


async def find_duplicate_txn(
    txn: Txn, agent_id: str, email_message_id: str, envelope_from: str, verdict: Verdict
) -> str | None:
    if not email_message_id:
        return None
    return await txn.fetchval(
        _duplicate_select(
            agent="%s", mid="%s", sender="%s", window="%s", ip="%s", check="%s", verified="%s", auth_sender="%s",
            sha="%s",
        ),
        (agent_id, email_message_id, envelope_from, DUPLICATE_WINDOW_SECONDS,
         verdict.client_ip, verdict.domain_check, verdict.verified, verdict.sender, verdict.content_sha256),
    )


_INBOUND_CONTEXT = Prepared(
    "e2a_inbound_context",
    "SELECT a.id, a.user_id, a.agent_mode, a.webhook_url, a.webhook_status,"
    " s.secret_ids[1] AS secret_id, s.secrets[1] AS secret, s.secret_ids, s.secrets,"
    # The agent's webhook attempts in flight in every process (leases), for the hand-off of a
    # fresh job to this process's worker (e2a.inbound): same count as the claim's, read in lease
    # order and at most ``in_flight_cap`` of them, an order only ``deliveries_leased_idx`` gives
    # (as a plain count, a plan made on a new installation's few rows read the agent's whole
    # backlog through ``deliveries_pending_agent_idx``; schema/0011).
    " CASE WHEN a.agent_mode = 'cloud' THEN (SELECT count(*) FROM (SELECT 1 FROM deliveries f"
    "  WHERE f.agent_id = a.id AND f.status = 'pending' AND f.leased_until > %(now)s"
    "  ORDER BY f.leased_until LIMIT %(in_flight_cap)s) live) ELSE 0 END AS in_flight,"
    " CASE WHEN %(mid)s = '' THEN NULL ELSE ("
    + _duplicate_select(
        agent="a.id", mid="%(mid)s", sender="%(sender)s", window="%(window)s", ip="%(ip)s",
        check="%(check)s", verified="%(verified)s", auth_sender="%(auth_sender)s", sha="%(sha)s",
    )
    + ") END AS duplicate_id,"
    " CASE WHEN %(n)s = 0 THEN '' ELSE COALESCE(("
    + _conversation_select(agent="a.id", c="%(c)s::text[]", bases="%(bases)s::text[]")
    + "), '') END AS conversation_id"
    f" FROM agents a LEFT JOIN LATERAL ({NEWEST_SECRETS_LATERAL}) s ON true"
    " WHERE lower(a.id) = lower(%(rcpt)s)",
)


async def inbound_context_txn(
    txn: Txn,
    recipient: str,
    email_message_id: str,
    envelope_from: str,
    candidates: list[str],
    now: datetime,
    verdict: Verdict,
    in_flight_cap: int,
) -> dict[str, Any] | None:
    """Everything accepting one inbound copy needs to read, in ONE statement (one round trip).

    The agent of ``recipient`` (``id, user_id, agent_mode, webhook_url, webhook_status``), its
    owner's newest signing secret (``secret_id``/``secret``, None when the user has none) and
    newest few (``secret_ids``/``secrets`` arrays, for a webhook attempt started from here),
    the agent's webhook attempts in flight at ``now`` (``in_flight``, 0 for a local agent;
    counted up to ``in_flight_cap``, the per-agent limit: all a free slot needs), the
    RFC 1047 duplicate (``duplicate_id``, as :func:`find_duplicate_txn`: same ``verdict`` too) and the conversation
    id (``conversation_id``, ``""`` when none, as :func:`find_conversation_txn`). None when the
    agent no longer exists.
    """
    return await txn.fetchone_prepared(
        _INBOUND_CONTEXT,
        {
            "now": now,
            "in_flight_cap": in_flight_cap,
            "max_secrets": MAX_WEBHOOK_SECRETS,
            "rcpt": recipient,
            "mid": email_message_id,
            "sender": envelope_from,
            "window": DUPLICATE_WINDOW_SECONDS,
            "ip": verdict.client_ip,
            "check": verdict.domain_check,
            "verified": verdict.verified,
            "auth_sender": verdict.sender,
            "sha": verdict.content_sha256,
            "n": len(candidates),
            "c": candidates,
            "bases": provider_id_bases(candidates),
        },
    )


def provider_id_bases(candidates: list[str]) -> list[str]:
    """Relays that report a bare queue id ``<id>`` later write ``<id@their.domain>``: for each
    candidate ``<x@y>`` the provider id it may stand for is ``<x>`` (mail.md §6)."""
    out = []
    for c in candidates:
        if c.startswith("<") and c.endswith(">") and "@" in c:
            out.append(c[: c.index("@")] + ">")
    return out


async def find_conversation_txn(txn: Txn, agent_id: str, candidates: list[str]) -> str:
    """mail.md §6 item 2: newest of this agent's messages matching any candidate id."""
    if not candidates:
        return ""
    value = await txn.fetchval(
        _conversation_select(agent="%(agent)s", c="%(c)s::text[]", bases="%(bases)s::text[]"),
        {"agent": agent_id, "c": candidates, "bases": provider_id_bases(candidates)},
    )
    return value or ""


_INSERT_INBOUND = Prepared(
    "e2a_insert_inbound",
    f"INSERT INTO messages (direction, {INBOUND_COLUMNS}, content_sha256) VALUES ('inbound', "
    + ", ".join(
        octets_sql(name) if name == "raw_message" else f"%({name})s" for name in InboundMessage.__dataclass_fields__
    )
    + ", %(content_sha256)s)",
)


#: SQLSTATE of ``e2a_accept_context_stale`` (schema/0010).
REMEMBERED_CONTEXT_STALE = "E2A01"


def remembered_context_stale(error: BaseException) -> bool:
    """Whether ``error`` is the refusal of a copy written with a remembered context
    (:class:`Remembered`): the agent or its owner's newest secret changed, or the copy has a
    stored duplicate. Nothing of its transaction was written; the accept reads afresh."""
    return getattr(error, "pgcode", None) == REMEMBERED_CONTEXT_STALE


@dataclass(frozen=True)
class Remembered:
    """A copy for a local agent written without the accept's read (:mod:`e2a.inbound`): the
    agent and the secret it was signed with are the ones an earlier read returned, and its
    ``INSERT`` does what the read did, on the database's current rows. It checks that the
    agent still exists, for the same user and in local mode, and that ``secret_id`` is still
    its owner's newest secret; it also checks that the copy has no duplicate (as
    :func:`find_duplicate_txn`: the copy's own sender, client and content hash, and the verdict
    here). Either failing raises :data:`REMEMBERED_CONTEXT_STALE`. It computes the
    conversation from ``candidates`` (as :func:`find_conversation_txn`)."""

    secret_id: str
    domain_check: str  # X-E2A-Auth-Domain-Check
    verified: str  # X-E2A-Auth-Verified ("true" / "false")
    candidates: list[str]


# The conversation id of a copy written with a remembered context, or the statement's refusal
# (see Remembered). The checks are the read's own lookups, so each is served by one index as
# there: the agent by primary key and the newest secret by the secrets' user index. The agent
# is fenced (``OFFSET 0``): offered its owner's id too, a plan made while the tables held a
# few rows served it from ``agents_user_idx`` and read all the owner's agents per message.
_REMEMBERED_CONVERSATION = (
    "(CASE WHEN NOT EXISTS (SELECT 1 FROM (SELECT id, user_id, agent_mode FROM agents"
    " WHERE id = %(agent_id)s OFFSET 0) a WHERE a.user_id = %(user_id)s AND a.agent_mode = 'local'"
    " AND (SELECT t.id FROM signing_secrets t WHERE t.user_id = a.user_id"
    " ORDER BY t.created_at DESC, t.id DESC LIMIT 1) = %(secret_id)s)"
    " THEN e2a_accept_context_stale('agent')"
    " WHEN %(email_message_id)s <> '' AND EXISTS ("
    + _duplicate_select(
        agent="%(agent_id)s", mid="%(email_message_id)s", sender="%(envelope_from)s", window="%(window)s",
        ip="%(client_ip)s", check="%(check)s", verified="%(verified)s", auth_sender="%(sender)s",
        sha="%(content_sha256)s",
    )
    + ") THEN e2a_accept_context_stale('duplicate')"
    " WHEN %(n)s = 0 THEN ''"
    " ELSE COALESCE(("
    + _conversation_select(agent="%(agent_id)s", c="%(c)s::text[]", bases="%(bases)s::text[]")
    + "), '') END)"
)

_INSERT_INBOUND_REMEMBERED = Prepared(
    "e2a_insert_inbound_remembered",
    _INSERT_INBOUND.sql.replace("%(conversation_id)s", _REMEMBERED_CONVERSATION),
)


async def insert_inbound_txn(
    txn: Txn, message: InboundMessage, content_sha256: str | None = None, remembered: Remembered | None = None
) -> None:
    """Write one inbound copy inside the accept's transaction (:mod:`e2a.inbound`);
    ``content_sha256``: the received content's hash, for the duplicate check (None: never one).
    With ``remembered``, the statement checks the context and computes the conversation
    (:class:`Remembered`; ``message.conversation_id`` is not used)."""
    params = {
        "content_sha256": content_sha256,
        **{name: getattr(message, name) for name in InboundMessage.__dataclass_fields__},
        "to_addrs": None if message.to_addrs is None else json.dumps(message.to_addrs),
        "cc_addrs": None if message.cc_addrs is None else json.dumps(message.cc_addrs),
        "auth_headers": json.dumps(message.auth_headers),
        **octets_params("raw_message", message.raw_message),
    }
    if remembered is None:
        await txn.execute_prepared(_INSERT_INBOUND, params)
        return
    params.update(
        secret_id=remembered.secret_id,
        window=DUPLICATE_WINDOW_SECONDS,
        check=remembered.domain_check,
        verified=remembered.verified,
        n=len(remembered.candidates),
        c=remembered.candidates,
        bases=provider_id_bases(remembered.candidates),
    )
    await txn.execute_prepared(_INSERT_INBOUND_REMEMBERED, params)


async def inbound_exists(db: Database, message_id: str) -> bool:
    """Whether the copy ``message_id`` is stored: one primary-key read, committed data only.

    How the SMTP reply learns a transaction's real outcome when the accept itself failed or
    was given up (e2a.abort ``probe``): the copies' ids are chosen before their INSERT, and
    all copies of a message commit together, so one id tells whether they all did.
    """
    return await db.fetchone("SELECT 1 AS found FROM messages WHERE id = %s", (message_id,)) is not None


async def list_inbox(
    db: Database, agent_id: str, status: str, page_size: int, after: tuple[datetime, str] | None
) -> tuple[list[InboundMessage], bool]:
    """Oldest first, keyset pagination on (created_at, id). Returns (rows, more)."""
    clauses = ["agent_id = %s", "direction = 'inbound'"]
    params: list[Any] = [agent_id]
    if status != "all":
        clauses.append("status = %s")
        params.append(status)
    if after is not None:
        clauses.append("(created_at, id) > (%s, %s)")
        params.extend(after)
    params.append(page_size + 1)
    rows = await db.fetchall(
        f"SELECT {INBOUND_LIST_COLUMNS} FROM messages"
        f" WHERE {' AND '.join(clauses)} ORDER BY created_at, id LIMIT %s",
        params,
    )
    more = len(rows) > page_size
    return [inbound_message(r) for r in rows[:page_size]], more


async def _read_inbound_txn(txn: Txn, agent_id: str, message_id: str) -> InboundMessage | None:
    row = await txn.fetchone(
        "UPDATE messages SET status = 'read', read_at = COALESCE(read_at, now())"
        f" WHERE id = (SELECT one.id FROM {INBOUND_BY_ID})"
        f" RETURNING {INBOUND_COLUMNS}",
        {"id": message_id, "agent": agent_id},
    )
    return None if row is None else inbound_message(row)


async def read_inbound(db: Database, agent_id: str, message_id: str, mark_read: bool = True) -> InboundMessage | None:
    """Fetch one inbound message of the agent and mark it read (api.md §5.2); with
    ``mark_read=False`` the status is left alone (the client acks after handling it)."""
    if not mark_read:
        row = await db.fetchone(
            f"SELECT {INBOUND_COLUMNS} FROM {INBOUND_BY_ID}", {"id": message_id, "agent": agent_id}
        )
        return None if row is None else inbound_message(row)
    return await db.run("read_inbound", _read_inbound_txn, agent_id, message_id)


async def mark_read(db: Database, agent_id: str, message_id: str) -> bool:
    """WebSocket ack / successful webhook: unread → read. True if it was unread."""

    async def _mark_read_txn(txn: Txn) -> bool:
        await txn.execute(
            "UPDATE messages SET status = 'read', read_at = now()"
            # the status again outside: a concurrent ack's update is re-checked on the row
            # it committed, so only one of two acks reports the message as newly read
            f" WHERE id = (SELECT one.id FROM {INBOUND_BY_ID} AND one.status = 'unread') AND status = 'unread'",
            {"id": message_id, "agent": agent_id},
        )
        return txn.rowcount == 1

    return await db.run("mark_read", _mark_read_txn)


_SUMMARY_COLUMNS = "id, conversation_id, display_from, recipient, subject, created_at"


def _summary(row: dict[str, Any]) -> InboundSummary:
    return InboundSummary(
        message_id=row["id"],
        conversation_id=row["conversation_id"] or "",
        sender=row["display_from"],
        recipient=row["recipient"],
        subject=row["subject"],
        received_at=row["created_at"],
    )


async def unread_page(
    db: Database, agent_id: str, after: tuple[datetime, str] | None, page_size: int
) -> list[InboundSummary]:
    """One WebSocket drain page: the agent's unread inbound mail, oldest first (``created_at``, ``id``)."""
    clauses = "agent_id = %s AND direction = 'inbound' AND status = 'unread'"
    params: list[Any] = [agent_id]
    if after is not None:
        clauses += " AND (created_at, id) > (%s, %s)"
        params.extend(after)
    params.append(page_size)
    rows = await db.fetchall(
        f"SELECT {_SUMMARY_COLUMNS} FROM messages WHERE {clauses} ORDER BY created_at, id LIMIT %s", params
    )
    return [_summary(r) for r in rows]


async def fetch_summary(db: Database, agent_id: str, message_id: str) -> InboundSummary | None:
    """One inbound message of the agent for a live push; None when it is gone."""
    row = await db.fetchone(
        # agent ids keep the local part's case; live events are keyed by the lowercased address
        f"SELECT {_SUMMARY_COLUMNS} FROM messages WHERE id = %s AND lower(agent_id) = lower(%s) AND direction = 'inbound'",
        (message_id, agent_id),
    )
    return None if row is None else _summary(row)


async def purge_inbound_older_than(db: Database, days: int) -> None:
    """Retention (mail.md §9): drop inbound mail older than ``days`` (one statement)."""
    await db.execute(
        "DELETE FROM messages WHERE direction = 'inbound' AND created_at < now() - make_interval(days => %(days)s)",
        {"days": days},
    )


async def purge_outbound_older_than(db: Database, days: int) -> None:
    """Retention: drop outbound records older than ``days``; held mail is never purged."""
    await db.execute(
        "DELETE FROM messages WHERE direction = 'outbound' AND status <> 'pending_approval'"
        " AND created_at < now() - make_interval(days => %(days)s)",
        {"days": days},
    )


async def get_reply_source(db: Database, agent_id: str, message_id: str) -> ReplySource | None:
    """The inbound message of ``agent_id`` a reply answers; None when it is not there."""
    row = await db.fetchone(
        f"SELECT raw_message, subject, display_from, conversation_id, email_message_id FROM {INBOUND_BY_ID}",
        {"id": message_id, "agent": agent_id},
    )
    if row is None:
        return None
    raw = row["raw_message"]
    return ReplySource(
        raw_message=bytes(raw) if raw is not None else None,
        subject=row["subject"],
        display_from=row["display_from"],
        conversation_id=row["conversation_id"],
        email_message_id=row["email_message_id"],
    )
