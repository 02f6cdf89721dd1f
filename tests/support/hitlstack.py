"""A whole e2a service with a HITL agent, a local SMTP sink as upstream relay and a local DNS
zone, for the magic-link page, notification and browser tests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import treq

from twisted.internet import reactor

from e2a.config import DnsConfig, HitlConfig, HttpConfig, OutboundSmtpConfig, SigningConfig
from e2a.outbound.magiclink import ApprovalTokens
from e2a.store import accounts
from tests.support.apiserver import Response
from tests.support.dnsserver import start_dns_server
from tests.support.smtpsink import start_smtp_sink

HMAC_SECRET = "magic-link-test-secret-0123456789abcdef"
PUBLIC_URL = "http://e2a.test"
AGENT = "alpha@agents.test"
OWNER = "owner@example.com"
MAIL_DOMAIN = "mx.e2a.test"  # M: the conftest service's smtp.domain

PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


def assert_page(resp: Response, status: int, *texts: str) -> str:
    """``resp`` is a magic-link page with ``status``, every security header, no script and no
    external resource, and contains each of ``texts``; returns the body as text."""
    assert resp.code == status, (resp.code, resp.body[:500])
    for name, value in PAGE_HEADERS.items():
        assert resp.header(name) == value, (name, resp.header(name))
    body = resp.body.decode("utf-8")
    tags = " ".join(re.findall(r"<[^>]*>", body)).lower()  # markup only: escaped text is not markup
    for banned in ("<script", "src=", "href=", "<link", "<iframe", "<img", "<object", "<embed", "javascript:"):
        assert banned not in tags, banned
    for style in re.findall(r"<style>(.*?)</style>", body, re.S):
        assert "url(" not in style and "@import" not in style
    for text in texts:
        assert text in body, (text, body)
    return body


@dataclass
class HitlStack:
    service: Any
    sink: Any
    dns: Any
    key: str
    user_id: str
    tokens: ApprovalTokens
    base: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    async def api(self, method: str, path: str, body: Any = None) -> Response:
        data = None if body is None else json.dumps(body).encode()
        resp = await treq.request(
            method, self.base + path, data=data, headers={"Authorization": f"Bearer {self.key}"}, persistent=False
        )
        return Response(resp.code, resp.headers, await treq.content(resp))

    async def page(self, method: str, path: str, form: dict[str, str] | bytes | None = None,
                   headers: dict[str, str] | None = None) -> Response:
        """A magic-link request: ``path`` may hold a query; ``form`` is url-encoded as the body."""
        h = dict(headers or {})
        data = None
        if form is not None:
            data = form if isinstance(form, bytes) else urlencode(form).encode()
            h.setdefault("Content-Type", "application/x-www-form-urlencoded")
        resp = await treq.request(method, self.base + path, data=data, headers=h, persistent=False)
        return Response(resp.code, resp.headers, await treq.content(resp))

    def local(self, public_link: str) -> str:
        """Path and query of a link minted for ``http.public_url`` (served here on 127.0.0.1)."""
        parts = urlsplit(public_link)
        return parts.path + ("?" + parts.query if parts.query else "")

    async def hold(self, subject: str = "Quarterly numbers", body: str = "Hello Bob,\nthe numbers.",
                   to: tuple[str, ...] = ("bob@example.net",), **extra: Any) -> str:
        resp = await self.api("POST", "/api/v1/send", {"from": AGENT, "to": list(to), "subject": subject,
                                                       "body": body, **extra})
        assert resp.code == 202, resp.body
        return resp.json()["message_id"]

    async def status(self, message_id: str) -> str:
        row = await self.service.db.fetchone("SELECT status FROM messages WHERE id = %s", (message_id,))
        return row["status"]

    async def stop(self) -> None:
        await self.sink.stop()
        await self.dns.stop()


async def start_hitl_stack(
    e2a_service_factory: Any, *, relay: bool = True, public_url: str = PUBLIC_URL, agent: dict[str, Any] | None = None,
    **overrides: Any,
) -> HitlStack:
    """Service (``relay``: upstream relay = the sink), owner + bootstrap key, agent ``alpha``
    with HITL on (``agent``: more agent settings), DNS zone publishing M's DKIM key."""
    sink = await start_smtp_sink(reactor)
    dns = await start_dns_server(reactor, {})
    config: dict[str, Any] = {
        "dns": DnsConfig(nameservers=tuple(f"127.0.0.1:{p}" for _h, p in dns.nameservers), timeout=2),
        "http": HttpConfig(listen_addr="127.0.0.1:0", public_url=public_url),
        "signing": SigningConfig(hmac_secret=HMAC_SECRET),
        "hitl": HitlConfig(sweep_interval=3600),  # the expiry worker stays out of these tests
    }
    if relay:
        config["outbound_smtp"] = OutboundSmtpConfig(host="127.0.0.1", port=sink.port, tls="none")
    config.update(overrides)
    service = await e2a_service_factory(**config)
    boot = await accounts.bootstrap(service.db, service.master_key, OWNER)
    stack = HitlStack(service, sink, dns, boot.api_key_plaintext, boot.user.id,
                      ApprovalTokens(HMAC_SECRET, service.config.hitl.token_grace))
    stack.base = f"http://127.0.0.1:{service.http_port.getHost().port}"
    r = await stack.api("POST", "/api/v1/agents", {"slug": AGENT.split("@")[0], "agent_mode": "local"})
    assert r.code == 201, r.body
    settings = {"hitl_enabled": True, **(agent or {})}
    r = await stack.api("PUT", f"/api/v1/agents/{AGENT}", settings)
    assert r.code == 200, r.body
    await publish_dkim_key(stack)
    return stack


async def publish_dkim_key(stack: HitlStack) -> None:
    """M's deployment key (created at start) as ``<selector>._domainkey.M`` in the DNS zone."""
    from twisted.internet import threads

    from e2a.outbound.dkimsign import public_key_b64, thd_load_deployment_key

    config = stack.service.config
    selector, pem = await threads.deferToThread(
        thd_load_deployment_key, config.data_dir, config.mail_domain, config.dkim.keys, config.dkim.selector
    )
    stack.dns.add(f"{selector}._domainkey.{config.mail_domain}", "TXT", f"v=DKIM1; k=rsa; p={public_key_b64(pem)}")


LINK_RE = re.compile(r"https?://[^\s\"<>]+/api/v1/(approve|reject)\?t=[A-Za-z0-9_.\-]+")


def links_in(text: str) -> dict[str, str]:
    """{action: url} of the magic links in a notification part."""
    return {m.group(1): m.group(0) for m in LINK_RE.finditer(text)}


class StackServer:
    """The ``url()`` a browser helper needs, for a whole service started by the HITL stack."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack

    def url(self, path: str) -> str:
        return self.stack.base + path
