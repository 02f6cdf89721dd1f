"""Attacker's encodings in every path and query value (API, console, metrics, OpenAPI, magic
links): %00, overlong UTF-8 (%C0%80), invalid UTF-8, %2F, CR/LF. None may become a 500 or put
database or driver text in a response."""

from __future__ import annotations

import json
import re
from urllib.parse import urlencode

import pytest_twisted
import treq

from e2a.store import accounts

AGENT = "alpha@agents.test"
MSG = "msg_" + "0" * 32
KEY = "apk_" + "0" * 32
SEC = "wsec_" + "0" * 32
BAD = ["%00", "%C0%80", "%E0%80%80", "%FF", "%ED%A0%80", "%2F", "%0D%0A", "%C0%AF", "%25%30%30"]

API_TEMPLATES = [
    ("GET", "/api/v1/agents/{x}"), ("PUT", "/api/v1/agents/{x}"), ("DELETE", "/api/v1/agents/{x}"),
    ("GET", "/api/v1/agents/a{x}b@agents.test"), ("GET", "/api/v1/agents/alpha@agents.test{x}"),
    ("GET", "/api/v1/agents/alpha@agents{x}.test/messages"),
    ("GET", "/api/v1/agents/{x}/messages"), ("GET", "/api/v1/agents/{x}/deliveries"),
    ("POST", "/api/v1/agents/{x}/test"), ("GET", "/api/v1/agents/{x}/ws"),
    ("GET", f"/api/v1/agents/{AGENT}/messages/{{x}}"), ("GET", f"/api/v1/agents/{AGENT}/messages/{MSG}{{x}}"),
    ("POST", f"/api/v1/agents/{AGENT}/messages/{MSG}{{x}}/reply"),
    ("POST", f"/api/v1/agents/{AGENT}/messages/{MSG}{{x}}/redeliver"),
    ("GET", f"/api/v1/agents/{AGENT}/messages?status={{x}}"), ("GET", f"/api/v1/agents/{AGENT}/messages?token={{x}}"),
    ("GET", f"/api/v1/agents/{AGENT}/messages?page_size={{x}}"),
    ("GET", f"/api/v1/agents/{AGENT}/messages/{MSG}?mark_read={{x}}"),
    ("GET", f"/api/v1/agents/{AGENT}/deliveries?status={{x}}"), ("GET", f"/api/v1/agents/{AGENT}/deliveries?token={{x}}"),
    ("GET", f"/api/v1/agents/{AGENT}/deliveries?message_id={{x}}"),
    ("GET", f"/api/v1/agents/{AGENT}/deliveries?page_size={{x}}"),
    ("GET", f"/api/v1/agents/{AGENT}/ws?token={{x}}"),
    ("GET", "/api/v1/messages?status={x}"), ("GET", "/api/v1/messages?page_size={x}"),
    ("GET", "/api/v1/messages?token={x}"),
    ("GET", f"/api/v1/messages/{MSG}{{x}}"), ("POST", f"/api/v1/messages/{MSG}{{x}}/approve"),
    ("POST", f"/api/v1/messages/{MSG}{{x}}/reject"),
    ("DELETE", f"/api/v1/keys/{KEY}{{x}}"), ("DELETE", f"/api/v1/users/me/signing-secrets/{SEC}{{x}}"),
    ("POST", "/api/v1/domains/a{x}b.example/verify"), ("DELETE", "/api/v1/domains/a{x}b.example"),
    ("GET", "/api/v1/domains?page_size={x}"), ("GET", "/api/v1/agents?page_size={x}"),
    ("GET", "/api/v1/agents?token={x}"), ("GET", "/api/v1/keys?token={x}"),
    ("DELETE", "/api/v1/users/me?confirm={x}"),
    ("GET", "/api/v1/approve?t={x}"), ("GET", "/api/v1/reject?t={x}"),
    ("POST", "/api/v1/approve?t={x}"), ("POST", "/api/v1/reject?t={x}"),
    ("GET", "/metrics?x={x}"), ("GET", "/api/openapi.json?x={x}"), ("GET", "/api/health?x={x}"),
    ("GET", "/api/ready?x={x}"), ("GET", "/api/v1/{x}"), ("GET", "/{x}"),
]
CONSOLE_TEMPLATES = [
    ("GET", "/console/agents/{x}"), ("GET", "/console/agents/a{x}b@agents.test"),
    ("GET", f"/console/agents/{AGENT}{{x}}"),
    ("GET", f"/console/agents/{AGENT}/messages/{MSG}{{x}}"), ("GET", f"/console/agents/{AGENT}/messages/{MSG}{{x}}/raw"),
    ("GET", f"/console/approvals/{MSG}{{x}}"), ("GET", "/console/static/{x}"), ("GET", "/console/{x}"),
    ("GET", "/console/?done={x}"), ("GET", "/console/login?t={x}"), ("GET", "/console/keys?done={x}"),
    ("GET", f"/console/agents/{AGENT}?done={{x}}"),
]
CONSOLE_POSTS = [
    f"/console/agents/{AGENT}{{x}}/settings", f"/console/agents/{AGENT}/messages/{MSG}{{x}}/redeliver",
    f"/console/approvals/{MSG}{{x}}/approve", f"/console/approvals/{MSG}{{x}}/reject",
    f"/console/keys/{KEY}{{x}}/revoke", f"/console/secrets/{SEC}{{x}}/revoke",
    "/console/domains/a{x}b.example/verify", "/console/domains/a{x}b.example/delete",
]
LEAKS = [b"psycopg", b"NUL", b"0x00", b"Traceback", b"invalid byte sequence", b"syntax error", b"postgres"]


def _bad(resp_code: int, body: bytes) -> bool:
    return resp_code >= 500 or any(leak in body for leak in LEAKS)


async def _req(base: str, method: str, path: str, headers: dict[str, str], data: bytes | None = None) -> tuple[int, bytes]:
    resp = await treq.request(method, base + path, headers=headers, data=data, persistent=False, allow_redirects=False)
    return resp.code, await treq.content(resp)


@pytest_twisted.ensureDeferred
async def test_hostile_encodings_in_paths_and_queries_never_500(e2a_service_factory):
    """%00, overlong and invalid UTF-8, %2F and CRLF in every path/query value: no 500, no leak."""
    service = await e2a_service_factory()
    boot = await accounts.bootstrap(service.db, service.master_key, "owner@example.com")
    base = f"http://127.0.0.1:{service.http_port.getHost().port}"
    auth = {"Authorization": f"Bearer {boot.api_key_plaintext}"}
    code, body = await _req(base, "POST", "/api/v1/agents", {**auth, "Content-Type": "application/json"},
                            json.dumps({"slug": "alpha", "agent_mode": "local", "name": "a"}).encode())
    assert code == 201, body
    broken = []
    for method, template in API_TEMPLATES:
        for x in BAD:
            path = template.replace("{x}", x)
            code, body = await _req(base, method, path, auth)
            if _bad(code, body):
                broken.append((method, path, code, body[:200]))
    # the console, signed in
    cookies: dict[str, str] = {}

    async def creq(method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, bytes]:
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
        data = None
        if form is not None:
            data = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        resp = await treq.request(method, base + path, data=data, headers=headers, persistent=False,
                                  allow_redirects=False)
        for raw in resp.headers.getRawHeaders("set-cookie") or []:
            name, _, rest = raw.partition("=")
            cookies[name] = rest.split(";", 1)[0]
        return resp.code, await treq.content(resp)

    _, page = await creq("GET", "/console/signin")
    pre = re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()
    code, _ = await creq("POST", "/console/signin", {"csrf": pre, "key": boot.api_key_plaintext})
    assert code == 303
    _, page = await creq("GET", "/console/")
    csrf = re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()
    for method, template in CONSOLE_TEMPLATES:
        for x in BAD:
            path = template.replace("{x}", x)
            code, body = await creq(method, path)
            if _bad(code, body):
                broken.append((method, path, code, body[:200]))
    for template in CONSOLE_POSTS:
        for x in BAD:
            path = template.replace("{x}", x)
            code, body = await creq("POST", path, {"csrf": csrf})
            if _bad(code, body):
                broken.append(("POST", path, code, body[:200]))
    # console forms with NUL / lone surrogates in their values
    for path, form in [
        ("/console/agents", {"slug": "a\x00b", "name": "n", "agent_mode": "local"}),
        ("/console/agents", {"slug": "gamma", "name": "n\x00", "agent_mode": "local"}),
        ("/console/agents", {"slug": "gamma", "name": "n", "agent_mode": "loc\x00al"}),
        ("/console/agents", {"slug": "gamma", "name": "n", "agent_mode": "local", "domain": "a\x00.test"}),
        ("/console/keys", {"name": "k\x00", "scope": "user"}),
        ("/console/keys", {"name": "k", "agent": "a\x00@agents.test"}),
        ("/console/secrets", {"name": "s\x00"}),
        ("/console/domains", {"domain": "a\x00b.example"}),
        (f"/console/agents/{AGENT}/settings", {"name": "x\x00", "webhook_url": "http://a\x00.example/"}),
        ("/console/signin", {"csrf": pre, "key": "e2a_\x00"}),
        ("/console/login", {"csrf": pre, "t": "\x00"}),
    ]:
        form = {"csrf": csrf, **form} if "csrf" not in form else form
        code, body = await creq("POST", path, form)
        if _bad(code, body):
            broken.append(("POST", path, form, code, body[:200]))
    # raw bytes in forms that do not decode as UTF-8
    for path in ("/console/agents", "/console/keys", "/console/domains", "/console/secrets"):
        data = f"csrf={csrf}&slug=%C0%80&name=%FF&domain=%ED%A0%80&agent=%C0%80&scope=%FF".encode()
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items()),
                   "Content-Type": "application/x-www-form-urlencoded"}
        code, body = await _req(base, "POST", path, headers, data)
        if _bad(code, body):
            broken.append(("POST raw", path, code, body[:200]))
    assert broken == []


@pytest_twisted.ensureDeferred
async def test_hostile_encodings_in_magic_link_forms_never_500(e2a_service_factory):
    """POSTed magic-link forms with NUL / invalid UTF-8 in the token: a page, never a 500."""
    service = await e2a_service_factory()
    base = f"http://127.0.0.1:{service.http_port.getHost().port}"
    broken = []
    for path in ("/api/v1/approve", "/api/v1/reject"):
        for data in (b"t=%00", b"t=a%00b&reason=%00", b"t=%C0%80", b"t=%FF&csrf=%00", b"%00=%00"):
            code, body = await _req(base, "POST", path, {"Content-Type": "application/x-www-form-urlencoded"}, data)
            if _bad(code, body):
                broken.append((path, data, code, body[:200]))
    assert broken == []
