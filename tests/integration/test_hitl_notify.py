"""Reviewer notification email (mail.md §8.7) on the whole service: queued with the hold,
relayed to a local SMTP sink, DKIM-verified by dkimpy against the local DNS zone, its links
followed; the switches; and a notification that cannot be sent never blocks the hold."""

from __future__ import annotations

import base64
import email
import email.policy
from datetime import UTC

import dkim
import pytest
import pytest_twisted

from twisted.internet import reactor, threads
from twisted.logger import globalLogPublisher

from e2a.config import HitlConfig
from e2a.mailauth.dns import DnsClient
from e2a.store import notifications as notify_store
from tests.support.hitlstack import AGENT, MAIL_DOMAIN, OWNER, assert_page, links_in
from tests.support.waiting import wait_for


async def _notifications(stack) -> list[dict]:
    return await stack.service.db.fetchall(
        "SELECT id, status, sender, to_addrs, delivery_status FROM messages WHERE type = 'notify' ORDER BY created_at"
    )


async def _relayed(stack, count: int = 1):
    async def arrived() -> bool:
        return len(stack.sink.messages) >= count

    await wait_for(arrived)
    return stack.sink.messages


async def dkim_verifies(stack, content: bytes) -> bool:
    client = DnsClient(stack.dns.nameservers, timeout=2.0, reactor=reactor)
    return await threads.deferToThread(dkim.verify, content, dnsfunc=client.thd_dkim_dnsfunc)


@pytest_twisted.ensureDeferred
async def test_notification_relayed_signed_without_content_and_links_work(hitl_stacks):
    """One hold → one mail to the owner from hitl-noreply@M: DKIM verifies against the zone,
    multipart/alternative with To/Cc/Bcc/Subject/Expires and both links, never the body or
    attachments; the reject link shows its page and the approve link releases the message."""
    stack = await hitl_stacks()
    secret_body = "The secret body text 7f3a"
    attachment = base64.b64encode(b"attachment-bytes-91c2").decode()
    mid = await stack.hold(
        subject="Quarterly numbers", body=secret_body, html_body="<p>secret html 55e1</p>",
        cc=["carol@example.net"], bcc=["dave@example.net"],
        attachments=[{"filename": "q3.txt", "content_type": "text/plain", "data": attachment}],
    )
    [mail] = await _relayed(stack)
    assert stack.sink.violations == []
    assert mail.mail_from == f"hitl-noreply@{MAIL_DOMAIN}" and mail.recipients == [OWNER]
    content = mail.content
    assert content.startswith(b"DKIM-Signature:")
    assert await dkim_verifies(stack, content)
    assert b" d=" + MAIL_DOMAIN.encode() + b";" in content.split(b"\r\n\r\n")[0].replace(b"\r\n", b"")

    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert msg["From"] == f"e2a <hitl-noreply@{MAIL_DOMAIN}>"
    assert msg["Reply-To"] == f"hitl-noreply@{MAIL_DOMAIN}"
    assert msg["To"] == OWNER
    assert msg["Subject"] == f"[e2a] approve outbound from {AGENT}: Quarterly numbers"
    assert msg.get_content_type() == "multipart/alternative"
    text_part, html_part = msg.get_payload()
    assert (text_part.get_content_type(), html_part.get_content_type()) == ("text/plain", "text/html")
    text, page = text_part.get_content(), html_part.get_content()
    row = await stack.service.db.fetchone("SELECT approval_expires_at FROM messages WHERE id = %s", (mid,))
    expires = row["approval_expires_at"].astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    for part in (text, page):
        for needle in ("bob@example.net", "carol@example.net", "dave@example.net", "Quarterly numbers", expires):
            assert needle in part, (needle, part)
    for needle in (b"7f3a", b"55e1", b"91c2", b"q3.txt", attachment.encode()):
        assert needle not in content
    assert "7f3a" not in text + page
    links = links_in(text)
    assert set(links) == {"approve", "reject"} and links_in(page.replace("&amp;", "&")) == links
    assert all(link.startswith("http://e2a.test/api/v1/") for link in links.values())
    for action, link in links.items():  # exp = floor(approval_expires_at) + hitl.token_grace (600)
        payload = link.split("?t=", 1)[1].split(".")[0]
        decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
        assert decoded == f"{mid}|{action}|{int(row['approval_expires_at'].timestamp()) + 600}"

    [row] = await _notifications(stack)
    assert row["sender"] == f"hitl-noreply@{MAIL_DOMAIN}" and row["to_addrs"] == [OWNER]
    assert (await stack.api("GET", f"/api/v1/messages/{row['id']}")).code == 404  # e2a's own mail
    audit = await stack.service.db.fetchall("SELECT action FROM approvals WHERE message_id = %s", (mid,))
    assert [a["action"] for a in audit] == ["hold", "notify"]

    # follow both links (served here on 127.0.0.1 rather than http.public_url)
    assert_page(await stack.page("GET", stack.local(links["reject"])), 200, "Reject outbound email")
    body = assert_page(await stack.page("GET", stack.local(links["approve"])), 200, "Approve outbound email",
                       secret_body)
    token = links["approve"].split("?t=", 1)[1]
    assert f'value="{token}"' in body
    assert_page(await stack.page("POST", "/api/v1/approve", {"t": token}), 200, "Approved")
    assert await stack.status(mid) == "sent"
    relayed = await _relayed(stack, 2)
    assert sorted(relayed[1].recipients) == ["bob@example.net", "carol@example.net", "dave@example.net"]
    # the reject link now answers Already resolved
    assert_page(await stack.page("GET", stack.local(links["reject"])), 409, "Already resolved", "sent")


@pytest_twisted.ensureDeferred
async def test_notification_goes_to_every_reviewer(hitl_stacks):
    """hitl_reviewers set: one mail To all of them (normalised), not the owner."""
    stack = await hitl_stacks(agent={"hitl_reviewers": ["Rev One <rev1@example.org>", "REV2@example.org"]})
    await stack.hold()
    [mail] = await _relayed(stack)
    assert sorted(mail.recipients) == ["rev1@example.org", "rev2@example.org"]
    msg = email.message_from_bytes(mail.content, policy=email.policy.default)
    assert msg["To"] == "rev1@example.org, rev2@example.org"


@pytest_twisted.ensureDeferred
async def test_export_lists_the_hold_but_not_its_notification(hitl_stacks):
    """The user export carries the user's own mail only: the reviewer notification (e2a's mail
    about the hold, with approval links) is not one of the user's messages."""
    stack = await hitl_stacks()
    held = await stack.hold()
    await _relayed(stack)
    assert len(await _notifications(stack)) == 1
    resp = await stack.api("GET", "/api/v1/users/me/export")
    assert resp.code == 200
    exported = resp.json()["messages"]
    assert [m["id"] for m in exported] == [held]
    assert all(m.get("type") != "notify" for m in exported)


@pytest_twisted.ensureDeferred
async def test_notification_to_agent_reviewer_is_internal(hitl_stacks):
    """A reviewer that is an agent here gets the mail through the internal route."""
    stack = await hitl_stacks(relay=False)
    assert (await stack.api("POST", "/api/v1/agents", {"slug": "boss", "agent_mode": "local"})).code == 201
    assert (await stack.api("PUT", f"/api/v1/agents/{AGENT}", {"hitl_reviewers": ["boss@agents.test"]})).code == 200
    await stack.hold(to=("boss@agents.test",))
    inbox = (await stack.api("GET", "/api/v1/agents/boss@agents.test/messages")).json()["messages"]
    assert [m["subject"] for m in inbox] == [f"[e2a] approve outbound from {AGENT}: Quarterly numbers"]
    assert inbox[0]["from"] == f"hitl-noreply@{MAIL_DOMAIN}"
    [row] = await _notifications(stack)
    assert row["delivery_status"] == "sent"


@pytest.mark.parametrize(("overrides", "agent"), [
    ({"hitl": HitlConfig(notify=False, sweep_interval=3600)}, {}),
    ({}, {"hitl_notify": False}),
])
@pytest_twisted.ensureDeferred
async def test_switches_turn_notification_off(hitl_stacks, overrides, agent):
    """hitl.notify false or the agent's hitl_notify false: the hold, no notification."""
    stack = await hitl_stacks(agent=agent, **overrides)
    mid = await stack.hold()
    assert await stack.status(mid) == "pending_approval"
    assert await _notifications(stack) == []


@pytest.mark.parametrize("kind", ["no_public_url", "no_route"])
@pytest_twisted.ensureDeferred
async def test_unsendable_notification_never_blocks_hold_and_warns_once(hitl_stacks, kind):
    """No http.public_url, or no route for the owner's address: holds still answer 202, nothing
    is queued, and the warning is logged once per process."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        stack = await hitl_stacks(**({"public_url": ""} if kind == "no_public_url" else {"relay": False}))
        # without a relay only agents here can be held for (the hold itself needs a route)
        assert (await stack.api("POST", "/api/v1/agents", {"slug": "beta", "agent_mode": "local"})).code == 201
        to = ("beta@agents.test",)
        first, second = await stack.hold(to=to), await stack.hold(subject="again", to=to)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert await stack.status(first) == await stack.status(second) == "pending_approval"
    assert await _notifications(stack) == []
    warnings = [e for e in events if "notification" in str(e.get("log_format", "")).lower()
                and e.get("log_level") is not None and e["log_level"].name == "warn"]
    assert len(warnings) == 1, warnings


@pytest_twisted.ensureDeferred
async def test_failing_notification_insert_rolls_back_alone(hitl_stacks, monkeypatch):
    """An SQL error while queueing the notification: the savepoint drops it, the hold commits."""
    stack = await hitl_stacks()

    async def broken(txn, **kw):
        await txn.execute("SELECT * FROM no_such_table")

    monkeypatch.setattr(notify_store, "insert_notification_txn", broken)
    mid = await stack.hold()
    assert await stack.status(mid) == "pending_approval"
    assert await _notifications(stack) == []
    audit = await stack.service.db.fetchall("SELECT action FROM approvals WHERE message_id = %s", (mid,))
    assert [a["action"] for a in audit] == ["hold"]


@pytest_twisted.ensureDeferred
async def test_link_exp_follows_hitl_token_grace(hitl_stacks):
    """hitl.token_grace: 5 → the links' exp is floor(approval_expires_at) + 5."""
    stack = await hitl_stacks(hitl=HitlConfig(token_grace=5, sweep_interval=3600))
    mid = await stack.hold()
    [mail] = await _relayed(stack)
    text = email.message_from_bytes(mail.content, policy=email.policy.default).get_payload()[0].get_content()
    row = await stack.service.db.fetchone("SELECT approval_expires_at FROM messages WHERE id = %s", (mid,))
    payload = links_in(text)["reject"].split("?t=", 1)[1].split(".")[0]
    decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    assert decoded == f"{mid}|reject|{int(row['approval_expires_at'].timestamp()) + 5}"
