"""HITL review by API on the whole service (real sockets, real PostgreSQL): approve/reject in
the contract's check order, edits, release through the outbound path, and scrubbed rows."""

from __future__ import annotations

import base64
import re

import dkim
import pytest_twisted

from twisted.internet import reactor

from e2a.config import OutboundSmtpConfig
from e2a.store import accounts
from tests.integration.test_send_internal import Client
from tests.support.hitl import deployment
from tests.support.smtpsink import start_smtp_sink
from tests.support.waiting import wait_for


async def _inbox(d, agent: str) -> list[dict]:
    return (await d.api.call("GET", f"/api/v1/agents/{agent}/messages?status=all")).json()["messages"]


async def _raw(d, agent: str, inbound_id: str) -> bytes:
    detail = (await d.api.call("GET", f"/api/v1/agents/{agent}/messages/{inbound_id}")).json()
    return base64.b64decode(detail["raw_message"])


def _err(r) -> tuple[int, str]:
    return r.code, r.json()["error"]["code"]


@pytest_twisted.ensureDeferred
async def test_approve_releases_internally_and_scrubs_the_row(e2a_service_factory):
    """Approve → 200 §7.3 body; beta gets the mail with Message-ID <held id@M>; the row is
    `sent`, bodies and attachments NULL in PostgreSQL; one audit row."""
    d = await deployment(e2a_service_factory)
    att = {"filename": "a.txt", "content_type": "text/plain", "data": base64.b64encode(b"hello").decode()}
    mid = await d.hold({"html_body": "<p>Shall we?</p>", "attachments": [att], "conversation_id": "c-1"})
    assert await _inbox(d, "beta@agents.test") == []

    r = await d.api.call("POST", f"/api/v1/messages/{mid}/approve")
    assert r.code == 200, r.body
    assert r.json() == {
        "status": "sent", "message_id": mid, "edited": False, "method": "internal",
        "smtp_message_id": f"<{mid}@mx.e2a.test>", "delivery_status": "sent",
    }
    [got] = await _inbox(d, "beta@agents.test")
    assert got["subject"] == "Plan" and got["conversation_id"] == "c-1"
    raw = await _raw(d, "beta@agents.test", got["message_id"])
    assert f"Message-ID: <{mid}@mx.e2a.test>".encode() in raw and b"a.txt" in raw

    row = await d.assert_scrubbed(mid, "sent")
    assert row["edited"] is False and row["method"] == "internal" and row["delivery_status"] == "sent"
    assert await d.transitions(mid) == ["approve"]
    detail = (await d.api.call("GET", f"/api/v1/messages/{mid}")).json()
    assert detail["status"] == "sent" and "body_text" not in detail and "attachments" not in detail
    assert detail["reviewed_at"].endswith("Z") and "approval_expires_at" not in detail
    assert detail["recipients"][0]["status"] == "sent"
    assert (await d.api.call("GET", "/api/v1/messages")).json()["messages"] == []


@pytest_twisted.ensureDeferred
async def test_approve_relays_by_smtp_dkim_signed(e2a_service_factory):
    """A held mail to the outside is queued at approval, relayed with the held id as its
    Message-ID and a DKIM signature that verifies."""
    sink = await start_smtp_sink(reactor)
    try:
        d = await deployment(
            e2a_service_factory, outbound_smtp=OutboundSmtpConfig(host="127.0.0.1", port=sink.port, tls="none")
        )
        mid = await d.hold({"to": ["Alice <ALICE@example.org>"]})
        delivered = sink.wait_for("DOT")
        r = await d.api.call("POST", f"/api/v1/messages/{mid}/approve")
        assert r.code == 200, r.body
        assert r.json()["method"] == "smtp" and r.json()["delivery_status"] == "queued"
        await delivered.addTimeout(30, reactor)

        async def sent() -> bool:
            return (await d.row(mid))["delivery_status"] == "sent"

        await wait_for(sent)
        [relayed] = sink.messages
        assert relayed.mail_from == "alpha@agents.test" and relayed.recipients == ["alice@example.org"]
        assert re.search(rb"^Message-ID: <" + mid.encode() + rb"@mx\.e2a\.test>\r$", relayed.content, re.M)
        from e2a.outbound.dkimsign import public_key_b64, thd_load_deployment_key

        selector, pem = thd_load_deployment_key(d.service.config.data_dir, "agents.test", (), "e2a")
        assert dkim.verify(relayed.content, dnsfunc=lambda name, timeout=5: (
            f"v=DKIM1; k=rsa; p={public_key_b64(pem)}".encode()))
        await d.assert_scrubbed(mid, "sent")
    finally:
        await sink.stop()


@pytest_twisted.ensureDeferred
async def test_held_reply_keeps_its_threading_ids(e2a_service_factory):
    """A held reply, once approved, carries In-Reply-To/References of the replied message."""
    d = await deployment(e2a_service_factory)
    first = await d.api.call(
        "POST", "/api/v1/send", {"from": "beta@agents.test", "to": ["alpha@agents.test"], "subject": "Q", "body": "?"}
    )
    assert first.code == 200
    [incoming] = await _inbox(d, "alpha@agents.test")
    held = await d.api.call("POST", f"/api/v1/agents/alpha@agents.test/messages/{incoming['message_id']}/reply",
                            {"body": "answer"})
    assert held.code == 202, held.body
    mid = held.json()["message_id"]
    assert (await d.api.call("POST", f"/api/v1/messages/{mid}/approve")).code == 200
    [answer] = await _inbox(d, "beta@agents.test")
    raw = await _raw(d, "beta@agents.test", answer["message_id"])
    original = first.json()["smtp_message_id"].encode()
    assert b"\r\nIn-Reply-To: " + original + b"\r\n" in raw
    assert b"\r\nReferences: " + original + b"\r\n" in raw
    assert answer["subject"] == "Re: Q"


@pytest_twisted.ensureDeferred
async def test_held_test_email_approves_and_reaches_the_agent_itself(e2a_service_factory):
    """A held `test` email approves (changed: it used to fail) and arrives in the agent's inbox."""
    d = await deployment(e2a_service_factory)
    held = await d.api.call("POST", "/api/v1/agents/alpha@agents.test/test")
    assert held.code == 202, held.body
    mid = held.json()["message_id"]
    r = await d.api.call("POST", f"/api/v1/messages/{mid}/approve")
    assert r.code == 200, r.body
    [msg] = await _inbox(d, "alpha@agents.test")
    assert msg["subject"] == "Test email from e2a" and msg["from"] == "noreply@mx.e2a.test"
    await d.assert_scrubbed(mid, "sent")
    edit = await d.api.call("POST", f"/api/v1/messages/{await _held_test(d)}/approve", {"subject": "changed"})
    assert _err(edit) == (400, "invalid_field")


async def _held_test(d) -> str:
    r = await d.api.call("POST", "/api/v1/agents/alpha@agents.test/test")
    assert r.code == 202
    return r.json()["message_id"]


@pytest_twisted.ensureDeferred
async def test_approve_check_order(e2a_service_factory):
    """401 → 403 insufficient_scope → 404 → 409 not_pending → 409 expired → 403
    domain_not_verified → 400 validation (stays pending) → 503 (stays pending) → release."""
    d = await deployment(e2a_service_factory)
    api, db = d.api, d.db
    nobody = "msg_" + "0" * 32
    agent_key = (await api.call("POST", "/api/v1/keys", {"name": "k", "agent": "alpha@agents.test"})).json()["key"]
    agent_api = Client(d.service, agent_key)
    no_key = Client(d.service, "")
    bad = {"to": ["not an address"]}

    r = await no_key.call("POST", f"/api/v1/messages/{nobody}/approve")
    assert _err(r) == (401, "unauthorized")
    mid = await d.hold()
    for target in (nobody, mid):  # decided before any lookup: reveals nothing
        assert _err(await agent_api.call("POST", f"/api/v1/messages/{target}/approve")) == (403, "insufficient_scope")
    assert _err(await api.call("POST", f"/api/v1/messages/{nobody}/approve", bad)) == (404, "message_not_found")
    # an inbound id and another user's hold are the same 404
    await api.call("POST", "/api/v1/send", {"from": "beta@agents.test", "to": ["alpha@agents.test"],
                                            "subject": "s", "body": "b"})
    [inbound] = await _inbox(d, "alpha@agents.test")
    assert _err(await api.call("POST", f"/api/v1/messages/{inbound['message_id']}/approve")) == (
        404, "message_not_found")
    other = await accounts.bootstrap(db, d.service.master_key, "other@example.com")
    assert _err(await Client(d.service, other.api_key_plaintext).call(
        "POST", f"/api/v1/messages/{mid}/approve")) == (404, "message_not_found")
    # a malformed body is reported after the lookup: 404 first, then 400
    assert (await api.call("POST", f"/api/v1/messages/{nobody}/approve", "x")).code == 404
    assert _err(await api.call("POST", f"/api/v1/messages/{mid}/approve", [1])) == (400, "invalid_request_body")

    # every later condition true at once: the earliest check wins
    done = await d.hold()
    assert (await api.call("POST", f"/api/v1/messages/{done}/reject")).code == 200
    await db.execute("UPDATE messages SET approval_expires_at = now() - interval '1 second' WHERE id IN (%s, %s)",
                     (done, mid))
    await db.execute("UPDATE domains SET verified = FALSE WHERE domain = 'agents.test'")
    r = await api.call("POST", f"/api/v1/messages/{done}/approve", bad)
    assert _err(r) == (409, "not_pending")
    assert _err(await api.call("POST", f"/api/v1/messages/{mid}/approve", bad)) == (409, "expired")
    await db.execute("UPDATE messages SET approval_expires_at = now() + interval '1 hour' WHERE id = %s", (mid,))
    assert _err(await api.call("POST", f"/api/v1/messages/{mid}/approve", bad)) == (403, "domain_not_verified")
    await db.execute("UPDATE domains SET verified = TRUE WHERE domain = 'agents.test'")
    for body, code in [
        (bad, "invalid_address"),
        ({"to": ["x@example.org"], "subject": "a\r\nBcc: evil@example.org"}, "invalid_header_value"),
        ({"to": [], "cc": []}, "no_recipients"),
        ({"attachments": [{"filename": "a", "data": "!!"}]}, "invalid_attachment"),
        ({"subject": " "}, "missing_field"),
        ({"subject": 7}, "invalid_request_body"),
    ]:
        assert _err(await api.call("POST", f"/api/v1/messages/{mid}/approve", body)) == (400, code), body
    # a recipient outside needs SMTP, and this deployment has no relay and no direct MX
    r = await api.call("POST", f"/api/v1/messages/{mid}/approve", {"to": ["x@example.org"]})
    assert _err(r) == (503, "outbound_not_configured")
    row = await d.row(mid)
    assert row["status"] == "pending_approval" and row["body_text"] == "Shall we?" and row["reviewed_at"] is None
    assert await d.transitions(mid) == []
    assert (await api.call("POST", f"/api/v1/messages/{mid}/approve")).code == 200
    assert _err(await api.call("POST", f"/api/v1/messages/{mid}/approve")) == (409, "not_pending")


@pytest_twisted.ensureDeferred
async def test_approve_edits_apply_normalised_and_set_edited(e2a_service_factory):
    """Edits replace content; recipients are normalised (display names, case, duplicates, the
    agent itself); `attachments: []` removes all; unchanged values are not edits."""
    d = await deployment(e2a_service_factory, agents=("alpha", "beta", "gamma"))
    att = {"filename": "a.txt", "content_type": "text/plain", "data": base64.b64encode(b"hello").decode()}

    same = await d.hold({"attachments": [att]})
    r = await d.api.call("POST", f"/api/v1/messages/{same}/approve",
                         {"subject": "  Plan ", "to": ["Beta <BETA@agents.test>"], "cc": [], "body_html": None})
    assert r.code == 200 and r.json()["edited"] is False
    assert (await d.row(same))["edited"] is False

    mid = await d.hold({"attachments": [att], "cc": ["gamma@agents.test"]})
    r = await d.api.call("POST", f"/api/v1/messages/{mid}/approve", {
        "subject": "New plan", "body_text": "Let us.", "body_html": "<b>Let us.</b>",
        "to": ["Gamma <GAMMA@agents.test>", "alpha@agents.test", " "], "cc": ["gamma@agents.test", "beta@agents.test"],
        "bcc": ["BETA@agents.test"], "attachments": [],
    })
    assert r.code == 200, r.body
    assert r.json()["edited"] is True
    row = await d.assert_scrubbed(mid, "sent")
    assert (row["to_addrs"], row["cc_addrs"], row["bcc_addrs"]) == (["gamma@agents.test"], ["beta@agents.test"], [])
    assert row["subject"] == "New plan" and row["edited"] is True
    [got] = await _inbox(d, "gamma@agents.test")
    raw = await _raw(d, "gamma@agents.test", got["message_id"])
    assert got["subject"] == "New plan" and b"Let us." in raw and b"<b>Let us.</b>" in raw and b"a.txt" not in raw
    assert (await d.api.call("GET", f"/api/v1/messages/{mid}")).json()["edited"] is True

    # attachments present counts as an edit even when equal
    again = await d.hold({"attachments": [att]})
    r = await d.api.call("POST", f"/api/v1/messages/{again}/approve", {"attachments": [att]})
    assert r.json()["edited"] is True


@pytest_twisted.ensureDeferred
async def test_reject_check_order_and_scrub(e2a_service_factory):
    """401 → 403 → 404 → 409 not_pending → 400 invalid_field; rejected rows keep the reason and
    lose their bodies; reject still works after approval_expires_at until the worker ran."""
    d = await deployment(e2a_service_factory)
    api = d.api
    nobody = "msg_" + "1" * 32
    agent_key = (await api.call("POST", "/api/v1/keys", {"name": "k", "agent": "alpha@agents.test"})).json()["key"]
    assert _err(await Client(d.service, "").call("POST", f"/api/v1/messages/{nobody}/reject")) == (401, "unauthorized")
    assert _err(await Client(d.service, agent_key).call("POST", f"/api/v1/messages/{nobody}/reject")) == (
        403, "insufficient_scope")
    long = {"reason": "x" * 1001}
    assert _err(await api.call("POST", f"/api/v1/messages/{nobody}/reject", long)) == (404, "message_not_found")
    mid = await d.hold({"html_body": "<p>x</p>"})
    assert _err(await api.call("POST", f"/api/v1/messages/{mid}/reject", long)) == (400, "invalid_field")
    assert (await d.row(mid))["status"] == "pending_approval"

    await d.db.execute("UPDATE messages SET approval_expires_at = now() - interval '1 second' WHERE id = %s", (mid,))
    r = await api.call("POST", f"/api/v1/messages/{mid}/reject", {"reason": "x" * 1000})
    assert r.code == 200 and r.json() == {"status": "rejected", "message_id": mid, "rejection_reason": "x" * 1000}
    row = await d.assert_scrubbed(mid, "rejected")
    assert row["rejection_reason"] == "x" * 1000
    assert _err(await api.call("POST", f"/api/v1/messages/{mid}/reject", long)) == (409, "not_pending")

    plain = await d.hold()
    r = await api.call("POST", f"/api/v1/messages/{plain}/reject")
    assert r.json() == {"status": "rejected", "message_id": plain, "rejection_reason": ""}
    detail = (await api.call("GET", f"/api/v1/messages/{plain}")).json()
    assert detail["status"] == "rejected" and "rejection_reason" not in detail and "body_text" not in detail
    assert await d.transitions(plain) == ["reject"]
    assert await _inbox(d, "beta@agents.test") == []


@pytest_twisted.ensureDeferred
async def test_service_mints_tokens_with_the_configured_grace(e2a_service_factory):
    """hitl.token_grace reaches the magic-link tokens: exp = floor(approval_expires_at) + grace;
    hitl.sweep_interval reaches the running expiry worker's loop."""
    from e2a.config import HitlConfig

    d = await deployment(e2a_service_factory, hitl=HitlConfig(token_grace=5, sweep_interval=7))
    mid = await d.hold()
    held = await d.service.hold_review.check(mid, "approve")
    token = d.service.approval_tokens.mint(mid, "approve", held.approval_expires_at)
    payload = base64.urlsafe_b64decode(token.split(".")[0] + "==").decode()
    assert payload == f"{mid}|approve|{int(held.approval_expires_at.timestamp()) + 5}"
    expiry = d.service.expiry
    assert expiry is not None and expiry.interval == 7
    assert expiry._loop is not None and expiry._loop.running and expiry._loop.interval == 7


@pytest_twisted.ensureDeferred
async def test_review_path_id_not_of_message_form_is_404_not_500(e2a_service_factory):
    """A path id that is not `msg_<32 hex>` (here with NUL) is 404 `message_not_found` for
    approve and reject, after the scope check, and never reaches SQL (was a 500)."""
    d = await deployment(e2a_service_factory)
    agent_key = (await d.api.call("POST", "/api/v1/keys", {"name": "k", "agent": "alpha@agents.test"})).json()["key"]
    for action in ("approve", "reject"):
        for path_id in ("msg_%00", "msg_" + "A" * 32, "nope"):
            r = await d.api.call("POST", f"/api/v1/messages/{path_id}/{action}")
            assert _err(r) == (404, "message_not_found"), (action, path_id, r.body)
        r = await Client(d.service, agent_key).call("POST", f"/api/v1/messages/msg_%00/{action}")
        assert _err(r) == (403, "insufficient_scope")


@pytest_twisted.ensureDeferred
async def test_approve_edit_with_nul_in_header_text_is_invalid_header_value(e2a_service_factory):
    """NUL in an edited subject or attachment filename is `invalid_header_value`, as for a send
    (api.md §0.11; was `invalid_request_body`); the message stays pending."""
    d = await deployment(e2a_service_factory)
    mid = await d.hold()
    att = {"filename": "a\x00.txt", "content_type": "text/plain", "data": ""}
    for body in ({"subject": "a\x00b"}, {"attachments": [att]}):
        r = await d.api.call("POST", f"/api/v1/messages/{mid}/approve", body)
        assert _err(r) == (400, "invalid_header_value"), r.body
    assert (await d.row(mid))["status"] == "pending_approval"


@pytest_twisted.ensureDeferred
async def test_review_of_a_reviewer_notification_id_is_404(e2a_service_factory):
    """A reviewer notification row (e2a's own mail, 404 in GET /messages/{id}) is 404 for
    approve and reject too, not 409 `not_pending`."""
    from e2a.config import HttpConfig

    d = await deployment(e2a_service_factory, agents=("alpha", "beta", "boss"),
                         http=HttpConfig(listen_addr="127.0.0.1:0", public_url="http://e2a.test"))
    r = await d.api.call("PUT", "/api/v1/agents/alpha@agents.test", {"hitl_reviewers": ["boss@agents.test"]})
    assert r.code == 200, r.body
    await d.hold()
    row = await d.db.fetchone("SELECT id FROM messages WHERE type = 'notify'")
    assert row is not None
    assert (await d.api.call("GET", f"/api/v1/messages/{row['id']}")).code == 404
    for action in ("approve", "reject"):
        assert _err(await d.api.call("POST", f"/api/v1/messages/{row['id']}/{action}")) == (404, "message_not_found")
