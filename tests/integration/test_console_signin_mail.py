"""The console's "mail me a sign-in link" form on the whole service: the mail goes through the
outbound queue to a local SMTP sink, DKIM-verifies against the local DNS zone, its link signs
in once; the answer never tells whether an account exists; requests are rate limited; and
without outbound or a public URL the form is not offered."""

from __future__ import annotations

import email
import email.policy
import re
from urllib.parse import urlsplit

import pytest_twisted

from twisted.internet import threads

from e2a.config import HttpConfig, OutboundSmtpConfig, RateLimitConfig
from tests.integration.test_console_http import Browserish, val
from tests.integration.test_hitl_notify import dkim_verifies
from tests.support.apiserver import insert_user_with_key, make_test_config
from tests.support.hitlstack import OWNER, PUBLIC_URL, StackServer
from tests.support.waiting import wait_for


async def _publish_key(stack, domain: str) -> None:
    from e2a.outbound.dkimsign import public_key_b64, thd_load_deployment_key

    config = stack.service.config
    selector, pem = await threads.deferToThread(
        thd_load_deployment_key, config.data_dir, domain, config.dkim.keys, config.dkim.selector
    )
    stack.dns.add(f"{selector}._domainkey.{domain}", "TXT", f"v=DKIM1; k=rsa; p={public_key_b64(pem)}")


async def _ask(b: Browserish, address: str):
    pre = await b.csrf("/console/signin")
    return await b.request("POST", "/console/signin/mail", {"csrf": pre, "email": address})


@pytest_twisted.ensureDeferred
async def test_mailed_sign_in_link_arrives_signed_and_signs_in_once(hitl_stacks):
    """The link is mailed From e2a <noreply@D> through the relay, DKIM-verified; unknown and known
    addresses get the same page; the link signs in once and is refused the second time."""
    stack = await hitl_stacks()
    config = stack.service.config
    domain = config.shared_domain or config.smtp.domain
    await _publish_key(stack, domain)
    b = Browserish(StackServer(stack))
    page = (await b.get("/console/signin")).body.decode()
    assert 'action="/console/signin/mail"' in page and "Mail me a sign-in link" in page

    known = await _ask(b, OWNER.upper())
    unknown = await _ask(b, "nobody-here@example.com")
    assert known.code == unknown.code == 200
    assert known.body.replace(OWNER.encode(), b"ADDR") == unknown.body.replace(b"nobody-here@example.com", b"ADDR")
    assert "e2a_console" not in b.cookies

    async def arrived() -> bool:
        return any(m.mail_from.startswith("noreply@") for m in stack.sink.messages)

    await wait_for(arrived)
    [mail] = [m for m in stack.sink.messages if m.mail_from.startswith("noreply@")]
    assert mail.mail_from == f"noreply@{domain}" and mail.recipients == [OWNER]
    assert mail.content.startswith(b"DKIM-Signature:") and await dkim_verifies(stack, mail.content)
    msg = email.message_from_bytes(mail.content, policy=email.policy.default)
    assert msg["From"] == f"e2a <noreply@{domain}>" and msg["To"] == OWNER
    assert msg["Auto-Submitted"] == "auto-generated"
    links = re.findall(r"https?://\S+", msg.get_content())
    assert len(links) == 1 and links[0].startswith(f"{PUBLIC_URL}/console/login?t=")
    parts = urlsplit(links[0])
    local = f"{parts.path}?{parts.query}"

    rows = await stack.service.db.fetchall("SELECT id, agent_id FROM messages WHERE type = 'signin'")
    assert len(rows) == 1 and rows[0]["agent_id"] is None  # nothing queued for the unknown address
    assert await val(stack.service.db, "SELECT count(*) FROM console_login_links") == 1
    assert (await stack.api("GET", f"/api/v1/messages/{rows[0]['id']}")).code == 404  # e2a's own mail
    for action in ("approve", "reject"):  # not a hold either: review answers as for unknown ids
        assert (await stack.api("POST", f"/api/v1/messages/{rows[0]['id']}/{action}")).code == 404
    export = await stack.api("GET", "/api/v1/users/me/export")
    assert export.code == 200 and rows[0]["id"].encode() not in export.body

    visitor = Browserish(StackServer(stack))
    form = await visitor.get(local)
    assert form.code == 200
    pre = re.search(rb'name="csrf" value="([^"]+)"', form.body).group(1).decode()
    token = parts.query.split("t=", 1)[1]
    r = await visitor.request("POST", "/console/login", {"csrf": pre, "t": token})
    assert r.code == 303 and "e2a_console" in visitor.cookies
    overview = await visitor.get("/console/")
    assert overview.code == 200 and OWNER.encode() in overview.body

    again = Browserish(StackServer(stack))
    form = await again.get(local)
    pre = re.search(rb'name="csrf" value="([^"]+)"', form.body).group(1).decode()
    r = await again.request("POST", "/console/login", {"csrf": pre, "t": token})
    assert r.code == 400 and "e2a_console" not in again.cookies


@pytest_twisted.ensureDeferred
async def test_sign_in_mail_is_not_offered_without_outbound_or_public_url(api_server_factory):
    """No relay (or no public URL): the page points to e2a-admin login-link and the route is a 404 page."""
    relay = OutboundSmtpConfig(host="127.0.0.1", port=9, tls="none")
    for config in (make_test_config(http=HttpConfig(public_url="https://e2a.example")),
                   make_test_config(outbound_smtp=relay)):
        server = await api_server_factory(config=config)
        b = Browserish(server)
        page = (await b.get("/console/signin")).body.decode()
        assert "signin/mail" not in page and "e2a-admin login-link" in page
        r = await _ask(b, "owner@example.com")
        assert r.code == 404 and r.header("Content-Type") == "text/html; charset=utf-8"
        assert await val(server.db, "SELECT count(*) FROM console_login_links") == 0


@pytest_twisted.ensureDeferred
async def test_sign_in_mail_requests_are_rate_limited_like_failed_sign_ins(api_server_factory):
    """Each request counts in the per-IP sign-in budget: past it → 429, nothing more queued; and a
    mail request uses up the budget that failed key sign-ins use."""
    config = make_test_config(rate_limits=RateLimitConfig(register_per_hour=2),
                              http=HttpConfig(public_url="https://e2a.example"),
                              outbound_smtp=OutboundSmtpConfig(host="127.0.0.1", port=9, tls="none"))
    server = await api_server_factory(config=config)
    _uid, key = await insert_user_with_key(server.db)
    b = Browserish(server)
    assert (await _ask(b, "owner@example.com")).code == 200
    assert (await _ask(b, "someone@example.com")).code == 200
    r = await _ask(b, "owner@example.com")
    assert r.code == 429 and b"Too many" in r.body
    assert (await b.sign_in(key)).code == 429  # the same budget as failed sign-ins

    async def queued() -> bool:
        return await val(server.db, "SELECT count(*) FROM messages WHERE type = 'signin'") == 1

    await wait_for(queued)
    assert await val(server.db, "SELECT count(*) FROM console_login_links") == 1
