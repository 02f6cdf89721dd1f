"""Outbound store contract on PostgreSQL: the send path's writes and the API's reads of them."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest_twisted

from e2a.store import approvals, outbound
from e2a.store.models import HeldAttachment, NewOutboundMessage, OutboundRecipientState
from tests.storage.storehelpers import MAIL_OCTETS, stored_octets, user_with_agent

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def _new(user_id: str, agent: str, mid: str, **changes) -> NewOutboundMessage:
    values = dict(
        id=mid, agent_id=agent, user_id=user_id, type="send", status="sent", sender=agent, subject="hi",
        to_addrs=("a@example.com",), cc_addrs=(), bcc_addrs=("b@example.com",), email_message_id="",
        in_reply_to="", references_ids="", smtp_message_id=f"<{mid}@mail.test>", conversation_id="conv_1",
        composed=b"Subject: hi\r\n\r\nbody", created_at=NOW, method="smtp", delivery_status="queued",
    )
    values.update(changes)
    return NewOutboundMessage(**values)


@pytest_twisted.ensureDeferred
async def test_released_message_and_recipients_read_back_as_records(db):
    """A released message and its recipient rows read back through the API's record shapes."""
    user_id, agent = await user_with_agent(db)

    async def _txn(txn):
        await outbound.insert_message_txn(txn, _new(user_id, agent, "msg_1"))
        await outbound.insert_recipient_txn(txn, "msg_1", "a@example.com", "to", "smtp", NOW)
        await outbound.insert_recipient_txn(txn, "msg_1", "bot2@agents.test", "bcc", "internal", NOW)

    await db.run("t", _txn)
    record = await outbound.get_record(db, user_id, "msg_1")
    assert record is not None and record.to_addrs == ["a@example.com"] and record.bcc_addrs == ["b@example.com"]
    assert record.method == "smtp" and record.delivery_status == "queued" and record.attachments is None
    states = await outbound.list_recipient_states(db, "msg_1")
    assert [(s.address, s.kind, s.status, s.attempts) for s in states] == [
        ("a@example.com", "to", "queued", 0), ("bot2@agents.test", "bcc", "sent", 0)
    ]
    assert all(isinstance(s, OutboundRecipientState) for s in states)
    due = await db.fetchall("SELECT next_attempt_at FROM outbound_recipients ORDER BY id")
    assert [r["next_attempt_at"] for r in due] == [NOW, None]
    assert (await outbound.load_message(db, "msg_1")).composed == b"Subject: hi\r\n\r\nbody"


@pytest_twisted.ensureDeferred
async def test_holds_list_soonest_first_with_their_content(db):
    """Holds carry body and attachments; list_pending orders by expiry and filters by agent."""
    user_id, agent = await user_with_agent(db)
    attachment = HeldAttachment("a.txt", "text/plain", "aGk=")

    async def _txn(txn):
        for mid, minutes in (("msg_late", 60), ("msg_soon", 5)):
            await outbound.insert_message_txn(txn, _new(
                user_id, agent, mid, status="pending_approval", composed=None, smtp_message_id="", method="",
                delivery_status="", body_text="body", body_html=None, attachments=(attachment,),
                approval_expires_at=NOW + timedelta(minutes=minutes), hitl_expiration_action="reject",
            ))
            await approvals.record_hold_txn(txn, mid)

    await db.run("t", _txn)
    pending = await outbound.list_pending(db, user_id)
    assert [m.id for m in pending] == ["msg_soon", "msg_late"]
    assert pending[0].attachments == [{"filename": "a.txt", "content_type": "text/plain", "data": "aGk="}]
    assert await outbound.list_pending(db, user_id, "other@agents.test") == []
    assert [m.id for m in await outbound.list_pending(db, user_id, agent.upper())] == ["msg_soon", "msg_late"]
    holds = await db.fetchall("SELECT message_id, action, actor FROM approvals ORDER BY message_id")
    assert [tuple(r.values()) for r in holds] == [("msg_late", "hold", "api"), ("msg_soon", "hold", "api")]


@pytest_twisted.ensureDeferred
async def test_get_record_hides_e2a_own_mail_and_other_users(db):
    """Reviewer notifications are e2a's mail, not the agent's; other users see nothing."""
    user_id, agent = await user_with_agent(db)
    other, _ = await user_with_agent(db, "x@other.test", email="other@example.com")
    await db.run("t", outbound.insert_message_txn, _new(user_id, agent, "msg_n", type="notify"))
    await db.run("t", outbound.insert_message_txn, _new(user_id, agent, "msg_s"))
    assert await outbound.get_record(db, user_id, "msg_n") is None
    assert await outbound.get_record(db, other, "msg_s") is None


@pytest_twisted.ensureDeferred
async def test_composed_octets_are_stored_unchanged_by_the_send_and_by_a_release(db):
    """The signed bytes of a sent message, and of a hold released later, come back octet for
    octet whichever parameter carried them (text for 7-bit, bytea for the rest)."""
    user_id, agent = await user_with_agent(db)
    for n, composed in enumerate(MAIL_OCTETS):
        sent, held = f"msg_sent_{n}", f"msg_held_{n}"
        await db.run("t", outbound.insert_message_txn, _new(user_id, agent, sent, composed=composed))
        await db.run("t", outbound.insert_message_txn, _new(
            user_id, agent, held, status="pending_approval", composed=None, smtp_message_id="", method="",
            delivery_status="", approval_expires_at=NOW + timedelta(hours=1),
        ))
        released = approvals.Released(
            subject="hi", to=("a@example.com",), cc=(), bcc=(), smtp_message_id=f"<{held}@mail.test>",
            method="smtp", delivery_status="queued", composed=composed,
        )
        assert await db.run(
            "t", approvals.release_txn, held, status="sent", now=NOW, edited=False, values=released,
            require_unexpired=False,
        ) is False
        for mid in (sent, held):
            assert (await outbound.load_message(db, mid)).composed == composed
            assert await stored_octets(db, mid, "composed") == (len(composed), hashlib.sha256(composed).hexdigest())
