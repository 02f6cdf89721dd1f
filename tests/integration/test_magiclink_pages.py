"""Magic-link pages on the whole service (real PostgreSQL, real sockets): every row of the
outcome table of the API contract §8 for GET, HEAD and POST, the exact form, the security
headers on every status, escaping, the public URL's path prefix, and tokens kept out of logs."""

from __future__ import annotations

import dataclasses
import io
import re
import secrets
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from e2a.api.magiclink_pages import confirmation_page, form_action, render_page
from tests.support.hitlstack import AGENT, assert_page
from tests.support.waiting import wait_for


def _future() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)


def _t(stack, message_id: str, action: str, expires: datetime | None = None) -> str:
    return stack.tokens.mint(message_id, action, expires or _future())


async def _expire_window(stack, message_id: str) -> None:
    """The hold's approval window closed a minute ago (the worker is not running)."""
    await stack.service.db.execute(
        "UPDATE messages SET approval_expires_at = now() - interval '1 minute' WHERE id = %s", (message_id,)
    )


# ------------------------------------------------------------------------------ GET / HEAD


@pytest_twisted.ensureDeferred
async def test_get_confirmation_page_shows_hold_and_exact_form_without_acting(hitl_stacks):
    """GET approve/reject: 200 confirmation with agent, To/Cc/Bcc, subject, expiry, preview and
    the exact form; GET and HEAD leave the message pending."""
    stack = await hitl_stacks()
    mid = await stack.hold(cc=["carol@example.net"], bcc=["dave@example.net"])
    row = await stack.service.db.fetchone("SELECT approval_expires_at FROM messages WHERE id = %s", (mid,))
    t = _t(stack, mid, "approve", row["approval_expires_at"])
    body = assert_page(await stack.page("GET", f"/api/v1/approve?t={t}"), 200,
                       AGENT, "bob@example.net", "carol@example.net", "dave@example.net", "Quarterly numbers",
                       "Hello Bob,\nthe numbers.")
    expires = row["approval_expires_at"].astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
    assert expires in body
    assert '<form method="POST" action="/api/v1/approve">' in body
    assert f'<input type="hidden" name="t" value="{t}">' in body
    assert re.search(r'<button type="submit"[^>]*>', body)

    rt = _t(stack, mid, "reject")
    body = assert_page(await stack.page("GET", f"/api/v1/reject?t={rt}"), 200, "Quarterly numbers")
    assert '<form method="POST" action="/api/v1/reject">' in body
    assert f'<input type="hidden" name="t" value="{rt}">' in body
    assert '<input type="text" name="reason" maxlength="200">' in body  # exactly, no extra attribute

    head = await stack.page("HEAD", f"/api/v1/approve?t={t}")
    assert head.code == 200 and head.body == b""
    assert head.header("Content-Security-Policy") and head.header("Cache-Control") == "no-store"
    assert await stack.status(mid) == "pending_approval"


@pytest_twisted.ensureDeferred
async def test_token_parameter_accepted_and_t_wins(hitl_stacks):
    """``token`` works as an alias; with both, ``t`` decides (a bad ``t`` is an invalid link)."""
    stack = await hitl_stacks()
    mid = await stack.hold()
    good = _t(stack, mid, "approve")
    assert_page(await stack.page("GET", f"/api/v1/approve?token={good}"), 200, "Quarterly numbers")
    assert_page(await stack.page("GET", f"/api/v1/approve?t=garbage&token={good}"), 400, "Invalid link")
    assert_page(await stack.page("GET", f"/api/v1/approve?t={good}&token=garbage"), 200)
    assert_page(await stack.page("GET", f"/api/v1/approve?t={good}&t=garbage"), 200)  # first wins


@pytest.mark.parametrize("query", ["t=%ff", "t=%00", "t=%E2%82%AC.abc", "t=" + "A" * 300 + ".x"])
@pytest_twisted.ensureDeferred
async def test_undecodable_or_odd_token_is_invalid_link_page(hitl_stacks, query):
    """A token that is not UTF-8, holds NUL, is not ASCII or is far too long: 400 invalid link
    (an HTML page, not the API's JSON)."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    assert_page(await stack.page("GET", f"/api/v1/reject?{query}"), 400, "Invalid link")
    assert_page(await stack.page("POST", "/api/v1/reject", query.encode()), 400, "Invalid link")


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
@pytest_twisted.ensureDeferred
async def test_outcome_table_rows_for_every_method(hitl_stacks, method):
    """Missing, invalid, wrong action, expired token, unknown message, resolved message,
    closed window and unverified domain give their page and status for GET, HEAD and POST,
    and never change the message."""
    stack = await hitl_stacks()
    mid = await stack.hold()
    other = await stack.hold(subject="second")

    async def check(action: str, query: str, status: int, text: str) -> None:
        if method == "POST":
            form = dict(p.split("=", 1) for p in query.split("&")) if query else {}
            resp = await stack.page("POST", f"/api/v1/{action}", form)
        else:
            resp = await stack.page(method, f"/api/v1/{action}" + (f"?{query}" if query else ""))
        if method == "HEAD":
            assert resp.code == status and resp.body == b""
            assert resp.header("X-Frame-Options") == "DENY"
        else:
            assert_page(resp, status, text)

    for action in ("approve", "reject"):
        await check(action, "", 400, "Missing link token")
        await check(action, "t=", 400, "Missing link token")
        await check(action, "t=not-a-token", 400, "Invalid link")
        other_action = "reject" if action == "approve" else "approve"
        await check(action, f"t={_t(stack, mid, other_action)}", 400, "Invalid link")
        tampered = _t(stack, mid, action)
        await check(action, "t=" + tampered[:-2] + ("AA" if not tampered.endswith("AA") else "BA"), 400, "Invalid link")
        padded = _t(stack, mid, action).split(".")
        await check(action, f"t={padded[0]}=.{padded[1]}", 400, "Invalid link")
        past = datetime.now(UTC) - timedelta(hours=1)
        await check(action, f"t={_t(stack, mid, action, past)}", 410, "Link expired")
        ghost = "msg_" + secrets.token_hex(16)
        await check(action, f"t={_t(stack, ghost, action)}", 404, "Not found")

    # resolved: another message, rejected through the API
    assert (await stack.api("POST", f"/api/v1/messages/{other}/reject", {"reason": "no"})).code == 200
    for action in ("approve", "reject"):
        await check(action, f"t={_t(stack, other, action)}", 409, "Already resolved")
    if method != "HEAD":
        resp = await stack.page("GET", f"/api/v1/approve?t={_t(stack, other, 'approve')}")
        assert_page(resp, 409, "Current status: <strong>rejected</strong>")

    # approve only: domain unverified → 403; window closed → 409 (checked first)
    await stack.service.db.execute("UPDATE domains SET verified = FALSE WHERE domain = 'agents.test'")
    await check("approve", f"t={_t(stack, mid, 'approve')}", 403, "Domain not verified")
    await _expire_window(stack, mid)
    await check("approve", f"t={_t(stack, mid, 'approve')}", 409, "Approval window closed")
    await stack.service.db.execute("UPDATE domains SET verified = TRUE WHERE domain = 'agents.test'")
    assert await stack.status(mid) == "pending_approval"
    # ...while reject still shows its page after the window (until the worker ran)
    await check("reject", f"t={_t(stack, mid, 'reject')}", 200, "Reject outbound email" if method == "GET" else "")


# ------------------------------------------------------------------------------ POST acts


@pytest_twisted.ensureDeferred
async def test_post_approve_releases_and_second_post_is_already_resolved(hitl_stacks):
    """POST approve: 200 Approved, the message is sent and relayed; the same token again → 409."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    mid = await stack.hold()
    t = _t(stack, mid, "approve")
    delivered = stack.sink.wait_for("DOT")
    assert_page(await stack.page("POST", "/api/v1/approve", {"t": t}), 200, "Approved")
    assert await stack.status(mid) == "sent"
    await delivered.addTimeout(30, reactor)
    await wait_for(lambda: _delivery(stack, mid, "sent"))
    assert [m.recipients for m in stack.sink.messages] == [["bob@example.net"]]
    row = await stack.service.db.fetchone(
        "SELECT body_text, body_html, attachments, reviewed_at FROM messages WHERE id = %s", (mid,)
    )
    assert row["body_text"] is None and row["attachments"] is None and row["reviewed_at"] is not None
    audit = await stack.service.db.fetchall("SELECT action, actor FROM approvals WHERE message_id = %s", (mid,))
    assert ("approve", "magic_link") in {(a["action"], a["actor"]) for a in audit}
    assert_page(await stack.page("POST", "/api/v1/approve", {"t": t}), 409, "Already resolved", "sent")


async def _delivery(stack, mid: str, status: str) -> bool:
    row = await stack.service.db.fetchone("SELECT delivery_status FROM messages WHERE id = %s", (mid,))
    return row["delivery_status"] == status


@pytest.mark.parametrize(("reason", "stored"), [("", "magic-link rejection"), ("  ", "magic-link rejection"),
                                                ("wrong <tone> & facts", "wrong <tone> & facts")])
@pytest_twisted.ensureDeferred
async def test_post_reject_stores_reason_or_default(hitl_stacks, reason, stored):
    """POST reject: 200 Rejected, reason stored (default ``magic-link rejection``), bodies gone."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    mid = await stack.hold()
    assert_page(await stack.page("POST", "/api/v1/reject", {"t": _t(stack, mid, "reject"), "reason": reason}),
                200, "Rejected")
    row = await stack.service.db.fetchone(
        "SELECT status, rejection_reason, body_text FROM messages WHERE id = %s", (mid,)
    )
    assert (row["status"], row["rejection_reason"], row["body_text"]) == ("rejected", stored, None)


@pytest_twisted.ensureDeferred
async def test_post_reject_reason_too_long_is_400_and_stays_pending(hitl_stacks):
    """A reason over 1000 characters is refused with a page; nothing changes."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    mid = await stack.hold()
    assert_page(await stack.page("POST", "/api/v1/reject", {"t": _t(stack, mid, "reject"), "reason": "x" * 1001}),
                400, "Invalid reason")
    assert await stack.status(mid) == "pending_approval"


@pytest_twisted.ensureDeferred
async def test_post_approve_validation_error_is_400_and_stays_pending(hitl_stacks):
    """Held content that no longer validates (a stored recipient is not an address): 400 page
    naming the reason; the message stays pending."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    mid = await stack.hold()
    await stack.service.db.execute("UPDATE messages SET to_addrs = '[\"not an address\"]' WHERE id = %s", (mid,))
    t = _t(stack, mid, "approve")
    assert_page(await stack.page("GET", f"/api/v1/approve?t={t}"), 200)  # GET does not validate content
    assert_page(await stack.page("POST", "/api/v1/approve", {"t": t}), 400, "Cannot be sent", "stays pending")
    assert await stack.status(mid) == "pending_approval"


@pytest_twisted.ensureDeferred
async def test_post_approve_without_route_is_503_and_stays_pending(hitl_stacks):
    """No upstream relay: a hold to an internal agent whose recipient was deleted since needs
    SMTP → 503 page; the message stays pending."""
    stack = await hitl_stacks(relay=False, agent={"hitl_notify": False})
    assert (await stack.api("POST", "/api/v1/agents", {"slug": "beta", "agent_mode": "local"})).code == 201
    mid = await stack.hold(to=("beta@agents.test",))
    assert (await stack.api("DELETE", "/api/v1/agents/beta@agents.test")).code == 200
    assert_page(await stack.page("POST", "/api/v1/approve", {"t": _t(stack, mid, "approve")}), 503, "Cannot be sent")
    assert await stack.status(mid) == "pending_approval"


@pytest_twisted.ensureDeferred
async def test_post_takes_token_from_form_only(hitl_stacks):
    """POST reads ``t``/``token`` from the form body; a token only in the query is missing."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    mid = await stack.hold()
    t = _t(stack, mid, "reject")
    assert_page(await stack.page("POST", f"/api/v1/reject?t={t}", {}), 400, "Missing link token")
    assert_page(await stack.page("POST", "/api/v1/reject", {"token": t}), 200, "Rejected")


@pytest_twisted.ensureDeferred
async def test_form_over_16_kib_is_400_page_with_headers(hitl_stacks):
    """A form post over 16 KiB: 400 HTML page with every header, nothing changes."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    mid = await stack.hold()
    form = {"t": _t(stack, mid, "reject"), "reason": "x" * (16 * 1024)}
    assert_page(await stack.page("POST", "/api/v1/reject", form), 400, "Request too large")
    assert await stack.status(mid) == "pending_approval"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest_twisted.ensureDeferred
async def test_other_methods_are_405_pages(hitl_stacks, method):
    """Any other method: 405 HTML page with Allow and every security header."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    resp = await stack.page(method, "/api/v1/approve?t=x")
    assert_page(resp, 405, "Method not allowed")
    assert resp.header("Allow") == "GET, HEAD, POST"


@pytest_twisted.ensureDeferred
async def test_unexpected_failure_is_generic_500_page_without_token_in_log(hitl_stacks):
    """A failure inside the review: 500 generic page with the headers; the log has the failure
    but not the token."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    mid = await stack.hold()
    t = _t(stack, mid, "approve")

    class Broken:
        async def check(self, *a, **kw):
            raise RuntimeError("database exploded")

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    deps = stack.service.api.deps
    saved = deps.services
    deps.services = dataclasses.replace(saved, hold_review=Broken())
    try:
        body = assert_page(await stack.page("GET", f"/api/v1/approve?t={t}"), 500, "Something went wrong")
    finally:
        globalLogPublisher.removeObserver(events.append)
        deps.services = saved
    assert "exploded" not in body
    assert any("magic-link" in str(e.get("log_format", "")) for e in events)
    assert t not in repr(events)


# ------------------------------------------------------------------------------ escaping, prefix, logs


@pytest_twisted.ensureDeferred
async def test_dynamic_values_are_escaped(hitl_stacks):
    """Subject and body with markup are shown as text; an HTML-only note when there is no text."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    mid = await stack.hold(subject='<script>alert("s")</script> & co', body="<b>bold</b> & <img src=x>")
    body = assert_page(await stack.page("GET", f"/api/v1/approve?t={_t(stack, mid, 'approve')}"), 200)
    assert "&lt;script&gt;alert(&quot;s&quot;)&lt;/script&gt; &amp; co" in body
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;img src=x&gt;" in body


def test_confirmation_page_preview_limits_and_html_only_note():
    """Pure: the preview is the first 2000 characters; a hold without text says it is HTML only."""

    class Held:
        agent_id = "a@agents.test"
        to, cc, bcc = ("b@x.test",), (), ()
        subject = "s"
        approval_expires_at = datetime(2026, 12, 6, 19, 0, 5, 900000, tzinfo=UTC)
        body_text = "a" * 2000 + "TAIL"
        body_html = None

    page = render_page(confirmation_page(Held, "approve", "tok.en", "https://e2a.example.test")).decode()
    assert "a" * 2000 in page and "TAIL" not in page
    assert "Sun, 06 Dec 2026 19:00:05 +0000" in page
    Held.body_text, Held.body_html = "", "<p>hi</p>"
    page = render_page(confirmation_page(Held, "reject", "tok.en", "")).decode()
    assert "only an HTML body" in page and "<p>hi</p>" not in page


@pytest.mark.parametrize(("public_url", "action"), [
    ("https://e2a.example.test", "/api/v1/approve"),
    ("https://e2a.example.test/", "/api/v1/approve"),
    ("https://example.test/mail", "/mail/api/v1/approve"),
    ("https://example.test/mail/", "/mail/api/v1/approve"),
    ("https://example.test/a/b?x=1", "/a/b/api/v1/approve"),
    ("", "/api/v1/approve"),
])
def test_form_action_keeps_public_url_prefix(public_url, action):
    """Pure: the form action is the public URL's path prefix + the endpoint path."""
    assert form_action(public_url, "approve") == action


@pytest_twisted.ensureDeferred
async def test_form_action_uses_prefix_of_public_url(hitl_stacks):
    """With http.public_url under /mail, the served form posts to /mail/api/v1/…."""
    stack = await hitl_stacks(public_url="https://example.test/mail", agent={"hitl_notify": False})
    mid = await stack.hold()
    body = assert_page(await stack.page("GET", f"/api/v1/reject?t={_t(stack, mid, 'reject')}"), 200)
    assert '<form method="POST" action="/mail/api/v1/reject">' in body


@pytest_twisted.ensureDeferred
async def test_access_log_never_contains_token(hitl_stacks):
    """GET with ``t=``/``token=`` and POST: the access log shows *** and never the token."""
    stack = await hitl_stacks(agent={"hitl_notify": False})
    mid = await stack.hold()
    site = stack.service.http_port.factory
    site = getattr(site, "wrappedFactory", site)  # the connection guard wraps the Site
    site.logFile = io.StringIO()
    t = _t(stack, mid, "reject")
    await stack.page("GET", f"/api/v1/reject?t={t}")
    await stack.page("HEAD", f"/api/v1/reject?token={t}")
    await stack.page("GET", f"/api/v1/reject?%74={t}")
    await stack.page("POST", "/api/v1/reject", {"t": t})
    lines = site.logFile.getvalue()
    assert lines.count("/api/v1/reject") == 4
    assert t not in lines and t.split(".")[0] not in lines
    assert "t=***" in lines and "token=***" in lines
