"""The web console over real HTTP on real PostgreSQL: sign-in, cookie flags, CSRF, session
expiry under ``task.Clock``, cross-user 404s, security headers and XSS payloads rendered inert."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest_twisted
import treq

from twisted.internet import task

from e2a.config import HttpConfig, RateLimitConfig
from e2a.store import accounts, sessions
from tests.support.apiserver import Response, insert_user_with_key, make_test_config

XSS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "invoice\u202egnp.exe",
]
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class Browserish:
    """A tiny cookie-keeping client for the console (no redirects followed)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.cookies: dict[str, str] = {}

    async def request(self, method: str, path: str, form: dict[str, str] | None = None) -> Response:
        headers = {}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        data = None
        if form is not None:
            data = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        resp = await treq.request(method, self.server.url(path), data=data, headers=headers, persistent=False,
                                   allow_redirects=False)
        body = await treq.content(resp)
        for raw in resp.headers.getRawHeaders("set-cookie") or []:
            name, _, rest = raw.partition("=")
            value = rest.split(";", 1)[0]
            if value:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        return Response(resp.code, resp.headers, body)

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    async def csrf(self, path: str = "/console/") -> str:
        page = await self.get(path)
        assert page.code == 200, (page.code, page.body[:300])
        return re.search(rb'name="csrf" value="([^"]+)"', page.body).group(1).decode()

    async def sign_in(self, key: str) -> Response:
        pre = await self.csrf("/console/signin")
        return await self.request("POST", "/console/signin", {"csrf": pre, "key": key})

    async def post(self, path: str, form: dict[str, str]) -> Response:
        form = {"csrf": await self.csrf(), **form}
        return await self.request("POST", path, form)


async def val(db: Any, sql: str, params: Any = None) -> Any:
    row = await db.fetchone(sql, params)
    return None if row is None else next(iter(row.values()))


def parsed(body: bytes) -> list[tuple[str, dict[str, str]]]:
    """Every element of a page as the browser's tokenizer sees it: (tag, attributes)."""
    from html.parser import HTMLParser

    found: list[tuple[str, dict[str, str]]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found.append((tag, {k: v or "" for k, v in attrs}))

    Collect().feed(body.decode("utf-8"))
    return found


def assert_headers(resp: Response) -> None:
    assert resp.header("Content-Security-Policy") == CSP
    assert resp.header("X-Frame-Options") == "DENY"
    assert resp.header("Referrer-Policy") == "no-referrer"
    assert resp.header("Cache-Control") == "no-store"
    assert resp.header("X-Content-Type-Options") == "nosniff"


async def _agent(server: Any, key: str, slug: str) -> str:
    r = await server.request("POST", "/api/v1/agents", key=key, json_body={"slug": slug, "agent_mode": "local"})
    assert r.code == 201, r.body
    return r.json()["id"]


async def _inbound(db: Any, agent: str, user_id: str, subject: str, html: bool = False) -> str:
    mid = "msg_" + secrets.token_hex(16)
    raw = (f"From: Mallory <m@evil.test>\r\nTo: {agent}\r\nSubject: {subject}\r\n\r\n"
           "Hello <script>alert(2)</script>\r\n").encode()
    if html:
        raw = (f"From: m@evil.test\r\nTo: {agent}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
               "Content-Type: text/html; charset=utf-8\r\n\r\n"
               '<img src=x onerror=alert(4)><a href="javascript:alert(5)">x</a>\r\n').encode()
    auth = {"X-E2A-Auth-Verified": "false", "X-E2A-Auth-Sender": '"><img src=x onerror=alert(3)>',
            "X-E2A-Auth-Entity-Type": "human", "X-E2A-Auth-Domain-Check": "spf=fail; dkim=none; dmarc=fail"}

    async def txn(t: Any) -> None:
        await t.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status, sender, display_from, recipient, subject,"
            " raw_message, auth_headers) VALUES (%s, %s, %s, 'inbound', 'unread', 'm@evil.test', %s, %s, %s, %s, %s)",
            (mid, agent, user_id, "Mallory <script>", agent, subject, raw, json.dumps(auth)),
        )

    await db.run("test_inbound", txn)
    return mid


async def _hold(db: Any, agent: str, user_id: str, subject: str, expires_in: int = 3600) -> str:
    mid = "msg_" + secrets.token_hex(16)

    async def txn(t: Any) -> None:
        await t.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, type, status, sender, subject, to_addrs,"
            " body_text, approval_expires_at) VALUES (%s, %s, %s, 'outbound', 'send', 'pending_approval', %s, %s,"
            " %s, 'body', now() + make_interval(secs => %s))",
            (mid, agent, user_id, agent, subject, json.dumps(["bob@example.net"]), expires_in),
        )

    await db.run("test_hold", txn)
    return mid


@pytest_twisted.ensureDeferred
async def test_signin_with_user_key_sets_session_cookie_with_flags(api_server_factory):
    """A user key signs in: 303 to the overview, cookie HttpOnly + SameSite=Lax + Path=/console, no Secure on http."""
    server = await api_server_factory()
    _uid, key = await insert_user_with_key(server.db)
    b = Browserish(server)
    r = await b.sign_in(key)
    assert r.code == 303 and r.header("Location") == "/console/"
    cookie = [c for c in r.headers.getRawHeaders("set-cookie") if c.startswith("e2a_console=")][0]
    flags = [p.strip().lower() for p in cookie.split(";")]
    assert "httponly" in flags and "samesite=lax" in flags and "path=/console" in flags
    assert "secure" not in flags and "max-age=604800" in flags
    token = cookie.split(";")[0].split("=", 1)[1]
    stored = await server.db.fetchall("SELECT token_hash FROM console_sessions")
    assert [row["token_hash"] for row in stored] == [hashlib.sha256(token.encode()).hexdigest()]  # hash only
    page = await b.get("/console/")
    assert page.code == 200 and b"Overview" in page.body
    assert_headers(page)


@pytest_twisted.ensureDeferred
async def test_cookie_is_secure_when_public_url_is_https(api_server_factory):
    """http.public_url https → the session cookie carries Secure."""
    config = make_test_config(http=HttpConfig(public_url="https://mail.example.com"))
    server = await api_server_factory(config=config)
    _uid, key = await insert_user_with_key(server.db)
    r = await Browserish(server).sign_in(key)
    assert r.code == 303
    cookie = [c for c in r.headers.getRawHeaders("set-cookie") if c.startswith("e2a_console=")][0]
    assert "secure" in [p.strip().lower() for p in cookie.split(";")]


@pytest_twisted.ensureDeferred
async def test_signin_refuses_agent_keys_bad_keys_and_rate_limits_failures(api_server_factory):
    """Agent-scoped key → 403, unknown key → 401, no session; after the limit of failures → 429."""
    config = make_test_config(rate_limits=RateLimitConfig(register_per_hour=3))
    server = await api_server_factory(config=config)
    uid, key = await insert_user_with_key(server.db)
    agent = await _agent(server, key, "alpha")
    _k, agent_key = await accounts.create_api_key(server.db, uid, "agent", agent)
    b = Browserish(server)
    r = await b.sign_in(agent_key)
    assert r.code == 403 and b"Agent-scoped keys cannot sign in" in r.body
    r = await b.sign_in("e2a_" + "0" * 64)
    assert r.code == 401
    r = await b.sign_in("nonsense")
    assert r.code == 401
    assert "e2a_console" not in b.cookies
    r = await b.sign_in(key)  # the right key, but three failures already used the budget
    assert r.code == 429 and "e2a_console" not in b.cookies
    assert await val(server.db, "SELECT count(*) FROM console_sessions") == 0


@pytest_twisted.ensureDeferred
async def test_post_without_or_with_wrong_csrf_token_is_403_and_changes_nothing(api_server_factory):
    """Every state-changing form needs the session's CSRF token: missing or wrong → 403, nothing created."""
    server = await api_server_factory()
    uid, key = await insert_user_with_key(server.db)
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    before = len(await accounts.list_api_keys(server.db, uid))
    for form in ({"name": "x"}, {"name": "x", "csrf": "wrong"}, {"name": "x", "csrf": ""}):
        r = await b.request("POST", "/console/keys", form)
        assert r.code == 403, r.body[:300]
        assert_headers(r)
    r = await b.request("POST", "/console/secrets", {"name": "s"})
    assert r.code == 403
    r = await b.request("POST", "/console/account/delete", {"confirm": "DELETE", "csrf": "nope"})
    assert r.code == 403
    assert len(await accounts.list_api_keys(server.db, uid)) == before
    assert await accounts.list_signing_secrets(server.db, uid) == []
    assert await accounts.get_user(server.db, uid) is not None
    # sign-in form: its double-submit token is required too
    r = await Browserish(server).request("POST", "/console/signin", {"key": key})
    assert r.code == 403
    # with the token it works
    r = await b.post("/console/keys", {"name": "made"})
    assert r.code == 200 and b"shown only this once" in r.body
    assert len(await accounts.list_api_keys(server.db, uid)) == before + 1


@pytest_twisted.ensureDeferred
async def test_session_expires_after_seven_days_under_the_clock(api_server_factory):
    """A session valid at 7 days minus a second is refused at 7 days (task.Clock), redirecting to sign-in."""
    clock = task.Clock()
    clock.advance(time.time())
    server = await api_server_factory(clock=clock)
    _uid, key = await insert_user_with_key(server.db)
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    clock.advance(timedelta(days=7).total_seconds() - 1)
    assert (await b.get("/console/")).code == 200
    clock.advance(1)
    r = await b.get("/console/")
    assert r.code == 303 and r.header("Location") == "/console/signin"


@pytest_twisted.ensureDeferred
async def test_signout_and_account_delete_revoke_the_session(api_server_factory):
    """Sign-out revokes the session server-side (the old cookie is refused); account delete too."""
    server = await api_server_factory()
    _uid, key = await insert_user_with_key(server.db)
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    old = dict(b.cookies)
    r = await b.post("/console/signout", {})
    assert r.code == 303
    b.cookies = old  # a stolen copy of the cookie
    assert (await b.get("/console/")).code == 303

    uid2, key2 = await insert_user_with_key(server.db, "second@example.com")
    c = Browserish(server)
    assert (await c.sign_in(key2)).code == 303
    kept = dict(c.cookies)
    r = await c.post("/console/account/delete", {"confirm": "delete"})
    assert r.code == 400 and await accounts.get_user(server.db, uid2) is not None  # typed confirmation
    r = await c.post("/console/account/delete", {"confirm": "DELETE"})
    assert r.code == 303 and await accounts.get_user(server.db, uid2) is None
    c.cookies = kept
    assert (await c.get("/console/")).code == 303


@pytest_twisted.ensureDeferred
async def test_other_users_agent_message_and_hold_are_404(api_server_factory):
    """User B's session on user A's agent, message, raw bytes, redeliver and hold → 404, nothing changed."""
    server = await api_server_factory()
    uid_a, key_a = await insert_user_with_key(server.db, "a@example.com")
    _uid_b, key_b = await insert_user_with_key(server.db, "b@example.com")
    agent = await _agent(server, key_a, "alpha")
    mid = await _inbound(server.db, agent, uid_a, "secret plans")
    hold = await _hold(server.db, agent, uid_a, "held plans")
    b = Browserish(server)
    assert (await b.sign_in(key_b)).code == 303
    for path in (f"/console/agents/{agent}", f"/console/agents/{agent}/messages/{mid}",
                 f"/console/agents/{agent}/messages/{mid}/raw", f"/console/approvals/{hold}"):
        r = await b.get(path)
        assert r.code == 404, (path, r.code)
        assert b"secret plans" not in r.body and b"held plans" not in r.body
        assert_headers(r)
    for path in (f"/console/approvals/{hold}/approve", f"/console/approvals/{hold}/reject",
                 f"/console/agents/{agent}/messages/{mid}/redeliver", f"/console/agents/{agent}/settings"):
        r = await b.post(path, {"name": "pwned", "hitl_ttl_seconds": "5"})
        assert r.code == 404, (path, r.code, r.body[:300])
    assert await val(server.db, "SELECT status FROM messages WHERE id = %s", (hold,)) == "pending_approval"
    assert await val(server.db, "SELECT count(*) FROM deliveries") == 0
    assert await val(server.db, "SELECT name FROM agents WHERE id = %s", (agent,)) != "pwned"
    assert b"held plans" not in (await b.get("/console/approvals")).body


@pytest_twisted.ensureDeferred
async def test_attacker_text_is_rendered_inert_on_every_page(api_server_factory):
    """<script>, "><img onerror>, RTL override and a 10,000-character subject: escaped text, no markup."""
    server = await api_server_factory()
    uid, key = await insert_user_with_key(server.db)
    agent = await _agent(server, key, "alpha")
    long_subject = "L" * 10_000
    mids = [await _inbound(server.db, agent, uid, s) for s in [*XSS, long_subject]]
    mids.append(await _inbound(server.db, agent, uid, "html only", html=True))
    holds = [await _hold(server.db, agent, uid, s) for s in [*XSS, long_subject]]
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    pages = ["/console/", f"/console/agents/{agent}", "/console/approvals",
             *(f"/console/agents/{agent}/messages/{m}" for m in mids), *(f"/console/approvals/{h}" for h in holds)]
    for path in pages:
        r = await b.get(path)
        assert r.code == 200, (path, r.code, r.body[:300])
        assert_headers(r)
        elements = parsed(r.body)
        names = [name for name, _attrs in elements]
        assert "img" not in names and "iframe" not in names and "style" not in names, path
        assert [a for _n, a in elements if a.get("src") or a.get("href", "").startswith("javascript")] == [
            {"src": "/console/static/console.js", "defer": "defer"}], path
        assert not [a for _n, attrs in elements for a in attrs if a.startswith("on") or a == "style"], path
        assert names.count("script") == 1
    listing = (await b.get(f"/console/agents/{agent}")).body.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in listing
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in listing or "\"&gt;&lt;img" in listing
    assert "<bdi" in listing and "invoice\u202egnp.exe" in listing  # isolated, not reordering the page
    assert "L" * 10_000 not in listing and "L" * 120 + "…" in listing  # cut in listings
    html_page = (await b.get(f"/console/agents/{agent}/messages/{mids[-1]}")).body.decode()
    assert "&lt;img src=x onerror=alert(4)&gt;" in html_page and "never rendered" in html_page
    detail = (await b.get(f"/console/approvals/{holds[-1]}")).body.decode()
    assert "L" * 10_000 in detail  # the edit form holds it whole
    raw = await b.get(f"/console/agents/{agent}/messages/{mids[0]}/raw")
    assert raw.code == 200 and raw.header("Content-Type") == "application/octet-stream"
    assert raw.header("Content-Disposition", ) == f'attachment; filename="{mids[0]}.eml"'
    assert b"<script>alert(2)</script>" in raw.body


@pytest_twisted.ensureDeferred
async def test_console_reject_and_second_action_shows_409_message(api_server_factory):
    """Reject through HoldReview; acting again on the same hold → 409 shown as a message on the queue page."""
    server = await api_server_factory()
    uid, key = await insert_user_with_key(server.db)
    agent = await _agent(server, key, "alpha")
    hold = await _hold(server.db, agent, uid, "to reject")
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    r = await b.post(f"/console/approvals/{hold}/reject", {"reason": "not today"})
    assert r.code == 303 and r.header("Location") == "/console/approvals?done=rejected"
    row = await server.db.fetchone("SELECT status, rejection_reason FROM messages WHERE id = %s", (hold,))
    assert row["status"] == "rejected" and row["rejection_reason"] == "not today"
    actor = await val(server.db, "SELECT actor FROM approvals WHERE message_id = %s AND action = 'reject'", (hold,))
    assert actor == "console"
    r = await b.post(f"/console/approvals/{hold}/reject", {"reason": "again"})
    assert r.code == 409 and b"no longer" in r.body or b"not pending" in r.body
    assert b"flash error" in r.body and b"<h1>Approvals</h1>" in r.body


@pytest_twisted.ensureDeferred
async def test_login_link_is_shown_on_get_and_used_once_on_post(api_server_factory):
    """GET of the link changes nothing (scanners); POST signs in once; a second use is refused."""
    from datetime import UTC, datetime

    server = await api_server_factory()
    _uid, _key = await insert_user_with_key(server.db, "ops@example.com")
    token = await sessions.create_login_link(server.db, "OPS@example.com", datetime.now(UTC))
    assert token
    b = Browserish(server)
    page = await b.get(f"/console/login?t={token}")
    assert page.code == 200
    assert_headers(page)
    pre = re.search(rb'name="csrf" value="([^"]+)"', page.body).group(1).decode()
    r = await b.request("POST", "/console/login", {"csrf": pre, "t": token})
    assert r.code == 303 and "e2a_console" in b.cookies
    assert (await b.get("/console/")).code == 200
    other = Browserish(server)
    page = await other.get(f"/console/login?t={token}")
    pre = re.search(rb'name="csrf" value="([^"]+)"', page.body).group(1).decode()
    r = await other.request("POST", "/console/login", {"csrf": pre, "t": token})
    assert r.code == 400 and "e2a_console" not in other.cookies


@pytest_twisted.ensureDeferred
async def test_agent_settings_refuse_ssrf_webhook_inline_and_save_valid_settings(api_server_factory):
    """A webhook URL on a private address is refused next to the field with the SSRF reason; valid settings save."""
    server = await api_server_factory()
    uid, key = await insert_user_with_key(server.db)
    agent = await _agent(server, key, "alpha")
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    form = {"name": "Alpha", "agent_mode": "cloud", "webhook_url": "http://169.254.169.254/latest",
            "hitl_ttl_seconds": "600", "hitl_expiration_action": "reject", "hitl_reviewers": ""}
    r = await b.post(f"/console/agents/{agent}/settings", form)
    assert r.code == 400
    assert re.search(rb'<p class="field-error" id="webhook-error" role="alert">[^<]*webhook URL', r.body), r.body
    assert await val(server.db, "SELECT webhook_url FROM agents WHERE id = %s", (agent,)) == ""
    form.update(agent_mode="local", webhook_url="", hitl_enabled="on",
                hitl_reviewers="rev@example.com\nrev2@example.com")
    r = await b.post(f"/console/agents/{agent}/settings", form)
    assert r.code == 303, r.body[:500]
    row = await server.db.fetchone("SELECT name, hitl_enabled, hitl_ttl_seconds FROM agents WHERE id = %s", (agent,))
    assert dict(row) == {"name": "Alpha", "hitl_enabled": True, "hitl_ttl_seconds": 600}


@pytest_twisted.ensureDeferred
async def test_static_assets_and_root_redirect(api_server_factory):
    """/ redirects to /console/; the stylesheet and script are served by the process; unknown pages are HTML 404s."""
    server = await api_server_factory()
    b = Browserish(server)
    r = await b.get("/")
    assert r.code == 302 and r.header("Location") == "/console/"
    r = await b.get("/console/")
    assert r.code == 303 and r.header("Location") == "/console/signin"
    css = await b.get("/console/static/console.css")
    assert css.code == 200 and css.header("Content-Type").startswith("text/css") and b"url(" not in css.body
    js = await b.get("/console/static/console.js")
    assert js.code == 200 and js.header("Content-Type").startswith("text/javascript")
    assert (await b.get("/console/static/nope.js")).code == 404
    _uid, key = await insert_user_with_key(server.db)
    assert (await b.sign_in(key)).code == 303
    r = await b.get("/console/no/such/page")
    assert r.code == 404 and r.header("Content-Type") == "text/html; charset=utf-8"


@pytest_twisted.ensureDeferred
async def test_admin_login_link_prints_a_link_that_signs_in_once(api_server_factory, db_dsn, tmp_path):
    """``e2a-admin login-link --email`` prints public_url + /console/login?t=…; the link signs in."""
    import os
    import subprocess
    import sys

    from twisted.internet import threads

    server = await api_server_factory()
    await insert_user_with_key(server.db, "ops@example.com")
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2A_")}
    env.update(E2A_DATABASE_URL=db_dsn, E2A_DATA_DIR=str(tmp_path / "data"), E2A_PUBLIC_URL="https://e2a.example")

    def run(email: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "e2a.admin", "login-link", "--email", email], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    proc = await threads.deferToThread(run, "OPS@example.com")
    assert proc.returncode == 0, proc.stderr
    m = re.fullmatch(r"https://e2a\.example/console/login\?t=([A-Za-z0-9_\-]+)\n", proc.stdout)
    assert m, proc.stdout
    b = Browserish(server)
    page = await b.get(f"/console/login?t={m.group(1)}")
    pre = re.search(rb'name="csrf" value="([^"]+)"', page.body).group(1).decode()
    r = await b.request("POST", "/console/login", {"csrf": pre, "t": m.group(1)})
    assert r.code == 303 and (await b.get("/console/")).code == 200
    unknown = await threads.deferToThread(run, "nobody@example.com")
    assert unknown.returncode == 2 and "no user" in unknown.stderr


@pytest_twisted.ensureDeferred
async def test_domains_keys_and_agent_creation_go_through_the_api_rules(api_server_factory):
    """Domain add (records shown) / verify without DNS (message) / delete; agent-scoped key shown
    once then revoked; an agent created from the form; the same refusals as the API."""
    server = await api_server_factory()
    uid, key = await insert_user_with_key(server.db)
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    r = await b.post("/console/domains", {"domain": "agents.test"})  # the deployment's shared domain
    assert r.code == 400 and b"reserved" in r.body
    r = await b.post("/console/domains", {"domain": "Example.ORG"})
    assert r.code == 303
    page = (await b.get("/console/domains")).body.decode()
    assert "example.org" in page and "_domainkey.example.org" in page and "v=DMARC1" in page
    assert 'data-copy="rec-0-0"' in page and "hidden" in page
    r = await b.post("/console/domains/example.org/verify", {})
    assert r.code == 400 and b"Not verified: DNS lookup failed" in r.body  # no resolver in this server
    r = await b.post("/console/domains/example.org/delete", {})
    assert r.code == 303 and await val(server.db, "SELECT count(*) FROM domains WHERE user_id = %s", (uid,)) == 0

    r = await b.post("/console/agents", {"slug": "Bad Slug!", "agent_mode": "local"})
    assert r.code == 400 and b"Agent not created" in r.body
    r = await b.post("/console/agents", {"slug": "gamma", "name": "Gamma", "agent_mode": "cloud", "webhook_url": ""})
    assert r.code == 400 and b"webhook" in r.body  # cloud needs a webhook, as in the API
    r = await b.post("/console/agents", {"slug": "gamma", "name": "Gamma", "agent_mode": "local"})
    assert r.code == 303 and r.header("Location") == "/console/agents/gamma@agents.test?done=created"

    r = await b.post("/console/keys", {"name": "bot key", "agent": "gamma@agents.test"})
    assert r.code == 200
    plaintext = re.search(rb'id="new-value">(e2a_[0-9a-f]{64})<', r.body).group(1).decode()
    assert b"agent (gamma@agents.test)" in r.body
    assert plaintext.encode() not in (await b.get("/console/keys")).body  # shown once
    key_id = await val(server.db, "SELECT id FROM api_keys WHERE user_id = %s AND scope = 'agent'", (uid,))
    r = await b.post(f"/console/keys/{key_id}/revoke", {})
    assert r.code == 303
    assert await val(server.db, "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = %s", (key_id,))


@pytest_twisted.ensureDeferred
async def test_approving_an_expired_hold_is_a_409_message(api_server_factory):
    """Approve at or after approval_expires_at → the queue page with the 409 message; the hold stays pending."""
    server = await api_server_factory()
    uid, key = await insert_user_with_key(server.db)
    agent = await _agent(server, key, "alpha")
    hold = await _hold(server.db, agent, uid, "too late", expires_in=-60)
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    assert "expired" in (await b.get("/console/approvals")).body.decode()
    r = await b.post(f"/console/approvals/{hold}/approve", {"subject": "too late"})
    assert r.code == 409 and b"approval window" in r.body and b"<h1>Approvals</h1>" in r.body
    assert await val(server.db, "SELECT status FROM messages WHERE id = %s", (hold,)) == "pending_approval"


@pytest_twisted.ensureDeferred
async def test_every_input_has_a_label_and_the_queue_is_oldest_deadline_first(api_server_factory):
    """Each visible input, select and textarea on every page has a <label for>; holds are listed by deadline."""
    server = await api_server_factory()
    uid, key = await insert_user_with_key(server.db)
    agent = await _agent(server, key, "alpha")
    mid = await _inbound(server.db, agent, uid, "hello")
    late = await _hold(server.db, agent, uid, "second deadline", expires_in=7200)
    soon = await _hold(server.db, agent, uid, "first deadline", expires_in=600)
    b = Browserish(server)
    assert (await b.sign_in(key)).code == 303
    for path in ("/console/", f"/console/agents/{agent}", f"/console/agents/{agent}/messages/{mid}",
                 "/console/approvals", f"/console/approvals/{soon}", "/console/keys", "/console/domains",
                 "/console/account"):
        elements = parsed((await b.get(path)).body)
        labelled = {a.get("for") for n, a in elements if n == "label"}
        fields = [a for n, a in elements if n in ("input", "select", "textarea") and a.get("type") != "hidden"]
        assert all(a.get("id") in labelled for a in fields), (path, fields, labelled)
    queue = (await b.get("/console/approvals")).body.decode()
    assert queue.index(soon) < queue.index(late)
    assert "9 min left" in queue or "10 min left" in queue
