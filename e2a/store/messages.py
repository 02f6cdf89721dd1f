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
from e2a.store.database import Database, Prepared, Txn

# RFC 1047 duplicate suppression: a sender that lost our reply to its final dot resends the
# same message; within this window the same Message-ID from the same MAIL FROM to the same
# agent, from the same client IP and with the same verdict (domain check, verified, sender),
# is answered 250 with the first copy's id and not stored twice. A copy whose verdict or
# client differs is stored: else a forged copy sent first would stand in for the genuine
# one (issue 15.5, docs/decisions.md).
DUPLICATE_WINDOW_SECONDS = 3600


@dataclass(frozen=True)
class InboundRecord:
    id: str
    agent_id: str
    user_id: str
    status: str
    sender: str
    display_from: str
    recipient: str
    subject: str
    to_addrs: list[str] | None
    cc_addrs: list[str] | None
    conversation_id: str
    auth_headers: dict[str, str]
    raw_message: bytes
    created_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> InboundRecord:
        raw = row.get("raw_message")
        return cls(
            id=row["id"],
            agent_id=row["agent_id"],
            user_id=row["user_id"],
            status=row["status"],
            sender=row["sender"],
            display_from=row["display_from"],
            recipient=row["recipient"],
            subject=row["subject"],
            to_addrs=row["to_addrs"],
            cc_addrs=row["cc_addrs"],
            conversation_id=row["conversation_id"],
            auth_headers=row["auth_headers"] or {},
            raw_message=bytes(raw) if raw is not None else b"",
            created_at=row["created_at"],
        )


_DUPLICATE_WHERE = (
    "agent_id = {agent} AND direction = 'inbound' AND email_message_id = {mid}"
    " AND envelope_from = {sender} AND created_at > now() - make_interval(secs => {window})"
    " AND client_ip = {ip} AND auth_headers->>'X-E2A-Auth-Domain-Check' = {check}"
    " AND auth_headers->>'X-E2A-Auth-Verified' = {verified} AND auth_headers->>'X-E2A-Auth-Sender' = {auth_sender}"
)

_CONVERSATION_WHERE = (
    "agent_id = {agent} AND conversation_id <> '' AND ("
    "   (direction = 'inbound' AND email_message_id = ANY({c}))"
    "   OR (direction = 'outbound' AND smtp_message_id = ANY({c}))"
    "   OR (direction = 'outbound' AND provider_message_id = ANY({c}))"
    "   OR (direction = 'outbound' AND provider_message_id = ANY({bases})"
    "       AND position('@' in provider_message_id) = 0)"
    " )"
)


def _duplicate_select(**placeholders: str) -> str:
    """The oldest duplicate's id (only called with a non-empty Message-ID).

    The inner query is fenced (``OFFSET 0``) so PostgreSQL picks the index for the WHERE clause
    (``messages_thread_inbound_idx`` on agent + Message-ID) instead of walking the agent's
    ``(agent_id, created_at)`` index in order to satisfy ``ORDER BY … LIMIT 1``, which reads
    every message of the agent in the window. ``email_message_id <> ''`` is implied by the
    equality and lets the planner match that partial index. Same rows, same order.
    """
    where = _DUPLICATE_WHERE.format(**placeholders)
    return (
        f"SELECT id FROM (SELECT id, created_at FROM messages WHERE {where} AND email_message_id <> ''"
        " OFFSET 0) dup ORDER BY created_at LIMIT 1"
    )


@dataclass(frozen=True)
class Verdict:
    """What a copy must share with a stored one to be its duplicate, besides the envelope."""

    client_ip: str
    domain_check: str  # X-E2A-Auth-Domain-Check
    verified: str  # X-E2A-Auth-Verified ("true" / "false")
    sender: str  # X-E2A-Auth-Sender


async def find_duplicate_txn(
    txn: Txn, agent_id: str, email_message_id: str, envelope_from: str, verdict: Verdict
) -> str | None:
    if not email_message_id:
        return None
    return await txn.fetchval(
        _duplicate_select(
            agent="%s", mid="%s", sender="%s", window="%s", ip="%s", check="%s", verified="%s", auth_sender="%s"
        ),
        (agent_id, email_message_id, envelope_from, DUPLICATE_WINDOW_SECONDS,
         verdict.client_ip, verdict.domain_check, verdict.verified, verdict.sender),
    )


_INBOUND_CONTEXT = Prepared(
    "e2a_inbound_context",
    "SELECT a.id, a.user_id, a.agent_mode, a.webhook_url, a.webhook_status,"
    " s.secret_ids[1] AS secret_id, s.secrets[1] AS secret, s.secret_ids, s.secrets,"
    # The agent's webhook attempts in flight in every process (leases), for the hand-off of a
    # fresh job to this process's worker (e2a.inbound): same count as the claim's.
    " CASE WHEN a.agent_mode = 'cloud' THEN (SELECT count(*) FROM deliveries f WHERE f.agent_id = a.id"
    "  AND f.status = 'pending' AND f.leased_until > %(now)s) ELSE 0 END AS in_flight,"
    " CASE WHEN %(mid)s = '' THEN NULL ELSE ("
    + _duplicate_select(
        agent="a.id", mid="%(mid)s", sender="%(sender)s", window="%(window)s", ip="%(ip)s",
        check="%(check)s", verified="%(verified)s", auth_sender="%(auth_sender)s",
    )
    + ") END AS duplicate_id,"
    " CASE WHEN %(n)s = 0 THEN '' ELSE"
    "  COALESCE((SELECT conversation_id FROM messages WHERE "
    + _CONVERSATION_WHERE.format(agent="a.id", c="%(c)s::text[]", bases="%(bases)s::text[]")
    + "   ORDER BY created_at DESC LIMIT 1), '') END AS conversation_id"
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
) -> dict[str, Any] | None:
    """Everything accepting one inbound copy needs to read, in ONE statement (one round trip).

    The agent of ``recipient`` (``id, user_id, agent_mode, webhook_url, webhook_status``), its
    owner's newest signing secret (``secret_id``/``secret``, None when the user has none) and
    newest few (``secret_ids``/``secrets`` arrays, for a webhook attempt started from here),
    the agent's webhook attempts in flight at ``now`` (``in_flight``, 0 for a local agent), the
    RFC 1047 duplicate (``duplicate_id``, as :func:`find_duplicate_txn`: same ``verdict`` too) and the conversation
    id (``conversation_id``, ``""`` when none, as :func:`find_conversation_txn`). None when the
    agent no longer exists.
    """
    return await txn.fetchone_prepared(
        _INBOUND_CONTEXT,
        {
            "now": now,
            "max_secrets": MAX_WEBHOOK_SECRETS,
            "rcpt": recipient,
            "mid": email_message_id,
            "sender": envelope_from,
            "window": DUPLICATE_WINDOW_SECONDS,
            "ip": verdict.client_ip,
            "check": verdict.domain_check,
            "verified": verdict.verified,
            "auth_sender": verdict.sender,
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
    where = _CONVERSATION_WHERE.format(agent="%(agent)s", c="%(c)s", bases="%(bases)s")
    value = await txn.fetchval(
        f"SELECT conversation_id FROM messages WHERE {where} ORDER BY created_at DESC LIMIT 1",
        {"agent": agent_id, "c": candidates, "bases": provider_id_bases(candidates)},
    )
    return value or ""


_INSERT_INBOUND = Prepared(
    "e2a_insert_inbound",
    "INSERT INTO messages (id, agent_id, user_id, direction, status, route, sender, display_from,"
    " recipient, envelope_from, client_ip, subject, to_addrs, cc_addrs, email_message_id, in_reply_to,"
    " references_ids, conversation_id, raw_message, auth_headers, created_at)"
    " VALUES (%(id)s, %(agent_id)s, %(user_id)s, 'inbound', 'unread', %(route)s, %(sender)s, %(display_from)s,"
    " %(recipient)s, %(envelope_from)s, %(client_ip)s, %(subject)s, %(to_addrs)s, %(cc_addrs)s,"
    " %(email_message_id)s, %(in_reply_to)s, %(references_ids)s, %(conversation_id)s, %(raw_message)s,"
    " %(auth_headers)s, %(created_at)s)",
)


async def insert_inbound_txn(txn: Txn, row: dict[str, Any]) -> None:
    await txn.execute_prepared(
        _INSERT_INBOUND,
        {
            **row,
            "to_addrs": None if row["to_addrs"] is None else json.dumps(row["to_addrs"]),
            "cc_addrs": None if row["cc_addrs"] is None else json.dumps(row["cc_addrs"]),
            "auth_headers": json.dumps(row["auth_headers"]),
        },
    )


async def list_inbox(
    db: Database, agent_id: str, status: str, page_size: int, after: tuple[datetime, str] | None
) -> tuple[list[InboundRecord], bool]:
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
        "SELECT id, agent_id, user_id, status, sender, display_from, recipient, subject, to_addrs, cc_addrs,"
        " conversation_id, auth_headers, NULL AS raw_message, created_at FROM messages"
        f" WHERE {' AND '.join(clauses)} ORDER BY created_at, id LIMIT %s",
        params,
    )
    more = len(rows) > page_size
    return [InboundRecord.from_row(r) for r in rows[:page_size]], more


async def _read_inbound_txn(txn: Txn, agent_id: str, message_id: str) -> InboundRecord | None:
    row = await txn.fetchone(
        "UPDATE messages SET status = 'read', read_at = COALESCE(read_at, now())"
        " WHERE id = %s AND agent_id = %s AND direction = 'inbound'"
        " RETURNING id, agent_id, user_id, status, sender, display_from, recipient, subject, to_addrs,"
        " cc_addrs, conversation_id, auth_headers, raw_message, created_at",
        (message_id, agent_id),
    )
    return None if row is None else InboundRecord.from_row(row)


async def read_inbound(db: Database, agent_id: str, message_id: str, mark_read: bool = True) -> InboundRecord | None:
    """Fetch one inbound message of the agent and mark it read (api.md §5.2); with
    ``mark_read=False`` the status is left alone (the client acks after handling it)."""
    if not mark_read:
        row = await db.fetchone(
            "SELECT id, agent_id, user_id, status, sender, display_from, recipient, subject, to_addrs,"
            " cc_addrs, conversation_id, auth_headers, raw_message, created_at FROM messages"
            " WHERE id = %s AND agent_id = %s AND direction = 'inbound'",
            (message_id, agent_id),
        )
        return None if row is None else InboundRecord.from_row(row)
    return await db.run("read_inbound", _read_inbound_txn, agent_id, message_id)


async def mark_read(db: Database, agent_id: str, message_id: str) -> bool:
    """WebSocket ack / successful webhook: unread → read. True if it was unread."""

    async def _mark_read_txn(txn: Txn) -> bool:
        await txn.execute(
            "UPDATE messages SET status = 'read', read_at = now()"
            " WHERE id = %s AND agent_id = %s AND direction = 'inbound' AND status = 'unread'",
            (message_id, agent_id),
        )
        return txn.rowcount == 1

    return await db.run("mark_read", _mark_read_txn)
