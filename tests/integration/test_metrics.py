"""``GET /metrics`` on the whole service (api.md §3.3): SMTP, HTTP, webhooks, WebSocket, outbound
and HITL driven for real, the exposition parsed with prometheus_client's own parser, every
required series checked to have moved; ``metrics.token`` and ``metrics.enabled`` enforced;
usage events recorded, exported and counted by the deletion when ``usage.tracking`` is on."""

from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from twisted.internet import reactor
from twisted.web import resource, server

from e2a.config import MetricsConfig, UsageConfig, WebhooksConfig
from tests.support import wsclient
from tests.support.hitlstack import AGENT, start_hitl_stack
from tests.support.mail import make_message, send_mail
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

TOKEN = "metrics-scrape-token"

#: api.md §3.3: metric → (type, label names).
REQUIRED = {
    "e2a_smtp_connections": ("counter", {"result"}),
    "e2a_smtp_messages": ("counter", {"result"}),
    "e2a_inbound_stored": ("counter", {"route"}),
    "e2a_webhook_attempts": ("counter", {"outcome"}),
    "e2a_webhook_queue_depth": ("gauge", {"status"}),
    "e2a_outbound_recipients": ("counter", {"route", "outcome"}),
    "e2a_outbound_queue_depth": ("gauge", set()),
    "e2a_websocket_connections": ("gauge", set()),
    "e2a_hitl_pending": ("gauge", set()),
    "e2a_http_requests": ("counter", {"route", "method", "status"}),
    "e2a_http_request_seconds": ("histogram", {"route", "method"}),
}

#: Label values allowed per label (api.md §3.3); ``route`` of HTTP is checked separately.
FIXED = {
    "result": {"accepted", "refused", "rejected", "tempfail"},
    "outcome": {"success", "http_error", "timeout", "connect_error", "blocked", "sent", "deferred", "failed"},
    "status": {"pending", "paused", "1xx", "2xx", "3xx", "4xx", "5xx"},
    "method": {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"},
}


class _Hook(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 - twisted.web API
        self.count += 1
        request.setResponseCode(204)
        return b""


async def _scrape(base: str, token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    resp = await treq.get(base + "/metrics", headers=headers, persistent=False)
    body = await treq.content(resp)
    return resp.code, {k.decode().lower(): v[0].decode() for k, v in resp.headers.getAllRawHeaders()}, body


def _samples(body: bytes) -> dict[str, Any]:
    """{family name: (type, {(sample name, sorted labels): value})} via the library's parser."""
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        out[family.name] = (
            family.type,
            {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples},
        )
    return out


def _total(families: dict[str, Any], name: str, **labels: str) -> float:
    _type, samples = families.get(name, (None, {}))
    suffix = {"counter": "_total", "histogram": "_count"}.get(_type or "", "")
    return sum(
        v for (sample, lab), v in samples.items()
        if sample == name + suffix and all(dict(lab).get(k) == val for k, val in labels.items())
    )


@pytest_twisted.ensureDeferred
async def test_metrics_every_required_series_moves_when_driven(e2a_service_factory):
    """Drive SMTP, HTTP, webhooks, WebSocket, outbound (relay and internal) and HITL; every
    series of api.md §3.3 exists with its type and labels, label values are from the fixed sets,
    and each one moved."""
    stack = await start_hitl_stack(
        e2a_service_factory,
        metrics=MetricsConfig(token=TOKEN),
        webhooks=WebhooksConfig(allow_private=True),
        usage=UsageConfig(tracking=True),
    )
    hook = _Hook()
    site = server.Site(hook)
    site.noisy = False
    hook_port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        code, headers, body = await _scrape(stack.base)
        assert code == 200, body
        assert re.fullmatch(r"text/plain; version=[0-9.]+; charset=utf-8", headers["content-type"])
        before = _samples(body)

        # A cloud agent with a webhook, a local one without HITL, and one whose webhook is paused.
        db = stack.service.db
        hook_url = f"http://127.0.0.1:{hook_port.getHost().port}/hook"
        for slug, mode in (("gamma", "cloud"), ("beta", "local"), ("delta", "cloud")):
            body_json: dict[str, Any] = {"slug": slug, "agent_mode": mode}
            if mode == "cloud":
                body_json["webhook_url"] = hook_url
            r = await stack.api("POST", "/api/v1/agents", body_json)
            assert r.code == 201, r.body
        await db.execute("UPDATE agents SET webhook_status = 'disabled' WHERE id = 'delta@agents.test'")

        # WebSocket: alpha (local) connected while we scrape.
        ws = await wsclient.connect(stack.service.http_port.getHost().port, AGENT, bearer=stack.key)

        # SMTP: one message to gamma (webhook) and delta (paused), one refused at end of DATA.
        smtp_port = stack.service.smtp_port.getHost().port
        message = make_message(from_addr="alice@example.org", to_addr="gamma@agents.test")
        reply = await send_mail(smtp_port, "alice@example.org", ["gamma@agents.test", "delta@agents.test"], message)
        assert reply.code == 250, reply
        bad = await send_mail(smtp_port, "alice@example.org", ["gamma@agents.test"], b"Subject: x\r\n\r\nbare\nLF\r\n")
        assert bad.code == 550, bad

        async def webhook_done() -> bool:
            return hook.count >= 1

        await wait_for(webhook_done, timeout=20)

        # Outbound internal: beta → alpha (no HITL on beta).
        r = await stack.api("POST", "/api/v1/send", {"from": "beta@agents.test", "to": [AGENT], "subject": "hi",
                                                     "body": "internal"})
        assert r.code in (200, 202), r.body

        # HITL: one hold stays pending; another is approved and relayed (bob sent, dave deferred).
        stack.sink.script["RCPT <dave@example.net>"] = ["451 4.3.0 try later"] * 10
        stack.sink.script["RCPT dave@example.net"] = ["451 4.3.0 try later"] * 10
        await stack.hold(subject="stays held")
        released = await stack.hold(subject="approved", to=("bob@example.net", "dave@example.net"))
        r = await stack.api("POST", f"/api/v1/messages/{released}/approve")
        assert r.code == 200, r.body

        async def relayed() -> bool:
            row = await db.fetchone(
                "SELECT count(*) AS n FROM outbound_recipients WHERE message_id = %s AND status IN ('sent', 'deferred')",
                (released,),
            )
            return row["n"] == 2

        await wait_for(relayed, timeout=30)

        # A 404 and a 401 for the HTTP counters' other classes.
        assert (await stack.api("GET", "/api/v1/agents/nobody%40agents.test")).code == 404

        code, _headers, body = await _scrape(stack.base)
        assert code == 200, body
        after = _samples(body)
        await ws.close_and_wait()
    finally:
        await hook_port.stopListening()
        await stack.stop()

    for name, (mtype, labels) in REQUIRED.items():
        assert name in after, name
        ftype, samples = after[name]
        assert ftype == mtype, (name, ftype)
        for (_sample, lab), _v in samples.items():
            names = {k for k, _ in lab} - {"le"}
            assert names == labels, (name, names)
            for k, v in lab:
                if k in FIXED:
                    assert v in FIXED[k], (name, k, v)
                elif k == "route" and name.startswith("e2a_http"):
                    assert v == "unmatched" or (v.startswith("/") and "@" not in v), v
                elif k == "route":
                    assert v in {"smtp", "internal"}, v

    def moved(name: str, **labels: str) -> bool:
        return _total(after, name, **labels) > _total(before, name, **labels)

    assert moved("e2a_smtp_connections", result="accepted")
    assert moved("e2a_smtp_messages", result="accepted")
    assert moved("e2a_smtp_messages", result="rejected")
    assert moved("e2a_inbound_stored", route="smtp")
    assert moved("e2a_inbound_stored", route="internal")
    assert moved("e2a_webhook_attempts", outcome="success")
    assert moved("e2a_webhook_queue_depth", status="paused")
    assert moved("e2a_outbound_recipients", route="smtp", outcome="sent")
    assert moved("e2a_outbound_recipients", route="smtp", outcome="deferred")
    assert moved("e2a_outbound_recipients", route="internal", outcome="sent")
    assert moved("e2a_outbound_queue_depth")
    assert moved("e2a_websocket_connections")
    assert moved("e2a_hitl_pending")
    assert moved("e2a_http_requests", route="/api/v1/send", method="POST", status="2xx")
    assert moved("e2a_http_requests", route="/api/v1/agents/{email}", method="GET", status="4xx")
    assert moved("e2a_http_request_seconds", route="/api/v1/messages/{message_id}/approve", method="POST")
    assert _total(after, "e2a_hitl_pending") == 1
    assert _total(after, "e2a_websocket_connections") == 1
    # No address, domain or id anywhere in the exposition.
    assert b"@" not in body and b"msg_" not in body and b"agents.test" not in body

    # usage.tracking: gamma + delta (SMTP) + alpha (internal) copies, beta's send and the release.
    export = (await stack.api("GET", "/api/v1/users/me/export")).json()
    events = sorted((e["direction"], e["event_type"], e["agent_id"]) for e in export["usage_events"])
    assert events == [
        ("inbound", "message_received", "alpha@agents.test"),
        ("inbound", "message_received", "delta@agents.test"),
        ("inbound", "message_received", "gamma@agents.test"),
        ("outbound", "message_sent", "alpha@agents.test"),
        ("outbound", "message_sent", "beta@agents.test"),
    ]
    assert all(e["id"].startswith("ue_") and e["domain"] == "agents.test" for e in export["usage_events"])
    deleted = (await stack.api("DELETE", "/api/v1/users/me?confirm=DELETE")).json()
    assert deleted["usage_events_deleted"] == 5


@pytest_twisted.ensureDeferred
async def test_metrics_token_enforced_when_set(e2a_service_factory):
    """With metrics.token: no or a wrong bearer → 401 text/plain; the right one → 200."""
    service = await e2a_service_factory(metrics=MetricsConfig(token=TOKEN))
    base = f"http://127.0.0.1:{service.http_port.getHost().port}"
    for token in (None, "wrong", TOKEN + "x"):
        code, headers, body = await _scrape(base, token)
        assert code == 401 and headers["content-type"].startswith("text/plain"), (token, code, body)
        assert b"e2a_" not in body
    code, _headers, body = await _scrape(base)
    assert code == 200 and b"e2a_smtp_connections_total" in body


@pytest_twisted.ensureDeferred
async def test_metrics_404_when_disabled_and_open_without_token(e2a_service_factory):
    """metrics.enabled false → 404; enabled without a token → 200 without any Authorization."""
    off = await e2a_service_factory(metrics=MetricsConfig(enabled=False))
    code, _h, _b = await _scrape(f"http://127.0.0.1:{off.http_port.getHost().port}", None)
    assert code == 404
    on = await e2a_service_factory()
    code, _h, body = await _scrape(f"http://127.0.0.1:{on.http_port.getHost().port}", None)
    assert code == 200 and b"e2a_hitl_pending" in body


@pytest_twisted.ensureDeferred
async def test_usage_events_absent_when_tracking_off(e2a_service_factory):
    """usage.tracking false (default): an internal send records nothing; export omits the list."""
    stack = await start_hitl_stack(e2a_service_factory)
    try:
        r = await stack.api("POST", "/api/v1/agents", {"slug": "beta", "agent_mode": "local"})
        assert r.code == 201, r.body
        r = await stack.api("POST", "/api/v1/send", {"from": "beta@agents.test", "to": [AGENT], "subject": "hi",
                                                     "body": "internal"})
        assert r.code in (200, 202), r.body
        export = (await stack.api("GET", "/api/v1/users/me/export")).json()
        assert "usage_events" not in export
        assert len(export["messages"]) >= 2
    finally:
        await stack.stop()
